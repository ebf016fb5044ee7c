"""Multi-process runs: `jax.distributed` from the environment, and who writes what.

One process per host (or per GPU), every process running the same command:

  RLHF_JAX_COORDINATOR=10.0.0.2:1234 RLHF_JAX_NUM_PROCESSES=4 RLHF_JAX_PROCESS_ID=$i \\
    rlhf-jax pipeline --config configs/scale.py:preset=gpu_7b --workdir /shared/run
  RLHF_JAX_DISTRIBUTED=auto rlhf-jax ...   # Cloud TPU pod slices, SLURM: JAX finds them

The settings live in the environment, not in the config, because they differ from
process to process while the config must be the same everywhere (it fingerprints the
stages). On the CPU backend the collectives go through gloo, so a multi-process run
works on one machine too (127.0.0.1, tests/test_multihost.py).

Every process computes the same things (the data stream, the global arrays); files
are written by process 0 only (`first`), checkpoints collectively by Orbax, and a
barrier follows each write that another process is about to read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import jax

from rlhf_jax.errors import UserInputError

T = TypeVar("T")
ENV = ("RLHF_JAX_COORDINATOR", "RLHF_JAX_NUM_PROCESSES", "RLHF_JAX_PROCESS_ID")
_initialized = False


def initialize() -> bool:
  """Join the multi-process run the environment describes (once; before any JAX work).
  Returns whether this is a multi-process run."""
  global _initialized
  if _initialized:
    return jax.process_count() > 1
  auto = os.environ.get("RLHF_JAX_DISTRIBUTED", "") == "auto"
  given = [os.environ.get(k, "") for k in ENV]
  if not auto and not any(given):
    return False
  if not auto and not all(given):
    missing = [k for k, v in zip(ENV, given, strict=True) if not v]
    raise UserInputError(f"multi-process run: {', '.join(missing)} not set (set all three)")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # (CPU backend only)
  # SIGTERM stays with rlhf_jax.interrupts (the processes agree on any one's signal at a
  # logging step): JAX's preemption service would take the signal over for its own sync
  # points, which nothing here asks, and the run would go on.
  jax.config.update("jax_enable_preemption_service", False)
  if auto:
    jax.distributed.initialize()
  else:
    try:
      n, pid = int(given[1]), int(given[2])
    except ValueError:
      raise UserInputError(f"{ENV[1]} / {ENV[2]}: expected integers, got {given[1:]}") from None
    if not 0 <= pid < n:
      raise UserInputError(f"{ENV[2]}={pid}: not in [0, {ENV[1]}={n})")
    jax.distributed.initialize(coordinator_address=given[0], num_processes=n, process_id=pid)
  _initialized = True
  return jax.process_count() > 1


def is_writer() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process got here (a no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
  """The largest of every process's `value` (a collective: every process calls it at the
  same point; on one process, `value`)."""
  if jax.process_count() == 1:
    return value
  import numpy as np
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def first(name: str, fn: Callable[[], T]) -> T | None:
  """Run `fn` on process 0 only (a write), then wait for it everywhere."""
  out = fn() if is_writer() else None
  barrier(name)
  return out


def first_then_all(name: str, fn: Callable[[], T]) -> T:
  """Run an idempotent build (`fn`) on process 0, then on the others, which find it done
  and only read it: a cache every process needs, made once."""
  if not is_writer():
    barrier(name)
    return fn()
  out = fn()
  barrier(name)
  return out
