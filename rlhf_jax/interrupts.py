"""SIGTERM (a preemption notice) and SIGINT (Ctrl-C): every command stops resumably.

Inside a training loop (`train.loop.run_loop`) a signal is a request: the loop runs on
to its next logging step (or its last), checkpoints, and raises `Preempted`, which the
CLI turns into its exit status. In a multi-process run the processes agree on it there
(`requested` is a collective), so a signal to any one of them stops all of them at the
same step, with one checkpoint.

Anywhere else (loading, compiling, evaluating, exporting) and at a second signal while
a loop's request is pending (Ctrl-C twice), the process ends at once: its output is
flushed and `os._exit` ends it. Every file a run writes is written atomically (Orbax
renames a finished checkpoint into place; exports are complete once `params.json`
exists), so the work directory resumes as after a SIGKILL, which
experiments/preemption.py sends at random moments. Not an exception raised from the
handler, as KeyboardInterrupt is: it lands at whatever bytecode runs, inside `except
Exception` blocks (a checkpoint being restored was set aside as unreadable, a tokenizer
being trained became a one-line error), and it cuts short the wait for an XLA
compilation, which goes on in XLA's thread pool: the interpreter's teardown then freed
the PjRt client under that thread (a SIGSEGV, seen in core dumps in
`PjRtLoadedExecutable::Create` while the main thread destroyed the client). `os._exit`
runs no teardown.

A multi-process run keeps SIGTERM from JAX's preemption service (`distributed`), which
would otherwise take it over. Outside a loop a signal ends only the process it reached:
the others wait at their next collective until JAX's coordination service misses its
heartbeats (100 s) and aborts them (a scheduler's preemption signals every process).

Exit status: 0 after SIGTERM (the scheduler asked; the work is saved), 130 after SIGINT
(128 + 2, what a shell reports for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn

from rlhf_jax.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_STATUS = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT}

_requested = 0  # the signal a running loop is to stop for (0: none)
_loops = 0  # training loops running now, which answer a request at a logging step
_installed = False


def name(signum: int) -> str:
  return signal.Signals(signum).name


def _say(text: str) -> None:
  # Straight to the file descriptor: a print from a handler that interrupted another
  # write to the same stream (tqdm's progress bar) raises "reentrant call".
  with contextlib.suppress(OSError):
    os.write(2, f"\nrlhf-jax: {text}\n".encode())


def exit_now(signum: int) -> NoReturn:
  """End the process with `signum`'s exit status, output flushed, no teardown."""
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):  # (a reentrant call: what it held is lost)
      stream.flush()
  _say(f"{name(signum)}: stopped; a run resumes from its last checkpoint")
  os._exit(EXIT_STATUS[signum])


def _handle(signum, frame) -> None:
  global _requested
  if _loops and not _requested:
    _requested = signum
    _say(
      f"{name(signum)}: stopping after the checkpoint at the next logging step "
      f"({name(signum)} again to stop at once)"
    )
    return
  exit_now(signum)


def install() -> None:
  """Handle SIGTERM and SIGINT as above for the rest of the process (the program's own
  entry point: its exit handlers run with them too)."""
  global _installed, _requested
  for s in SIGNALS:
    signal.signal(s, _handle)
  _installed, _requested = True, 0


@contextlib.contextmanager
def handled() -> Iterator[None]:
  """SIGTERM and SIGINT handled as above while inside, then the previous handlers back
  (a no-op when already handled, or off the main thread, where signals cannot be)."""
  global _installed
  if _installed:
    yield
    return
  previous = {s: signal.getsignal(s) for s in SIGNALS}
  try:
    install()
  except ValueError:  # not the main thread
    yield
    return
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _installed = False


@contextlib.contextmanager
def loop() -> Iterator[None]:
  """While a training loop runs: a (first) signal is a request the loop answers at its
  next logging step (`requested`, `stop`)."""
  global _loops
  with handled():
    _loops += 1
    try:
      yield
    finally:
      _loops -= 1


def requested() -> int:
  """The signal to stop for now (0: none): the largest any process received. In a
  multi-process run a collective: every process calls it at the same steps."""
  from rlhf_jax import distributed

  return distributed.max_over_processes(_requested)


def stop(signum: int, what: str) -> Preempted:
  """The exception that ends a command stopped by `signum` after `what`."""
  return Preempted(f"{name(signum)}: {what}", EXIT_STATUS[signum])
