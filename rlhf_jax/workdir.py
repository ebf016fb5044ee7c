"""The work directory: one run at a time, its shared files, atomic writes.

Two runs writing one work directory would interleave their checkpoints and metrics, and
each resume from the other's steps. Every command that writes a `--workdir` holds an
advisory lock on `DIR/.lock` (one per process of a multi-process run) for its lifetime;
a second one is refused with a one-line error. The kernel drops the lock when the holder
exits however it exits (SIGKILL included), so a preempted run never leaves it stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from rlhf_jax.errors import UserInputError

WALL_SECONDS = "wall_seconds.json"  # seconds per stage run here, added up by the pipeline


@contextlib.contextmanager
def locked(workdir: str, process_index: int = 0) -> Iterator[str]:
  """Hold `workdir`'s lock (created with the directory if need be); yields its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(
    os.path.abspath(workdir), ".lock" if not process_index else f".lock.{process_index}"
  )
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
      raise UserInputError(
        f"{workdir}: in use by another run (pid {holder}, lock {path}); wait for it to "
        f"finish or use another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield path
  finally:
    os.close(fd)  # (releases the lock)


def write_text(path: str, text: str) -> None:
  """Write `path` atomically (process 0 of a multi-process run; the others wait)."""
  from rlhf_jax import distributed  # (jax: only when writing)

  def write():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)

  distributed.first(f"write {os.path.basename(path)}", write)
