"""The main job: every registered stage in order, resumable, with a summary.

  rlhf-jax pipeline --config configs/default.py --workdir DIR

data + tokenizer -> pretrain -> SFT -> comparisons -> RM -> PPO -> PPO-ptx -> eval
(+ report): the stages of `stages/registry.py` in registration order, then evaluation.
A stage whose outputs are complete is skipped, so re-running an interrupted pipeline
resumes it (inside a stage, from its latest checkpoint); one whose outputs (complete or
not) were made with other settings is an error naming them (`provenance`), checked for
every stage before any runs. The wall time of each stage
run is added to `DIR/wall_seconds.json`, which evaluation folds into `summary.json`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable

import ml_collections

from rlhf_jax import distributed, provenance
from rlhf_jax.stages import registry
from rlhf_jax.workdir import WALL_SECONDS


def _eval(config, workdir):
  from rlhf_jax import evaluate

  return evaluate.run(config, workdir)


def run_stage(stage: registry.Stage, config: ml_collections.ConfigDict, workdir: str):
  """Run (or resume) `stage` after checking that its directory and those of the stages
  it reads were made with these settings (recording them when it starts afresh); what
  the stage returns."""
  for name in registry.upstream([stage.name]):
    provenance.check(registry.get(name), config, workdir)
  wrote = provenance.record(stage, config, workdir)
  try:
    return stage.train_and_evaluate(config, workdir)
  except BaseException:
    if wrote and not provenance.has_outputs(stage, workdir):
      provenance.forget(stage, workdir)
    raise


def steps() -> list[tuple[str, Callable]]:
  """(name, fn(config, workdir)) of every stage in pipeline order, then evaluation."""
  out = [(s.name, functools.partial(run_stage, s)) for s in registry.stages()]
  return [*out, (registry.EVAL, _eval)]


def is_complete(workdir: str, name: str) -> bool:
  """Whether step `name`'s outputs in `workdir` are complete (evaluation never is: it
  reads the stages' exports, and caches per policy)."""
  return name != registry.EVAL and registry.get(name).is_complete(workdir)


def _active(name: str, config) -> bool:
  return name == registry.EVAL or registry.get(name).active(config)


def _add_wall(workdir: str, name: str, seconds: float) -> dict[str, float]:
  path = os.path.join(workdir, WALL_SECONDS)
  wall = {}
  if os.path.exists(path):
    with open(path) as f:
      wall = json.load(f)
  wall[name] = wall.get(name, 0.0) + seconds
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(wall, f, indent=1)
  os.replace(tmp, path)
  return wall


def run(config: ml_collections.ConfigDict, workdir: str, only: tuple[str, ...] = ()) -> dict:
  """Run every step not yet complete (of `only`, when given); return evaluation's
  summary."""
  os.makedirs(workdir, exist_ok=True)
  provenance.check_all(config, workdir)  # before anything runs
  summary: dict = {}
  todo = [(n, f) for n, f in steps() if (not only or n in only) and _active(n, config)]
  for i, (name, fn) in enumerate(todo, 1):
    if is_complete(workdir, name):
      print(f"[{i}/{len(todo)}] {name}: complete, skipped")
      continue
    print(f"[{i}/{len(todo)}] {name} ...", flush=True)
    start = time.time()
    out = fn(config, workdir)
    seconds = time.time() - start
    if name == registry.EVAL:
      summary = out
    else:
      distributed.first(f"wall {name}", functools.partial(_add_wall, workdir, name, seconds))
    print(f"[{i}/{len(todo)}] {name}: done in {seconds:.1f}s", flush=True)
  return summary
