"""The optimiser and the numerical guard every stage shares.

- `make_optimizer`: optax AdamW with warmup + cosine (or constant) and global-norm
  clipping, from a `config.optim` section (`optim_config()` gives the fields).
- `Guard`: the numerical guard. A step whose loss or gradients are not finite is
  skipped inside the jit (no host sync) and counted (`keep_if`, `guarded_metrics`);
  after `guard.max_bad_steps` in a row the loop (train/loop.py) restores the last good
  checkpoint and lowers the learning rate (`Guard.lr_scale`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax.errors import UserInputError

Params = Any


def optim_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.lr = 1e-3  # peak learning rate
  c.schedule = "cosine"  # cosine | constant (both after linear warmup)
  c.warmup_steps = 100
  c.end_lr_frac = 0.1  # cosine decays to lr * end_lr_frac
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.weight_decay = 0.1  # decoupled (AdamW); not applied to norms / biases
  c.grad_clip = 1.0  # global-norm clipping; 0 = off
  c.ema_decay = 0.0  # EMA of the parameters (e.g. 0.992); 0 = off
  c.grad_accum = 1  # microbatches per step, one at a time (activation memory / N)
  c.update(overrides)
  return c


def lr_schedule(c: ml_collections.ConfigDict, total_steps: int, peak=None) -> optax.Schedule:
  """The learning rate per optimiser step: linear warmup, then constant or cosine.

  `peak` replaces `c.lr` and may be a traced f32[] (a per-run value in a vmapped group of
  runs, see stages/ppo/group.py).
  """
  lr = c.lr if peak is None else peak
  warmup = min(c.warmup_steps, max(total_steps - 1, 0))
  if c.schedule == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
    )
  if c.schedule == "cosine":
    decay_steps = max(total_steps, warmup + 1)
    if peak is None:
      return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, decay_steps, end_value=lr * c.end_lr_frac
      )
    # optax's cosine schedule tests its peak in Python: scale a unit-height one instead.
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, decay_steps, c.end_lr_frac)
    return lambda count: peak * unit(count)
  raise UserInputError(f"config.optim.schedule: must be cosine|constant, got {c.schedule!r}")


def _decay_mask(params: Params) -> Params:
  """Weight decay on matrices only (not on norm scales, biases or the scalar head); by
  name for biases, as Qwen2's q/k/v biases are [heads, head_dim]."""

  def decays(path, x) -> bool:
    return x.ndim >= 2 and not str(getattr(path[-1], "key", "")).endswith("bias")

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
  c: ml_collections.ConfigDict, total_steps: int, lr=None
) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) on `lr_schedule`, after global-norm clipping.

  `lr` replaces the peak `c.lr` (it may be traced); the optimiser state does not depend
  on it, so one `init` serves every learning rate.
  """
  tx = optax.adamw(
    lr_schedule(c, total_steps, lr),
    c.b1,
    c.b2,
    c.eps,
    weight_decay=c.weight_decay,
    mask=_decay_mask,
  )
  if c.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), tx)
  return tx


# --- numerical guard ------------------------------------------------------------------


def guard_config() -> ml_collections.ConfigDict:
  """`config.guard`: what a run does about non-finite losses and gradients."""
  c = ml_collections.ConfigDict()
  c.max_bad_steps = 3  # non-finite steps in a row before the last good checkpoint is restored
  c.lr_factor = 0.5  # learning-rate multiplier at each restore (1.0 = keep)
  c.max_restores = 3  # restores before the run stops as diverged (exit status 3)
  # PPO's warning signs, flagged in metrics (ppo/alert_*) and the report: the KL to the
  # reference above kl_ceiling nats per episode; the mean response length leaving
  # [L0 / length_ratio, L0 x length_ratio], L0 the first iteration's. 0 = off.
  c.kl_ceiling = 25.0
  c.length_ratio = 3.0
  # Fault injection (to test a setup): the gradients of steps inject_nan_from ..
  # inject_nan_from + inject_nan_steps - 1 become NaN, until the first restore.
  c.inject_nan_from = -1
  c.inject_nan_steps = 0
  return c


@flax.struct.dataclass
class Guard:
  """Non-finite step bookkeeping, carried in a train state and updated inside the jit."""

  bad_streak: jax.Array  # int32[]: non-finite steps in a row, ending at the last step
  skipped: jax.Array  # int32[]: non-finite steps skipped so far
  restores: jax.Array  # int32[]: last-good-checkpoint restores so far
  lr_scale: jax.Array  # f32[]: multiplies the learning rate (lowered at each restore)
  nan_from: jax.Array  # int32[]: fault injection (guard_config), -1 = off
  nan_until: jax.Array  # int32[]

  @classmethod
  def create(cls, c: ml_collections.ConfigDict | None = None) -> Guard:
    start = -1 if c is None else int(c.inject_nan_from)
    until = -1 if c is None else start + int(c.inject_nan_steps)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    return cls(i32(0), i32(0), i32(0), jnp.ones((), jnp.float32), i32(start), i32(until))

  def injects(self, step: jax.Array) -> jax.Array:
    return (step >= self.nan_from) & (step < self.nan_until) & (self.restores == 0)

  def after(self, ok: jax.Array) -> Guard:
    """The guard after a step that was finite (`ok`) or skipped."""
    return self.replace(
      bad_streak=jnp.where(ok, 0, self.bad_streak + 1),
      skipped=self.skipped + (~ok).astype(jnp.int32),
    )


def all_finite(*trees) -> jax.Array:
  """bool[]: every leaf of every tree finite (one fused reduction: the norm)."""
  return jnp.all(jnp.stack([jnp.isfinite(optax.tree.norm(t)) for t in trees]))


def keep_if(ok: jax.Array, new, old):
  """`new` where the step was finite, else `old` (the skipped step changes nothing)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def poison(tree, on: jax.Array):
  """NaN in the first leaf of `tree` when `on` (fault injection)."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves[0] = jnp.where(on, jnp.nan, leaves[0]).astype(leaves[0].dtype)
  return jax.tree.unflatten(treedef, leaves)


def guarded_metrics(metrics: Mapping[str, jax.Array], guard: Guard) -> dict[str, jax.Array]:
  """A step's metrics, zero when it was skipped, with `guard/ok` (1 or 0): `run_loop`
  averages over the finite steps only and logs the skipped ones as `guard/skipped`."""
  ok = guard.bad_streak == 0
  out = {k: jnp.where(ok, v, jnp.zeros_like(v)) for k, v in metrics.items()}
  out["guard/ok"] = ok.astype(jnp.float32)
  return out
