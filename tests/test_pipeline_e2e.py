"""The main job end to end with the `quick` preset (runlocal sizes on an easier world,
configs/default.py): every contract file and key exists and is well-formed, a re-run
skips the completed stages, and PPO trained against the real reward model (from real
comparisons of the real SFT policy) raises both the RM score of its rollouts and the
gold judge's score of its replies (direction, not a threshold)."""

import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.train import metrics_io

pytestmark = pytest.mark.slow  # the whole recipe in a fresh process

POLICIES = ("pretrained", "sft", "ppo", "ppo_ptx")
STAGES = ("pretrain", "sft", "comparisons", "rm", "ppo", "ppo_ptx")


@pytest.fixture(scope="module")
def run(tmp_path_factory, run_cli):
  workdir = str(tmp_path_factory.mktemp("pipeline") / "run")
  argv = ["pipeline", "--config", "configs/default.py:quick", "--workdir", workdir]
  run_cli(*argv)
  return workdir, argv


def test_contract_files_and_keys(run):
  workdir, _ = run
  for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx"):
    assert os.path.exists(f"{workdir}/{stage}/metrics.jsonl"), stage
    assert os.path.isdir(f"{workdir}/{stage}/checkpoints"), stage
  with open(f"{workdir}/summary.json") as f:
    summary = json.load(f)
  wall = summary["wall_seconds"]
  for stage in (*STAGES, "total"):
    assert wall[stage] >= 0 and math.isfinite(wall[stage]), stage
  assert 0.0 <= summary["rm"]["val_accuracy"] <= 1.0
  for name in POLICIES:
    p = summary["policies"][name]
    lo, hi = p["winrate_vs_sft_ci95"]
    assert 0.0 <= lo <= p["winrate_vs_sft"] <= hi <= 1.0, (name, p)
    assert 0.0 <= p["gold_score"] <= 1.0
    assert math.isfinite(p["kl_to_sft"]) and math.isfinite(p["heldout_lm_loss"])
  assert summary["policies"]["sft"]["winrate_vs_sft"] == 0.5
  with open(f"{workdir}/report.md") as f:
    report = f.read()
  assert "PPO-ptx" in report and "win rate" in report.lower()
  assert any(name.endswith(".png") for name in os.listdir(f"{workdir}/plots"))


def test_rerun_skips_completed_stages(run, run_cli):
  workdir, argv = run
  before = {s: os.path.getmtime(f"{workdir}/{s}/params.json") for s in STAGES if s != "comparisons"}
  out = run_cli(*argv).stdout
  for stage in STAGES:
    assert f"{stage}: complete, skipped" in out, stage
  after = {s: os.path.getmtime(f"{workdir}/{s}/params.json") for s in before}
  assert before == after


@pytest.mark.parametrize("stage", ["ppo", "ppo_ptx"])
def test_ppo_raises_rm_score_and_gold_score(run, stage):
  workdir, _ = run
  rows = metrics_io.read_metrics(f"{workdir}/{stage}")
  gold = [(r["step"], r["ppo/gold_score"]) for r in rows if "ppo/gold_score" in r]
  score = [r["ppo/score"] for r in rows if "ppo/score" in r]
  # Step 0 is the SFT policy itself, scored before any update.
  assert [s for s, _ in gold] == [0, 24] and len(score) == 6, (gold, score)
  assert np.mean(score[-2:]) > np.mean(score[:2]), score
  assert gold[-1][1] > gold[0][1], gold
