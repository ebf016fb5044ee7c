"""A new stage is one module plus one registry entry.

This test module is the toy stage's module: `train_and_evaluate` below exports the SFT
policy scaled by `config.toy.scale`. Registered here (and nowhere else), it runs in the
pipeline after the stages it reads, gets a sweep fingerprint, is a subcommand, is scored
by evaluation and listed in the report, and is served by `sample --policy` — without a
line of any other file naming it.
"""

import io
import json
import os
import sys

import jax
import ml_collections
import pytest
from test_evaluate import fake_run, make_config

from rlhf_jax import cli, config_lib, evaluate, pipeline, provenance, report, sweep
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import abstract_params
from rlhf_jax.stages import common, registry
from rlhf_jax.train import checkpoints

TOY = registry.Stage(
  "toy",
  __name__,
  "export the SFT policy scaled by config.toy.scale (a test stage)",
  reads=("data", "sft"),
  title="Toy method",
)
RUNS = []  # (workdir, scale) of every toy run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The toy method: SFT's parameters x `config.toy.scale`, exported as its own policy."""
  if common.is_complete(workdir, TOY.name):
    return checkpoints.params_info(common.stage_dir(workdir, TOY.name))["metrics"]
  scale = config[TOY.name].scale
  RUNS.append((workdir, scale))
  sft_dir = registry.get(TOY.reads[-1]).directory(workdir)
  like = abstract_params(config.model)
  params = checkpoints.load_params(sft_dir, like, config.model.to_dict())
  params = jax.tree.map(lambda x: x * scale, params)
  metrics = {"toy/scale": scale, "wall_seconds": 0.5}
  out = common.stage_dir(workdir, TOY.name)
  checkpoints.export_params(out, params, config.model.to_dict(), stage=TOY.name, metrics=metrics)
  return metrics


def toy_config(scale: float = 1.0) -> ml_collections.ConfigDict:
  config = make_config()
  with config.unlocked():
    config[TOY.name] = ml_collections.ConfigDict({"scale": scale, "batch_size": 8})
  return config


@pytest.fixture
def toy():
  registry.register(TOY)
  yield TOY
  registry.unregister(TOY.name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A work directory with every real stage complete (random-init exports)."""
  wd = str(tmp_path_factory.mktemp("toy") / "run")
  fake_run(wd, make_config())
  os.makedirs(f"{wd}/comparisons")
  with open(f"{wd}/comparisons/DONE", "w") as f:
    json.dump({"fingerprint": {}, "summary": {"wall_seconds": 1.0}}, f)
  return wd


def test_the_registry_orders_the_recipe():
  names = registry.names()
  assert names[0] == "data" and registry.reference().policy == "sft"
  for s in registry.stages():  # every stage after what it reads
    assert all(names.index(r) < names.index(s.name) for r in s.reads), s.name
  assert [n for n, _ in pipeline.steps()] == [*names, registry.EVAL]
  with pytest.raises(ValueError, match="unregistered"):
    registry.register(registry.Stage("late", __name__, "?", reads=("nothing",)))
  with pytest.raises(ValueError, match="reference policy already"):
    registry.register(registry.Stage("ref2", __name__, "?", reference=True))


def test_toy_stage_runs_in_the_pipeline_and_is_evaluated(toy, workdir, capsys):
  summary = pipeline.run(toy_config(), workdir)
  out = capsys.readouterr().out
  n = sum(s.active(toy_config()) for s in registry.stages()) + 1  # (+ eval; rounds: off)
  assert f"[{n - 1}/{n}] toy ..." in out and "ppo_ptx: complete, skipped" in out
  assert RUNS == [(workdir, 1.0)]
  assert "toy" in evaluate.available_policies(workdir)
  toy_row = summary["policies"]["toy"]
  # SFT's own parameters: the same replies (one seed for every policy), no KL
  assert toy_row["kl_to_sft"] == 0.0 and toy_row["winrate_vs_sft"] == 0.5
  assert toy_row["stage"] == "toy" and summary["wall_seconds"]["toy"] > 0
  assert "Toy method" in report.summary_table(summary)
  with open(f"{workdir}/report.md") as f:
    assert "| Toy method " in f.read()
  pipeline.run(toy_config(), workdir, only=("toy",))  # complete: skipped
  assert RUNS == [(workdir, 1.0)] and "toy: complete, skipped" in capsys.readouterr().out


def test_toy_stage_has_a_sweep_fingerprint_of_what_it_reads(toy):
  base = provenance.fingerprints(toy_config(1.0))
  scaled = provenance.fingerprints(toy_config(2.0))
  assert set(base) == set(registry.names())
  assert {k for k in base if base[k] != scaled[k]} == {"toy"}
  other_sft = toy_config()
  with other_sft.unlocked():
    other_sft.sft.num_epochs = 7
  changed = {k for k, v in provenance.fingerprints(other_sft).items() if v != base[k]}
  assert "toy" in changed and "pretrain" not in changed
  assert sweep.needed_stages(["toy"]) == ("data", "pretrain", "sft", "toy", registry.EVAL)


def test_toy_stage_is_a_subcommand_a_policy_and_validated(toy, workdir):
  args = cli.build_parser().parse_args(["toy", "--config", "c.py", "--workdir", "w"])
  assert args.command == "toy"
  out = io.StringIO()
  sys_stdout, sys.stdout = sys.stdout, out
  try:
    argv = ["sample", "--workdir", workdir, "--policy", "toy", "--prompt", "hi"]
    assert cli.main([*argv, "--max-new-tokens", "4"]) == 0
  finally:
    sys.stdout = sys_stdout
  assert "User: hi" in out.getvalue() and "Assistant:" in out.getvalue()
  assert "toy" in cli.export_choices()
  bad = toy_config()
  with bad.unlocked():
    bad.toy.batch_size = 0
  with pytest.raises(UserInputError, match=r"config\.toy\.batch_size: must be > 0"):
    config_lib.validate(bad)


def test_an_unregistered_stage_is_gone_everywhere():
  assert "toy" not in registry.names() and "toy" not in registry.policies()
  with pytest.raises(UserInputError, match="invalid choice: 'toy'"):
    cli.build_parser().parse_args(["toy", "--config", "c.py", "--workdir", "w"])
