"""Reliability: the numerical guard skips non-finite steps and recovers from the last
good checkpoint, one run per work directory, and a full or read-only disk is a one-line
error that leaves the previous checkpoint intact. (SIGKILL / SIGTERM resume: the
preemption harness, tests/test_preemption.py; bad inputs: tests/test_bad_inputs.py.)"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import cli, config_lib, workdir
from rlhf_jax.train import checkpoints, metrics_io, optim

RUNLOCAL = "configs/default.py:runlocal"
GUARD = ("--config.pretrain.save_every=4", "--config.pretrain.log_every=2")


def _one_line_error(stderr: str, *words: str) -> str:
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  assert lines and "Traceback" not in stderr, stderr[-2000:]
  last = lines[-1]
  assert last.startswith("rlhf-jax: error: "), stderr[-2000:]
  for w in words:
    assert w in last, last
  return last


@pytest.mark.slow
def test_nan_steps_are_skipped_then_the_last_good_checkpoint_restored(run_cli, tmp_path):
  wd = str(tmp_path / "run")
  # Steps 6, 7 and 8 (0-based state.step 5..7) get NaN gradients; 3 in a row restore
  # the checkpoint of step 4 at half the learning rate, and the run goes on.
  proc = run_cli(
    "pretrain",
    "--config",
    RUNLOCAL,
    "--workdir",
    wd,
    *GUARD,
    "--config.guard.inject_nan_from=5",
    "--config.guard.inject_nan_steps=3",
  )
  assert "guard: 3+ non-finite steps in a row at step 8; restored step 4, learning rate x0.5" in (
    proc.stdout
  ), proc.stdout[-2000:]
  rows = metrics_io.read_metrics(f"{wd}/pretrain")
  assert sum(r.get("guard/skipped", 0) for r in rows) == 3
  restore = [i for i, r in enumerate(rows) if "guard/restores" in r]
  assert len(restore) == 1 and rows[restore[0]] == {
    "step": 4,
    "guard/restores": 1.0,
    "guard/lr_scale": 0.5,
  }
  # Before the restore: the interval with one skipped step averages the finite one
  # only; the interval of two skipped steps logs no loss at all.
  assert rows[restore[0] - 1]["step"] == 8 and "pretrain/loss" not in rows[restore[0] - 1]
  config = config_lib.get(RUNLOCAL)
  schedule = optim.lr_schedule(config.pretrain.optim, config.pretrain.num_steps)
  after = rows[restore[0] + 1]  # steps 5-6 again, at half the rate
  assert after["step"] == 6 and after["guard/skipped"] == 0
  np.testing.assert_allclose(after["pretrain/lr"], 0.5 * (schedule(4) + schedule(5)) / 2, rtol=1e-6)
  losses = [r["pretrain/loss"] for r in rows if "pretrain/loss" in r]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0
  params = ocp.StandardCheckpointer().restore(f"{wd}/pretrain/params")
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
  assert all(np.isfinite(x).all() for x in leaves)

  # Non-finite steps with no restores left: exit status 3, one line.
  wd2 = str(tmp_path / "diverged")
  proc = run_cli(
    "pretrain",
    "--config",
    RUNLOCAL,
    "--workdir",
    wd2,
    *GUARD,
    "--config.guard.inject_nan_from=5",
    "--config.guard.inject_nan_steps=3",
    "--config.guard.max_restores=0",
    returncode=3,
  )
  _one_line_error(proc.stderr, "non-finite", "step 8")


def test_second_run_in_a_workdir_is_refused(tmp_path, capsys):
  wd = str(tmp_path / "run")
  with workdir.locked(wd) as path:
    assert open(path).read().strip() == str(os.getpid())
    assert cli.main(["data", "--config", RUNLOCAL, "--workdir", wd]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use by another run" in err and wd in err, err
    assert sorted(os.listdir(wd)) == [".lock"]  # nothing written
  with workdir.locked(wd):  # released: free again
    pass
  # Another process's lock too (flock is per open file, so also across processes).
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from rlhf_jax import workdir\n"
      "with workdir.locked(sys.argv[1]):\n print('locked', flush=True); time.sleep(60)",
      wd,
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match=f"pid {holder.pid}"):
      with workdir.locked(wd):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir.locked(wd):  # a SIGKILLed holder leaves no stale lock
    pass


@pytest.fixture
def small_disk(tmp_path):
  """A 24 MB tmpfs (needs root and mount; skipped otherwise)."""
  mnt = tmp_path / "disk"
  mnt.mkdir()
  r = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True
  )
  if r.returncode:
    pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()[:100]})")
  yield str(mnt)
  subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: str, leave: int) -> None:
  """Fill the filesystem of `path` up to `leave` free bytes."""
  st = os.statvfs(path)
  free = st.f_bavail * st.f_frsize
  with open(os.path.join(path, "filler"), "wb") as f:
    f.write(b"\0" * max(0, free - leave))


@pytest.mark.slow
def test_full_disk_and_read_only_workdir_are_one_line_errors(small_disk, tmp_path):
  wd = os.path.join(small_disk, "run")
  cmd = [
    sys.executable,
    "-m",
    "rlhf_jax",
    "pretrain",
    "--config",
    RUNLOCAL,
    "--workdir",
    wd,
    "--config.pretrain.save_every=8",
    "--config.pretrain.num_steps=24",
  ]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  # A run killed after its checkpoint of step 8.
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker = f"{wd}/pretrain/checkpoints/8"
  deadline = time.time() + 120
  while not os.path.isdir(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(marker) and not os.path.exists(f"{wd}/pretrain/params.json")
  ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(marker) for f in fs)
  # The disk fills up: room for the metrics, not for the next checkpoint.
  _fill(small_disk, leave=min(ckpt_bytes // 2, 256 << 10))
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  assert r.returncode == 2, r.stderr[-2000:]
  line = _one_line_error(r.stderr, "No space left on device")
  assert "checkpoint 16" in line and "step 8 is intact" in line, line
  os.remove(os.path.join(small_disk, "filler"))
  # The checkpoint of step 8 still restores, and the run completes from it.
  r = subprocess.run(cmd, env=env, capture_output=True, text=True)
  assert r.returncode == 0 and "resuming from step 8" in r.stdout, r.stderr[-2000:]
  assert checkpoints.params_info(f"{wd}/pretrain") is not None
  rows = metrics_io.read_metrics(f"{wd}/pretrain")
  assert [r["step"] for r in rows if "pretrain/loss" in r][-1] == 24
  # A read-only work directory: the error names it, and nothing written before changed.
  with open(f"{wd}/pretrain/params.json") as f:
    export = f.read()
  subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True)
  r = subprocess.run(
    [*cmd[:-1], "--config.pretrain.num_steps=32"], env=env, capture_output=True, text=True
  )
  assert r.returncode == 2, r.stderr[-2000:]
  _one_line_error(r.stderr, "Read-only file system", wd)
  assert metrics_io.read_metrics(f"{wd}/pretrain") == rows
  with open(f"{wd}/pretrain/params.json") as f:
    assert f.read() == export


def test_a_run_with_nothing_to_resume_starts_its_metrics_afresh(tmp_path):
  """A PPO run killed before its first checkpoint has logged its step-0 evaluation; the
  restart logs it again, so the old line must go (the preemption harness found it)."""
  import ml_collections

  from rlhf_jax.stages import common

  out = str(tmp_path / "ppo")
  w = metrics_io.MetricsWriter(out)
  w.write(0, {"ppo/gold_score": 0.5})
  w.write(2, {"ppo/score": 1.0})
  w.close()
  with open(f"{out}/metrics.jsonl", "a") as f:
    f.write('{"step": 4, "ppo/sco')  # and a half-written line
  c = ml_collections.ConfigDict({"keep_checkpoints": 2, "save_every": 2})
  state = {"x": jax.numpy.zeros(3)}
  ckpt, writer, _, resumed = common.open_run(out, c, state, None, "ppo")
  assert resumed == 0 and metrics_io.read_metrics(out) == []
  ckpt.save(2, state, force=True)
  writer.write(2, {"ppo/score": 1.0})
  with open(f"{out}/metrics.jsonl", "a") as f:
    f.write('{"step": 4, "ppo/sco')
  ckpt, writer, _, resumed = common.open_run(out, c, state, None, "ppo")
  assert resumed == 2 and metrics_io.read_metrics(out) == [{"step": 2, "ppo/score": 1.0}]
