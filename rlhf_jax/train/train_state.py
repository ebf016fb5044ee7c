"""The train state of the single-model stages, and gradient accumulation.

`TrainState` holds step, params, optimiser state, an optional EMA of the params, the
rng and the numerical guard; `AdaptedState` (LoRA) also a frozen base under the trained
adapters (`model_params` composes them). Exact resume needs the step's rng to be
`fold_in(state.rng, state.step)` (`step_rng`). `accumulated_grads` gathers a mean loss's
gradients over microbatches taken one at a time (same mean as the whole batch).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import lora
from rlhf_jax.train.optim import Guard, all_finite, keep_if, poison

Params = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Params
  opt_state: optax.OptState
  ema: Params | None  # EMA of params (None when off)
  rng: jax.Array  # uint32[2], raw key; step keys are fold_in(rng, step)
  guard: Guard

  @classmethod
  def create(
    cls,
    params,
    tx: optax.GradientTransformation,
    rng,
    ema_decay: float = 0.0,
    guard: ml_collections.ConfigDict | None = None,
  ):
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema=jax.tree.map(jnp.copy, params) if ema_decay else None,
      rng=rng,
      guard=Guard.create(guard),
    )

  def apply_gradients(
    self,
    grads,
    tx: optax.GradientTransformation,
    ema_decay: float = 0.0,
    loss: jax.Array | None = None,
  ):
    """One optimiser step, skipped (params, optimiser state and EMA unchanged; the step
    and with it the data still advance) when `loss` or `grads` are not finite."""
    grads = poison(grads, self.guard.injects(self.step))
    ok = all_finite(grads) if loss is None else all_finite(grads, loss)
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    # (AdamW's update is lr x (adam + decay): scaling it is scaling the learning rate)
    updates = jax.tree.map(lambda u: u * self.guard.lr_scale.astype(u.dtype), updates)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema
    if ema is not None:
      ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
    params, opt_state, ema = keep_if(
      ok, (params, opt_state, ema), (self.params, self.opt_state, self.ema)
    )
    return self.replace(
      step=self.step + 1, params=params, opt_state=opt_state, ema=ema, guard=self.guard.after(ok)
    )


@flax.struct.dataclass
class AdaptedState(TrainState):
  """A `TrainState` of a stage training LoRA adapters: `params` (and the optimiser state,
  the EMA) hold only what is trained, `{"lora": adapters, + a new head}`; `base` is the
  model they adapt, frozen: never differentiated, never seen by the optimiser."""

  base: Params
  lora: lora.Settings = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params, tx, rng, ema_decay=0.0, guard=None, *, base=None, settings=None):
    s = TrainState.create(params, tx, rng, ema_decay, guard)
    return cls(s.step, s.params, s.opt_state, s.ema, s.rng, s.guard, base, settings)


def model_params(state: TrainState, params: Params | None = None) -> Params:
  """The parameters the model reads for trained `params` (default: the state's): those
  themselves, or with LoRA laid over the frozen base (`lora.attach`, no copy)."""
  params = state.params if params is None else params
  if isinstance(state, AdaptedState):
    return lora.attach(state.base, params, state.lora)
  return params


def microbatches(batch, n: int):
  """Split every array of `batch` on its leading axis into `n` microbatches: [n, B/n, ...].

  Microbatch i takes rows i, i + n, i + 2n, ...: every device keeps a share of each
  microbatch when the batch axis is sharded, so accumulation moves no data.
  """
  return jax.tree.map(
    lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch
  )


def unmicrobatch(x: jax.Array) -> jax.Array:
  """The inverse of `microbatches` for one array: [n, B/n, ...] -> [B, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def accumulated_grads(sum_loss_fn, params, batch, rng, n: int = 1):
  """Loss, weight, aux and gradients of a mean loss `sum / count`, the sums and counts
  gathered over `n` microbatches taken one at a time (gradient accumulation: only one
  microbatch's activations are alive), so any `n` gives the same mean as the whole batch.

  `sum_loss_fn(params, batch, rng) -> ((sum f32[], count f32[]), aux)` where `aux` has
  the batch axis first; it comes back for the whole batch. Microbatch i draws dropout
  from `fold_in(rng, i)`; with n == 1 the rng and the arithmetic are the plain step's.
  """
  if n == 1:

    def mean_loss(p):
      (total, count), aux = sum_loss_fn(p, batch, rng)
      return total / jnp.maximum(count, 1.0), (count, aux)

    (loss, (count, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    return loss, count, aux, grads

  def body(carry, xs):
    mb, i = xs

    def summed(p):
      (total, count), aux = sum_loss_fn(p, mb, jax.random.fold_in(rng, i))
      return total, (count, aux)

    (total, (count, aux)), g = jax.value_and_grad(summed, has_aux=True)(params)
    s, c, acc = carry
    return (s + total, c + count, jax.tree.map(jnp.add, acc, g)), aux

  zeros = jax.tree.map(jnp.zeros_like, params)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
  (total, count, grads), aux = jax.lax.scan(body, init, (microbatches(batch, n), jnp.arange(n)))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  return total / denom, count, jax.tree.map(unmicrobatch, aux), grads


def step_rng(state: TrainState) -> jax.Array:
  return jax.random.fold_in(state.rng, state.step)


def global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)
