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


class Preempted(Exception):
  """A SIGTERM stopped the run: inside a training loop once the state is checkpointed
  (`train.loop.run_loop`), anywhere else at once (the last checkpoint is where the next
  run resumes, as after a SIGKILL). The CLI exits 0."""
