"""Comparisons stage: sampled K in range, valid rankings, loadable, deterministic, skipped
when done, user data instead of sampling, clear errors."""

import json
import os
import shutil

import jax
import pytest

from rlhf_jax import config_lib, pipeline
from rlhf_jax.data import prepare, user_data
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import TransformerConfig, init_params
from rlhf_jax.stages import comparisons, registry, rm
from rlhf_jax.train import checkpoints


def make_config(overrides=()):
  """The runlocal config (one layer, to compile fast) with the comparisons / rm sections
  (added if the config lacks them), then `overrides` applied."""
  config = config_lib.get("configs/default.py:runlocal", [("model.n_layers", "1")])
  with config.unlocked():
    if "comparisons" not in config:
      config.comparisons = comparisons.comparisons_config(runlocal=True)
    if "rm" not in config:
      config.rm = rm.rm_config(runlocal=True)
  for key, value in overrides:
    config_lib.apply_override(config, key, value)
  return config


def prepare_workdir(workdir: str, config) -> None:
  """The runlocal world's datasets + tokenizer and a random-init "SFT" export."""
  prepare.prepare(config, workdir)
  params, _ = init_params(TransformerConfig.from_config(config.model), jax.random.PRNGKey(0))
  checkpoints.export_params(f"{workdir}/sft", params, config.model.to_dict(), stage="sft")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("cmp"))
  config = make_config()
  prepare_workdir(d, config)
  pipeline.run_stage(registry.get("comparisons"), config, d)
  return d


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_rankings_are_well_formed_and_load(workdir):
  config = make_config()
  lo, hi = config.world.rank_k_min, config.world.rank_k_max
  with open(os.path.join(workdir, "comparisons", "DONE")) as f:
    summary = json.load(f)["summary"]
  for split, n_prompts in (("train", 32), ("validation", 16)):
    records = _read(comparisons.output_path(workdir, split))
    assert summary[f"comparisons/{split}"] == len(records)
    assert summary[f"comparisons/{split}_prompts"] == n_prompts
    empty = summary[f"comparisons/{split}_empty_responses"]
    empty += summary[f"comparisons/{split}_duplicate_responses"]  # (dropped alike)
    assert (
      sum(len(r["responses"]) for r in records) + empty
      == (summary[f"comparisons/{split}_responses"])
    )
    for r in records:
      k = len(r["responses"])
      assert (lo <= k <= hi) if not empty else (2 <= k <= hi)
      assert sorted(r["ranking"]) == list(range(k))
      assert r["messages"][-1]["role"] == "user"
      assert set(r) >= {"messages", "responses", "ranking", "labeler_id", "family", "task"}
      assert 0 <= r["labeler_id"] < config.world.num_labelers
      assert r["task"]["family"] == r["family"]
    # The user-rankings loader reads it and keeps the extra keys (the RM needs `task`).
    loaded = user_data.load_rankings(comparisons.output_path(workdir, split)).records
    assert [x["task"] for x in loaded] == [r["task"] for r in records]
  assert len(comparisons.load(workdir, "train")) == summary["comparisons/train"]


def test_deterministic_per_seed_and_skipped_when_done(workdir):
  config = make_config()
  first = {s: _read(comparisons.output_path(workdir, s)) for s in comparisons.SPLITS}
  # Done: a re-run skips (files untouched).
  mtime = os.path.getmtime(comparisons.output_path(workdir, "train"))
  comparisons.train_and_evaluate(config, workdir)
  assert os.path.getmtime(comparisons.output_path(workdir, "train")) == mtime
  # Another config never overwrites what is there.
  # (the pipeline and every command check a stage's settings before running it)
  stage = registry.get("comparisons")
  with pytest.raises(
    UserInputError, match=r"made with other settings \(config.seed: 0 there, 1 now"
  ):
    pipeline.run_stage(stage, make_config([("seed", "1")]), workdir)
  # From scratch again: identical files; another seed: different samples.
  out = os.path.join(workdir, "comparisons")
  shutil.move(out, out + ".first")
  comparisons.train_and_evaluate(config, workdir)
  again = {s: _read(comparisons.output_path(workdir, s)) for s in comparisons.SPLITS}
  assert again == first
  shutil.rmtree(out)
  comparisons.train_and_evaluate(make_config([("seed", "1")]), workdir)
  other = _read(comparisons.output_path(workdir, "train"))
  assert [r["responses"] for r in other] != [r["responses"] for r in first["train"]]
  shutil.rmtree(out)
  shutil.move(out + ".first", out)


def test_user_rankings_replace_sampling(tmp_path, repo_root):
  fixture = str(repo_root / "tests" / "fixtures" / "user_data" / "hh.jsonl")
  config = make_config([("comparisons.user_train", fixture), ("comparisons.user_format", "hh")])
  summary = comparisons.train_and_evaluate(config, str(tmp_path))  # no SFT, no world needed
  train = _read(comparisons.output_path(str(tmp_path), "train"))
  val = _read(comparisons.output_path(str(tmp_path), "validation"))
  n = len(user_data.load_hh_pairs(fixture).records)
  assert (
    len(train)
    + len(val)
    + summary["comparisons/train_dropped_comparisons"]
    + (summary["comparisons/validation_dropped_comparisons"])
    == n
  )
  assert len(val) >= 1
  assert all(r["ranking"] == [0, 1] and all(t.strip() for t in r["responses"]) for r in train)


def test_missing_sft_export_is_one_line_error(tmp_path):
  config = make_config()
  prepare.prepare(config, str(tmp_path))
  with pytest.raises(UserInputError, match=r"sft: no exported parameters"):
    comparisons.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "comparisons" / "DONE")
