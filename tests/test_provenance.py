"""A stage's outputs record the settings they were made with; a run with other settings
(of the stage or of anything upstream) is an error naming the keys, the same settings
pass, and settings that only change how a run is laid out or saved are not compared."""

import json
import os

import pytest

from rlhf_jax import config_lib, pipeline, provenance
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import registry

RUNLOCAL = "configs/default.py:runlocal"


def _config(*overrides):
  return config_lib.get(RUNLOCAL, [o.split("=", 1) for o in overrides])


def test_dependencies_are_the_stage_its_inputs_and_the_common_settings(repo_root):
  deps = provenance.dependencies(_config())
  ppo, sft = deps["ppo"], deps["sft"]
  for key in ("ppo.kl_coef", "ppo.optim.lr", "sft.optim.lr", "rm.optim.lr", "seed"):
    assert key in ppo, key
  assert "model.d_model" in sft and "world.num_labelers" in sft
  assert "ppo.kl_coef" not in sft and "rm.optim.lr" not in sft
  # Layout and saving do not change what is computed; the guard and eval are not stages.
  assert not any(k.startswith(("mesh.", "guard.", "eval.")) for k in ppo)
  assert not any(k.endswith((".save_every", ".keep_checkpoints")) for k in ppo)
  # As JSON stores it, so a recorded value compares equal to a fresh one.
  assert json.loads(json.dumps(deps)) == deps


def test_differences_name_every_changed_key_and_ignore_added_ones():
  assert provenance.differences({"a.b": 1, "c": [1, 2]}, {"a.b": 1, "c": [1, 2]}) == []
  assert provenance.differences({"a.b": 1, "c": 2}, {"a.b": 3, "c": 2, "new": 0}) == [
    "config.a.b: 1 there, 3 now"
  ]
  assert provenance.differences({"gone": 1, "c": "x"}, {"c": "y"}) == [
    "config.c: 'x' there, 'y' now"
  ]


def _checkpoint(workdir, stage, step=5):  # what a killed run leaves to resume from
  os.makedirs(os.path.join(workdir, stage, "checkpoints", str(step)))


def test_check_and_record(tmp_path, repo_root):
  workdir = str(tmp_path)
  sft, ppo = registry.get("sft"), registry.get("ppo")
  base = _config()
  provenance.record(sft, base, workdir)
  with open(os.path.join(workdir, "sft", provenance.RECORD)) as f:
    assert json.load(f)["fingerprint"] == provenance.fingerprints(base)["sft"]
  # Nothing to resume or reuse yet (say the run stopped on a bad data file): another
  # config runs, and its settings replace the record.
  provenance.check(sft, _config("seed=3"), workdir)
  _checkpoint(workdir, "sft")
  provenance.check(sft, base, workdir)  # the same settings pass
  provenance.check(sft, _config("ppo.kl_coef=0.5", "sft.save_every=7", "mesh.data=1"), workdir)
  with pytest.raises(UserInputError) as e:
    provenance.check(sft, _config("sft.optim.lr=0.5", "seed=3"), workdir)
  msg = str(e.value)
  assert "\n" not in msg and f"{workdir}/sft: made with other settings" in msg
  assert "config.seed: 0 there, 3 now" in msg and "config.sft.optim.lr: " in msg
  assert "new --workdir" in msg
  # A directory holding outputs keeps its record...
  provenance.record(sft, _config("seed=3"), workdir)
  with pytest.raises(UserInputError, match="config.seed: 0 there, 3 now"):
    provenance.check(sft, _config("seed=3"), workdir)
  # ... and one written before records existed is neither given one nor checked.
  _checkpoint(workdir, "ppo")
  provenance.record(ppo, base, workdir)
  assert not os.path.exists(os.path.join(workdir, "ppo", provenance.RECORD))
  provenance.check(ppo, _config("ppo.kl_coef=0.5"), workdir)


def test_a_finished_stage_is_checked(tmp_path, repo_root):
  workdir = str(tmp_path)
  rm = registry.get("rm")
  provenance.record(rm, _config(), workdir)
  with open(os.path.join(workdir, "rm", "params.json"), "w") as f:
    json.dump({"model": {}}, f)
  assert provenance.has_outputs(rm, workdir)
  with pytest.raises(UserInputError, match=r"/rm: made with other settings \(config.rm.optim.lr"):
    provenance.check(rm, _config("rm.optim.lr=0.5"), workdir)


def test_pipeline_checks_every_stage_before_running_any(tmp_path, repo_root):
  workdir = str(tmp_path)
  provenance.record(registry.get("rm"), _config(), workdir)
  _checkpoint(workdir, "rm")
  before = sorted(os.listdir(workdir))
  with pytest.raises(UserInputError, match=r"/rm: made with other settings \(config.rm.optim.lr"):
    pipeline.run(_config("rm.optim.lr=0.5"), workdir)
  assert sorted(os.listdir(workdir)) == before  # nothing ran (not even the data stage)


def test_a_stage_checks_the_stages_it_reads(tmp_path, repo_root):
  workdir = str(tmp_path)
  provenance.record(registry.get("sft"), _config(), workdir)
  _checkpoint(workdir, "sft")
  with pytest.raises(UserInputError, match=r"/sft: made with other settings \(config.sft.num_"):
    pipeline.run_stage(registry.get("rm"), _config("sft.num_epochs=9"), workdir)
  assert sorted(os.listdir(workdir)) == ["sft"]
