"""SIGTERM and SIGINT (rlhf_jax/interrupts.py): in a training loop a request answered at
the next logging step, after a checkpoint; anywhere else the process ends at once with
the signal's exit status (0, 130), whatever `except` it was inside.

The whole commands under signals at random moments: experiments/preemption.py
(tests/test_preemption.py); one process of two signalled: tests/test_multihost.py."""

import itertools
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from rlhf_jax.errors import Preempted
from rlhf_jax.train import checkpoints, loop, metrics_io, train_state


def _toy_loop(directory: str, num_steps: int, signum: int, during: str, at: int):
  """`run_loop` over a toy state, logging every 2 steps, evaluating at the end; sends
  itself `signum` during step `at`'s `during` (step, eval or save)."""
  tx = optax.sgd(0.1)
  state = train_state.TrainState.create({"w": jnp.ones(2)}, tx, jax.random.PRNGKey(0))
  update = jax.jit(lambda s: s.replace(step=s.step + 1, params={"w": s.params["w"] * 0.5}))
  send = lambda what, step: what == during and step == at and os.kill(os.getpid(), signum)

  def step_fn(state, batch):
    send("step", int(state.step) + 1)
    new = update(state)
    return new, {"toy/w": new.params["w"][0]}

  def eval_fn(state, step):
    send("eval", step)
    return {"toy/eval": float(state.params["w"][0])}

  ckpt = checkpoints.Checkpointer(f"{directory}/checkpoints", save_every=100)
  save = ckpt.save
  ckpt.save = lambda step, *a, **k: (save(step, *a, **k), send("save", step))[0]
  writer = metrics_io.MetricsWriter(directory, enabled=True)
  try:
    loop.run_loop(
      state=state,
      step_fn=step_fn,
      batches=itertools.repeat({}),
      data_iter=None,
      put=lambda b: b,
      num_steps=num_steps,
      checkpointer=ckpt,
      writer=writer,
      log_every=2,
      eval_fn=eval_fn,
      eval_every=num_steps,
    )
  finally:
    ckpt.close()
    writer.close()


def test_sigint_in_a_loop_checkpoints_at_the_next_logging_step(tmp_path):
  before = signal.getsignal(signal.SIGINT)  # (SIG_IGN in a shell's background job)
  with pytest.raises(Preempted, match="SIGINT: checkpointed step 4") as e:
    _toy_loop(str(tmp_path), 10, signal.SIGINT, "step", 3)
  assert e.value.exit_status == 130
  assert [r["step"] for r in metrics_io.read_metrics(str(tmp_path))] == [2, 4]
  assert checkpoints.Checkpointer(f"{tmp_path}/checkpoints").mngr.all_steps() == [4]
  assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.parametrize("during", ["eval", "save"])
def test_a_signal_during_the_last_step_still_stops_the_command(tmp_path, during):
  """Issue 19: RM's runlocal loop is 4 steps; a SIGTERM that arrived while its last
  step evaluated was recorded and then forgotten, and the run went on to complete."""
  with pytest.raises(Preempted, match="SIGTERM: checkpointed step 4") as e:
    _toy_loop(str(tmp_path), 4, signal.SIGTERM, during, 4)
  assert e.value.exit_status == 0
  assert checkpoints.Checkpointer(f"{tmp_path}/checkpoints").mngr.all_steps() == [4]


# A command outside any loop, inside an `except Exception` (a signal raised as an
# exception there was swallowed), and a loop's pending request signalled again.
SLEEPER = """
import os, sys, time
from rlhf_jax import interrupts
# Short naps: a signal the kernel gives to one of JAX's threads does not cut short the
# main thread's sleep, and Python runs the handler only when that sleep returns.
nap = lambda: [time.sleep(0.05) for _ in range(1200)]
interrupts.install()
if sys.argv[1] == "loop":
  with interrupts.loop():
    os.kill(os.getpid(), int(sys.argv[2]))
    assert interrupts.requested() == int(sys.argv[2])
    print("requested", flush=True)
    nap()
try:
  print("ready", flush=True)
  nap()
except Exception:
  print("swallowed", flush=True)
nap()
"""


@pytest.mark.parametrize(
  "where, signum, status",
  [("outside", signal.SIGINT, 130), ("outside", signal.SIGTERM, 0), ("loop", signal.SIGINT, 130)],
)
def test_a_signal_outside_a_loop_or_a_second_one_ends_the_process_at_once(
  where, signum, status, repo_root
):
  proc = subprocess.Popen(
    [sys.executable, "-c", SLEEPER, where, str(int(signum))],
    cwd=repo_root,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == ("requested" if where == "loop" else "ready")
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == status, err
  name = signal.Signals(signum).name
  assert f"rlhf-jax: {name}: stopped; a run resumes from its last checkpoint" in err, err
  assert "swallowed" not in out and "Traceback" not in err
