"""The report's plots (matplotlib, Agg), from an evaluation summary and the stages'
`metrics.jsonl`:

  plots/curves_<stage>.png        training curves of each stage with registered `curves`
  plots/winrate.png               win rate against SFT per policy, gold judge and labelers
  plots/gold_by_family.png        gold score per family and policy
  plots/<prefix>_score_vs_kl.png  RM score and gold score against KL during the RL stages
                                  (`score_vs_kl`: PPO and PPO-ptx, `ppo_score_vs_kl.png`)

Stages, titles and curves come from the stage registry. A plot without data is not
drawn (never an error).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_jax.stages import registry
from rlhf_jax.train import metrics_io

PLOTS = "plots"
MAX_PANELS = 8


def policies(summary: Mapping[str, Any]) -> list[tuple[str, dict]]:
  """The summary's policies, registered ones in pipeline order first."""
  pol = summary.get("policies", {})
  known = registry.policies()
  order = [p for p in known if p in pol] + [p for p in pol if p not in known]
  return [(p, pol[p]) for p in order]


def curve_stages() -> tuple[registry.Stage, ...]:
  """The stages with training curves (and training health), in pipeline order."""
  return tuple(s for s in registry.stages() if s.curves)


def pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  return [s for s, _ in pts], [float(v) for _, v in pts]


def plot_curves(workdir: str, stage: str, out_path: str) -> bool:
  """Training curves of a stage's `metrics.jsonl` (its registered `curves` first, then
  every other loss); False when there is nothing to plot."""
  entry = registry.get(stage)
  rows = metrics_io.read_metrics(entry.directory(workdir))
  wanted = [entry.metric(c) for c in entry.curves]
  wanted += sorted({k for r in rows for k in r if k.endswith("/loss") and k not in wanted})
  keys = [k for k in wanted if _series(rows, k)[0]][:MAX_PANELS]
  if not keys:
    return False
  plt = pyplot()
  cols = min(len(keys), 4)
  nrows = -(-len(keys) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
  for ax, key in zip(axes.flat, keys, strict=False):
    steps, values = _series(rows, key)
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, ms=3)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys) :]:
    ax.axis("off")
  fig.suptitle(f"{stage}: training curves", fontsize=10)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def plot_winrate(summary: Mapping[str, Any], out_path: str) -> bool:
  """Win rate against SFT per policy with 95% intervals (gold judge and labelers)."""
  pols = policies(summary)
  if not pols:
    return False
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  width = 0.38
  for j, (key, label) in enumerate(
    (("winrate_vs_sft", "gold judge"), ("labeler_winrate_vs_sft", "labelers"))
  ):
    xs, ys, err = [], [], [[], []]
    for i, (_, p) in enumerate(pols):
      if p.get(key) is None:
        continue
      lo, hi = p.get(f"{key}_ci95") or (p[key], p[key])
      xs.append(i + (j - 0.5) * width)
      ys.append(p[key])
      err[0].append(p[key] - lo)
      err[1].append(hi - p[key])
    ax.bar(xs, ys, width, yerr=err, capsize=3, label=label)
  ax.axhline(0.5, color="gray", lw=1, ls="--")
  ax.set_xticks(range(len(pols)), [registry.title_of(n) for n, _ in pols], fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("win rate vs SFT (95% CI)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def plot_gold_by_family(summary: Mapping[str, Any], out_path: str) -> bool:
  pols = policies(summary)
  families = list(dict.fromkeys(f for _, p in pols for f in p.get("gold_score_by_family", {})))
  if not pols or not families:
    return False
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  width = 0.8 / len(pols)
  for i, (name, p) in enumerate(pols):
    fam = p.get("gold_score_by_family", {})
    ys = [fam.get(f) if fam.get(f) is not None else 0.0 for f in families]
    ax.bar(
      [k + (i - (len(pols) - 1) / 2) * width for k in range(len(families))],
      ys,
      width,
      label=registry.title_of(name),
    )
  ax.set_xticks(range(len(families)), families, fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("mean gold score")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def score_vs_kl(
  rows: Sequence[Mapping[str, Any]], prefix: str
) -> dict[str, list[tuple[float, float]]]:
  """(KL, RM score) per logged step of an RL stage whose metrics are `<prefix>/kl`,
  `<prefix>/score` (or `rm_score`) and `<prefix>/gold_score`, and (KL, gold score) per
  evaluation step with the KL of the nearest logged step at or before it."""
  kl_steps, kls = _series(rows, f"{prefix}/kl")
  out = {"score": [], "gold_score": []}
  for key in (f"{prefix}/score", f"{prefix}/rm_score"):
    steps, values = _series(rows, key)
    if steps:
      by_step = dict(zip(kl_steps, kls, strict=True))
      out["score"] = [(by_step[s], v) for s, v in zip(steps, values, strict=True) if s in by_step]
      break
  for s, v in zip(*_series(rows, f"{prefix}/gold_score"), strict=True):
    before = [k for k in zip(kl_steps, kls, strict=True) if k[0] <= s]
    if before:
      out["gold_score"].append((before[-1][1], v))
    elif s == 0:
      out["gold_score"].append((0.0, v))
  return out


def _score_vs_kl_stages() -> tuple[registry.Stage, ...]:
  return tuple(s for s in registry.stages() if s.score_vs_kl)


def plot_score_vs_kl(workdir: str, summary: Mapping[str, Any], out_path: str) -> bool:
  """RM score and gold score against KL(policy || SFT) over the RL stages' training,
  with the evaluated policies' (KL, gold score) as stars."""
  curves = {
    s.title: score_vs_kl(metrics_io.read_metrics(s.directory(workdir)), s.metric_prefix)
    for s in _score_vs_kl_stages()
  }
  final = [(n, p) for n, p in policies(summary) if p.get("kl_to_sft") is not None]
  if not any(c["score"] or c["gold_score"] for c in curves.values()) and len(final) < 2:
    return False
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for stage, c in curves.items():
    for ax, key in zip(axes, ("score", "gold_score"), strict=True):
      if c[key]:
        xs, ys = zip(*c[key], strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=stage)
  for name, p in final:
    if p.get("gold_score") is not None:
      axes[1].scatter(
        [p["kl_to_sft"]],
        [p["gold_score"]],
        marker="*",
        s=80,
        zorder=3,
        label=f"{registry.title_of(name)} (eval)",
      )
  for ax, title in zip(axes, ("RM score during PPO", "gold score"), strict=True):
    ax.set_xlabel("KL to SFT (nats per reply)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def write_plots(workdir: str, summary: Mapping[str, Any]) -> list[str]:
  """Every plot that has data, under `DIR/plots/`; returns their paths relative to DIR."""
  os.makedirs(os.path.join(workdir, PLOTS), exist_ok=True)
  made = []

  def keep(ok: bool, name: str) -> None:
    if ok:
      made.append(f"{PLOTS}/{name}")

  for stage in curve_stages():
    name = f"curves_{stage.name}.png"
    keep(plot_curves(workdir, stage.name, os.path.join(workdir, PLOTS, name)), name)
  keep(plot_winrate(summary, os.path.join(workdir, PLOTS, "winrate.png")), "winrate.png")
  keep(
    plot_gold_by_family(summary, os.path.join(workdir, PLOTS, "gold_by_family.png")),
    "gold_by_family.png",
  )
  rl = _score_vs_kl_stages()
  if rl:
    name = f"{rl[0].metric_prefix}_score_vs_kl.png"
    keep(plot_score_vs_kl(workdir, summary, os.path.join(workdir, PLOTS, name)), name)
  return made
