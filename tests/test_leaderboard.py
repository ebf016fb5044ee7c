"""experiments/leaderboard.py: settings are selected on the dev prompts of seed 0 only,
best-of-n's n at its curve's gold peak, the table ranks by gold win rate; eval's
`skip_prompts` splits the validation prompts; the whole script at runlocal size."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_jax import evaluate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import leaderboard  # noqa: E402


def test_skip_prompts_takes_the_rest_of_the_split():
  source = list(range(10))
  assert evaluate._take(source, 4) == [0, 1, 2, 3]
  assert evaluate._take(source, 0, skip=4) == [4, 5, 6, 7, 8, 9]
  assert evaluate._take(source, 3, skip=4) == [4, 5, 6]
  assert evaluate._take(source, 30, skip=8) == [8, 9]
  dev, report = evaluate._take(source, 4), evaluate._take(source, 0, skip=4)
  assert not set(dev) & set(report) and sorted(dev + report) == source


class FakeBoard:
  """Records what selection asks for; dev win rates from a table."""

  def __init__(self, tmp_path, dev=None, curves=None):
    self.tmp, self.dev, self.curves, self.calls = tmp_path, dev or {}, curves or {}, []

  def run(self, key, setting, seed, extra=None):
    self.calls.append(("run", key, setting, seed))
    wd = self.tmp / f"{key}-{setting}-{seed}"
    if key == "best_of_n":
      out = wd / leaderboard.best_of_n.STAGE
      out.mkdir(parents=True, exist_ok=True)
      (out / "params.json").write_text(json.dumps({"curve": self.curves[seed]}))
    return str(wd)

  def evaluate(self, key, wd, seed, split):
    self.calls.append(("evaluate", key, wd, seed, split))
    setting = float(os.path.basename(wd).split("-")[1])
    return {"policy": {"winrate_vs_sft": self.dev[setting]}}


def test_a_swept_method_is_selected_on_dev_prompts_of_the_first_seed(tmp_path):
  board = FakeBoard(tmp_path, dev={0.03: 0.61, 0.1: 0.66, 0.3: 0.58})
  setting, trials = leaderboard.select(board, "ppo", [0, 1, 2])
  assert setting == 0.1
  assert [t["dev_winrate_vs_sft"] for t in trials] == [0.61, 0.66, 0.58]
  evals = [c for c in board.calls if c[0] == "evaluate"]
  assert {c[4] for c in evals} == {"dev"} and {c[3] for c in evals} == {0}
  assert {c[3] for c in board.calls} == {0}


def test_best_of_n_is_selected_at_the_gold_peak_of_the_seeds_mean_curve(tmp_path):
  row = lambda n, g: {"n": n, "gold_score": g, "rm_score": 0.1 * n, "kl": 0.0}
  curves = {  # seed 0 alone peaks at n = 2, the mean at n = 4
    0: [row(1, 0.30), row(2, 0.50), row(4, 0.45), row(8, 0.20)],
    1: [row(1, 0.30), row(2, 0.35), row(4, 0.55), row(8, 0.25)],
  }
  board = FakeBoard(tmp_path, curves=curves)
  n, trials = leaderboard.select(board, "best_of_n", [0, 1])
  assert n == 4
  assert [t["dev_gold_score"] for t in trials] == pytest.approx([0.30, 0.425, 0.5, 0.225])
  assert not [c for c in board.calls if c[0] == "evaluate"]


def test_expert_iteration_has_nothing_to_select(tmp_path):
  board = FakeBoard(tmp_path)
  assert leaderboard.select(board, "expert_iteration", [0]) == (None, [])
  assert not board.calls


def _entry(title, axis, setting, win, seeds=(0, 1)):
  cell = lambda v: {"mean": v, "ci95_half": 0.01, "values": [v] * len(seeds)}
  cells = {m: cell(0.5) for m in leaderboard.METRICS}
  cells["winrate_vs_sft"] = cell(win)
  sft = {m: cell(0.3) for m in leaderboard.METRICS[:6]}
  trials = [{"setting": setting, "dev_winrate_vs_sft": win}]
  return {
    "title": title,
    "axis": axis,
    "setting": setting,
    "cells": cells,
    "sft": sft,
    "per_seed": {},
    "curves": {},
    "selection": trials,
  }


def test_the_table_ranks_by_gold_win_rate_and_sets_alpacafarm_beside():
  board = {
    "methods": {
      "best_of_n": _entry("best-of-n", "n", 16, 0.55),
      "ppo": _entry("PPO", "kl_coef", 0.1, 0.68),
      "expert_iteration": _entry("expert iteration", "", None, 0.52),
    }
  }
  text = leaderboard.table(board)
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  order = [line.split(" | ")[0][2:] for line in lines[1:5]]
  assert order == ["PPO", "best-of-n", "expert iteration", "SFT"]
  assert "| 46.8 |" in lines[1] and "| 39.2 |" in lines[4]
  assert "kl_coef = 0.1" in lines[1] and "| config |" in lines[3]


@pytest.mark.slow
def test_the_leaderboard_end_to_end_at_runlocal_size(tmp_path, repo_root):
  """Two methods, two seeds: the JSON holds every seed's report on the prompts after the
  dev ones; a re-run finds everything complete and writes the same numbers."""
  out = tmp_path / "out"
  cmd = [sys.executable, "experiments/leaderboard.py", "--workdir", str(tmp_path / "w")]
  cmd += ["--preset", "runlocal", "--methods", "dpo,best_of_n", "--seeds", "0,1"]
  cmd += ["--grid", "0.1", "--dev-prompts", "20", "--out", str(out)]
  subprocess.run(cmd, cwd=repo_root, check=True, capture_output=True, text=True)
  data = json.loads((out / "leaderboard.json").read_text())
  assert set(data["methods"]) == {"dpo", "best_of_n"} and data["dev_prompts"] == 20
  for e in data["methods"].values():
    assert len(e["cells"]["winrate_vs_sft"]["values"]) == 2
    for row in e["per_seed"].values():
      assert row["num_prompts"] == 16  # runlocal eval.num_prompts, after the 20 dev ones
      assert 0.0 <= row["winrate_vs_sft"] <= 1.0
  bon = data["methods"]["best_of_n"]
  assert set(bon["curves"]) == {"0", "1"}
  peak = max(bon["selection"], key=lambda t: t["dev_gold_score"])["setting"]
  assert bon["setting"] == peak
  dev = json.loads((tmp_path / "w/runs/dpo/beta=0.1/seed0/leaderboard_dev.json").read_text())
  assert dev["num_prompts"] == 20
  assert (out / "leaderboard.png").stat().st_size > 0
  again = subprocess.run(cmd, cwd=repo_root, check=True, capture_output=True, text=True)
  assert "==" not in again.stdout  # no stage ran again
  redo = json.loads((out / "leaderboard.json").read_text())
  assert redo["methods"]["dpo"]["cells"] == data["methods"]["dpo"]["cells"]


@pytest.mark.parametrize(
  "path, points, trained",
  [
    ("configs/sweeps/dpo.py", 24, {"dpo": 24}),
    ("configs/sweeps/rloo.py", 9, {"rloo": 9, "grpo": 9}),
    # best-of-n's export (no curve) depends on n alone, eval's samples on eval.seed; the
    # n points share expert iteration at its default iterations
    ("configs/sweeps/best_of_n.py", 18, {"best_of_n": 4, "expert_iteration": 9}),
  ],
)
def test_the_new_methods_sweeps_share_one_sft_and_rm(path, points, trained, repo_root):
  from rlhf_jax import sweep

  s = sweep.load(os.path.join(repo_root, path) + ":runlocal")
  assert len(s.points) == points
  for stage in ("sft", "rm"):
    if stage in s.stages:
      assert len({p.fingerprints[stage] for p in s.points}) == 1, stage
  for stage, n in trained.items():
    assert len({p.fingerprints[stage] for p in s.points}) == n, stage
