"""What every stage shares: optimiser, train state, checkpoints, metrics, the loop.

- `make_optimizer`: optax AdamW with warmup + cosine (or constant) and global-norm
  clipping, from a `config.optim` section (`optim_config()` gives the fields).
- `TrainState`: step, params, optimiser state, optional EMA of the params, rng.
- `Checkpointer`: an Orbax `CheckpointManager` saving the train state *and* the input
  iterator state together (keep N, every M steps, at the end), restoring the latest
  and falling back to the previous one when the latest is unreadable.
- `export_params` / `load_params`: a stage's final parameters with the model config
  they belong to; the next stage starts from them, and a mismatch (another model size)
  is a one-line error naming the path.
- `MetricsWriter`: `metrics.jsonl` and TensorBoard event files (process 0 only).
- `run_loop`: the host loop: batches -> jitted step -> metrics / eval / checkpoint,
  with a progress bar; a SIGTERM checkpoints at the next logging step and stops cleanly.
- `Guard`: the numerical guard. A step whose loss or gradients are not finite is
  skipped inside the jit (no host sync) and counted; after `guard.max_bad_steps` in a
  row `run_loop` restores the last good checkpoint and lowers the learning rate.

Exact resume: the step's rng is `fold_in(state.rng, state.step)`, the data iterator's
position is checkpointed with the state, and metrics logged after the restored step are
dropped, so a run killed at any moment and restarted ends bitwise-identical (CPU).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from rlhf_jax import distributed, sharding
from rlhf_jax.errors import Diverged, Preempted, UserInputError  # noqa: F401 (re-export)

log = logging.getLogger(__name__)
Params = Any
Metrics = dict[str, jax.Array]


# --- optimiser ------------------------------------------------------------------------


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
  runs, see stages/ppo_group.py).
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
  """Weight decay on matrices only (not on norm scales, biases or the scalar head)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


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


# --- train state ----------------------------------------------------------------------


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


# --- metrics --------------------------------------------------------------------------


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


# --- checkpoints ----------------------------------------------------------------------


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) to restore a tree exactly as laid out now."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


class Checkpointer:
  """Train state + input-iterator state, saved together, restored together."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, save_every: int = 100):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self.mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
      ),
    )

  def due(self, step: int) -> bool:
    return step % self.save_every == 0 and step not in self.mngr.all_steps()

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    if not (force or self.due(step)):
      return False
    self._check_space(step, state)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
      self.mngr.wait_until_finished()
    except Exception as e:  # a full disk, a read-only or vanished directory, ...
      # Orbax writes into a temporary directory and renames it when complete, so the
      # checkpoints already there are untouched.
      text = str(e)
      reason = getattr(e, "strerror", None) or next(
        (
          m
          for m in ("No space left on device", "Read-only file system", "Permission denied")
          if m in text
        ),
        text.splitlines()[0][:200] if text else type(e).__name__,
      )
      raise UserInputError(
        f"{self.directory}: cannot write checkpoint {step} ({reason}); {self._kept(step)}"
      ) from None
    return True

  def _kept(self, step: int) -> str:
    before = [s for s in self.mngr.all_steps() if s != step]
    return f"step {max(before)} is intact" if before else "there is no earlier one"

  def _check_space(self, step: int, state) -> None:
    """Refuse before writing when the disk cannot hold this process's share of the state
    (an Orbax write that runs out of space fails too, but noisily, from its threads)."""
    need = sum(x.nbytes for x in jax.tree.leaves(state)) / jax.process_count()
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise UserInputError(
        f"{self.directory}: cannot write checkpoint {step} (No space left on device: it "
        f"needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free); "
        f"{self._kept(step)}"
      )

  def restore_latest(self, state, data_iter=None) -> tuple[Any, int]:
    """Restore the newest readable checkpoint into `state`'s structure and layout.

    Returns `(state, step)`; `(state, 0)` unchanged when there is none. A checkpoint
    that fails to load is reported and the previous one is tried.
    """
    for step in sorted(self.mngr.all_steps(), reverse=True):
      items = {"state": ocp.args.StandardRestore(_abstract(state))}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # a truncated / corrupted step directory
        # Kept for inspection under another name, so the step can be written again.
        aside = f"{self.directory}/{step}.unreadable-{int(time.time())}"
        rename = functools.partial(os.rename, f"{self.directory}/{step}", aside)
        distributed.first(f"aside {step}", rename)
        self.mngr.reload()
        log.warning(
          "checkpoint %s/%d unreadable (%s: %s), moved to %s",
          self.directory,
          step,
          type(e).__name__,
          str(e)[:200],
          aside,
        )
        print(
          f"warning: checkpoint {self.directory}/{step} is unreadable "
          f"({type(e).__name__}); moved to {aside}, using the previous one"
        )
        continue
      return restored["state"], step
    return state, 0

  def close(self) -> None:
    self.mngr.close()


def export_params(directory: str, params: Params, model_config: Mapping[str, Any], **meta) -> None:
  """Write a stage's final parameters (`<dir>/params`) and what model they belong to."""
  path = os.path.join(os.path.abspath(directory), "params")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()
  tok = meta.get("tokenizer")
  if tok and os.path.exists(tok):  # what the next stage checks its tokenizer against
    meta["tokenizer_sha256"] = file_sha256(tok)
  write_params_info(directory, {"model": dict(model_config), **meta})


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def write_params_info(directory: str, info: Mapping[str, Any]) -> None:
  """(Re)write `<dir>/params.json` atomically (process 0; the others wait for it, as a
  stage is complete once it exists)."""

  def write():
    tmp = os.path.join(directory, "params.json.tmp")
    with open(tmp, "w") as f:
      json.dump(dict(info), f, indent=1, default=str)
    os.replace(tmp, os.path.join(directory, "params.json"))

  distributed.first(f"params.json {directory}", write)


def params_info(directory: str) -> dict[str, Any] | None:
  path = os.path.join(directory, "params.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "head_dim")


def load_params(
  directory: str, like: Params, model_config: Mapping[str, Any], tokenizer: str | None = None
) -> Params:
  """Parameters exported by a previous stage, laid out like `like`.

  A missing export, one for another model shape, or (given the `tokenizer` file this run
  uses) one trained with another tokenizer is a UserInputError naming the path and the
  mismatch.
  """
  info = params_info(directory)
  if info is None or not os.path.isdir(os.path.join(directory, "params")):
    raise UserInputError(f"{directory}: no exported parameters (run that stage first)")
  diff = [
    f"{k}={info['model'].get(k)} (checkpoint) vs {model_config.get(k)} (config)"
    for k in _SHAPE_KEYS
    if info["model"].get(k) != model_config.get(k)
  ]
  if diff:
    raise UserInputError(f"{directory}: model mismatch: {'; '.join(diff)}")
  recorded = info.get("tokenizer_sha256")
  if tokenizer and recorded and os.path.exists(tokenizer) and file_sha256(tokenizer) != recorded:
    raise UserInputError(
      f"{directory}: trained with the tokenizer {info.get('tokenizer')}, but this run's "
      f"tokenizer {tokenizer} is another one (sha256 differs); set config.tokenizer.path to "
      f"the checkpoint's"
    )
  try:
    return ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), "params"), _abstract(like)
    )
  except Exception as e:
    raise UserInputError(
      f"{directory}/params: cannot restore ({type(e).__name__}: {str(e)[:200]})"
    ) from None


# --- the loop -------------------------------------------------------------------------


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


class _Stop:
  """SIGTERM -> run on to the next logging step, checkpoint, exit 0 (preemption notice)."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    self.requested = True


@contextlib.contextmanager
def sigterm_checkpoint() -> Iterator[_Stop]:
  stop = _Stop()
  try:
    previous = signal.signal(signal.SIGTERM, stop)
  except ValueError:  # not the main thread
    yield stop
    return
  try:
    yield stop
  finally:
    signal.signal(signal.SIGTERM, previous)


def _host_max(x) -> float:
  return float(np.max(sharding.to_host(x)))


def _interval_means(total: Metrics, count: int) -> dict[str, np.ndarray]:
  """Means over a logging interval's finite steps (float64, so a vmapped group's f32[R]
  metrics average as a lone run's do); `guard/skipped` counts the others."""
  m = {k: sharding.to_host(v).astype(np.float64) for k, v in total.items()}
  ok = m.pop("guard/ok", None)
  if ok is None:
    return {k: v / count for k, v in m.items()}
  with np.errstate(invalid="ignore", divide="ignore"):
    out = {k: np.where(ok > 0, v / np.maximum(ok, 1), np.nan) for k, v in m.items()}
  if np.all(ok == 0):  # nothing finite to average
    out = {}
  out["guard/skipped"] = count - ok
  return out


def _with_guard(state, **values):
  """`state` with guard fields set (host values broadcast to each field's shape and
  layout: a vmapped group's guard is per run)."""
  fields = {}
  for k, v in values.items():
    old = getattr(state.guard, k)
    fields[k] = jax.device_put(np.broadcast_to(np.asarray(v, old.dtype), old.shape), old.sharding)
  return state.replace(guard=state.guard.replace(**fields))


def recover(state, checkpointer: Checkpointer, data_iter, c: ml_collections.ConfigDict, step: int):
  """After `c.max_bad_steps` non-finite steps in a row: the last good checkpoint (state and
  data position; with none, the current state, whose params are the last finite ones) at
  `lr_factor` x its learning rate. Returns `(state, step)`; raises `Diverged` after
  `max_restores`."""
  restores = int(_host_max(state.guard.restores)) + 1
  skipped = sharding.to_host(state.guard.skipped)
  if restores > c.max_restores:
    raise Diverged(
      f"{checkpointer.directory}: non-finite loss or gradients for {c.max_bad_steps}+ steps "
      f"in a row at step {step}, after {c.max_restores} restores of the last good checkpoint; "
      f"lower the learning rate or check the data"
    )
  restored, at = checkpointer.restore_latest(state, data_iter)
  if at == 0:
    restored, at = state, step
  scale = sharding.to_host(restored.guard.lr_scale) * c.lr_factor
  restored = _with_guard(restored, bad_streak=0, restores=restores, skipped=skipped, lr_scale=scale)
  msg = (
    f"guard: {c.max_bad_steps}+ non-finite steps in a row at step {step}; restored "
    f"step {at}, learning rate x{float(np.max(scale)):g} "
    f"(restore {restores}/{c.max_restores})"
  )
  log.warning(msg)
  if jax.process_index() == 0:
    print(f"warning: {msg}")
  return restored, at


def run_loop(
  *,
  state,
  step_fn: Callable,
  batches: Iterator[dict[str, np.ndarray]],
  data_iter,
  put: Callable[[dict[str, np.ndarray]], Any],
  num_steps: int,
  checkpointer: Checkpointer,
  writer: MetricsWriter,
  log_every: int = 10,
  eval_every: int = 0,
  eval_fn: Callable[[Any, int], dict[str, float]] | None = None,
  eval_at_start: bool = False,
  desc: str = "train",
  tokens_per_batch: int = 0,
  flops_per_step: float = 0.0,
  guard: ml_collections.ConfigDict | None = None,
) -> Any:
  """Run `step_fn(state, batch) -> (state, metrics)` up to `num_steps` (resuming).

  Metrics are fetched from the device only every `log_every` steps (no per-step host
  sync), with throughput measured between logs. `eval_at_start` also evaluates the
  initial state of a fresh run (step 0: the baseline a curve starts from). The guard
  (`guard_config`; default values when None) is checked at the same points: a checkpoint
  is not written during a run of non-finite steps, and `guard.max_bad_steps` of them in a
  row restore the last good one (`recover`).
  """
  from tqdm.auto import tqdm

  guard = guard or guard_config()
  step = int(np.ravel(sharding.to_host(state.step))[0])  # (a vmapped group's runs share it)
  if eval_fn is not None and eval_at_start and step == 0:
    writer.write(0, eval_fn(state, 0))
  bar = tqdm(
    total=num_steps, initial=step, desc=desc, dynamic_ncols=True, disable=jax.process_index() != 0
  )
  t_last, s_last = time.perf_counter(), step
  total, count = None, 0  # metrics summed on device over the logging interval
  try:
    with sigterm_checkpoint() as stop:
      while step < num_steps:
        state, metrics = step_fn(state, put(next(batches)))
        total = metrics if total is None else _add(total, metrics)
        count += 1
        step += 1
        bar.update(1)
        last = step == num_steps
        # A SIGTERM stops at the next logging step (at most log_every - 1 more steps), so
        # the resumed run logs over the same intervals as an uninterrupted one.
        stopping = stop.requested and step % log_every == 0
        save = last or stopping or checkpointer.due(step)
        # Also log at every checkpoint, so a resumed run averages over the same steps.
        if step % log_every == 0 or save:
          # Means over the interval: the last step alone can mislead (with 10% mixed-in
          # pretraining batches, every 10th step's loss is a pretraining loss).
          m = _interval_means(total, count)
          total, count = None, 0
          dt = time.perf_counter() - t_last
          steps = step - s_last
          m[f"{desc}/steps_per_s"] = steps / dt
          if tokens_per_batch:
            m[f"{desc}/tokens_per_s"] = steps * tokens_per_batch / dt
          if flops_per_step:
            m[f"{desc}/gflops_per_s"] = steps * flops_per_step / dt / 1e9
          t_last, s_last = time.perf_counter(), step
          writer.write(step, m)
          loss_key = next((k for k in m if k.endswith("/loss")), None)
          if loss_key:
            bar.set_postfix({"loss": f"{float(np.mean(m[loss_key])):.4f}"})
          streak = _host_max(state.guard.bad_streak)
          if streak >= guard.max_bad_steps:
            state, step = recover(state, checkpointer, data_iter, guard, step)
            writer.write(
              step,
              {
                "guard/restores": _host_max(state.guard.restores),
                "guard/lr_scale": _host_max(state.guard.lr_scale),
              },
            )
            bar.reset(total=num_steps)
            bar.update(step)
            t_last, s_last = time.perf_counter(), step
            continue
          if streak and not (last or stopping):
            save = False  # not a "last good" checkpoint: wait for a finite step
        if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
          writer.write(step, eval_fn(state, step))
        if save:
          checkpointer.save(step, state, data_iter, force=True)
        if stopping:
          raise Preempted(f"SIGTERM: checkpointed step {step} in {checkpointer.directory}")
  finally:  # (before any error message: the bar's last line ends with a newline)
    bar.close()
  return state
