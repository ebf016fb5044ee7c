"""A stage's logged metrics: `<dir>/metrics.jsonl` (one JSON object per logged step)
and TensorBoard event files, written by process 0 only."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class MetricsWriter:
  """`<dir>/metrics.jsonl` (one JSON object per logged step) + TensorBoard events."""

  def __init__(self, directory: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(directory, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(directory, exist_ok=True)
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(directory, "tb"), flush_secs=30)

  def truncate_after(self, step: int) -> None:
    """Drop lines logged after `step` (written after the checkpoint we resume from);
    -1 drops every line."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    keep = [
      json.dumps(row) + "\n"
      for row in read_metrics(os.path.dirname(self.path))
      if row.get("step", 0) <= step
    ]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _to_py(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _to_py(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def read_metrics(directory: str) -> list[dict[str, Any]]:
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # the half-written last line of a killed run
        continue
  return rows
