"""One error type for bad user input.

Anything the user can get wrong (a config override, a data file, a checkpoint path)
raises `UserInputError`; the CLI turns it into a single line on stderr and exit status
2, never a traceback. Library code stays free to raise it from any depth.
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UserInputError(Exception):
  """Bad input from the user: config, data file, tokenizer or checkpoint.

  The message must name what is wrong (a config key, a `file:line` and field, a path)
  and fit on one line.
  """

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split("\n")))


def at_line(path: str, line: int, message: str) -> UserInputError:
  """An error located at `path:line` (1-based line numbers, as editors show them)."""
  return UserInputError(f"{path}:{line}: {message}")


class Diverged(Exception):
  """Training gave up: non-finite steps persisted through `guard.max_restores` restores
  of the last good checkpoint (rlhf_jax.train.loop.recover). The CLI exits 3."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split("\n")))


class Preempted(BaseException):
  """A SIGTERM or SIGINT stopped a training loop once its state was checkpointed
  (`rlhf_jax.interrupts`; anywhere else a signal ends the process at once). The CLI
  exits with `exit_status`: 0 after SIGTERM, 130 after SIGINT. A BaseException, as
  KeyboardInterrupt is: no `except Exception` on its way up (a sweep's, which records a
  failed point and goes on with the next) takes it for an error."""

  def __init__(self, message: str, exit_status: int = 0):
    super().__init__(message)
    self.exit_status = exit_status
