"""The RL pieces of PPO for language models, as small pure functions.

Conventions: `B` episodes (one sampled response per prompt), `T` response tokens. Token
`t` of a response is one action; `mask: bool[B, T]` is True on response tokens (its EOS
included) and False on the padding after it. Every mean over tokens is an explicit
masked mean. Episodes end at EOS or at the length limit; either way the state after the
last token is terminal (its value is 0), as in Ziegler et al. 2019.

  per-token reward   r_t = -beta * kl_t  (+ score on the last token)   `shaped_rewards`
  KL estimators      k1 = logp - ref, k2, k3, abs                     `kl_estimate`
  GAE                A_t = delta_t + gamma * lam * A_{t+1}            `gae` (reverse scan)
  k per prompt       leave-one-out / group-normalised baselines  `rloo_advantages`,
                                                                   `grpo_advantages`
  PPO losses         clipped policy loss, clipped value loss           `policy_loss`, `value_loss`
  KL controller      adaptive (target, horizon) or fixed beta          `kl_controller_update`
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# --- masked statistics -----------------------------------------------------------------------


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of `x` where `mask` (0 when the mask is empty). x: f32[...]; mask: bool[...]."""
  return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
  """Variance of `x` where `mask` (Bessel-corrected by default, as lm-human-preferences)."""
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  if unbiased:
    n = jnp.sum(mask)
    var = var * n / jnp.maximum(n - 1, 1)
  return var


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the masked entries; 0 outside the mask.

  `shift_mean=False` only rescales (keeps the mean), e.g. for rewards.
  """
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask, out, 0.0)


# --- log-probs and entropy -------------------------------------------------------------------


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """f32[B, T]: log softmax(logits)[tokens]. logits: f32[B, T, V]; tokens: int[B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def entropy(logits: jax.Array) -> jax.Array:
  """f32[B, T]: entropy of each token's distribution softmax(logits). logits: f32[B, T, V]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# --- KL to the reference, reward shaping ------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs.

  logp, ref_logp: f32[B, T] (policy and reference log-probs of the sampled tokens).
    k1   logp - ref_logp                    unbiased, can be negative (the paper's)
    k2   (logp - ref_logp)^2 / 2            biased, low variance, >= 0
    k3   exp(ref - logp) - 1 - (ref - logp) unbiased, >= 0 (Schulman's "k3")
    abs  |logp - ref_logp|
  """
  log_ratio = logp - ref_logp
  if estimator == "k1":
    return log_ratio
  if estimator == "k2":
    return 0.5 * log_ratio**2
  if estimator == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  if estimator == "abs":
    return jnp.abs(log_ratio)
  raise ValueError(f"unknown KL estimator {estimator!r} (known: {', '.join(KL_ESTIMATORS)})")


def last_token_index(mask: jax.Array) -> jax.Array:
  """int32[B]: index of each row's last response token (0 for an empty row)."""
  return jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def shaped_rewards(
  score: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Per-token rewards: -beta * kl_t on every response token, + the score on the last.

  score: f32[B] (RM score of each response, after any penalty / scaling); kl: f32[B, T]
  (per-token KL estimate); mask: bool[B, T]; kl_coef: f32[] (beta). Returns
  (rewards f32[B, T], 0 on padding; the KL penalty alone f32[B, T]).
  """
  penalty = jnp.where(mask, -kl_coef * kl, 0.0)
  last = jax.nn.one_hot(last_token_index(mask), mask.shape[-1], dtype=penalty.dtype)
  return penalty + last * score[:, None], penalty


def no_eos_penalty(score: jax.Array, ended: jax.Array, penalty: float) -> jax.Array:
  """`score + penalty` for responses that hit the length limit without EOS (ended False)."""
  return jnp.where(ended, score, score + penalty)


def scale_and_clip(score: jax.Array, scale: float = 1.0, clip: float = 0.0) -> jax.Array:
  """`score * scale`, then clipped to [-clip, clip] (clip 0 = off)."""
  score = score * scale
  return jnp.clip(score, -clip, clip) if clip > 0 else score


# --- advantages --------------------------------------------------------------------------------


def gae(
  rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation as a reverse `lax.scan` over tokens.

      delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
      A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}       (A_T = V_T = 0)

  rewards, values: f32[B, T]; mask: bool[B, T], True on a prefix of each row (past the
  last token the next state is terminal). Returns (advantages, returns = A + V), both
  f32[B, T] and 0 outside the mask.
  """
  m = mask.astype(rewards.dtype)
  # Time-major for the scan; the "next" of the last token is zero.
  r, v, mt = rewards.T, values.T, m.T
  next_v = jnp.concatenate([v[1:] * mt[1:], jnp.zeros_like(v[:1])])
  next_m = jnp.concatenate([mt[1:], jnp.zeros_like(mt[:1])])
  deltas = r + gamma * next_v - v

  def step(next_adv, x):
    delta, nm = x
    adv = delta + gamma * lam * nm * next_adv
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros_like(r[0]), (deltas, next_m), reverse=True)
  adv = adv.T * m
  return adv, (adv + values) * m


def rloo_advantages(scores: jax.Array) -> jax.Array:
  """REINFORCE leave-one-out (Ahmadian et al. 2024): each of a prompt's k samples is
  compared with the mean of the other k - 1.

      A_i = s_i - 1/(k-1) sum_{j != i} s_j  =  k/(k-1) (s_i - mean_j s_j)

  scores: f32[B, k] (k >= 2, a prompt's samples in a row). Returns f32[B, k]; every
  row sums to 0. No value model: the other samples are the baseline.
  """
  k = scores.shape[-1]
  others = (jnp.sum(scores, axis=-1, keepdims=True) - scores) / (k - 1)
  return scores - others


def grpo_advantages(scores: jax.Array, eps: float = 1e-4, scale: bool = True) -> jax.Array:
  """GRPO's group-normalised advantages (Shao et al. 2024): a sample's score less its
  group's mean, divided by the group's standard deviation (population, as the paper's
  reference code; `scale=False` keeps the difference only, as Dr. GRPO).

      A_i = (s_i - mean_j s_j) / (std_j s_j + eps)

  scores: f32[B, k]. Returns f32[B, k]; a group of equal scores gives 0 everywhere.
  """
  centred = scores - jnp.mean(scores, axis=-1, keepdims=True)
  if not scale:
    return centred
  return centred / (jnp.std(scores, axis=-1, keepdims=True) + eps)


# --- PPO losses -----------------------------------------------------------------------------


def policy_loss(
  logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, clip: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped surrogate objective (as a loss to minimise), a masked token mean.

      ratio = exp(logp - old_logp)
      loss  = mean_t max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))

  logp, old_logp, advantages: f32[B, T]; mask: bool[B, T]. Returns (loss f32[], stats:
  `clip_frac` (tokens where the clipped term is the larger), `approx_kl` (old -> new,
  mean of (logp - old)^2 / 2), `ratio` (mean)).
  """
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  stats = {
    "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
    "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
    "ratio": masked_mean(ratio, mask),
  }
  return loss, jax.lax.stop_gradient(stats)


def value_loss(
  values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, clip: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped value loss, a masked token mean (clip 0 = plain squared error).

      v_clip = old + clip(v - old, -eps_v, eps_v)
      loss   = 1/2 mean_t max((v - R)^2, (v_clip - R)^2)

  values (new), old_values (at rollout), returns: f32[B, T]; mask: bool[B, T]. Returns
  (loss f32[], stats: `clip_frac`).
  """
  err = (values - returns) ** 2
  if clip > 0:
    v_clip = old_values + jnp.clip(values - old_values, -clip, clip)
    err_clip = (v_clip - returns) ** 2
  else:
    err_clip = err
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clip), mask)
  stats = {"clip_frac": masked_mean((err_clip > err).astype(jnp.float32), mask)}
  return loss, jax.lax.stop_gradient(stats)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - Var[R - V] / Var[R] over masked tokens (1 = perfect, <= 0 = no better than a mean)."""
  var_r = masked_var(returns, mask)
  return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_r, 1e-8)


# --- KL controllers -------------------------------------------------------------------------


def adaptive_kl_coef(
  kl_coef: jax.Array, kl: jax.Array, n_steps: int, *, target: float, horizon: float
) -> jax.Array:
  """Ziegler et al. 2019's proportional controller for beta.

      e    = clip(KL / target - 1, -0.2, 0.2)
      beta = beta * (1 + e * n_steps / horizon)

  kl: f32[] the measured (per-episode) KL to the reference; n_steps: episodes in this
  batch. Beta rises when KL is above target and falls below it.
  """
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + error * n_steps / horizon)


def kl_controller_update(
  kl_coef: jax.Array, kl: jax.Array, n_steps: int, *, kind: str, target: float, horizon: float
) -> jax.Array:
  """The next beta: `kind` "fixed" keeps it, "adaptive" runs `adaptive_kl_coef`."""
  if kind == "fixed":
    return kl_coef
  if kind == "adaptive":
    return adaptive_kl_coef(kl_coef, kl, n_steps, target=target, horizon=horizon)
  raise ValueError(f"unknown KL controller {kind!r} (fixed | adaptive)")
