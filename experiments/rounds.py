"""Iterated rounds at an equal label budget: 1, 2 and 4 rounds, and the design choices.

  python experiments/rounds.py --workdir /tmp/rounds            # 7 settings x 3 seeds
  python experiments/rounds.py --workdir W --seeds 0 --settings r1,r2   # a subset

The default world's 2,000 train prompts (`config.rounds.label_budget` 0: one comparison
each) are spent in 1, 2 or 4 rounds (`rlhf_jax/stages/rounds.py`, configs/rounds.py:
round 0 from SFT, later rounds on conversations with the previous round's policy), and at
2 rounds each design choice is flipped once from the default (RM retrained from SFT on
every round's comparisons, policy from the previous round's, KL to SFT). Every round runs
PPO's full `num_iterations`, so with the policy carried over, R rounds train it R times
as long: what iterating buys is labels on the policy's own distribution *and* more RL.

Per seed the data, pretraining and SFT are shared by every setting (WORK/seed<S>/base),
and so is round 0 between the settings that give it the same share of the budget
(WORK/seed<S>/round0_<n>: it depends on nothing else). Each setting is a `rounds` stage
in WORK/seed<S>/<setting>/; a re-run skips what is complete and resumes what is not.
Writes `rounds.{md,json,png}` to --out (experiments/results): the last round's gold win
rate against SFT and the rest per setting (mean and 95% t-interval over the seeds), per
round, and the gold score against sqrt(KL) during each round's PPO.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import paper_common  # noqa: E402
from rlhf_jax import config_lib, pipeline, sweep  # noqa: E402
from rlhf_jax.stages import registry, rounds  # noqa: E402

SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
  "r1": ("1 round", {"rounds.num_rounds": 1}),
  "r2": ("2 rounds", {"rounds.num_rounds": 2}),
  "r4": ("4 rounds", {"rounds.num_rounds": 4}),
  "r2_rm_round": ("2 rounds, RM on its round's data only", {"rounds.rm_data": "round"}),
  "r2_rm_prev": ("2 rounds, RM from the previous RM", {"rounds.rm_init": "previous"}),
  "r2_policy_sft": ("2 rounds, policy from SFT", {"rounds.policy_init": "sft"}),
  "r2_kl_prev": ("2 rounds, KL to the previous policy", {"rounds.kl_ref": "previous"}),
}
METRICS = (
  "winrate_vs_sft",
  "labeler_winrate_vs_sft",
  "gold_score",
  "kl_to_sft",
  "heldout_lm_loss",
  "rm_accuracy_own",
  "rm_accuracy_policy",
  "rm_accuracy_round0",
  "rm_gold_accuracy_policy",
  "rm_gold_accuracy_round0",
  "rm0_accuracy_policy",
  "rm0_gold_accuracy_policy",
  "labeler_agreement",
  "peak_gold",
  "end_gold",
  "overoptimisation",
)


def overrides_of(key: str) -> dict[str, Any]:
  ov = dict(SETTINGS[key][1])
  ov.setdefault("rounds.num_rounds", 2)
  return ov


def _link(target: str, path: str) -> None:
  if os.path.islink(path) and os.readlink(path) == target:
    return
  if os.path.lexists(path):
    raise SystemExit(f"{path}: exists and is not a link to {target}; use a new --workdir")
  os.symlink(target, path)


def run_setting(base_cfg_args, root: str, seed: int, key: str) -> dict[str, Any]:
  """One setting of one seed (resumes; skipped when complete); its rounds and seconds."""
  config_path, overrides = base_cfg_args
  ov = {**overrides_of(key), "seed": seed}
  config = config_lib.get(config_path, [*overrides, *((k, str(v)) for k, v in ov.items())])
  seed_dir = os.path.join(root, f"seed{seed}")
  base = os.path.join(seed_dir, "base")
  start = time.time()
  pipeline.run(config, base, only=("data", "pretrain", "sft"))
  wd = os.path.join(seed_dir, key)
  shared_round0 = os.path.join(
    seed_dir, f"round0_{rounds.budget(config.rounds, config.world.num_prompts)[0]}"
  )
  os.makedirs(os.path.join(wd, rounds.STAGE), exist_ok=True)
  os.makedirs(shared_round0, exist_ok=True)
  for name in rounds.SHARED:
    _link(os.path.realpath(os.path.join(base, name)), os.path.join(wd, name))
  _link(shared_round0, rounds.round_dir(wd, 0))
  print(f"== seed {seed}, {SETTINGS[key][0]} ({wd})", flush=True)
  pipeline.run_stage(registry.get(rounds.STAGE), config, wd)
  return {"rounds": rounds.load(wd), "seconds": time.time() - start}


def aggregate(results: dict[str, dict[int, dict]]) -> dict[str, Any]:
  """Per setting: the last round's METRICS (mean, 95% half-width over seeds, values) and
  per round the same; the curves of every seed."""
  out = {}
  for key, by_seed in results.items():
    seeds = sorted(by_seed)
    n_rounds = min(len(by_seed[s]["rounds"]) for s in seeds)

    def cells(r: int, by_seed=by_seed, seeds=seeds) -> dict[str, Any]:
      row = {}
      for m in METRICS:
        values = [by_seed[s]["rounds"][r].get(m) for s in seeds]
        mean, half = sweep.mean_ci(values)
        row[m] = {
          "mean": paper_common.finite(mean),
          "ci95_half": paper_common.finite(half),
          "values": values,
        }
      return row

    out[key] = {
      "title": SETTINGS[key][0],
      "overrides": overrides_of(key),
      "seeds": seeds,
      "last": cells(n_rounds - 1),
      "per_round": [cells(r) for r in range(n_rounds)],
      "curves": {s: [r["curve"] for r in by_seed[s]["rounds"][:n_rounds]] for s in seeds},
    }
  return out


def target(agg: dict[str, Any]) -> dict[str, Any] | None:
  """The best multi-round setting against one round: gold win rate intervals."""
  if "r1" not in agg:
    return None
  multi = [k for k in agg if k != "r1" and agg[k]["last"]["winrate_vs_sft"]["mean"] is not None]
  if not multi:
    return None
  best = max(multi, key=lambda k: agg[k]["last"]["winrate_vs_sft"]["mean"])
  a, b = agg[best]["last"]["winrate_vs_sft"], agg["r1"]["last"]["winrate_vs_sft"]
  lo_a = a["mean"] - (a["ci95_half"] or 0.0)
  hi_b = b["mean"] + (b["ci95_half"] or 0.0)
  return {
    "best": best,
    "best_winrate": a,
    "one_round_winrate": b,
    "difference": a["mean"] - b["mean"],
    "non_overlapping": bool(lo_a > hi_b and a["ci95_half"] is not None),
    "gap_to_non_overlap": hi_b - lo_a,
  }


def table(agg: dict[str, Any]) -> str:
  f = paper_common.fmt
  header = [
    "setting",
    "seeds",
    "gold win rate vs SFT",
    "labeler win rate",
    "KL to SFT",
    "RM acc. (labelers) on its policy's samples",
    "on round 0's",
    "over-opt. (peak - end gold)",
  ]
  rows = [
    [
      e["title"],
      len(e["seeds"]),
      *(
        f(e["last"][m])
        for m in (
          "winrate_vs_sft",
          "labeler_winrate_vs_sft",
          "kl_to_sft",
          "rm_accuracy_policy",
          "rm_accuracy_round0",
          "overoptimisation",
        )
      ),
    ]
    for e in agg.values()
  ]
  out = paper_common.markdown(header, rows)
  per = [
    [
      e["title"],
      r,
      *(
        f(c[m])
        for m in (
          "winrate_vs_sft",
          "rm_gold_accuracy_policy",
          "rm0_gold_accuracy_policy",
          "rm_gold_accuracy_round0",
          "labeler_agreement",
          "peak_gold",
          "end_gold",
        )
      ),
    ]
    for e in agg.values()
    if len(e["per_round"]) > 1
    for r, c in enumerate(e["per_round"])
  ]
  if per:
    head = ["setting", "round", "gold win rate vs SFT", "RM gold acc. on its policy's"]
    head += ["round 0's RM there", "on round 0's", "labeler agreement", "peak gold", "end gold"]
    note = "Per round (RM accuracies against the gold judge's order of the responses):"
    out += f"\n\n{note}\n\n" + paper_common.markdown(head, per)
  return out


def plot(agg: dict[str, Any]):
  def draw(plt):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    show = "r4" if "r4" in agg else next(iter(agg))
    for s, curves in agg[show]["curves"].items():
      for r, curve in enumerate(curves):
        a1.plot(
          [p["sqrt_kl"] for p in curve],
          [p["gold_score"] for p in curve],
          marker=".",
          color=colours[r % len(colours)],
          alpha=0.8,
          label=f"round {r}" if s == agg[show]["seeds"][0] else None,
        )
    if "r1" in agg and show != "r1":
      for s, curves in agg["r1"]["curves"].items():
        a1.plot(
          [p["sqrt_kl"] for p in curves[0]],
          [p["gold_score"] for p in curves[0]],
          ls="--",
          color="grey",
          label="1 round" if s == agg["r1"]["seeds"][0] else None,
        )
    a1.set_xlabel("sqrt(KL to the round's reference) during PPO")
    a1.set_ylabel("gold score (validation prompts)")
    a1.set_title(f"{agg[show]['title']}: gold vs sqrt(KL) per round")
    a1.legend(fontsize=8)
    for e in agg.values():
      xs = list(range(len(e["per_round"])))
      paper_common.errorbars(a2, e["per_round"], "winrate_vs_sft", xs, label=e["title"])
    a2.set_xlabel("round")
    a2.set_ylabel("gold win rate vs SFT")
    a2.legend(fontsize=7)

  return draw


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--config", default="configs/rounds.py")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--settings", default=",".join(SETTINGS))
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  ap.add_argument("--name", default="rounds")
  args, rest = ap.parse_known_args()
  overrides, unknown = config_lib.parse_overrides(rest)
  if unknown:
    ap.error(f"unknown arguments: {unknown}")
  keys = [k.strip() for k in args.settings.split(",") if k.strip()]
  bad = [k for k in keys if k not in SETTINGS]
  if bad:
    ap.error(f"--settings: unknown {bad} (known: {', '.join(SETTINGS)})")
  seeds = [int(s) for s in args.seeds.split(",")]
  start = time.time()
  results: dict[str, dict[int, dict]] = {k: {} for k in keys}
  seconds: dict[str, float] = {}
  for seed in seeds:
    for key in keys:
      out = run_setting((args.config, overrides), args.workdir, seed, key)
      results[key][seed] = out
      seconds[f"seed{seed}/{key}"] = out["seconds"]
  agg = aggregate(results)
  data = {
    "command": " ".join(["python experiments/rounds.py", *sys.argv[1:]]),
    "config": args.config,
    "overrides": [list(o) for o in overrides],
    "settings": agg,
    "target": target(agg),
    "wall_seconds": time.time() - start,
    "seconds": seconds,
  }
  os.makedirs(args.out, exist_ok=True)
  paper_common.write(args.out, args.name, table(agg), data, plot(agg))
  if data["target"]:
    print(json.dumps(data["target"], indent=1))


if __name__ == "__main__":
  main()
