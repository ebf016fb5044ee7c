"""The host loop every stage runs: batches -> jitted step -> metrics / eval / checkpoint.

`run_loop` fetches metrics from the device only at logging steps, shows a progress bar,
checkpoints, and handles two kinds of interruption: a SIGTERM (preemption notice) or
SIGINT (Ctrl-C) runs on to the next logging step, checkpoints and stops (on every
process of a multi-process run at the same step: `rlhf_jax.interrupts`); a streak of
non-finite steps restores the last good checkpoint at a lower learning rate (`recover`).

Exact resume: the step's rng is `fold_in(state.rng, state.step)`, the data iterator's
position is checkpointed with the state, and metrics logged after the restored step are
dropped, so a run killed at any moment and restarted ends bitwise-identical (CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import interrupts, sharding
from rlhf_jax.errors import Diverged
from rlhf_jax.train.checkpoints import Checkpointer
from rlhf_jax.train.metrics_io import MetricsWriter
from rlhf_jax.train.optim import guard_config

log = logging.getLogger(__name__)
Metrics = dict[str, jax.Array]


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


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
    with interrupts.loop():
      while step < num_steps:
        state, metrics = step_fn(state, put(next(batches)))
        total = metrics if total is None else _add(total, metrics)
        count += 1
        step += 1
        bar.update(1)
        last = step == num_steps
        logged = step % log_every == 0 or last
        save = last or checkpointer.due(step)
        # Also log at every checkpoint, so a resumed run averages over the same steps.
        if logged or save:
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
          if streak and not last:
            save = False  # not a "last good" checkpoint: wait for a finite step
        if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
          writer.write(step, eval_fn(state, step))
        # A signal stops the run at a logging step (at most log_every - 1 steps later), so
        # the resumed run logs over the same intervals as an uninterrupted one. Asked
        # after this step's metrics and evaluation, which it may have arrived during (the
        # host waits there), and at the same steps on every process (a collective).
        signum = interrupts.requested() if logged else 0
        if save or signum:
          checkpointer.save(step, state, data_iter, force=True)
        if signum:
          raise interrupts.stop(signum, f"checkpointed step {step} in {checkpointer.directory}")
      # One that arrived while the last checkpoint was written: the run is saved as it ends.
      if signum := interrupts.requested():
        raise interrupts.stop(signum, f"checkpointed step {step} in {checkpointer.directory}")
  finally:  # (before any error message: the bar's last line ends with a newline)
    bar.close()
  return state
