"""README's result tables, rendered from the JSON the runs wrote: one script, one source.

  python experiments/readme_tables.py                  # re-render README's marked tables
  python experiments/readme_tables.py --check          # exit 1 naming the tables that differ
  python experiments/readme_tables.py --list           # table -> JSON -> the command writing it
  python experiments/readme_tables.py --collect-quickstart runs/seed0 runs/seed1 runs/seed2

A table lives in README between

  <!-- table:NAME source=PATH -->
  ...
  <!-- /table -->

NAME picks its renderer in `TABLES` below, PATH (relative to the repository) is the JSON
it is rendered from, and must be the one `TABLES` names. Renderers are the experiments'
own (`ablation_beta.table`, `bench_ppo.report`, ...: what each script prints or writes
to its `.md`), applied to the JSON that script wrote. `tests/test_readme_tables.py` runs
`--check` in the fast tier, so a README figure that no run wrote, or a JSON re-run
without re-rendering, fails the suite.

A marker ending in ` pending -->` holds text that predates its JSON (no run has written
PATH yet): `--check` lets it be while PATH does not exist and fails once it does;
re-rendering then fills it in and drops the word.

`--collect-quickstart` aggregates the `summary.json` of several full pipelines (the
Quick start's three seeds) into experiments/results/quickstart.json: per metric the
value of every run, their mean and the two-sided 95% Student-t interval of the mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the experiments import each other as scripts do
  sys.path.insert(0, HERE)

import ablation_beta  # noqa: E402
import bench_peers  # noqa: E402
import bench_ppo  # noqa: E402
import figure1  # noqa: E402
import leaderboard  # noqa: E402
import overoptimization  # noqa: E402
import paper_common as pc  # noqa: E402
import preemption  # noqa: E402
import rm_scaling  # noqa: E402
import rounds as rounds_experiment  # noqa: E402

from rlhf_jax import plots, sweep  # noqa: E402
from rlhf_jax.stages import registry  # noqa: E402

ROOT = os.path.dirname(HERE)
QUICKSTART = "experiments/results/quickstart.json"

# --- the Quick start: several pipelines, aggregated -------------------------------------------

# (summary key of a policy, column title, digits): the columns of `report.summary_table`.
POLICY_METRICS = (
  ("winrate_vs_sft", "win rate vs SFT (gold)", 3),
  ("labeler_winrate_vs_sft", "win rate vs SFT (labelers)", 3),
  ("gold_score", "gold score", 3),
  ("kl_to_sft", "KL to SFT", 2),
  ("heldout_lm_loss", "held-out LM loss", 3),
  ("zero_shot_mean", "zero-shot acc", 3),
)
RM_METRICS = ("val_accuracy", "val_gold_accuracy")


def across(values: Sequence[float | None]) -> dict[str, Any]:
  """`{"values", "mean", "ci95_half", "ci95"}` over runs: the 95% t-interval of the mean
  (`sweep.mean_ci`; half-width None for a single run)."""
  mean, half = (None if x != x else x for x in sweep.mean_ci(values))  # (nan: none, or one run)
  ci = None if half is None else [mean - half, mean + half]
  return {"values": list(values), "mean": mean, "ci95_half": half, "ci95": ci}


def collect(run_dirs: Sequence[str]) -> dict[str, Any]:
  """quickstart.json from the `summary.json` of each pipeline work directory."""
  runs = []
  for d in run_dirs:
    with open(os.path.join(d, "summary.json")) as f:
      runs.append(json.load(f))
  names = [n for n, _ in plots.policies(runs[0])]
  rms = [s.name for s in registry.exporting("reward_model") if s.name in runs[0]]
  walls = list(runs[0].get("wall_seconds", {}))
  return {
    "runs": [
      {"workdir": os.path.abspath(d), "seed": s.get("eval", {}).get("config_seed")}
      for d, s in zip(run_dirs, runs, strict=True)
    ],
    "num_prompts": runs[0].get("num_prompts"),
    "reference": registry.reference().policy,
    "policies": {
      n: {
        "title": registry.title_of(n),
        **{
          k: across([s["policies"].get(n, {}).get(k) for s in runs]) for k, _, _ in POLICY_METRICS
        },
      }
      for n in names
    },
    "reward_models": {
      r: {
        "title": registry.get(r).title,
        **{k: across([s.get(r, {}).get(k) for s in runs]) for k in RM_METRICS},
      }
      for r in rms
    },
    "wall_seconds": {k: across([s.get("wall_seconds", {}).get(k) for s in runs]) for k in walls},
  }


def _pm(stat: dict[str, Any], digits: int = 3) -> str:
  if stat["mean"] is None:
    return "–"
  half = stat["ci95_half"]
  return f"{stat['mean']:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def quickstart_table(q: dict[str, Any]) -> str:
  """The Quick start's headline: per policy mean ± 95% t-interval over the pipelines,
  each run's gold win rates, the reward model(s) and the wall time."""
  seeds = ", ".join(str(r["seed"]) for r in q["runs"])
  head = (
    f"Mean ± 95% t-interval over {len(q['runs'])} pipelines (`--config.seed` {seeds}), each"
    f" judging its policies on its {q['num_prompts']} held-out prompts:\n\n"
  )
  rows = [
    [p["title"], *(_pm(p[k], d) for k, _, d in POLICY_METRICS)] for p in q["policies"].values()
  ]
  text = head + pc.markdown(["policy", *(t for _, t, _ in POLICY_METRICS)], rows)
  per_seed = "; ".join(
    f"{p['title']} "
    + " / ".join("–" if v is None else f"{v:.3f}" for v in p["winrate_vs_sft"]["values"])
    for name, p in q["policies"].items()
    if name != q["reference"]  # (0.5 in every run)
  )
  text += f"\n\nGold win rate vs SFT per seed ({seeds}): {per_seed}."
  for r in q["reward_models"].values():
    text += (
      f"\n{r['title']} validation accuracy {_pm(r['val_accuracy'])}"
      f" (gold order: {_pm(r['val_gold_accuracy'])})."
    )
  wall = q["wall_seconds"]
  if "total" in wall:
    stages = ", ".join(f"{k} {w['mean']:.0f}" for k, w in wall.items() if k != "total")
    text += f"\nWall time per pipeline {_pm(wall['total'], 0)} s (means: {stages})."
  return text


# --- every table -------------------------------------------------------------------------------


def _code(command: str, body: str) -> str:
  return f"```\n$ {command}\n{body}\n```"


@dataclasses.dataclass(frozen=True)
class Table:
  source: str  # the JSON, relative to the repository
  render: Callable[[Any], str]  # its contents -> README's text between the markers
  writer: str  # the command that writes `source`


_PAPER = "python experiments/{0}.py --workdir runs/{1} --shared runs/stages && cp runs/{1}/{2}.* "
TABLES: dict[str, Table] = {
  "quickstart": Table(
    QUICKSTART,
    quickstart_table,
    "rlhf-jax pipeline --config configs/default.py --workdir runs/seedS --config.seed=S"
    " (S = 0, 1, 2); python experiments/readme_tables.py --collect-quickstart runs/seed0"
    " runs/seed1 runs/seed2",
  ),
  "ablation_beta": Table(
    "experiments/results/ablation_beta.json",
    lambda d: ablation_beta.table(d, "ppo", "beta"),
    _PAPER.format("ablation_beta", "beta", "ablation_beta") + "experiments/results/",
  ),
  "ablation_ptx": Table(
    "experiments/results/ablation_ptx.json",
    lambda d: ablation_beta.table(d, "ppo_ptx", "gamma_ptx"),
    _PAPER.format("ablation_ptx", "ptx", "ablation_ptx") + "experiments/results/",
  ),
  "figure1": Table(
    "experiments/results/figure1.json",
    figure1.table,
    _PAPER.format("figure1", "sizes", "figure1") + "experiments/results/",
  ),
  "rm_scaling": Table(
    "experiments/results/rm_scaling.json",
    rm_scaling.table,
    _PAPER.format("rm_scaling", "rm", "rm_scaling") + "experiments/results/",
  ),
  "overoptimization": Table(
    "experiments/results/overoptimization.json",
    overoptimization.table,
    _PAPER.format("overoptimization", "overopt", "overoptimization") + "experiments/results/",
  ),
  "rounds": Table(
    "experiments/results/rounds.json",
    lambda d: rounds_experiment.table(d["settings"]),
    "python experiments/rounds.py --workdir runs/rounds",
  ),
  "leaderboard": Table(
    "experiments/results/leaderboard.json",
    leaderboard.table,
    "python experiments/leaderboard.py --workdir runs/leaderboard",
  ),
  "bench_ppo": Table(
    "experiments/results/bench_ppo.json",
    lambda d: _code(bench_ppo.command_line(d), bench_ppo.report(d)),
    "python experiments/bench_ppo.py --iters 11 --out experiments/results/bench_ppo.json",
  ),
  "bench_peers": Table(
    "experiments/results/bench_peers.json",
    lambda d: _code(d["command"], bench_peers.report(d)),
    "python experiments/bench_peers.py --peer-python PY --rounds 7"
    " --out experiments/results/bench_peers.json",
  ),
  "preemption": Table(
    "experiments/results/preemption.json",
    lambda d: _code(preemption.command_line(d), "\n" + preemption.table(d)),
    "python experiments/preemption.py --kills 20 --out experiments/results/preemption.json",
  ),
  "preemption_sigint": Table(
    "experiments/results/preemption_sigint.json",
    lambda d: _code(preemption.command_line(d), "\n" + preemption.table(d)),
    "python experiments/preemption.py --kills 20 --stages pipeline --modes sigint"
    " --out experiments/results/preemption_sigint.json",
  ),
}

_MARKER = re.compile(
  r"<!-- table:(?P<name>[\w-]+) source=(?P<source>\S+)(?P<pending> pending)? -->\n"
  r"(?P<body>.*?)\n<!-- /table -->",
  re.S,
)


@dataclasses.dataclass
class Rendered:
  readme: str  # README with every table whose JSON exists re-rendered
  changed: list[str]  # tables whose text differs from their JSON's rendering
  pending: list[str]  # pending tables whose JSON does not exist yet
  names: list[str]  # every marked table, in README order


def render(readme: str, root: str = ROOT) -> Rendered:
  """Re-render README's marked tables from their JSON under `root`."""
  if readme.count("<!-- table:") != len(_MARKER.findall(readme)):
    raise SystemExit("README: a `<!-- table:NAME source=PATH -->` marker is malformed or unclosed")
  out = Rendered(readme, [], [], [])

  def one(m: re.Match) -> str:
    name, source = m["name"], m["source"]
    out.names.append(name)
    table = TABLES.get(name)
    if table is None:
      raise SystemExit(f"README: unknown table {name!r} (known: {', '.join(TABLES)})")
    if source != table.source:
      raise SystemExit(f"README: table {name} says source={source}, its JSON is {table.source}")
    path = os.path.join(root, source)
    if not os.path.exists(path):
      if m["pending"]:
        out.pending.append(name)
        return m[0]
      raise SystemExit(f"README: table {name}: {source} is missing (written by: {table.writer})")
    with open(path) as f:
      text = table.render(json.load(f))
    if m["pending"] or text != m["body"]:
      out.changed.append(name)
    return f"<!-- table:{name} source={source} -->\n{text}\n<!-- /table -->"

  out.readme = _MARKER.sub(one, readme)
  return out


def _diff(old: str, new: str, limit: int = 20) -> str:
  lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), "README", "JSON", n=0))
  return "\n".join(lines[2 : 2 + limit])


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__.split("\n")[0],
    epilog=__doc__.split("\n", 1)[1],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument("--check", action="store_true", help="exit 1 if README's tables differ")
  ap.add_argument("--list", action="store_true", help="print table -> JSON -> writer")
  ap.add_argument("--collect-quickstart", nargs="+", metavar="RUN_DIR", default=None)
  ap.add_argument("--root", default=ROOT, help="the repository (README.md and the JSON)")
  args = ap.parse_args(argv)
  if args.collect_quickstart:
    q, out = collect(args.collect_quickstart), os.path.join(args.root, QUICKSTART)
    seeds = [r["seed"] for r in q["runs"]]
    if len(set(seeds)) < len(seeds):
      print(f"warning: the runs share seeds ({seeds}): not independent repeats", file=sys.stderr)
    with open(out, "w") as f:
      json.dump(q, f, indent=1)
    print(f"wrote {out}")
    return 0
  if args.list:
    for name, t in TABLES.items():
      print(f"{name}: {t.source}\n  written by: {t.writer}")
    return 0
  path = os.path.join(args.root, "README.md")
  with open(path) as f:
    readme = f.read()
  r = render(readme, args.root)
  if r.pending:
    print(f"pending (no JSON yet): {', '.join(r.pending)}", file=sys.stderr)
  if args.check:
    if r.changed:
      print(f"README tables differ from their JSON: {', '.join(r.changed)}", file=sys.stderr)
      print(_diff(readme, r.readme), file=sys.stderr)
      print("re-render: python experiments/readme_tables.py", file=sys.stderr)
      return 1
    return 0
  if r.changed:
    with open(path, "w") as f:
      f.write(r.readme)
  print(f"re-rendered: {', '.join(r.changed) or 'nothing changed'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
