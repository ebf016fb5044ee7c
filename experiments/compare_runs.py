"""Are two pipeline work directories the same run? Bitwise, wall times and throughput aside.

  python experiments/compare_runs.py runs/before runs/after

Compares `summary.json` (every number but `wall_seconds`), each stage's `metrics.jsonl`
(throughput keys `*_per_s` and `wall_seconds` left out), each exported parameter
(`np.array_equal`) and `params.json` (its tokenizer path, wall time and throughput
aside), the comparisons datasets and `eval/generations.jsonl`. Prints what differs and
exits 1, or says IDENTICAL. What a refactoring that must not change results is checked
with (e.g. the same `rlhf-jax pipeline --config configs/default.py:runlocal` before and
after).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

TIMING = ("wall_seconds", "generations")  # generations: a path, compared as a file below
FILES = ("comparisons/train.jsonl", "comparisons/validation.jsonl", "eval/generations.jsonl")


def _timeless(x):
  """`x` without timing keys (at any depth)."""
  if isinstance(x, dict):
    return {k: _timeless(v) for k, v in x.items() if k not in TIMING and not k.endswith("_per_s")}
  if isinstance(x, list):
    return [_timeless(v) for v in x]
  return x


def _count_numbers(x) -> int:
  if isinstance(x, dict):
    return sum(_count_numbers(v) for v in x.values())
  if isinstance(x, list):
    return sum(_count_numbers(v) for v in x)
  return int(isinstance(x, (int, float)) and not isinstance(x, bool))


def _json(path: str):
  with open(path) as f:
    return json.load(f)


def compare(a: str, b: str) -> tuple[list[str], int]:
  """(what differs, how many numbers of summary.json were compared)."""
  diff = []
  sa, sb = _timeless(_json(f"{a}/summary.json")), _timeless(_json(f"{b}/summary.json"))
  if json.dumps(sa, sort_keys=True) != json.dumps(sb, sort_keys=True):
    diff.append("summary.json")
  for stage in sorted(d for d in os.listdir(a) if os.path.isdir(f"{a}/{d}")):
    metrics = f"{stage}/metrics.jsonl"
    if os.path.exists(f"{a}/{metrics}"):
      rows = [[_timeless(json.loads(line)) for line in open(f"{d}/{metrics}")] for d in (a, b)]
      if json.dumps(rows[0], sort_keys=True) != json.dumps(rows[1], sort_keys=True):
        diff.append(metrics)
    if os.path.isdir(f"{a}/{stage}/params"):
      trees = [
        ocp.StandardCheckpointer().restore(os.path.abspath(f"{d}/{stage}/params")) for d in (a, b)
      ]
      la, lb = (jax.tree.leaves(t) for t in trees)
      if len(la) != len(lb) or not all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True)):
        diff.append(f"{stage}/params")
      infos = [_timeless(_json(f"{d}/{stage}/params.json")) for d in (a, b)]
      for info in infos:
        info.pop("tokenizer", None)  # an absolute path
      if json.dumps(infos[0], sort_keys=True) != json.dumps(infos[1], sort_keys=True):
        diff.append(f"{stage}/params.json")
  for name in FILES:
    if os.path.exists(f"{a}/{name}") and open(f"{a}/{name}").read() != open(f"{b}/{name}").read():
      diff.append(name)
  return diff, _count_numbers(sa)


def main(argv: list[str]) -> int:
  a, b = argv
  diff, numbers = compare(a, b)
  print(f"summary.json: {numbers} numbers compared")
  print("differ: " + ", ".join(diff) if diff else "IDENTICAL (wall times and throughput aside)")
  return 1 if diff else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
