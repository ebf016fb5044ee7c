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
  with a progress bar; a SIGTERM checkpoints and stops cleanly.

Exact resume: the step's rng is `fold_in(state.rng, state.step)`, the data iterator's
position is checkpointed with the state, and metrics logged after the restored step are
dropped, so a run killed at any moment and restarted ends bitwise-identical (CPU).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
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
from rlhf_jax.errors import UserInputError

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
    lr_schedule(c, total_steps, lr), c.b1, c.b2, c.eps, weight_decay=c.weight_decay,
    mask=_decay_mask,
  )  # fmt: skip
  if c.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), tx)
  return tx


# --- train state ----------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[]
  params: Params
  opt_state: optax.OptState
  ema: Params | None  # EMA of params (None when off)
  rng: jax.Array  # uint32[2], raw key; step keys are fold_in(rng, step)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng, ema_decay: float = 0.0):
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema=jax.tree.map(jnp.copy, params) if ema_decay else None,
      rng=rng,
    )

  def apply_gradients(self, grads, tx: optax.GradientTransformation, ema_decay: float = 0.0):
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema
    if ema is not None:
      ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema=ema)


def microbatches(batch, n: int):
  """Split every array of `batch` on its leading axis into `n` microbatches: [n, B/n, ...].

  Microbatch i takes rows i, i + n, i + 2n, ...: every device keeps a share of each
  microbatch when the batch axis is sharded, so accumulation moves no data.
  """
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1),
                      batch)  # fmt: skip


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
    """Drop lines logged after `step` (written after the checkpoint we resume from)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
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
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
    self.mngr.wait_until_finished()
    return True

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
        log.warning("checkpoint %s/%d unreadable (%s: %s), moved to %s", self.directory, step,
                    type(e).__name__, str(e)[:200], aside)  # fmt: skip
        print(f"warning: checkpoint {self.directory}/{step} is unreadable "
              f"({type(e).__name__}); moved to {aside}, using the previous one")  # fmt: skip
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
  write_params_info(directory, {"model": dict(model_config), **meta})


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


def load_params(directory: str, like: Params, model_config: Mapping[str, Any]) -> Params:
  """Parameters exported by a previous stage, laid out like `like`.

  A missing export or one for another model shape is a UserInputError naming the path
  and the mismatch.
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
  """SIGTERM -> finish the current step, checkpoint, exit 0 (preemption notice)."""

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


class Preempted(Exception):
  """Raised after a SIGTERM once the state is checkpointed; the CLI exits 0."""


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
) -> Any:
  """Run `step_fn(state, batch) -> (state, metrics)` up to `num_steps` (resuming).

  Metrics are fetched from the device only every `log_every` steps (no per-step host
  sync), with throughput measured between logs. `eval_at_start` also evaluates the
  initial state of a fresh run (step 0: the baseline a curve starts from).
  """
  from tqdm.auto import tqdm

  step = int(np.ravel(sharding.to_host(state.step))[0])  # (a vmapped group's runs share it)
  if eval_fn is not None and eval_at_start and step == 0:
    writer.write(0, eval_fn(state, 0))
  bar = tqdm(total=num_steps, initial=step, desc=desc, dynamic_ncols=True,
             disable=jax.process_index() != 0)  # fmt: skip
  t_last, s_last = time.perf_counter(), step
  total, count = None, 0  # metrics summed on device over the logging interval
  with sigterm_checkpoint() as stop:
    while step < num_steps:
      state, metrics = step_fn(state, put(next(batches)))
      total = metrics if total is None else _add(total, metrics)
      count += 1
      step += 1
      bar.update(1)
      last = step == num_steps
      save = last or stop.requested or checkpointer.due(step)
      # Also log at every checkpoint, so a resumed run averages over the same steps.
      if step % log_every == 0 or save:
        # Means over the interval: the last step alone can mislead (with 10% mixed-in
        # pretraining batches, every 10th step's loss is a pretraining loss).
        # (float64, so a vmapped group's f32[R] metrics average as a lone run's do)
        m = {k: sharding.to_host(v).astype(np.float64) / count for k, v in total.items()}
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
      if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
        writer.write(step, eval_fn(state, step))
      if save:
        checkpointer.save(step, state, data_iter, force=True)
      if stop.requested:
        bar.close()
        raise Preempted(f"SIGTERM: checkpointed step {step} in {checkpointer.directory}")
  bar.close()
  return state
