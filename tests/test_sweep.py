"""Sweeps: the get_hyper vocabulary, stage sharing by fingerprint, intervals over seeds,
and a real sweep end to end (shared upstream stages, a vmapped PPO group, a failing
point that does not stop the others, resume)."""

import json
import math
import os

import numpy as np
import pytest

from rlhf_jax import config_lib, provenance, sweep
from rlhf_jax.sweep import Hyper

SWEEP_FILE = """
from configs import default

STAGES = ("ppo",)
METRICS = ("rm.val_accuracy", "policies.ppo.gold_score", "policies.ppo.kl_to_sft")


def get_config(arg=None):
  return default.get_config("runlocal")


def get_hyper(h):
  return h.chainit([
    h.product([h.sweep("config.ppo.kl_coef", [0.01, 0.2]), h.sweep("config.ppo.seed", [0, 1])]),
    h.fixed("config.ppo.num_minibatches", 3),  # does not divide the batch: this point fails
  ])
"""
# Small and fast everywhere.
SMALL = [
  ("model.n_layers", "1"),
  ("pretrain.num_steps", "4"),
  ("comparisons.num_prompts", "8"),
  ("comparisons.num_prompts_val", "8"),
  ("rm.num_steps", "2"),
  ("ppo.num_iterations", "2"),
  ("ppo.eval_prompts", "8"),
  ("eval.num_prompts", "8"),
  ("eval.kl_prompts", "8"),
  ("eval.heldout_docs", "4"),
  ("eval.zero_shot_examples", "2"),
  ("eval.few_shot", "1"),
]


def test_hyper_product_zip_chain():
  h = Hyper()
  pts = h.product(
    [
      h.sweep("config.a", [1, 2]),
      h.zipit([h.sweep("config.b", [3, 4]), h.sweep("config.c", [5, 6])]),
    ]
  )
  assert pts == [
    {"config.a": 1, "config.b": 3, "config.c": 5},
    {"config.a": 1, "config.b": 4, "config.c": 6},
    {"config.a": 2, "config.b": 3, "config.c": 5},
    {"config.a": 2, "config.b": 4, "config.c": 6},
  ]
  assert h.chainit([h.fixed("config.a", 1), h.fixed("config.a", 2)]) == [
    {"config.a": 1},
    {"config.a": 2},
  ]
  with pytest.raises(Exception, match="zipit"):
    h.zipit([h.sweep("config.a", [1]), h.sweep("config.b", [1, 2])])


def test_fingerprints_change_from_the_first_stage_that_reads_a_setting(repo_root):
  os.chdir(repo_root)
  base = provenance.fingerprints(config_lib.get("configs/default.py:runlocal"))
  beta = provenance.fingerprints(
    config_lib.get("configs/default.py:runlocal", [("ppo.kl_coef", "0.5")])
  )
  sft = provenance.fingerprints(
    config_lib.get("configs/default.py:runlocal", [("sft.num_epochs", "2")])
  )
  seed = provenance.fingerprints(config_lib.get("configs/default.py:runlocal", [("seed", "1")]))
  evals = provenance.fingerprints(
    config_lib.get("configs/default.py:runlocal", [("eval.num_prompts", "3")])
  )
  stages = list(base)
  # (the rounds read PPO's section: each of their rounds runs it)
  assert [base[s] == beta[s] for s in stages] == [s not in ("ppo", "rounds") for s in stages]
  assert [base[s] == sft[s] for s in stages] == [s in ("data", "pretrain") for s in stages]
  assert all(base[s] != seed[s] for s in stages)  # the seed is read by every stage
  assert base == evals  # evaluation settings are per point, never a stage's


def test_mean_and_t_interval_by_hand():
  mean, half = sweep.mean_ci([1.0, 2.0, 4.0])
  sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
  assert mean == pytest.approx(7 / 3)
  assert half == pytest.approx(4.302652729911275 * sd / math.sqrt(3))  # t(2, 0.975)
  assert math.isnan(sweep.mean_ci([0.5])[1])
  rows = [
    {"overrides": {"x": 1, "seed": s}, "status": "ok", "metrics": {"m": v}}
    for s, v in ((0, 1.0), (1, 2.0), (2, 4.0))
  ]
  rows.append({"overrides": {"x": 2, "seed": 0}, "status": "failed", "metrics": {}})
  table = sweep.results_table(rows, ["x", "seed"], ["m"])
  assert table.splitlines()[2] == f"| 1 | 3/3 | {mean:.3f} ± {half:.3f} |"
  assert table.splitlines()[3] == "| 2 | 0/1 | – |"


@pytest.mark.slow
def test_sweep_end_to_end_shares_stages_survives_a_failure_and_resumes(tmp_path, run_cli):
  spec = str(tmp_path / "tiny_sweep.py")
  with open(spec, "w") as f:
    f.write(SWEEP_FILE)
  root = str(tmp_path / "run")
  argv = [
    "sweep",
    "--config",
    spec,
    "--workdir",
    root,
    "--vmap",
    "on",
    *(f"--config.{k}={v}" for k, v in SMALL),
  ]
  run_cli(*argv, returncode=1)  # 1: a point failed
  with open(f"{root}/results.json") as f:
    rows = json.load(f)

  by_name = {r["point"]: r for r in rows}
  assert len(rows) == 5
  bad = by_name["ppo.num_minibatches=3"]
  assert bad["status"] == "failed" and "num_minibatches" in bad["error"]
  ok = [r for r in rows if r is not bad]
  assert all(r["status"] == "ok" for r in ok), ok
  for stage in ("data", "pretrain", "sft", "comparisons", "rm"):  # one of each, shared
    assert len(os.listdir(f"{root}/stages/{stage}")) == 1, stage
  ppo_dirs = [d for d in os.listdir(f"{root}/stages/ppo") if not d.startswith("group-")]
  assert len(ppo_dirs) == 5
  assert not os.path.exists(f"{root}/stages/ppo_ptx")
  # The four good PPO points trained as one vmapped group, and differ.
  infos = [json.load(open(f"{root}/points/{r['point']}/ppo/params.json")) for r in ok]
  assert {i["group"]["runs"] for i in infos} == {4}
  golds = [r["metrics"]["policies.ppo.gold_score"] for r in ok]
  assert all(0.0 <= g <= 1.0 for g in golds)
  kls = [r["metrics"]["policies.ppo.kl_to_sft"] for r in ok]
  assert len(set(np.round(kls, 6))) == 4
  for r in ok:
    assert set(r["wall_seconds"]) == {"data", "pretrain", "sft", "comparisons", "rm", "ppo"}
    summary = json.load(open(f"{root}/points/{r['point']}/summary.json"))
    assert set(summary["wall_seconds"]) >= {"rm", "ppo", "eval", "total"}
  with open(f"{root}/results.md") as f:
    table = f.read().splitlines()
  assert table[0].startswith("| ppo.kl_coef | ppo.num_minibatches | seeds |")
  assert table[2].startswith("| 0.01 | None | 2/2 | ")
  assert table[4].startswith("| None | 3 | 0/1 | –")
  with open(f"{root}/results.csv") as f:
    assert len(f.read().strip().splitlines()) == 6

  out = run_cli(*argv, returncode=1).stdout  # resumes: only the failed point runs again
  with open(f"{root}/results.json") as f:
    again = json.load(f)
  for stage in ("pretrain", "sft", "comparisons", "rm", "eval"):
    assert f"sweep: {stage}: nothing to do" in out, stage
  assert "sweep: ppo: 1 task(s) for 1 point(s)" in out
  assert [r["status"] for r in again] == [r["status"] for r in rows]
  assert [r["metrics"] for r in again] == [r["metrics"] for r in rows]


def test_results_are_written_atomically(tmp_path, monkeypatch, repo_root):
  """Every file the results step writes is written whole under a temporary name and
  renamed (a sweep killed meanwhile leaves the previous results)."""
  config = config_lib.get("configs/default.py:runlocal")
  point = sweep.Point("ppo.seed=1", {"ppo.seed": 1}, config, provenance.fingerprints(config))
  spec = sweep.Sweep("x.py", [point], ("ppo", "eval"), ("policies.ppo.gold_score",))
  os.makedirs(sweep.point_dir(str(tmp_path), point))
  with open(os.path.join(sweep.point_dir(str(tmp_path), point), "summary.json"), "w") as f:
    json.dump({"policies": {"ppo": {"gold_score": 0.5}}}, f)
  opened, real_open = [], open

  def recording_open(path, mode="r", *args, **kwargs):
    if any(m in mode for m in "wax"):
      opened.append(str(path))
    return real_open(path, mode, *args, **kwargs)

  monkeypatch.setattr("builtins.open", recording_open)
  rows = sweep.write_results(str(tmp_path), spec, {})
  monkeypatch.undo()
  assert rows[0]["metrics"] == {"policies.ppo.gold_score": 0.5}
  assert len(opened) == 3 and all(p.endswith(".tmp") for p in opened), opened
  for name in ("results.json", "results.csv", "results.md"):
    assert os.path.exists(tmp_path / name) and not os.path.exists(tmp_path / f"{name}.tmp")
