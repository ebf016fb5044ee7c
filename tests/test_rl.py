"""The RL math of `rlhf_jax.rl` against plain-Python loops and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rl


def _gae_loop(rewards, values, mask, gamma, lam):
  """Textbook GAE, one row and one token at a time (the state after the last token is
  terminal)."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    n = int(mask[i].sum())
    last = 0.0
    for j in reversed(range(n)):
      next_value = values[i, j + 1] if j + 1 < n else 0.0
      delta = rewards[i, j] + gamma * next_value - values[i, j]
      last = delta + gamma * lam * last
      adv[i, j] = last
  return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_equals_a_python_loop(gamma, lam):
  rng = np.random.default_rng(int(gamma * 100 + lam * 10))
  b, t = 6, 9
  lengths = np.array([9, 1, 0, 5, 8, 3])
  mask = np.arange(t)[None] < lengths[:, None]
  rewards = rng.normal(size=(b, t)).astype(np.float32)
  values = rng.normal(size=(b, t)).astype(np.float32)
  adv, ret = jax.jit(rl.gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
  want_adv, want_ret = _gae_loop(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, atol=1e-5)
  # Padding is zero, whatever the rewards / values there.
  assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)


def test_gae_lambda_one_no_discount_is_return_minus_value():
  rewards = np.array([[0.0, -0.1, 1.0, 5.0]], np.float32)
  values = np.array([[0.3, 0.2, 0.1, 7.0]], np.float32)
  mask = np.array([[True, True, True, False]])
  adv, ret = rl.gae(rewards, values, mask, 1.0, 1.0)
  np.testing.assert_allclose(ret, [[0.9, 0.9, 1.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(adv, [[0.6, 0.7, 0.9, 0.0]], atol=1e-6)


def test_shaped_rewards_by_hand():
  kl = jnp.array([[0.1, 0.2, 0.3], [0.5, 0.6, 9.0]])
  mask = jnp.array([[True, True, True], [True, True, False]])
  rewards, penalty = rl.shaped_rewards(jnp.array([1.0, 2.0]), kl, mask, jnp.float32(0.5))
  np.testing.assert_allclose(rewards, [[-0.05, -0.1, 0.85], [-0.25, 1.7, 0.0]], atol=1e-6)
  np.testing.assert_allclose(penalty, [[-0.05, -0.1, -0.15], [-0.25, -0.3, 0.0]], atol=1e-6)


def test_kl_estimators_by_hand():
  logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k1"), [0.5, -1.0], atol=1e-6)
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k2"), [0.125, 0.5], atol=1e-6)
  k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, "k3"), k3, atol=1e-6)
  np.testing.assert_allclose(rl.kl_estimate(logp, ref, "abs"), [0.5, 1.0], atol=1e-6)
  with pytest.raises(ValueError, match="k4"):
    rl.kl_estimate(logp, ref, "k4")


def test_score_penalty_scale_clip():
  score = jnp.array([1.0, 3.0, -5.0])
  ended = jnp.array([True, False, True])
  np.testing.assert_allclose(rl.no_eos_penalty(score, ended, -1.0), [1.0, 2.0, -5.0])
  np.testing.assert_allclose(rl.scale_and_clip(score, 2.0, 4.0), [2.0, 4.0, -4.0])
  np.testing.assert_allclose(rl.scale_and_clip(score, 0.5, 0.0), [0.5, 1.5, -2.5])


def test_policy_loss_by_hand():
  # Tokens: ratio 1.5 / A=+1 (clipped to 1.2), ratio 0.5 / A=+1 (unclipped wins),
  # ratio 1.5 / A=-1 (unclipped wins), and a padded token that must not count.
  logp = jnp.log(jnp.array([[1.5, 0.5, 1.5, 100.0]]))
  old = jnp.zeros((1, 4))
  adv = jnp.array([[1.0, 1.0, -1.0, 50.0]])
  mask = jnp.array([[True, True, True, False]])
  loss, stats = rl.policy_loss(logp, old, adv, mask, clip=0.2)
  # max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(1.5, 1.2) = 1.5
  assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.5) / 3, abs=1e-6)
  assert float(stats["clip_frac"]) == pytest.approx(1 / 3)
  approx_kl = 0.5 * (math.log(1.5) ** 2 * 2 + math.log(0.5) ** 2) / 3
  assert float(stats["approx_kl"]) == pytest.approx(approx_kl, rel=1e-5)
  # The gradient flows only through the unclipped tokens.
  g = jax.grad(lambda lp: rl.policy_loss(lp, old, adv, mask, 0.2)[0])(logp)
  np.testing.assert_allclose(g, [[0.0, -0.5 / 3, 1.5 / 3, 0.0]], atol=1e-6)


def test_value_loss_by_hand():
  v = jnp.array([[1.0, 0.0, 3.0]])
  old = jnp.array([[0.5, 0.5, 0.0]])
  ret = jnp.array([[2.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, False]])
  loss, stats = rl.value_loss(v, old, ret, mask, clip=0.2)
  # v_clip = [0.7, 0.3]; max((v-R)^2, (v_clip-R)^2) = [max(1, 1.69), max(0, 0.09)]
  assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09) / 2, abs=1e-6)
  assert float(stats["clip_frac"]) == pytest.approx(1.0)
  plain, _ = rl.value_loss(v, old, ret, mask, clip=0.0)
  assert float(plain) == pytest.approx(0.5 * (1.0 + 0.0) / 2, abs=1e-6)


def test_whiten_and_explained_variance():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3.0, 2.0, (4, 7)), jnp.float32)
  mask = jnp.asarray(rng.random((4, 7)) < 0.7)
  w = rl.whiten(x, mask)
  sel = np.asarray(w)[np.asarray(mask)]
  assert abs(sel.mean()) < 1e-5 and sel.std(ddof=1) == pytest.approx(1.0, abs=1e-4)
  assert np.all(np.asarray(w)[~np.asarray(mask)] == 0)
  kept = np.asarray(rl.whiten(x, mask, shift_mean=False))[np.asarray(mask)]
  assert kept.mean() == pytest.approx(np.asarray(x)[np.asarray(mask)].mean(), rel=1e-5)
  assert float(rl.explained_variance(x, x, mask)) == pytest.approx(1.0)
  mean = rl.masked_mean(x, mask)
  assert float(rl.explained_variance(jnp.full_like(x, mean), x, mask)) == pytest.approx(0, abs=1e-5)


def test_adaptive_kl_controller_moves_beta_toward_the_target():
  beta = jnp.float32(0.1)
  kw = dict(target=6.0, horizon=10_000.0)
  up = rl.adaptive_kl_coef(beta, jnp.float32(9.0), 100, **kw)
  down = rl.adaptive_kl_coef(beta, jnp.float32(3.0), 100, **kw)
  same = rl.adaptive_kl_coef(beta, jnp.float32(6.0), 100, **kw)
  assert float(up) > 0.1 > float(down) and float(same) == pytest.approx(0.1)
  # Ziegler et al.: error clipped to +-0.2, step scaled by n_steps / horizon.
  assert float(up) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
  assert float(down) == pytest.approx(0.1 * (1 - 0.2 * 100 / 10_000))
  small = rl.adaptive_kl_coef(beta, jnp.float32(6.6), 100, **kw)
  assert float(small) == pytest.approx(0.1 * (1 + 0.1 * 100 / 10_000))
  fixed = rl.kl_controller_update(beta, jnp.float32(100.0), 100, kind="fixed", **kw)
  assert float(fixed) == pytest.approx(0.1)
  adaptive = rl.kl_controller_update(beta, jnp.float32(100.0), 100, kind="adaptive", **kw)
  assert float(adaptive) == pytest.approx(float(up))


def test_token_logprobs_and_entropy():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]]]))
  lp = rl.token_logprobs(logits, jnp.array([[1, 0]]))
  np.testing.assert_allclose(lp, [[math.log(0.25), 0.0]], atol=1e-6)
  ent = rl.entropy(logits)
  np.testing.assert_allclose(ent, [[1.5 * math.log(2), 0.0]], atol=1e-6)
  mask = jnp.array([[True, True, False]])
  assert int(rl.last_token_index(mask)[0]) == 1


def test_rloo_advantages_equal_a_python_loop():
  scores = np.random.default_rng(0).normal(size=(5, 4))
  want = np.zeros_like(scores)
  for b in range(5):
    for i in range(4):
      others = [scores[b, j] for j in range(4) if j != i]
      want[b, i] = scores[b, i] - sum(others) / len(others)
  got = np.asarray(rl.rloo_advantages(jnp.asarray(scores, jnp.float32)))
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 0.0, atol=1e-5)


def test_grpo_advantages_equal_a_python_loop():
  scores = np.random.default_rng(1).normal(size=(5, 6))
  scores[2] = 0.7  # a group of equal scores: no signal
  got = np.asarray(rl.grpo_advantages(jnp.asarray(scores, jnp.float32), eps=1e-4))
  for b in range(5):
    mean = sum(scores[b]) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in scores[b]) / 6)
    for i in range(6):
      assert got[b, i] == pytest.approx((scores[b, i] - mean) / (std + 1e-4), abs=1e-4)
  assert (got[2] == 0).all()
  unscaled = np.asarray(rl.grpo_advantages(jnp.asarray(scores, jnp.float32), scale=False))
  np.testing.assert_allclose(unscaled, scores - scores.mean(-1, keepdims=True), atol=1e-5)
