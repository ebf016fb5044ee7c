"""Reward over-optimisation (Gao et al. 2022): as PPO pushes the proxy reward model's
score up, the gold score first rises and then falls — sooner for a worse RM.

  python experiments/overoptimization.py --workdir runs/overopt --shared runs/stages

Runs configs/sweeps/overopt.py (RMs trained on 250 and on 2,000 comparisons; PPO with no
KL penalty for 80 iterations, the gold score of 128 validation prompts every 5; three
seeds each; resumable) and writes runs/overopt/overoptimization.{md,json,png}: gold
and proxy (RM) score against sqrt(KL to SFT), averaged over seeds at each evaluation,
and per RM the peak gold score, where it peaks and where it ends. About 20 min on a
2-core CPU after the shared stages.

Gao et al.: the gold score peaks and falls while the proxy keeps rising; the peak comes
at a larger KL, and is higher, for a larger or better-trained reward model.
"""

from __future__ import annotations

import math
import os

import numpy as np
import paper_common as pc  # (experiments/ is on sys.path when run as a script)

from rlhf_jax import plots, sweep
from rlhf_jax.train import metrics_io

KEY = "rm.max_comparisons"


def curves(workdir: str, rows) -> dict:
  """Per RM setting: mean over seeds of (sqrt KL, gold) at each evaluation and of
  (sqrt KL, proxy score) at each logged iteration; and each seed's peak / final gold."""
  out = {}
  for r in rows:
    if r["status"] != "ok":
      continue
    m = metrics_io.read_metrics(os.path.join(workdir, "points", r["point"], "ppo"))
    c = plots.score_vs_kl(m, "ppo")
    entry = out.setdefault(r["overrides"][KEY], {"gold": [], "proxy": [], "rm_acc": []})
    entry["gold"].append(c["gold_score"])
    entry["proxy"].append(c["score"])
    entry["rm_acc"].append(r["metrics"].get("rm.val_accuracy"))
  result = {}
  for x, e in out.items():
    n = min(len(g) for g in e["gold"])
    gold = np.array([[v for _, v in g[:n]] for g in e["gold"]])  # [seeds, evals]
    kl_g = np.array([[k for k, _ in g[:n]] for g in e["gold"]])
    n = min(len(p) for p in e["proxy"])
    proxy = np.array([[v for _, v in p[:n]] for p in e["proxy"]])
    kl_p = np.array([[k for k, _ in p[:n]] for p in e["proxy"]])
    sqrt_g, sqrt_p = np.sqrt(np.maximum(kl_g, 0)), np.sqrt(np.maximum(kl_p, 0))
    peak_at = gold.argmax(axis=1)
    result[x] = {
      "seeds": len(e["gold"]),
      "rm_val_accuracy": float(np.mean(e["rm_acc"])),
      "gold": {"sqrt_kl": sqrt_g.mean(0).tolist(), "mean": gold.mean(0).tolist()},
      "proxy": {"sqrt_kl": sqrt_p.mean(0).tolist(), "mean": proxy.mean(0).tolist()},
      "gold_start": float(gold[:, 0].mean()),
      "gold_peak": sweep.mean_ci(gold.max(axis=1).tolist()),
      "sqrt_kl_at_peak": sweep.mean_ci(sqrt_g[np.arange(len(gold)), peak_at].tolist()),
      "gold_final": sweep.mean_ci(gold[:, -1].tolist()),
      "proxy_final": sweep.mean_ci(proxy[:, -1].tolist()),
      "sqrt_kl_final": sweep.mean_ci(sqrt_g[:, -1].tolist()),
    }
  return result


def _ci(t) -> str:
  mean, half = t
  return f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")


def table(data: dict) -> str:
  """The Markdown table of overoptimization.json (per RM setting, as `curves` returns):
  the gold score at the start, at its peak and at the end, mean ± 95% CI over seeds."""
  header = [
    "RM comparisons",
    "seeds",
    "RM val. acc.",
    "gold at start (SFT)",
    "peak gold",
    "sqrt KL at peak",
    "final gold",
    "final proxy (RM) score",
    "final sqrt KL",
  ]
  cells = ("gold_peak", "sqrt_kl_at_peak", "gold_final", "proxy_final", "sqrt_kl_final")
  return pc.markdown(
    header,
    [
      [
        x,
        e["seeds"],
        f"{e['rm_val_accuracy']:.3f}",
        f"{e['gold_start']:.3f}",
        *(_ci(e[k]) for k in cells),
      ]
      for x, e in data.items()
    ],
  )


def main() -> None:
  args, overrides = pc.parse(__doc__, "configs/sweeps/overopt.py")
  rows = pc.run_sweep(args, overrides)
  res = curves(args.workdir, rows)

  def plot(plt):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for x, e in res.items():
      a.plot(e["gold"]["sqrt_kl"], e["gold"]["mean"], marker="o", label=f"RM on {x} comparisons")
      b.plot(e["proxy"]["sqrt_kl"], e["proxy"]["mean"], marker=".", label=f"RM on {x} comparisons")
    a.set(xlabel="sqrt(KL to SFT) (nats^0.5)", ylabel="gold score", title="gold judge")
    b.set(xlabel="sqrt(KL to SFT) (nats^0.5)", ylabel="RM score", title="proxy reward model")
    a.legend(), b.legend()

  data = {
    k: {kk: (list(v) if isinstance(v, tuple) else v) for kk, v in e.items()} for k, e in res.items()
  }
  pc.write(args.workdir, "overoptimization", table(data), data, plot)


if __name__ == "__main__":
  main()
