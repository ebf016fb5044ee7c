"""`DIR/report.md` and `DIR/plots/*.png` from an evaluation summary.

  report.write_report(workdir, summary)   # summary: what `evaluate.evaluate` returned

Tables in the style of the paper (win rate against SFT with 95% intervals, gold score
per family, evasive / untruthful / toxic rates, the alignment tax, the reward model,
wall time per stage), example replies per family from every policy
(`DIR/eval/generations.jsonl`), and plots (matplotlib, Agg):

  plots/curves_<stage>.png   training curves of each stage's `metrics.jsonl`
  plots/winrate.png          win rate against SFT per policy, gold judge and labelers
  plots/gold_by_family.png   gold score per family and policy
  plots/ppo_score_vs_kl.png  RM score and gold score against KL during PPO / PPO-ptx

Missing stages, metrics or policies are left out, never an error. `summary_table`
formats the headline numbers as the Markdown table the pipeline prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax import evaluate, tokenizer, train_lib
from rlhf_jax.data import world as world_lib
from rlhf_jax.stages import common

PLOTS = "plots"
REPORT = "report.md"
TRAIN_STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")
NAMES = {"pretrained": "Pretrained (few-shot)", "sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}
# Curves per stage, in this order, when logged (PPO-ptx logs under the `ppo/` prefix).
_PPO_CURVES = (
  "ppo/score",
  "ppo/gold_score",
  "ppo/kl",
  "ppo/reward",
  "ppo/kl_coef",
  "ppo/policy_loss",
  "ppo/value_loss",
  "ppo/ptx_loss",
  "ppo/entropy",
  "ppo/response_len",
)
CURVES = {
  "pretrain": ("pretrain/loss", "pretrain/lr"),
  "sft": ("sft/loss", "sft/val_loss", "sft/gold_score", "sft/lr"),
  "rm": ("rm/loss", "rm/accuracy", "rm/val_accuracy", "rm/val_gold_accuracy", "rm/reward_std"),
  "ppo": _PPO_CURVES,
  "ppo_ptx": _PPO_CURVES,
}
MAX_PANELS = 8


# --- formatting ----------------------------------------------------------------------------


def _num(x: Any, digits: int = 3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def _ci(x: Any, ci: Sequence[float] | None) -> str:
  if x is None:
    return "–"
  return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{x:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table with aligned columns (readable as plain text too)."""
  cells = [list(header), *[list(r) for r in rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _policies(summary: Mapping[str, Any]) -> list[tuple[str, dict]]:
  pol = summary.get("policies", {})
  order = [p for p in evaluate.POLICIES if p in pol] + [p for p in pol if p not in NAMES]
  return [(p, pol[p]) for p in order]


def summary_table(summary: Mapping[str, Any]) -> str:
  """The headline numbers per policy, a Markdown table (what the pipeline prints)."""
  rows = []
  for name, p in _policies(summary):
    rows.append(
      [
        NAMES.get(name, name),
        _ci(p.get("winrate_vs_sft"), p.get("winrate_vs_sft_ci95")),
        _ci(p.get("labeler_winrate_vs_sft"), p.get("labeler_winrate_vs_sft_ci95")),
        _num(p.get("gold_score")),
        _num(p.get("kl_to_sft"), 2),
        _num(p.get("heldout_lm_loss")),
        _num(p.get("zero_shot_mean")),
      ]
    )
  header = [
    "policy",
    "win rate vs SFT (gold) [95% CI]",
    "win rate vs SFT (labelers) [95% CI]",
    "gold score",
    "KL to SFT",
    "held-out LM loss",
    "zero-shot acc",
  ]
  out = _table(header, rows)
  rm = summary.get("rm", {})
  wall = summary.get("wall_seconds", {})
  out += f"\n\nRM validation accuracy {_num(rm.get('val_accuracy'))}"
  if rm.get("val_gold_accuracy") is not None:
    out += f" (gold order: {_num(rm.get('val_gold_accuracy'))})"
  if wall:
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in wall.items() if k != "total")
    out += f"; wall time {_num(wall.get('total'), 0)}s ({stages})"
  return out


# --- plots -------------------------------------------------------------------------------------


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  return [s for s, _ in pts], [float(v) for _, v in pts]


def plot_curves(workdir: str, stage: str, out_path: str) -> bool:
  """Training curves of a stage's `metrics.jsonl`; False when there is nothing to plot."""
  rows = train_lib.read_metrics(common.stage_dir(workdir, stage))
  wanted = list(CURVES.get(stage, ()))
  wanted += sorted({k for r in rows for k in r if k.endswith("/loss") and k not in wanted})
  keys = [k for k in wanted if _series(rows, k)[0]][:MAX_PANELS]
  if not keys:
    return False
  plt = _plt()
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
  pols = _policies(summary)
  if not pols:
    return False
  plt = _plt()
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
  ax.set_xticks(range(len(pols)), [NAMES.get(n, n) for n, _ in pols], fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("win rate vs SFT (95% CI)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def plot_gold_by_family(summary: Mapping[str, Any], out_path: str) -> bool:
  pols = _policies(summary)
  families = list(dict.fromkeys(f for _, p in pols for f in p.get("gold_score_by_family", {})))
  if not pols or not families:
    return False
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  width = 0.8 / len(pols)
  for i, (name, p) in enumerate(pols):
    fam = p.get("gold_score_by_family", {})
    ys = [fam.get(f) if fam.get(f) is not None else 0.0 for f in families]
    ax.bar(
      [k + (i - (len(pols) - 1) / 2) * width for k in range(len(families))],
      ys,
      width,
      label=NAMES.get(name, name),
    )
  ax.set_xticks(range(len(families)), families, fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("mean gold score")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def score_vs_kl(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
  """(KL, RM score) per logged PPO step, and (KL, gold score) per evaluation step with
  the KL of the nearest logged step at or before it."""
  kl_steps, kls = _series(rows, "ppo/kl")
  out = {"score": [], "gold_score": []}
  for key in ("ppo/score", "ppo/rm_score"):
    steps, values = _series(rows, key)
    if steps:
      by_step = dict(zip(kl_steps, kls, strict=True))
      out["score"] = [(by_step[s], v) for s, v in zip(steps, values, strict=True) if s in by_step]
      break
  for s, v in zip(*_series(rows, "ppo/gold_score"), strict=True):
    before = [k for k in zip(kl_steps, kls, strict=True) if k[0] <= s]
    if before:
      out["gold_score"].append((before[-1][1], v))
    elif s == 0:
      out["gold_score"].append((0.0, v))
  return out


def plot_score_vs_kl(workdir: str, summary: Mapping[str, Any], out_path: str) -> bool:
  """RM score and gold score against KL(policy || SFT) over PPO / PPO-ptx training, with
  the evaluated policies' (KL, gold score) as stars."""
  curves = {
    s: score_vs_kl(train_lib.read_metrics(common.stage_dir(workdir, s))) for s in ("ppo", "ppo_ptx")
  }
  final = [(n, p) for n, p in _policies(summary) if p.get("kl_to_sft") is not None]
  if not any(c["score"] or c["gold_score"] for c in curves.values()) and len(final) < 2:
    return False
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for stage, c in curves.items():
    for ax, key in zip(axes, ("score", "gold_score"), strict=True):
      if c[key]:
        xs, ys = zip(*c[key], strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=NAMES.get(stage, stage))
  for name, p in final:
    if p.get("gold_score") is not None:
      axes[1].scatter(
        [p["kl_to_sft"]],
        [p["gold_score"]],
        marker="*",
        s=80,
        zorder=3,
        label=f"{NAMES.get(name, name)} (eval)",
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

  for stage in TRAIN_STAGES:
    name = f"curves_{stage}.png"
    keep(plot_curves(workdir, stage, os.path.join(workdir, PLOTS, name)), name)
  keep(plot_winrate(summary, os.path.join(workdir, PLOTS, "winrate.png")), "winrate.png")
  keep(
    plot_gold_by_family(summary, os.path.join(workdir, PLOTS, "gold_by_family.png")),
    "gold_by_family.png",
  )
  name = "ppo_score_vs_kl.png"
  keep(plot_score_vs_kl(workdir, summary, os.path.join(workdir, PLOTS, name)), name)
  return made


# --- the report --------------------------------------------------------------------------------


def _quote(text: str, limit: int = 300) -> str:
  """One Markdown table cell: newlines shown as ⏎, pipes escaped, long text cut."""
  text = text if len(text) <= limit else text[: limit - 1] + "…"
  return (text.replace("|", "\\|").replace("\n", " ⏎ ") or "(empty)").strip()


def examples_section(generations: Sequence[Mapping[str, Any]], per_family: int) -> str:
  """Replies of every policy to the first `per_family` prompts of each family."""
  by_prompt: dict[int, list[Mapping[str, Any]]] = {}
  for g in generations:
    by_prompt.setdefault(g["index"], []).append(g)
  order = {p: i for i, p in enumerate(evaluate.POLICIES)}
  by_family: dict[str, list[str]] = {}
  for index in sorted(by_prompt):
    gens = sorted(by_prompt[index], key=lambda g: order.get(g["policy"], len(order)))
    shown = by_family.setdefault(gens[0]["family"], [])
    if len(shown) >= per_family:
      continue
    rows = [
      [NAMES.get(g["policy"], g["policy"]), _quote(g["reply"]), f"{g['gold_score']:.2f}"]
      for g in gens
    ]
    prompt = tokenizer.render(gens[0]["messages"])
    shown.append(f"```\n{prompt}\n```\n\n" + _table(["policy", "reply", "gold"], rows))
  known = [f for f in world_lib.FAMILIES if f in by_family]
  families = known + sorted(set(by_family) - set(known))
  return "\n\n".join(f"### {f}\n\n" + "\n\n".join(by_family[f]) for f in families)


HEALTH_STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")


def _steps_where(rows: Sequence[Mapping[str, Any]], key: str) -> list[int]:
  return [r["step"] for r in rows if np.any(np.asarray(r.get(key, 0)) > 0)]


def health_section(workdir: str) -> str:
  """Per stage: steps the numerical guard skipped (non-finite), checkpoint restores, and
  for PPO the iterations flagged by its alerts (KL above the ceiling, response length far
  from the first iteration's)."""
  rows, quiet = [], []
  for stage in HEALTH_STAGES:
    metrics = train_lib.read_metrics(os.path.join(workdir, stage))
    if not metrics:
      continue
    skipped = int(sum(np.sum(r.get("guard/skipped", 0)) for r in metrics))
    restores = len(_steps_where(metrics, "guard/restores"))
    kl, length = _steps_where(metrics, "ppo/alert_kl"), _steps_where(metrics, "ppo/alert_length")
    show = lambda s: ", ".join(map(str, s[:8])) + (" ..." if len(s) > 8 else "") if s else "-"
    if skipped or restores or kl or length:
      rows.append([stage, str(skipped), str(restores), show(kl), show(length)])
    else:
      quiet.append(stage)
  text = [
    "Non-finite steps the guard skipped, last-good-checkpoint restores, and PPO's "
    "alerts (the logged steps where the KL to SFT passed `guard.kl_ceiling`, or the "
    "mean response length left `guard.length_ratio` x the first iteration's).",
    "",
  ]
  if rows:
    text.append(
      _table(["stage", "skipped steps", "restores", "KL alert at", "length alert at"], rows)
    )
  if quiet:
    text += ["", f"No skipped steps, restores or alerts: {', '.join(quiet)}."]
  return "\n".join(text)


def write_report(workdir: str, summary: Mapping[str, Any], examples: int = 2) -> str:
  """Write `DIR/report.md` (and the plots); returns its path."""
  plots = write_plots(workdir, summary)
  pols = _policies(summary)
  ev = summary.get("eval", {})
  md = ["# rlhf_jax evaluation report", ""]
  md.append(
    f"{summary.get('num_prompts', '?')} held-out prompts (`prompts/validation`: users PPO never "
    f"trained on); replies at temperature {ev.get('temperature', '?')} "
    f"(0 = greedy), at most {ev.get('max_new_tokens', '?')} tokens; the pretrained model is "
    f"prompted with {ev.get('few_shot', '?')} demonstrations (few-shot). Win rates are against "
    f"SFT's reply to the same prompt (win 1, tie 0.5, loss 0); intervals are 95% "
    f"({ev.get('ci', '?')} over prompts). KL to SFT: mean summed log-ratio of the policy's own "
    f"samples at temperature {ev.get('kl_temperature', 1.0)}."
  )
  md += ["", "## Win rate against SFT", "", summary_table(summary), ""]
  fams = list(dict.fromkeys(f for _, p in pols for f in p.get("gold_score_by_family", {})))
  counts = summary.get("prompts_per_family", {})
  md += ["## Gold score per instruction family", ""]
  md.append(
    _table(
      ["policy", "all", *[f"{f} ({counts.get(f, '?')})" for f in fams]],
      [
        [
          NAMES.get(n, n),
          _num(p.get("gold_score")),
          *[_num(p.get("gold_score_by_family", {}).get(f)) for f in fams],
        ]
        for n, p in pols
      ],
    )
  )
  md += [
    "",
    "## Failure rates",
    "",
    "Share of replies the judge finds evasive (no answer, a question back, or more "
    "instructions), untruthful (a false knowledge-base fact) or toxic.",
    "",
  ]
  md.append(
    _table(
      ["policy", "evasive", "untruthful", "toxic", "mean words"],
      [
        [
          NAMES.get(n, n),
          _num(p.get("evasive_rate")),
          _num(p.get("untruthful_rate")),
          _num(p.get("toxic_rate")),
          _num(p.get("response_words"), 1),
        ]
        for n, p in pols
      ],
    )
  )
  tasks = list(dict.fromkeys(t for _, p in pols for t in p.get("zero_shot", {})))
  md += [
    "",
    "## Alignment tax",
    "",
    "Per-token loss on held-out text of the pretraining distribution "
    f"({summary.get('heldout_lm_tokens', '?')} tokens) and zero-shot accuracy on the "
    "held-out tasks (the choice with the highest log-likelihood).",
    "",
  ]
  md.append(
    _table(
      ["policy", "held-out LM loss", *tasks, "mean"],
      [
        [
          NAMES.get(n, n),
          _num(p.get("heldout_lm_loss")),
          *[_num(p.get("zero_shot", {}).get(t)) for t in tasks],
          _num(p.get("zero_shot_mean")),
        ]
        for n, p in pols
      ],
    )
  )
  rm = summary.get("rm", {})
  md += ["", "## Reward model", ""]
  md.append(
    _table(
      ["validation accuracy (labelers)", "validation accuracy (gold order)", "reward bias"],
      [
        [
          _num(rm.get("val_accuracy")),
          _num(rm.get("val_gold_accuracy")),
          _num(rm.get("reward_bias")),
        ]
      ],
    )
  )
  md += ["", "## Training health", "", health_section(workdir)]
  wall = summary.get("wall_seconds", {})
  total = wall.get("total") or 0.0
  md += ["", "## Wall time", ""]
  md.append(
    _table(
      ["stage", "seconds", "share"],
      [
        [k, f"{v:.1f}", f"{v / total:.0%}" if total and k != "total" else ""]
        for k, v in wall.items()
      ],
    )
  )
  if plots:
    md += ["", "## Plots", ""]
    md += [f"![{os.path.basename(p)}]({p})" for p in plots]
  gens = evaluate.read_generations(workdir)
  if gens and examples:
    md += ["", "## Example replies", "", examples_section(gens, examples)]
  path = os.path.join(workdir, REPORT)
  evaluate.write_text(path, "\n".join(md) + "\n")
  return path
