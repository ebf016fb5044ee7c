"""One PPO iteration as one jit-compiled `train_step(state, batch) -> (state, metrics)`:
rollout -> shaped rewards -> GAE -> epochs x minibatches of clipped policy and value
updates (nested `lax.scan`s) -> the KL controller. The losses are small functions of
one minibatch; the math is in `rl.py`. With LoRA the gradients are the adapters' alone:
the losses read the models through `rollout.policy_params` / `value_params`."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import lora, rl, sharding
from rlhf_jax.models import TransformerConfig
from rlhf_jax.stages import lm
from rlhf_jax.stages.ppo import settings
from rlhf_jax.stages.ppo.rollout import (
  POLICY_HEADS,
  VALUE_HEADS,
  PPOState,
  Setup,
  ema_update,
  forward,
  optimizers,
  policy_params,
  rollout,
  value_params,
)
from rlhf_jax.train import optim


def policy_loss_fn(policy, mb, ptx, hp, *, model_cfg, c, full=None):
  """Clipped policy loss - entropy bonus + gamma_ptx x pretraining LM loss; and stats.
  `hp`: the run's `HPARAMS` (f32[] each); `ptx`: pretraining rows, or None; `full`: the
  model's params from trained `policy` (LoRA: `rollout.policy_params`)."""
  policy = policy if full is None else full(policy)
  logits = (
    forward(model_cfg, policy, mb["prompt_tokens"], mb["response"], mb["mask"], heads=POLICY_HEADS)[
      "lm"
    ]
    / c.temperature
  )
  logp = rl.token_logprobs(logits, mb["response"])
  pg_loss, stats = rl.policy_loss(logp, mb["logprobs"], mb["advantages"], mb["mask"], hp["clip"])
  ent = rl.masked_mean(rl.entropy(logits), mb["mask"])
  loss = pg_loss - hp["entropy_coef"] * ent
  stats = {**stats, "policy_loss": pg_loss, "entropy": jax.lax.stop_gradient(ent)}
  if ptx is not None:
    # The pretraining term of PPO-ptx; with ptx_coef 0 its gradient is exactly zero.
    ptx_logits = lm.logits(model_cfg, policy, ptx)
    total, count = lm.lm_loss(ptx_logits, ptx["tokens"], ptx["loss_mask"])
    ptx_loss = total / jnp.maximum(count, 1.0)
    loss = loss + hp["ptx_coef"] * ptx_loss
    stats["ptx_loss"] = jax.lax.stop_gradient(ptx_loss)
  return loss, stats


def value_loss_fn(value, mb, *, model_cfg, c, full=None):
  """Clipped value loss and its stats (`full`: as `policy_loss_fn`'s)."""
  value = value if full is None else full(value)
  v = forward(model_cfg, value, mb["prompt_tokens"], mb["response"], mb["mask"], heads=VALUE_HEADS)[
    "scalar"
  ]
  loss, stats = rl.value_loss(v, mb["values"], mb["returns"], mb["mask"], c.value_clip)
  return loss, {"value_loss": loss, "value_clip_frac": stats["clip_frac"]}


def iteration_rngs(state: PPOState) -> tuple[jax.Array, jax.Array]:
  """The (sampling, minibatch order) keys of the iteration `state` is at."""
  sample_rng, perm_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  return sample_rng, perm_rng


def train_step(
  state: PPOState,
  batch: dict[str, jax.Array],
  *,
  model_cfg: TransformerConfig,
  c: ml_collections.ConfigDict,
  alerts: tuple[float, float] = (0.0, 0.0),
  adapters: lora.Settings | None = None,
) -> tuple[PPOState, dict[str, jax.Array]]:
  """One PPO iteration: rollout -> rewards -> advantages -> epochs x minibatches.

  batch: prompt_tokens int32[B, P] (left-padded); for PPO-ptx also the pretraining rows
  ptx_{tokens, segment_ids, positions, loss_mask} [B_ptx, T], split evenly over the
  minibatches (the same rows in every epoch). Returns the new state and the metrics
  (the rollout of the same iteration: `rollout(state, prompts, iteration_rngs(state)[0])`).
  The numbers of `HPARAMS` come from `state.hparams`, everything else from `c`;
  `alerts`: `(kl_ceiling, length_ratio)` of `config.guard`; `adapters`: LoRA's settings
  (`Setup.adapters`). An iteration with a non-finite score, loss or gradient changes
  nothing but the step (and the guard's counts).
  """
  hp = state.hparams
  policy_tx, value_tx = optimizers(c, hp, state.guard.lr_scale)
  sample_rng, perm_rng = iteration_rngs(state)
  ro = rollout(
    state, batch["prompt_tokens"], sample_rng, model_cfg=model_cfg, c=c, adapters=adapters
  )
  ro = ro._replace(score=optim.poison(ro.score, state.guard.injects(state.step)))
  b, n = ro.response.shape
  mask = ro.mask

  # Rewards: the KL penalty on every token, the score on the last one.
  kl = rl.kl_estimate(ro.logprobs, ro.ref_logprobs, c.kl_estimator)  # [B, N]
  kl = jnp.where(mask, kl, 0.0)
  score = rl.no_eos_penalty(ro.score, ro.ended, c.no_eos_penalty)
  score = rl.scale_and_clip(score, c.score_scale, c.score_clip)
  rewards, kl_penalty = rl.shaped_rewards(score, kl, mask, state.kl_coef)

  # Advantages.
  advantages, returns = rl.gae(rewards, ro.values, mask, hp["gamma"], hp["lam"])
  if c.whiten_advantages:
    advantages = rl.whiten(advantages, mask)

  # Update: num_epochs x num_minibatches optimiser steps, as nested scans.
  data = {
    "prompt_tokens": ro.prompt_tokens,
    "response": ro.response,
    "mask": mask,
    "logprobs": ro.logprobs,
    "values": ro.values,
    "advantages": advantages,
    "returns": returns,
  }
  nmb = c.num_minibatches
  ptx = None
  if "ptx_tokens" in batch:
    ptx = {k[len("ptx_") :]: v for k, v in batch.items() if k.startswith("ptx_")}
    ptx = jax.tree.map(lambda x: x.reshape(nmb, x.shape[0] // nmb, *x.shape[1:]), ptx)
  ema_decay = c.optim.ema_decay
  kw = dict(model_cfg=model_cfg, c=c)
  if adapters is not None:  # the frozen models the trained adapters are laid over
    kw_p = dict(kw, full=lambda p: policy_params(state, adapters, p))
    kw_v = dict(kw, full=lambda v: value_params(state, adapters, c, v))
  else:
    kw_p = kw_v = kw
  policy_grad = jax.grad(functools.partial(policy_loss_fn, **kw_p), has_aux=True)
  value_grad = jax.grad(functools.partial(value_loss_fn, **kw_v), has_aux=True)

  def minibatch_step(carry, xs):
    policy, policy_opt, value, value_opt, ema = carry
    mb, ptx_mb = xs
    p_grads, p_stats = policy_grad(policy, mb, ptx_mb, hp)
    updates, policy_opt = policy_tx.update(p_grads, policy_opt, policy)
    policy = optax.apply_updates(policy, updates)
    if ema is not None:
      ema = ema_update(ema, policy, ema_decay)
    v_grads, v_stats = value_grad(value, mb)
    updates, value_opt = value_tx.update(v_grads, value_opt, value)
    value = optax.apply_updates(value, updates)
    stats = {
      **p_stats,
      **v_stats,
      "policy_grad_norm": optax.tree.norm(p_grads),
      "value_grad_norm": optax.tree.norm(v_grads),
    }
    return (policy, policy_opt, value, value_opt, ema), stats

  def epoch(carry, epoch_rng):
    perm = jax.random.permutation(epoch_rng, b)
    mbs = jax.tree.map(lambda x: x[perm].reshape(nmb, b // nmb, *x.shape[1:]), data)
    return jax.lax.scan(minibatch_step, carry, (mbs, ptx))

  carry = (state.policy, state.policy_opt, state.value, state.value_opt, state.ema)
  carry, stats = jax.lax.scan(epoch, carry, jax.random.split(perm_rng, c.num_epochs))
  policy, policy_opt, value, value_opt, ema = carry

  # KL controller: the next beta from the KL measured in this rollout.
  kl_per_episode = kl.sum(axis=1)  # the KL in the reward, per episode
  kl_mean = kl_per_episode.mean()
  kl_coef = rl.kl_controller_update(
    state.kl_coef,
    kl_mean,
    b,
    kind=c.kl_controller,
    target=hp["kl_target"],
    horizon=c.kl_horizon,
  )
  lengths = mask.sum(axis=1).astype(jnp.float32)
  len0 = jnp.where(state.step == 0, lengths.mean(), state.response_len0)
  ok = optim.all_finite(stats, ro.score, kl_mean)
  trained = (policy, policy_opt, value, value_opt, ema, kl_coef)
  policy, policy_opt, value, value_opt, ema, kl_coef = optim.keep_if(
    ok,
    trained,
    (state.policy, state.policy_opt, state.value, state.value_opt, state.ema, state.kl_coef),
  )
  new_state = state.replace(
    step=state.step + 1,
    policy=policy,
    policy_opt=policy_opt,
    value=value,
    value_opt=value_opt,
    ema=ema,
    kl_coef=kl_coef,
    guard=state.guard.after(ok),
    response_len0=len0,
  )

  metrics = {k: v.mean() for k, v in stats.items()}  # over epochs x minibatches
  metrics.update(
    score=ro.score.mean(),  # the RM score (with reward_bias), before penalty / scaling
    score_std=ro.score.std(),
    reward=rewards.sum(axis=1).mean(),  # total shaped reward per episode
    kl=kl_mean,
    kl_penalty=kl_penalty.sum(axis=1).mean(),
    kl_coef=state.kl_coef,  # the beta used in this iteration's rewards
    explained_var=rl.explained_variance(ro.values, returns, mask),
    value_mean=rl.masked_mean(ro.values, mask),
    return_mean=rl.masked_mean(returns, mask),
    response_len=lengths.mean(),
    no_eos_frac=1.0 - ro.ended.mean(),
    policy_lr=policy_lr(c, hp["lr"], state.step) * state.guard.lr_scale,
  )
  kl_ceiling, length_ratio = alerts
  if kl_ceiling:
    metrics["alert_kl"] = (kl_mean > kl_ceiling).astype(jnp.float32)
  if length_ratio:
    out = (lengths.mean() * length_ratio < len0) | (lengths.mean() > len0 * length_ratio)
    metrics["alert_length"] = out.astype(jnp.float32)
  metrics = optim.guarded_metrics(
    {f"{settings.PREFIX}/{k}": v for k, v in metrics.items()}, new_state.guard
  )
  return new_state, metrics


def policy_lr(c: ml_collections.ConfigDict, peak: jax.Array, step: jax.Array) -> jax.Array:
  """The policy's learning rate at the first update of iteration `step`."""
  schedule = optim.lr_schedule(c.optim, settings.num_updates(c), peak)
  return schedule(step * c.num_epochs * c.num_minibatches)


def jit_train_step(setup: Setup, c: ml_collections.ConfigDict, guard=None) -> Callable:
  """`train_step` jitted once: state sharded and donated, batch over (data, fsdp);
  `guard` (`config.guard`) sets the alerts, `setup.adapters` LoRA."""
  in_batch = {k: sharding.batch_sharding(setup.mesh, n) for k, n in settings.batch_ndims(c).items()}
  return jax.jit(
    functools.partial(
      train_step,
      model_cfg=setup.model_cfg,
      c=ml_collections.FrozenConfigDict(c),
      alerts=settings.alert_levels(guard),
      adapters=setup.adapters,
    ),
    in_shardings=(setup.shardings, in_batch),
    out_shardings=(setup.shardings, sharding.replicated(setup.mesh)),
    donate_argnums=(0,),
  )
