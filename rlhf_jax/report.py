"""`DIR/report.md` and `DIR/plots/*.png` from an evaluation summary.

  report.write_report(workdir, summary)   # summary: what `evaluate.evaluate` returned

Stages, policies, titles, curves and alerts come from the stage registry
(`stages/registry.py`); nothing here names a stage.

Tables in the style of the paper (win rate against SFT with 95% intervals, gold score
per family, evasive / untruthful / toxic rates, the alignment tax, the reward model,
training health, wall time per stage), example replies per family from every policy
(`DIR/eval/generations.jsonl`), and the plots of `plots.py`.

Missing stages, metrics or policies are left out, never an error. `summary_table`
formats the headline numbers as the Markdown table the pipeline prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax import plots, tokenizer
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.data import world as world_lib
from rlhf_jax.stages import registry
from rlhf_jax.train import metrics_io

REPORT = "report.md"


# --- formatting ----------------------------------------------------------------------------


def _num(x: Any, digits: int = 3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def with_ci(x: Any, ci: Sequence[float] | None) -> str:
  if x is None:
    return "–"
  return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{x:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table with aligned columns (readable as plain text too)."""
  cells = [list(header), *[list(r) for r in rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def summary_table(summary: Mapping[str, Any]) -> str:
  """The headline numbers per policy, a Markdown table (what the pipeline prints)."""
  rows = []
  for name, p in plots.policies(summary):
    rows.append(
      [
        registry.title_of(name),
        with_ci(p.get("winrate_vs_sft"), p.get("winrate_vs_sft_ci95")),
        with_ci(p.get("labeler_winrate_vs_sft"), p.get("labeler_winrate_vs_sft_ci95")),
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
  out = markdown_table(header, rows) + "\n\n"
  rms = []
  for stage in registry.exporting("reward_model"):
    rm = summary.get(stage.name, {})
    rms.append(f"{stage.title} validation accuracy {_num(rm.get('val_accuracy'))}")
    if rm.get("val_gold_accuracy") is not None:
      rms[-1] += f" (gold order: {_num(rm.get('val_gold_accuracy'))})"
  out += "; ".join(rms)
  wall = summary.get("wall_seconds", {})
  if wall:
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in wall.items() if k != "total")
    out += f"; wall time {_num(wall.get('total'), 0)}s ({stages})"
  return out


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
  order = {p: i for i, p in enumerate(registry.policies())}
  by_family: dict[str, list[str]] = {}
  for index in sorted(by_prompt):
    gens = sorted(by_prompt[index], key=lambda g: order.get(g["policy"], len(order)))
    shown = by_family.setdefault(gens[0]["family"], [])
    if len(shown) >= per_family:
      continue
    rows = [
      [registry.title_of(g["policy"]), _quote(g["reply"]), f"{g['gold_score']:.2f}"] for g in gens
    ]
    prompt = tokenizer.render(gens[0]["messages"])
    shown.append(f"```\n{prompt}\n```\n\n" + markdown_table(["policy", "reply", "gold"], rows))
  known = [f for f in world_lib.FAMILIES if f in by_family]
  families = known + sorted(set(by_family) - set(known))
  return "\n\n".join(f"### {f}\n\n" + "\n\n".join(by_family[f]) for f in families)


def _steps_where(rows: Sequence[Mapping[str, Any]], key: str) -> list[int]:
  return [r["step"] for r in rows if np.any(np.asarray(r.get(key, 0)) > 0)]


def health_section(workdir: str) -> str:
  """Per stage: steps the numerical guard skipped (non-finite), checkpoint restores, and
  the steps its registered alerts flagged (PPO's: KL above the ceiling, response length
  far from the first iteration's)."""
  stages = plots.curve_stages()
  labels = list(dict.fromkeys(label for s in stages for label, _ in s.alerts))
  rows, quiet = [], []
  for stage in stages:
    metrics = metrics_io.read_metrics(stage.directory(workdir))
    if not metrics:
      continue
    skipped = int(sum(np.sum(r.get("guard/skipped", 0)) for r in metrics))
    restores = len(_steps_where(metrics, "guard/restores"))
    alerts = {label: _steps_where(metrics, stage.metric(key)) for label, key in stage.alerts}
    show = lambda s: ", ".join(map(str, s[:8])) + (" ..." if len(s) > 8 else "") if s else "-"
    if skipped or restores or any(alerts.values()):
      cells = [show(alerts.get(label, [])) for label in labels]
      rows.append([stage.name, str(skipped), str(restores), *cells])
    else:
      quiet.append(stage.name)
  text = [
    "Non-finite steps the guard skipped, last-good-checkpoint restores, and PPO's "
    "alerts (the logged steps where the KL to SFT passed `guard.kl_ceiling`, or the "
    "mean response length left `guard.length_ratio` x the first iteration's).",
    "",
  ]
  if rows:
    text.append(
      markdown_table(
        ["stage", "skipped steps", "restores", *(f"{x} alert at" for x in labels)], rows
      )
    )
  if quiet:
    text += ["", f"No skipped steps, restores or alerts: {', '.join(quiet)}."]
  return "\n".join(text)


def read_generations(workdir: str, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The replies the evaluation wrote (`summary["generations"]`; empty when none)."""
  import json

  rel = summary.get("generations")
  path = os.path.join(workdir, rel) if rel else ""
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_report(workdir: str, summary: Mapping[str, Any], examples: int = 2) -> str:
  """Write `DIR/report.md` (and the plots); returns its path."""
  made = plots.write_plots(workdir, summary)
  pols = plots.policies(summary)
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
    markdown_table(
      ["policy", "all", *[f"{f} ({counts.get(f, '?')})" for f in fams]],
      [
        [
          registry.title_of(n),
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
    markdown_table(
      ["policy", "evasive", "untruthful", "toxic", "mean words"],
      [
        [
          registry.title_of(n),
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
    markdown_table(
      ["policy", "held-out LM loss", *tasks, "mean"],
      [
        [
          registry.title_of(n),
          _num(p.get("heldout_lm_loss")),
          *[_num(p.get("zero_shot", {}).get(t)) for t in tasks],
          _num(p.get("zero_shot_mean")),
        ]
        for n, p in pols
      ],
    )
  )
  rms = registry.exporting("reward_model")
  for stage in rms:
    rm = summary.get(stage.name, {})
    md += ["", "## Reward model" + (f" ({stage.name})" if len(rms) > 1 else ""), ""]
    md.append(
      markdown_table(
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
  for stage in registry.stages():  # sections of their own (the rounds' table and plot)
    hook = stage.hook("report_section")
    text = hook(workdir) if hook is not None and stage.is_complete(workdir) else None
    if text:
      md += ["", text]
  md += ["", "## Training health", "", health_section(workdir)]
  wall = summary.get("wall_seconds", {})
  total = wall.get("total") or 0.0
  md += ["", "## Wall time", ""]
  md.append(
    markdown_table(
      ["stage", "seconds", "share"],
      [
        [k, f"{v:.1f}", f"{v / total:.0%}" if total and k != "total" else ""]
        for k, v in wall.items()
      ],
    )
  )
  if made:
    md += ["", "## Plots", ""]
    md += [f"![{os.path.basename(p)}]({p})" for p in made]
  gens = read_generations(workdir, summary)
  if gens and examples:
    md += ["", "## Example replies", "", examples_section(gens, examples)]
  path = os.path.join(workdir, REPORT)
  workdir_lib.write_text(path, "\n".join(md) + "\n")
  return path
