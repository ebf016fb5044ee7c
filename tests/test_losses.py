"""Reward-model losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses


def _log_sigmoid(x: float) -> float:
  return -math.log1p(math.exp(-x))


def test_pairwise_loss_k4_equals_hand_computed_six_pairs():
  r = [1.0, 0.5, -0.2, 2.0]
  rank = [1, 0, 3, 2]  # best first: response 1, then 0, then 3, then 2
  pairs = [(1, 0), (1, 3), (1, 2), (0, 3), (0, 2), (3, 2)]  # (winner, loser)
  want = -sum(_log_sigmoid(r[win] - r[lose]) for win, lose in pairs) / 6
  got = losses.pairwise_loss(jnp.asarray([r]), jnp.asarray([rank], jnp.int32))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The pair mask holds exactly those six (winner, loser) entries.
  mask = np.asarray(losses.ranking_pairs(jnp.asarray([rank], jnp.int32)))[0]
  assert sorted(zip(*np.nonzero(mask), strict=True)) == sorted(pairs)


def test_padded_k3_equals_unpadded_k3_and_padding_gets_no_gradient():
  r3, rank3 = jnp.asarray([[0.3, -1.0, 0.7]]), jnp.asarray([[2, 1, 0]], jnp.int32)
  r4 = jnp.asarray([[0.3, -1.0, 0.7, 50.0]])  # the padded slot holds garbage
  rank4 = jnp.asarray([[2, 1, 0, -1]], jnp.int32)
  np.testing.assert_allclose(
    losses.pairwise_loss(r4, rank4), losses.pairwise_loss(r3, rank3), rtol=1e-6
  )
  grad = jax.grad(lambda r: losses.pairwise_loss(r, rank4))(r4)
  assert grad[0, 3] == 0.0


def test_batch_loss_is_mean_over_comparisons_not_pairs():
  # Element 0: K=2 (1 pair); element 1: K=4 (6 pairs); element 2: a padding element.
  r = jnp.asarray([[1.0, 0.0, 0, 0], [0.2, 0.1, -0.3, 0.4], [0, 0, 0, 0]])
  rank = jnp.asarray([[0, 1, -1, -1], [0, 1, 2, 3], [-1, -1, -1, -1]], jnp.int32)
  loss0 = -_log_sigmoid(1.0)
  rr = [0.2, 0.1, -0.3, 0.4]
  loss1 = -sum(_log_sigmoid(rr[i] - rr[j]) for i in range(4) for j in range(i + 1, 4)) / 6
  np.testing.assert_allclose(losses.pairwise_loss(r, rank), (loss0 + loss1) / 2, rtol=1e-6)


def test_pairwise_correct_and_gold_pairs_exclude_ties():
  r = jnp.asarray([[3.0, 1.0, 2.0, 0.0]])
  rank = jnp.asarray([[0, 1, 2, -1]], jnp.int32)  # labeler: 0 > 1 > 2
  correct, total = losses.pairwise_correct(r, losses.ranking_pairs(rank))
  assert (float(correct), float(total)) == (2.0, 3.0)  # (1, 2) is ordered the other way
  tied = jnp.asarray([[3.0, 1.0, 1.0, 0.0]])  # a reward tie counts one half
  assert float(losses.pairwise_correct(tied, losses.ranking_pairs(rank))[0]) == 2.5
  gold = jnp.asarray([[1.0, 0.5, 0.5, 9.0]])  # responses 1 and 2 tie; 3 is padding
  valid = rank >= 0
  correct, total = losses.pairwise_correct(r, losses.preference_pairs(gold, valid))
  assert (float(correct), float(total)) == (2.0, 2.0)


def test_gather_last_reads_the_eos_position():
  values = jnp.arange(2 * 3 * 5, dtype=jnp.float32).reshape(2, 3, 5)
  last = jnp.asarray([[4, 0, 2], [1, 1, 3]], jnp.int32)
  want = np.take_along_axis(np.asarray(values), np.asarray(last)[..., None], -1)[..., 0]
  np.testing.assert_array_equal(losses.gather_last(values, last), want)
