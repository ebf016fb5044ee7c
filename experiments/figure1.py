"""Figure 1 analogue: pretrained (few-shot), SFT, PPO and PPO-ptx at three model sizes,
each judged against the largest SFT model.

  python experiments/figure1.py --workdir runs/sizes --shared runs/stages

Runs configs/sweeps/sizes.py (the whole default recipe at d_model 64, 128 and 192;
resumable; the 128 one is the default run, shared through `--shared`) and writes
runs/sizes/figure1.{md,json,png}: for every size and policy the gold judge's win rate
against the replies of the largest SFT model to the same 500 held-out prompts, with a
95% bootstrap interval, and the gold score. About 35 min on a 2-core CPU (measured:
262k 265 s, 787k 473 s, 2.16M 1,050 s of stages).

The paper's claim to test: outputs of the 1.3B PPO-ptx model are preferred to those of
the 175B GPT-3, despite 100x fewer parameters; InstructGPT at every size beats SFT of
its size and few-shot GPT-3.
"""

from __future__ import annotations

import os

import numpy as np
import paper_common as pc  # (experiments/ is on sys.path when run as a script)

from rlhf_jax import evaluate, report
from rlhf_jax.evaluate import stats

POLICIES = ("pretrained", "sft", "ppo", "ppo_ptx")
LABELS = {"pretrained": "pretrained (few-shot)", "sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}


def table(data: dict) -> str:
  """The Markdown table of figure1.json (`{"reference_params", "rows"}`): per size and
  policy, the win rate against the largest SFT model and the gold score."""
  text = pc.markdown(
    ["parameters", "policy", "win rate vs the largest SFT (gold) [95% CI]", "gold score"],
    [
      [
        f"{e['params']:,}",
        LABELS[e["policy"]],
        f"{e['winrate_vs_largest_sft']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]",
        f"{e['gold_score']:.3f}",
      ]
      for e in data["rows"]
    ],
  )
  ref = data["reference_params"]
  return text + f"\n\nReference: the SFT model with {ref:,} parameters (its own row: 0.5)."


def main() -> None:
  args, overrides = pc.parse(__doc__, "configs/sweeps/sizes.py")
  rows = [r for r in pc.run_sweep(args, overrides) if r["status"] == "ok"]
  gens = {}
  for r in rows:
    o = r["overrides"]
    n = pc.model_params(o["model.d_model"], o["model.n_layers"], o["model.mlp_dim"])
    by_policy = {}
    point = os.path.join(args.workdir, "points", r["point"])
    summary = {"generations": evaluate.GENERATIONS}
    for g in report.read_generations(point, summary):
      by_policy.setdefault(g["policy"], []).append(g)
    gens[n] = by_policy
  largest = max(gens)
  ref = gens[largest]["sft"]
  ref_ids = [g["prompt_id"] for g in ref]
  ref_gold = np.array([g["gold_score"] for g in ref])
  out = []
  for n in sorted(gens):
    for p in POLICIES:
      g = gens[n].get(p)
      if not g:
        continue
      assert [x["prompt_id"] for x in g] == ref_ids, "sizes answered different prompts"
      gold = np.array([x["gold_score"] for x in g])
      wins = stats.outcomes(gold, ref_gold)
      ci = stats.ci95(wins, "bootstrap", np.random.default_rng([n, POLICIES.index(p)]))
      out.append(
        {
          "params": n,
          "policy": p,
          "winrate_vs_largest_sft": float(wins.mean()),
          "ci95": ci,
          "gold_score": float(gold.mean()),
        }
      )
  data = {"reference_params": largest, "rows": out}

  def plot(plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in POLICIES:
      es = [e for e in out if e["policy"] == p]
      xs = [e["params"] for e in es]
      ys = [e["winrate_vs_largest_sft"] for e in es]
      err = np.array([[y - e["ci95"][0], e["ci95"][1] - y] for y, e in zip(ys, es, strict=True)])
      ax.errorbar(xs, ys, yerr=err.T, marker="o", capsize=3, label=LABELS[p])
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="parameters", ylabel=f"win rate vs SFT {largest:,}")
    ax.legend()

  pc.write(args.workdir, "figure1", table(data), data, plot)


if __name__ == "__main__":
  main()
