"""The statistics of an evaluation: per-prompt outcomes against the reference policy
(gold judge, simulated labelers) and 95% intervals of their means."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import labelers
from rlhf_jax.errors import UserInputError


def outcomes(scores: Sequence[float], ref_scores: Sequence[float]) -> np.ndarray:
  """f64[N] per prompt: 1 where `scores` beats `ref_scores`, 0.5 on a tie, 0 on a loss."""
  a, b = np.asarray(scores, np.float64), np.asarray(ref_scores, np.float64)
  return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def normal_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """Mean +- z * s / sqrt(n) (s: sample std, ddof 1); (mean, mean) for n < 2."""
  x = np.asarray(values, np.float64)
  m = float(x.mean())
  if len(x) < 2:
    return m, m
  z = {0.95: 1.959963984540054}.get(level) or _z(level)
  half = z * float(x.std(ddof=1)) / math.sqrt(len(x))
  return m - half, m + half


def _z(level: float) -> float:
  from statistics import NormalDist

  return NormalDist().inv_cdf(0.5 + level / 2)


def bootstrap_ci(
  values: Sequence[float], num_samples: int, rng: np.random.Generator, level: float = 0.95
) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean: resample the N values with replacement
  `num_samples` times, take the (1 - level)/2 and (1 + level)/2 quantiles of the means."""
  x = np.asarray(values, np.float64)
  idx = rng.integers(0, len(x), size=(num_samples, len(x)))
  means = x[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def ci95(
  values: Sequence[float],
  method: str,
  rng: np.random.Generator,
  num_samples: int = 2000,
  bounds: tuple[float, float] | None = (0.0, 1.0),
) -> list[float]:
  """[lo, hi], the 95% interval of the mean of `values` by `method`, widened to contain
  the mean and clipped to `bounds`."""
  if method == "bootstrap":
    lo, hi = bootstrap_ci(values, num_samples, rng)
  elif method == "normal":
    lo, hi = normal_ci(values)
  else:
    raise UserInputError(f"config.eval.ci: must be bootstrap|normal, got {method!r}")
  m = float(np.mean(values))
  lo, hi = min(lo, m), max(hi, m)
  if bounds is not None:
    lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
  return [lo, hi]


def labeler_outcomes(
  tasks: Sequence[Mapping[str, Any]],
  replies: Sequence[str],
  ref_replies: Sequence[str],
  rng: np.random.Generator,
  world_config=None,
  gold: Sequence[float] | None = None,
  ref_gold: Sequence[float] | None = None,
) -> np.ndarray:
  """f64[N]: 1 where a labeler drawn from the pool ranks the reply above the reference
  reply, 0 below; identical texts are a tie (0.5) without asking anyone."""
  pool = labelers.pool(world_config)
  out = np.empty(len(tasks))
  for i, (task, a, b) in enumerate(zip(tasks, replies, ref_replies, strict=True)):
    lab = pool[int(rng.integers(len(pool)))]
    if a == b:
      out[i] = 0.5
      continue
    g = None if gold is None else [gold[i], ref_gold[i]]
    out[i] = 1.0 if labelers.rank_one(lab, task, [a, b], rng, g)[0] == 0 else 0.0
  return out
