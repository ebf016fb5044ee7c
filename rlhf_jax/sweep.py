"""Sweeps: many runs of one config, declared beside it, sharing their common stages.

A sweep file is a config file (`get_config(arg)`) with a `get_hyper(h)` beside it, as
in big_vision: products and zips of `config.x` values, seeds included:

    def get_hyper(h):
      return h.product([
        h.sweep("config.ppo.kl_coef", [0.0, 0.02, 0.1]),
        h.sweep("config.ppo.seed", [0, 1, 2]),
      ])

and optionally `STAGES` (the stages its table needs; their upstream stages are implied;
default: all) and `METRICS` (summary.json paths for the table).

  rlhf-jax sweep --config configs/sweeps/beta.py --workdir DIR [--workers N] [--vmap on]
                 [--shared DIR2]

Every point is the config plus its overrides. A stage's output is shared by every
point whose settings agree on what the stage reads (its sections, its upstream stages'
and the common ones: seed, model, mesh), so a beta sweep trains one SFT and one RM:

  DIR/stages/<stage>/<fingerprint>/   the stage's outputs (`--shared S`: S/<stage>/...,
                                      so sweeps of one base config share them too)
  DIR/points/<point>/                 a pipeline workdir: links to its stages + eval
  DIR/results.{json,csv,md}           one row per point; the table: mean ± 95% CI over
                                      the seeds of each setting

Stages run level by level (data, pretrain, ..., eval), N at a time in worker processes
(`--workers`); a stage that fails marks the points that need it failed (with the error)
and the rest go on. A re-run resumes: completed stages are skipped, interrupted ones
resume from their checkpoints, failed ones are tried again. With `--vmap on` (the
default `auto`: on for GPU / TPU, off on CPU), PPO points that differ only in
`HPARAMS` numbers and their `seed` train as one vmapped program (a stage's registered
`group`, stages/ppo/group.py):
faster where one run leaves the device idle (accelerators, small models), not on a CPU
that one run already keeps busy (experiments/bench_vmap.py: 0.83x at the default size).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax import config_lib, pipeline, provenance
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import registry
from rlhf_jax.workdir import WALL_SECONDS, write_text

DEFAULT_METRICS = (
  "rm.val_accuracy",
  "policies.*.winrate_vs_sft",
  "policies.*.gold_score",
  "policies.*.kl_to_sft",
  "policies.*.heldout_lm_loss",
)


class Hyper:
  """big_vision's `get_hyper` vocabulary. A sweep is a list of points, each a dict
  `{"config.a.b": value}`."""

  @staticmethod
  def sweep(key: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    return [{key: v} for v in values]

  @staticmethod
  def fixed(key: str, value: Any) -> list[dict[str, Any]]:
    return [{key: value}]

  @staticmethod
  def product(parts: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*parts)]

  @staticmethod
  def zipit(parts: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    if len({len(p) for p in parts}) > 1:
      raise UserInputError(f"get_hyper: zipit of lists of lengths {[len(p) for p in parts]}")
    return [dict(kv for d in combo for kv in d.items()) for combo in zip(*parts, strict=True)]

  @staticmethod
  def chainit(parts: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [d for p in parts for d in p]


@dataclasses.dataclass
class Point:
  name: str  # "ppo.kl_coef=0.02,ppo.seed=1": also its directory under DIR/points
  overrides: dict[str, Any]  # {"ppo.kl_coef": 0.02, ...}
  config: ml_collections.ConfigDict
  fingerprints: dict[str, str]  # stage -> fingerprint of what it reads


@dataclasses.dataclass
class Sweep:
  spec: str  # the sweep file (with its `:arg`)
  points: list[Point]
  stages: tuple[str, ...]  # every stage a point runs, in order (eval last)
  metrics: tuple[str, ...]


def _key(k: str) -> str:
  if not k.startswith("config."):
    raise UserInputError(f"get_hyper: keys start with 'config.', got {k!r}")
  return k[len("config.") :]


def point_name(overrides: dict[str, Any]) -> str:
  """`k=v,...`: the point's directory name too (a value's slashes become `_`)."""
  return ",".join(f"{k}={v}".replace(os.sep, "_") for k, v in overrides.items()) or "base"


def needed_stages(wanted: Sequence[str]) -> tuple[str, ...]:
  """`wanted` stages, their upstream stages and eval, in pipeline order."""
  for s in wanted:
    if s not in registry.names():
      known = ", ".join(registry.names())
      raise UserInputError(f"STAGES: unknown stage {s!r} (known: {known})")
  return (*registry.upstream(wanted), registry.EVAL)


def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> Sweep:
  """The sweep of `spec` (its points' configs built and validated), with command-line
  overrides applied to every point before the point's own."""
  path = spec.partition(":")[0]
  module = config_lib.load_module(path)
  if not hasattr(module, "get_hyper"):
    raise UserInputError(f"{path}: no get_hyper(h) function (not a sweep file)")
  raw = module.get_hyper(Hyper())
  if not raw:
    raise UserInputError(f"{path}: get_hyper returned no points")
  points, seen = [], set()
  for p in raw:
    ov = {_key(k): v for k, v in p.items()}
    name = point_name(ov)
    if name in seen:
      raise UserInputError(f"{path}: point {name} appears twice")
    seen.add(name)
    config = config_lib.get(spec, [*overrides, *((k, str(v)) for k, v in ov.items())])
    points.append(Point(name, ov, config, provenance.fingerprints(config)))
  wanted = getattr(module, "STAGES", registry.names())
  keep = lambda s: s not in registry.names() or registry.get(s).active(points[0].config)
  stages = needed_stages([s for s in wanted if keep(s)])
  return Sweep(spec, points, stages, tuple(getattr(module, "METRICS", DEFAULT_METRICS)))


# --- running ----------------------------------------------------------------------------------


def stage_dir(shared: str, stage: str, fingerprint: str) -> str:
  return os.path.join(shared, stage, fingerprint)


def point_dir(root: str, point: Point) -> str:
  return os.path.join(root, "points", point.name)


def _link_point(root: str, shared: str, point: Point, stages: Sequence[str]) -> str:
  """The point's pipeline workdir: a link per stage to its shared output."""
  wd = point_dir(root, point)
  os.makedirs(wd, exist_ok=True)
  for stage in stages:
    if stage == registry.EVAL:
      continue
    target = stage_dir(shared, stage, point.fingerprints[stage])
    os.makedirs(target, exist_ok=True)
    link = os.path.join(wd, stage)
    if not os.path.islink(link):
      os.symlink(os.path.relpath(target, wd), link)
  return wd


def _task(
  spec: str,
  overrides: list[tuple[str, str]],
  workdirs: list[str],
  stage: str,
  group_dir: str | None = None,
) -> float:
  """Run one stage for one point (or, for a vmapped group, several); seconds taken.
  Module-level, so worker processes can run it."""
  start = time.time()
  if group_dir is not None:
    group = importlib.import_module(registry.get(stage).group)
    members = [(config_lib.get(spec, ov), wd) for ov, wd in zip(overrides, workdirs, strict=True)]
    for config, wd in members:
      provenance.check(registry.get(stage), config, wd)
      provenance.record(registry.get(stage), config, wd)
    group.train_group(members, stage, group_dir)
  else:
    [run] = [fn for name, fn in pipeline.steps() if name == stage]
    run(config_lib.get(spec, overrides[0]), workdirs[0])
  return time.time() - start


WALL = "wall_seconds"  # a shared stage's own wall time, in its directory


def _complete(root: str, point: Point, stage: str, stages: Sequence[str]) -> bool:
  """A stage's outputs are complete; eval's when its summary is newer than every export."""
  wd = point_dir(root, point)
  if stage != registry.EVAL:
    return pipeline.is_complete(wd, stage)
  summary = os.path.join(wd, "summary.json")
  exports = [os.path.join(wd, s, "params.json") for s in stages if s != registry.EVAL]
  exports = [e for e in exports if os.path.exists(e)]
  return os.path.exists(summary) and all(
    os.path.getmtime(summary) > os.path.getmtime(e) for e in exports
  )


def run(
  spec: str,
  workdir: str,
  overrides: Sequence[tuple[str, str]] = (),
  workers: int = 1,
  vmap: str = "auto",
  shared: str = "",
) -> list[dict[str, Any]]:
  """Run (or resume) every point of the sweep; write and return the results.

  `shared` holds the stages' outputs (default `workdir/stages`): sweeps of one base
  config given the same `shared` train their common stages once.
  """
  sweep = load(spec, overrides)
  if vmap not in ("auto", "on", "off"):
    raise UserInputError(f"--vmap: must be auto|on|off, got {vmap!r}")
  if vmap == "auto":
    import jax

    vmap = "off" if jax.default_backend() == "cpu" else "on"
  os.makedirs(workdir, exist_ok=True)
  shared = os.path.abspath(shared or os.path.join(workdir, "stages"))
  about = {
    "config": spec,
    "overrides": list(overrides),
    "stages": sweep.stages,
    "points": [
      {"name": p.name, "overrides": p.overrides, "fingerprints": p.fingerprints}
      for p in sweep.points
    ],
  }
  write_text(os.path.join(workdir, "sweep.json"), json.dumps(about, indent=1))
  for p in sweep.points:
    _link_point(workdir, shared, p, sweep.stages)
  failed: dict[str, str] = {}  # point name -> error
  pool = None
  if workers > 1:
    pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")
    )
  try:
    for stage in sweep.stages:
      if stage == registry.EVAL:  # the points' stage times, for their summary.json
        for p in (p for p in sweep.points if p.name not in failed):
          wall = json.dumps(_wall(workdir, p, sweep.stages))
          write_text(os.path.join(point_dir(workdir, p), WALL_SECONDS), wall)
      _run_level(workdir, shared, sweep, stage, overrides, failed, pool, vmap)
  finally:
    if pool is not None:
      pool.shutdown()
  return write_results(workdir, sweep, failed)


def _run_level(root, shared, sweep: Sweep, stage, overrides, failed, pool, vmap) -> None:
  """Every distinct task of one stage; failures go into `failed` (by point)."""
  todo: dict[str, list[Point]] = {}  # task key -> the points it serves
  for p in sweep.points:
    if p.name in failed or _complete(root, p, stage, sweep.stages):
      continue
    key = p.name if stage == registry.EVAL else p.fingerprints[stage]
    todo.setdefault(key, []).append(p)
  if not todo:
    print(f"sweep: {stage}: nothing to do")
    return
  tasks = []  # (points, args of _task)
  group_module = "" if stage == registry.EVAL else registry.get(stage).group
  if vmap == "on" and group_module:
    group = importlib.import_module(group_module)

    groups: dict[str, list[list[Point]]] = {}
    for pts in todo.values():
      groups.setdefault(group.group_key(pts[0].config, stage), []).append(pts)
    for members in groups.values():
      firsts = [pts[0] for pts in members]
      fp = hashlib.blake2b(
        "|".join(p.fingerprints[stage] for p in firsts).encode(), digest_size=6
      ).hexdigest()
      group_dir = os.path.join(shared, stage, f"group-{fp}")
      args = (
        [_ov(overrides, p) for p in firsts],
        [point_dir(root, p) for p in firsts],
        stage,
        group_dir if len(firsts) > 1 else None,
      )
      tasks.append(([p for pts in members for p in pts], args))
  else:
    for pts in todo.values():
      tasks.append((pts, ([_ov(overrides, pts[0])], [point_dir(root, pts[0])], stage)))
  print(f"sweep: {stage}: {len(tasks)} task(s) for {sum(len(t[0]) for t in tasks)} point(s)")
  if pool is None:
    results = []
    for pts, args in tasks:
      try:
        results.append((pts, args, _task(sweep.spec, *args), None))
      except Exception as e:  # noqa: BLE001  (a failed point must not stop the others)
        results.append((pts, args, None, e))
  else:
    futures = [(pts, args, pool.submit(_task, sweep.spec, *args)) for pts, args in tasks]
    results = []
    for pts, args, fut in futures:
      try:
        results.append((pts, args, fut.result(), None))
      except Exception as e:  # noqa: BLE001
        results.append((pts, args, None, e))
  for pts, args, seconds, error in results:
    if error is not None:
      msg = f"{stage}: {type(error).__name__}: {error}".splitlines()[0][:300]
      print(f"sweep: FAILED {msg} ({', '.join(p.name for p in pts)})")
      if not isinstance(error, UserInputError):
        traceback.print_exception(error)
      for p in pts:
        failed[p.name] = msg
    elif stage != registry.EVAL:
      share = seconds / len(args[1])  # a group's time, split evenly over its runs
      for wd in args[1]:
        write_text(os.path.join(wd, stage, WALL), f"{share}\n")


def _ov(overrides, p: Point) -> list[tuple[str, str]]:
  return [*overrides, *((k, str(v)) for k, v in p.overrides.items())]


def _wall(root: str, p: Point, stages: Sequence[str]) -> dict[str, float]:
  out = {}
  for stage in stages:
    path = os.path.join(point_dir(root, p), stage, WALL)
    if stage != registry.EVAL and os.path.exists(path):
      with open(path) as f:
        out[stage] = float(f.read())
  return out


# --- results --------------------------------------------------------------------------------


def _get(d: Any, path: str) -> Any:
  for part in path.split("."):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


def expand_metrics(patterns: Sequence[str], summary: dict) -> list[str]:
  """`policies.*.x` -> one path per policy in the summary."""
  out = []
  for pat in patterns:
    if "*" in pat:
      head, _, tail = pat.partition(".*.")
      for name in _get(summary, head) or {}:
        out.append(f"{head}.{name}.{tail}")
    else:
      out.append(pat)
  return out


def t_quantile(df: int, level: float = 0.975) -> float:
  from scipy import stats  # a dependency of jax

  return float(stats.t.ppf(level, df))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
  """(mean, half-width of the 95% t-interval over the values; nan for one value)."""
  x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if len(x) == 0:
    return math.nan, math.nan
  if len(x) == 1:
    return float(x[0]), math.nan
  return float(x.mean()), t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


def is_seed(key: str) -> bool:
  return key.rsplit(".", 1)[-1] == "seed"


def write_results(root: str, sweep: Sweep, failed: dict[str, str]) -> list[dict[str, Any]]:
  rows = []
  for p in sweep.points:
    path = os.path.join(point_dir(root, p), "summary.json")
    summary = {}
    if p.name not in failed and os.path.exists(path):
      with open(path) as f:
        summary = json.load(f)
    status = "failed" if p.name in failed else ("ok" if summary else "missing")
    metrics = {m: _get(summary, m) for m in expand_metrics(sweep.metrics, summary)}
    rows.append(
      {
        "point": p.name,
        "overrides": p.overrides,
        "status": status,
        "error": failed.get(p.name),
        "wall_seconds": _wall(root, p, sweep.stages),
        "metrics": metrics,
      }
    )
  # Each file is replaced whole: a sweep killed while writing leaves the previous one.
  write_text(os.path.join(root, "results.json"), json.dumps(rows, indent=1, default=str))
  keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
  mkeys = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
  f = io.StringIO(newline="")
  w = csv.writer(f)
  w.writerow(["point", *keys, "status", *mkeys, "error"])
  for r in rows:
    w.writerow(
      [
        r["point"],
        *(r["overrides"].get(k) for k in keys),
        r["status"],
        *(r["metrics"].get(m) for m in mkeys),
        r["error"] or "",
      ]
    )
  write_text(os.path.join(root, "results.csv"), f.getvalue())
  table = results_table(rows, keys, mkeys)
  write_text(os.path.join(root, "results.md"), table + "\n")
  print(table)
  n_ok = sum(r["status"] == "ok" for r in rows)
  print(f"sweep: {n_ok}/{len(rows)} points ok; results in {root}/results.{{json,csv,md}}")
  return rows


def results_table(rows: list[dict], keys: list[str], mkeys: list[str]) -> str:
  """Markdown: one line per setting (the non-seed overrides), each metric as mean ± the
  95% CI half-width over that setting's seeds (points that did not fail)."""
  setting_keys = [k for k in keys if not is_seed(k)]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r["overrides"].get(k) for k in setting_keys), []).append(r)
  head = [*setting_keys, "seeds", *mkeys]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for setting, rs in groups.items():
    ok = [r for r in rs if r["status"] == "ok"]
    cells = [str(v) for v in setting] + [f"{len(ok)}/{len(rs)}"]
    for m in mkeys:
      mean, half = mean_ci([r["metrics"].get(m) for r in ok])
      cells.append(
        "–" if math.isnan(mean) else f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")
      )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
