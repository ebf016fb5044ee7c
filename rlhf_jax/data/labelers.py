"""Simulated labelers: rank K replies to a prompt, with bias and noise like people do.

Labeler `l` ranks the replies of one comparison by the utility

    u_i = gold_score(task, reply_i) + bias_l * words(reply_i) / 10 + noise_l * N(0, 1)

where `bias_l ~ N(0, labeler_length_bias)` is the labeler's taste for long or short
replies and `noise_l` is `labeler_noise` scaled by a per-labeler factor (some people
are more careful than others); the normal draw is fresh for every comparison.

Calibration. Two labelers agree on a pair of replies when they order it the same way;
agreement is measured over all pairs of the same comparisons (ties included, as
replies sampled from a policy repeat). The default `labeler_noise=0.1` is calibrated on
what matters, the comparisons of the default pipeline (K replies sampled from the SFT
policy): two labelers agree on 0.716 / 0.720 of their distinct reply pairs there (the paper
reports 72.6%), and the comparisons stage measures and reports this number on every
run (`second_opinion_agreement`). On the synthetic pools of `CALIBRATION_MIX`, whose
replies are further apart in quality, the same labelers agree more: `mean_agreement`
gives 0.81/0.80 (600 comparisons, seeds 0/1; noise 0.15 -> 0.79/0.77, 0.2 -> 0.77/0.75).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax.data import judge
from rlhf_jax.data import responses as responses_lib
from rlhf_jax.data import world as world_lib

# Reply kinds in calibration pools: mostly right, with the usual failures.
CALIBRATION_MIX = {
  "correct": 0.35,
  "wrong": 0.2,
  "verbose": 0.15,
  "evasive": 0.1,
  "untruthful": 0.1,
  "toxic": 0.1,
}


@dataclasses.dataclass(frozen=True)
class Labeler:
  id: int
  length_bias: float  # utility per 10 words of reply
  noise: float  # std of the per-comparison utility noise


def pool(config: Mapping[str, Any] | ml_collections.ConfigDict | None = None) -> list[Labeler]:
  """The labeler pool of a world config (a pure function of its seed and knobs)."""
  cfg = world_lib.make_world(config).cfg
  rng = world_lib.rng_for(cfg["seed"], "labelers")
  n = int(cfg["num_labelers"])
  bias = rng.normal(0.0, cfg["labeler_length_bias"], n)
  care = np.exp(rng.normal(0.0, 0.2, n))
  return [Labeler(i, float(bias[i]), float(cfg["labeler_noise"] * care[i])) for i in range(n)]


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def utilities(
  labeler: Labeler,
  task: Mapping[str, Any],
  responses: Sequence[str],
  rng: np.random.Generator,
  gold: Sequence[float] | None = None,
) -> np.ndarray:
  """f32[K] utilities of `responses` for `labeler` (fresh noise from `rng`)."""
  gold = np.array([judge.score(task, r) for r in responses] if gold is None else gold)
  words = np.array([len(r.split()) for r in responses], dtype=np.float64)
  noise = rng.normal(0.0, labeler.noise, len(responses))
  return gold + labeler.length_bias * words / 10.0 + noise


def rank_one(
  labeler: Labeler,
  task: Mapping[str, Any],
  responses: Sequence[str],
  rng: np.random.Generator,
  gold: Sequence[float] | None = None,
) -> list[int]:
  """Indices of `responses`, best first, as `labeler` ranks them."""
  u = utilities(labeler, task, responses, rng, gold)
  return [int(i) for i in np.argsort(-u, kind="stable")]


def rank(
  tasks: Sequence[Mapping[str, Any]],
  prompts_messages: Sequence[Sequence[Mapping[str, str]]],
  responses: Sequence[Sequence[str]],
  rng: np.random.Generator | int,
  config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
) -> list[dict[str, Any]]:
  """Rank the replies of each prompt by a labeler drawn from the pool.

  Returns one record per prompt: `{"messages", "responses", "ranking" (indices,
  best first), "labeler_id", "family", "task"}`.
  """
  if not len(tasks) == len(prompts_messages) == len(responses):
    raise ValueError("tasks, prompts_messages and responses must have the same length")
  rng, labelers = _as_rng(rng), pool(config)
  out = []
  for task, messages, resp in zip(tasks, prompts_messages, responses, strict=True):
    lab = labelers[int(rng.integers(len(labelers)))]
    out.append(
      {
        "messages": [dict(m) for m in messages],
        "responses": list(resp),
        "ranking": rank_one(lab, task, resp, rng),
        "labeler_id": lab.id,
        "family": task["family"],
        "task": dict(task),
      }
    )
  return out


def num_responses(rng: np.random.Generator, config=None) -> int:
  """K for one comparison, uniform in [rank_k_min, rank_k_max]."""
  cfg = world_lib.make_world(config).cfg
  return int(rng.integers(cfg["rank_k_min"], cfg["rank_k_max"] + 1))


def mixed_responses(
  world: world_lib.World,
  task: Mapping[str, Any],
  k: int,
  rng: np.random.Generator,
  mix: Mapping[str, float] = CALIBRATION_MIX,
) -> list[str]:
  """K replies of mixed quality (kinds drawn from `mix`) to calibrate labelers on."""
  kinds, p = list(mix), np.array(list(mix.values()), dtype=np.float64)
  picks = rng.choice(len(kinds), size=k, p=p / p.sum())
  return [responses_lib.response(world, task, kinds[i], rng) for i in picks]


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
  """(pairs ordered alike, pairs) of two rankings of the same replies."""
  pos_a = {r: i for i, r in enumerate(a)}
  pos_b = {r: i for i, r in enumerate(b)}
  agree = total = 0
  for i, j in itertools.combinations(range(len(a)), 2):
    agree += (pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])
    total += 1
  return agree, total


def agreement(
  tasks: Sequence[Mapping[str, Any]],
  responses: Sequence[Sequence[str]],
  labeler_a: Labeler,
  labeler_b: Labeler,
  rng: np.random.Generator | int,
) -> float:
  """Share of reply pairs that two labelers order alike, over the given comparisons."""
  rng = _as_rng(rng)
  agree = total = 0
  for task, resp in zip(tasks, responses, strict=True):
    gold = [judge.score(task, r) for r in resp]
    ra = rank_one(labeler_a, task, resp, rng, gold)
    rb = rank_one(labeler_b, task, resp, rng, gold)
    x, n = pair_agreement(ra, rb)
    agree, total = agree + x, total + n
  return agree / max(total, 1)


def second_opinion_agreement(
  records: Sequence[Mapping[str, Any]],
  rng: np.random.Generator | int,
  config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
) -> float:
  """Agreement of ranked `records` with a second labeler's ranking of the same replies.

  The second labeler is drawn from the pool (never the first); pairs of identical
  reply texts are left out (any order of them is as good as another). This is the
  inter-labeler agreement of the comparison data itself, the number the paper reports.
  """
  rng, labelers = _as_rng(rng), pool(config)
  agree = total = 0
  for r in records:
    others = [lab for lab in labelers if lab.id != r["labeler_id"]]
    second = others[int(rng.integers(len(others)))]
    again = rank_one(second, r["task"], r["responses"], rng)
    pos_a = {k: i for i, k in enumerate(r["ranking"])}
    pos_b = {k: i for i, k in enumerate(again)}
    for i, j in itertools.combinations(range(len(r["responses"])), 2):
      if r["responses"][i] != r["responses"][j]:
        agree += (pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])
        total += 1
  return agree / max(total, 1)


def mean_agreement(
  config: Mapping[str, Any] | ml_collections.ConfigDict | None = None,
  num_comparisons: int = 300,
  seed: int = 0,
) -> float:
  """Mean agreement of random labeler pairs on mixed-quality pools of K replies."""
  world = world_lib.make_world(config)
  labelers = pool(config)
  rng = np.random.default_rng(seed)
  agree = total = 0
  for _ in range(num_comparisons):
    task, _ = world_lib.sample_task(world, rng)
    resp = mixed_responses(world, task, num_responses(rng, world.cfg), rng)
    gold = [judge.score(task, r) for r in resp]
    i, j = rng.choice(len(labelers), size=2, replace=False)
    ra = rank_one(labelers[i], task, resp, rng, gold)
    rb = rank_one(labelers[j], task, resp, rng, gold)
    x, n = pair_agreement(ra, rb)
    agree, total = agree + x, total + n
  return agree / max(total, 1)
