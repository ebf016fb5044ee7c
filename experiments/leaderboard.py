"""The leaderboard: PPO, DPO, IPO, RLOO, GRPO, best-of-n and expert iteration on one world,
ranked by its gold judge.

  python experiments/leaderboard.py --workdir /tmp/lb                 # default world, 3 seeds
  python experiments/leaderboard.py --workdir W --preset quick --methods ppo,best_of_n

One data set, pretraining, SFT, comparisons and reward model (WORK/base, configs/
leaderboard.py at `config.seed`) serve every method. The validation prompts are split in
two: the first `--dev-prompts` select each method's setting, the rest report.
1. **Selection** (seed 0): each trained method at every value of its sweep axis (β: the
   KL coefficient of PPO / RLOO / GRPO, DPO's β, IPO's β), judged on the dev prompts by
   the gold win rate against SFT; best-of-n's n is the peak of the gold score of its
   curve (Gao et al.'s estimator on the dev prompts, every seed's curve averaged).
   Expert iteration runs at its config (n, iterations): it has no sweep axis here.
2. **Report**: each method at its selected setting for every seed (the stage's own
   `seed`: sampling and data order; and `eval.seed`: the judged samples), evaluated on
   the report prompts against SFT: gold win rate (95% interval over prompts per seed, then
   mean ± 95% t-interval over seeds), gold score, labeler win rate, KL to SFT, held-out LM
   loss and zero-shot accuracy (the alignment tax), the stage's wall seconds and FLOPs.

FLOPs are the model's (matmuls and attention, `lm.model_flops_per_step`) at the
config's padded shapes, which is what the compiled programs compute: 2 per parameter and
token forward, 6 trained; sampling counted as one forward over prompt + reply. Training
FLOPs are the stage's; FLOPs per reply are what answering one prompt costs (best-of-n:
n samples and n RM scores).

Every run lives in WORK/runs/<method>/<setting>/seed<S> (links to the base stages), is
resumable and skipped when complete; its evaluations are cached in it. Writes
`leaderboard.{md,json,png}` to --out (experiments/results); `--replot JSON` re-writes the
table and plot of a leaderboard.json without running anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import paper_common  # noqa: E402
from rlhf_jax import config_lib, evaluate, pipeline, sweep  # noqa: E402
from rlhf_jax.stages import (  # noqa: E402
  best_of_n,
  common,
  comparisons,
  dpo,
  expert_iteration,
  grpo,
  lm,
  registry,
  rloo,
)
from rlhf_jax.stages.ppo import driver as ppo  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Method:
  title: str
  stage: str
  axis: str = ""  # the swept field of the stage's section ("" = none)
  grid: tuple = ()
  fixed: tuple = ()  # (field, value) of the stage's section


METHODS = {
  "ppo": Method("PPO", ppo.STAGE, "kl_coef", (0.03, 0.1, 0.3)),
  "dpo": Method("DPO", dpo.STAGE, "beta", (0.03, 0.1, 0.3), (("loss", "dpo"),)),
  "ipo": Method("IPO", dpo.STAGE, "beta", (0.1, 0.3, 1.0), (("loss", "ipo"),)),
  "rloo": Method("RLOO", rloo.STAGE, "kl_coef", (0.03, 0.1, 0.3)),
  "grpo": Method("GRPO", grpo.STAGE, "kl_coef", (0.03, 0.1, 0.3)),
  "best_of_n": Method("best-of-n", best_of_n.STAGE, "n"),
  "expert_iteration": Method("expert iteration", expert_iteration.STAGE),
}
METRICS = (
  "winrate_vs_sft",
  "gold_score",
  "labeler_winrate_vs_sft",
  "kl_to_sft",
  "heldout_lm_loss",
  "zero_shot_mean",
  "wall_seconds",
  "train_flops",
  "flops_per_reply",
)


class Board:
  """The base, the runs and their evaluations of one leaderboard."""

  def __init__(self, root: str, config_path: str, overrides, dev_prompts: int):
    self.root, self.config_path, self.overrides = root, config_path, list(overrides)
    self.base = os.path.join(root, "base")
    self.dev_prompts = dev_prompts

  def config(self, ov: dict[str, Any] | None = None):
    pairs = [*self.overrides, *((k, str(v)) for k, v in (ov or {}).items())]
    return config_lib.get(self.config_path, pairs)

  def build_base(self) -> None:
    stages = [m.stage for m in METHODS.values()]
    only = tuple(n for n in registry.upstream(stages) if n not in stages)
    pipeline.run(self.config(), self.base, only=only)

  def run(self, key: str, setting: Any, seed: int, extra: dict | None = None) -> str:
    """Train (or resume) one method at one setting and seed; its work directory."""
    m = METHODS[key]
    wd = os.path.join(self.root, "runs", key, f"{m.axis or 'config'}={setting}", f"seed{seed}")
    stage = registry.get(m.stage)
    os.makedirs(wd, exist_ok=True)
    for name in registry.upstream([m.stage])[:-1]:
      target, link = os.path.realpath(os.path.join(self.base, name)), os.path.join(wd, name)
      if not os.path.lexists(link):
        os.symlink(target, link)
    config = self.config(self.stage_overrides(key, setting, seed, extra))
    seconds_file = os.path.join(wd, "stage_seconds.json")
    if not stage.is_complete(wd):
      print(f"== {m.title}, {m.axis or 'config'}={setting}, seed {seed} ({wd})", flush=True)
      start = time.time()
      pipeline.run_stage(stage, config, wd)
      with open(seconds_file, "w") as f:
        json.dump({"seconds": time.time() - start}, f)
    return wd

  def stage_overrides(self, key, setting, seed, extra=None) -> dict[str, Any]:
    m = METHODS[key]
    ov = {f"{m.stage}.{k}": v for k, v in m.fixed}
    if m.axis and setting is not None:
      ov[f"{m.stage}.{m.axis}"] = setting
    ov[f"{m.stage}.seed"] = seed
    ov["eval.seed"] = seed
    return {**ov, **(extra or {})}

  def evaluate(self, key: str, wd: str, seed: int, split: str) -> dict[str, Any]:
    """The method's policy in `wd` against SFT on the dev or the report prompts (cached)."""
    path = os.path.join(wd, f"leaderboard_{split}.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    ec = {"eval.seed": seed}
    if split == "dev":
      ec |= {"eval.num_prompts": self.dev_prompts, "eval.skip_prompts": 0}
    else:
      ec["eval.skip_prompts"] = self.dev_prompts
    summary = evaluate.evaluate(self.config(ec), wd)
    policy = summary["policies"][registry.get(METHODS[key].stage).policy]
    policy["zero_shot_mean"] = float(np.mean(list(policy["zero_shot"].values())))
    out = {"policy": policy, "sft": summary["policies"][registry.reference().policy]}
    out["num_prompts"] = summary["num_prompts"]
    with open(path, "w") as f:
      json.dump(out, f, indent=1)
    return out


def _seconds(wd: str) -> float | None:
  path = os.path.join(wd, "stage_seconds.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["seconds"]


def flops(key: str, config, wd: str) -> tuple[float, float]:
  """(training FLOPs of the stage, FLOPs per reply) at the config's padded shapes."""
  cfg = common.model_config(config)
  train = lambda b, s, head=True: lm.model_flops_per_step(cfg, b, s, lm_head=head)
  fwd = lambda b, s, head=True: train(b, s, head) / 3
  reply = config.eval.max_prompt_len + config.eval.max_new_tokens
  per_reply = fwd(1, reply)
  m = METHODS[key]
  c = config[m.stage]
  if key == "ppo":
    s, b = c.prompt_len + c.max_new_tokens, c.batch_size
    per_iter = (
      2 * fwd(b, s) + 2 * fwd(b, s, False) + c.num_epochs * (train(b, s) + train(b, s, False))
    )
    return c.num_iterations * per_iter, per_reply
  if key in ("rloo", "grpo"):
    s, b = c.prompt_len + c.max_new_tokens, c.batch_size * c.group_size
    per_iter = 2 * fwd(b, s) + fwd(b, s, False) + c.num_epochs * train(b, s)
    return c.num_iterations * per_iter, per_reply
  if key in ("dpo", "ipo"):
    n = len(comparisons.load(wd, "train"))
    steps = max(1, c.num_epochs * n // c.batch_size)
    return fwd(n, c.packed_len) + steps * train(c.batch_size, c.packed_len), per_reply
  n_best = int(c.n)
  if key == "best_of_n":
    return 0.0, n_best * (per_reply + fwd(1, reply, False))
  s = c.prompt_len + c.max_new_tokens
  pick = n_best * (fwd(1, s) + fwd(1, s, False))
  steps = 0  # the packed rows' optimiser steps each iteration took (its last checkpoint)
  for i in range(c.iterations):
    ckpts = os.path.join(expert_iteration.iteration_dir(wd, i), "checkpoints")
    steps += max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  sampling = c.iterations * c.prompts_per_iteration * pick
  return sampling + steps * train(c.batch_size, c.seq_len), per_reply


def _curve(board: Board, seed: int) -> list[dict[str, Any]]:
  """Best-of-n's curve of one seed (measured once: it does not depend on the exported n)."""
  wd = board.run("best_of_n", "curve", seed, {f"{best_of_n.STAGE}.n": 1})
  with open(os.path.join(common.stage_dir(wd, best_of_n.STAGE), "params.json")) as f:
    return json.load(f)["curve"]


def select(board: Board, key: str, seeds: list[int]) -> tuple[Any, list[dict]]:
  """The method's selected setting and what it was selected on."""
  m = METHODS[key]
  if key == "best_of_n":
    curves = [_curve(board, seed) for seed in seeds]
    ns = [row["n"] for row in curves[0]]
    gold = [float(np.mean([c[i]["gold_score"] for c in curves])) for i in range(len(ns))]
    trials = [{"setting": n, "dev_gold_score": g} for n, g in zip(ns, gold, strict=True)]
    return ns[int(np.argmax(gold))], trials
  if not m.axis:
    return None, []
  trials = []
  for value in m.grid:
    wd = board.run(key, value, seeds[0])
    dev = board.evaluate(key, wd, seeds[0], "dev")["policy"]
    trials.append({"setting": value, "dev_winrate_vs_sft": dev["winrate_vs_sft"]})
  best = max(trials, key=lambda t: t["dev_winrate_vs_sft"])
  return best["setting"], trials


def report(board: Board, key: str, setting: Any, seeds: list[int]) -> dict[str, Any]:
  """The method at `setting` for every seed on the report prompts."""
  m = METHODS[key]
  rows, curves, sft_rows = {}, {}, {}
  for seed in seeds:
    extra = {f"{m.stage}.curve_prompts": 0} if key == "best_of_n" else None
    wd = board.run(key, setting, seed, extra)
    res = board.evaluate(key, wd, seed, "report")
    config = board.config(board.stage_overrides(key, setting, seed, extra))
    train_flops, per_reply = flops(key, config, wd)
    sft_rows[seed] = {k: res["sft"].get(k) for k in METRICS[:6]}
    sft_rows[seed]["zero_shot_mean"] = float(np.mean(list(res["sft"]["zero_shot"].values())))
    rows[seed] = {
      **{k: res["policy"].get(k) for k in METRICS[:6]},
      "winrate_ci95": res["policy"]["winrate_vs_sft_ci95"],
      "sft_gold_score": res["sft"]["gold_score"],
      "wall_seconds": _seconds(wd),
      "train_flops": train_flops,
      "flops_per_reply": per_reply,
      "num_prompts": res["num_prompts"],
    }
    if key == "best_of_n":
      curves[seed] = _curve(board, seed)  # run by `select`: found complete
  return {
    "title": m.title,
    "axis": m.axis,
    "setting": setting,
    "cells": _cells(rows, seeds, METRICS),
    "sft": _cells(sft_rows, seeds, METRICS[:6]),
    "per_seed": rows,
    "curves": curves,
  }


def _cells(rows: dict[int, dict], seeds: list[int], metrics) -> dict[str, dict]:
  out = {}
  for metric in metrics:
    values = [rows[s][metric] for s in seeds]
    mean, half = sweep.mean_ci(values)
    out[metric] = {
      "mean": paper_common.finite(mean),
      "ci95_half": paper_common.finite(half),
      "values": values,
    }
  return out


# AlpacaFarm (Dubois et al. 2023), Table 2: simulated win rate (%) against Davinci003.
ALPACAFARM = {"ppo": 46.8, "best_of_n": 45.0, "expert_iteration": 41.9, "sft": 39.2}


def table(board: dict[str, Any]) -> str:
  f = paper_common.fmt
  gflop = lambda cell: "–" if cell["mean"] is None else f"{cell['mean'] / 1e12:.2f}"
  header = ["method", "setting", "gold win rate vs SFT", "gold score", "labeler win rate"]
  header += ["KL to SFT", "held-out LM loss", "zero-shot acc.", "stage s", "train TFLOP"]
  header += ["GFLOP / reply", "AlpacaFarm"]
  ranked = sorted(
    board["methods"].items(), key=lambda kv: -kv[1]["cells"]["winrate_vs_sft"]["mean"]
  )
  rows = []
  for key, e in ranked:
    c = e["cells"]
    setting = "config" if e["setting"] is None else f"{e['axis']} = {e['setting']}"
    rows.append(
      [
        e["title"],
        setting,
        *(f(c[k]) for k in METRICS[:6]),
        "–" if c["wall_seconds"]["mean"] is None else f"{c['wall_seconds']['mean']:.0f}",
        gflop(c["train_flops"]),
        f"{c['flops_per_reply']['mean'] / 1e9:.2f}",
        ALPACAFARM.get(key, ""),
      ]
    )
  sft = next(iter(board["methods"].values()))["sft"]
  rows.append(
    ["SFT", "", "0.5", f(sft["gold_score"]), "0.5", "0", *(f(sft[k]) for k in METRICS[4:6])]
    + ["–", "–", "–", ALPACAFARM["sft"]]
  )
  out = paper_common.markdown(header, rows)
  trials = [
    [e["title"], t["setting"], *_criterion(t)]
    for e in board["methods"].values()
    for t in e["selection"]
  ]
  if trials:
    note = "Selection on the dev prompts (seed 0; best-of-n: its curve, every seed):"
    head = ["method", "setting", "criterion", "dev"]
    out += f"\n\n{note}\n\n" + paper_common.markdown(head, trials)
  return out


def _criterion(trial: dict[str, Any]) -> tuple[str, str]:
  if "dev_gold_score" in trial:
    return "gold score of the RM's pick", f"{trial['dev_gold_score']:.3f}"
  return "gold win rate vs SFT", f"{trial['dev_winrate_vs_sft']:.3f}"


def plot(board: dict[str, Any]):
  def draw(plt):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for e in board["methods"].values():
      c = e["cells"]
      a1.errorbar(
        [c["kl_to_sft"]["mean"]],
        [c["gold_score"]["mean"]],
        xerr=[c["kl_to_sft"]["ci95_half"] or 0.0],
        yerr=[c["gold_score"]["ci95_half"] or 0.0],
        marker="o",
        capsize=3,
        label=e["title"],
      )
      a1.scatter(c["kl_to_sft"]["values"], c["gold_score"]["values"], s=8, alpha=0.4)
      if e["curves"]:  # measured on the dev prompts: a panel of its own
        rows = list(e["curves"].values())
        ns = [r["n"] for r in rows[0]]
        gold = [np.mean([r[i]["gold_score"] for r in rows]) for i in range(len(ns))]
        rm = [np.mean([r[i]["rm_score"] for r in rows]) for i in range(len(ns))]
        a2.plot(ns, gold, marker="o", label="gold score")
        a2.plot(ns, rm, marker="s", label="RM score")
        a2.set_xscale("log", base=2)
    sft = next(iter(board["methods"].values()))["sft"]["gold_score"]["mean"]
    a1.axhline(sft, color="black", lw=0.8, ls=":", label="SFT")
    a1.set_xlabel("KL to SFT (nats)")
    a1.set_ylabel("gold score (report prompts)")
    a1.set_title("gold score vs KL: every method, mean ± 95% CI over seeds")
    a1.legend(fontsize=7)
    a2.set_xlabel("n")
    a2.set_ylabel("score of the RM's pick (dev prompts, mean over seeds)")
    a2.set_title("best-of-n: RM vs gold score (over-optimisation)")
    a2.legend(fontsize=8)

  return draw


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir")
  ap.add_argument("--replot", default="", help="a leaderboard.json: re-write its table, plot")
  ap.add_argument("--config", default="configs/leaderboard.py")
  ap.add_argument("--preset", default="", help="the config's preset: quick, runlocal, size=s")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--dev-prompts", type=int, default=0, help="0 = 40%% of the validation split")
  ap.add_argument("--grid", default="", help="one value for every swept method (a smoke test)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  ap.add_argument("--name", default="leaderboard")
  args, rest = ap.parse_known_args()
  overrides, unknown = config_lib.parse_overrides(rest)
  if unknown:
    ap.error(f"unknown arguments: {unknown}")
  if args.replot:
    with open(args.replot) as f:
      data = json.load(f)
    paper_common.write(args.out, args.name, table(data), data, plot(data))
    return
  if not args.workdir:
    ap.error("--workdir is required (or --replot)")
  keys = [k.strip() for k in args.methods.split(",") if k.strip()]
  if bad := [k for k in keys if k not in METHODS]:
    ap.error(f"--methods: unknown {bad} (known: {', '.join(METHODS)})")
  if args.grid:
    for k, m in METHODS.items():
      if m.grid:
        METHODS[k] = dataclasses.replace(m, grid=(float(args.grid),))
  seeds = [int(s) for s in args.seeds.split(",")]
  config_path = args.config + (f":{args.preset}" if args.preset else "")
  dev = args.dev_prompts or int(0.4 * config_lib.get(config_path, overrides).world.num_prompts_val)
  board = Board(args.workdir, config_path, overrides, dev)
  start = time.time()
  board.build_base()
  out: dict[str, Any] = {}
  for key in keys:
    setting, trials = select(board, key, seeds)
    out[key] = {**report(board, key, setting, seeds), "selection": trials}
  data = {
    "command": " ".join(["python experiments/leaderboard.py", *sys.argv[1:]]),
    "config": config_path,
    "overrides": [list(o) for o in overrides],
    "seeds": seeds,
    "dev_prompts": dev,
    "methods": out,
    "alpacafarm_table2": ALPACAFARM,
    "wall_seconds": time.time() - start,
  }
  os.makedirs(args.out, exist_ok=True)
  paper_common.write(args.out, args.name, table(data), data, plot(data))
  print(f"leaderboard: {time.time() - start:.0f}s")


if __name__ == "__main__":
  main()
