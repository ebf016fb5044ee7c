"""Losses as small pure functions, with shape notes and explicit masked means.

Conventions: `B` batch elements (one comparison / prompt each), `K` responses per
element (padded to K_max), `T` tokens. A rank of -1 marks a padded response.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# --- reward model ---------------------------------------------------------------------


def gather_last(values: jax.Array, last_index: jax.Array) -> jax.Array:
  """The value at each sequence's last token: f32[..., T], int32[...] -> f32[...]."""
  return jnp.take_along_axis(values, last_index[..., None], axis=-1)[..., 0]


def ranking_pairs(rank: jax.Array) -> jax.Array:
  """bool[B, K, K]: `[b, i, j]` is True iff response i is ranked above response j.

  rank: int32[B, K], 0 = best, -1 = padded (in no pair). Each valid pair of an element
  appears exactly once, oriented winner -> loser.
  """
  valid = rank >= 0
  both = valid[:, :, None] & valid[:, None, :]
  return both & (rank[:, :, None] < rank[:, None, :])


def preference_pairs(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """bool[B, K, K]: `[b, i, j]` iff score i > score j, both valid (ties are in no pair).

  scores: f32[B, K] (e.g. gold judge scores); valid: bool[B, K].
  """
  both = valid[:, :, None] & valid[:, None, :]
  return both & (scores[:, :, None] > scores[:, None, :])


def pairwise_loss(rewards: jax.Array, rank: jax.Array) -> jax.Array:
  """The InstructGPT reward-model loss over all C(K, 2) pairs of each comparison.

      loss_b = -1 / C(K_b, 2) * sum_{(w, l): rank_w < rank_l} log sigmoid(r_w - r_l)
      loss   = mean_b loss_b          (over elements with at least one pair)

  rewards: f32[B, K]; rank: int32[B, K] (0 = best, -1 = padded). Returns f32[].
  Weighting each comparison by 1 / C(K_b, 2) keeps a prompt with many responses from
  dominating (the paper's remedy for overfitting to correlated pairs).
  """
  total, count = pairwise_loss_sum(rewards, rank)
  return total / jnp.maximum(count, 1)


def pairwise_loss_sum(rewards: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`pairwise_loss` as (sum of the per-element losses, number of elements with a pair),
  both f32[], so microbatches can be accumulated into the same mean."""
  pairs = ranking_pairs(rank)
  diff = rewards[:, :, None] - rewards[:, None, :]  # [B, K, K]: r_i - r_j
  nll = -jnp.where(pairs, jax.nn.log_sigmoid(diff), 0.0).sum(axis=(1, 2))  # [B]
  n_pairs = pairs.sum(axis=(1, 2))  # [B] = C(K_b, 2)
  per_element = nll / jnp.maximum(n_pairs, 1)
  has_pairs = n_pairs > 0
  return jnp.sum(jnp.where(has_pairs, per_element, 0.0)), has_pairs.sum().astype(jnp.float32)


def pairwise_correct(rewards: jax.Array, pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(pairs the rewards order like `pairs`, number of pairs), both f32[].

  rewards: f32[B, K]; pairs: bool[B, K, K] from `ranking_pairs` / `preference_pairs`.
  A reward tie counts one half (a coin flip, as the labelers' agreement counts ties).
  Sums, not a mean, so batches can be accumulated.
  """
  diff = rewards[:, :, None] - rewards[:, None, :]
  right = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
  return jnp.sum(jnp.where(pairs, right, 0.0)), pairs.sum().astype(jnp.float32)
