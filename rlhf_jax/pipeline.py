"""The main job: every stage of the recipe in order, resumable, with a summary.

  rlhf-jax pipeline --config configs/default.py --workdir DIR

data + tokenizer -> pretrain -> SFT -> comparisons -> RM -> PPO -> PPO-ptx -> eval
(+ report). A stage whose outputs are complete is skipped, so re-running an
interrupted pipeline resumes it (inside a stage, from its latest checkpoint). The wall
time of each stage run is added to `DIR/wall_seconds.json`, which evaluation folds into
`summary.json`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable

import ml_collections

from rlhf_jax import distributed
from rlhf_jax.data import prepare

WALL = "wall_seconds.json"


def _data(config, workdir):
  return prepare.prepare(config, workdir)


def _stage(module: str, **kw) -> Callable:
  def run(config, workdir):
    import importlib

    return importlib.import_module(f"rlhf_jax.stages.{module}").train_and_evaluate(
      config, workdir, **kw
    )

  return run


def _eval(config, workdir):
  from rlhf_jax import evaluate

  return evaluate.run(config, workdir)


def stages() -> list[tuple[str, Callable]]:
  return [
    ("data", _data),
    ("pretrain", _stage("pretrain")),
    ("sft", _stage("sft")),
    ("comparisons", _stage("comparisons")),
    ("rm", _stage("rm")),
    ("ppo", _stage("ppo", stage="ppo")),
    ("ppo_ptx", _stage("ppo", stage="ppo_ptx")),
    ("eval", _eval),
  ]


def is_complete(workdir: str, name: str) -> bool:
  """Whether stage `name`'s outputs in `workdir` are complete (data and eval never are)."""
  if name == "data":
    return False  # cheap and idempotent: it checks what is built itself
  if name == "comparisons":
    return os.path.exists(os.path.join(workdir, "comparisons", "DONE"))
  if name == "eval":
    return False  # always re-evaluated (it reads the stages' exports)
  return os.path.exists(os.path.join(workdir, name, "params.json"))


def _add_wall(workdir: str, name: str, seconds: float) -> dict[str, float]:
  path = os.path.join(workdir, WALL)
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
  """Run every stage not yet complete; return evaluation's summary."""
  os.makedirs(workdir, exist_ok=True)
  summary: dict = {}
  todo = [(n, f) for n, f in stages() if not only or n in only]
  for i, (name, fn) in enumerate(todo, 1):
    if is_complete(workdir, name):
      print(f"[{i}/{len(todo)}] {name}: complete, skipped")
      continue
    print(f"[{i}/{len(todo)}] {name} ...", flush=True)
    start = time.time()
    out = fn(config, workdir)
    seconds = time.time() - start
    if name == "eval":
      summary = out
    else:
      distributed.first(f"wall {name}", functools.partial(_add_wall, workdir, name, seconds))
    print(f"[{i}/{len(todo)}] {name}: done in {seconds:.1f}s", flush=True)
  return summary
