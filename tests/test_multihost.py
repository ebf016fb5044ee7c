"""Two processes on 127.0.0.1 (CPU backend, gloo; 2 fake devices each) train a few real
SFT steps and one PPO iteration and end with the parameters one process on 4 fake
devices ends with: the same global batches, the same mesh, collective checkpoints. A
SIGTERM to one of them stops both at the same step, with one checkpoint."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rlhf_jax.models import abstract_params
from rlhf_jax.train import checkpoints, metrics_io

pytestmark = pytest.mark.slow  # two processes over gloo

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
# SFT from the tiny imported LLaMA (no pretraining needed) for a few steps, the imported
# RM, one PPO iteration; checkpoints along the way, gold-judge evaluations at the ends.
ARGS = [
  "--config",
  "configs/default.py:runlocal",
  f"--config.init.hf_dir={FIX}/llama",
  f"--config.init.rm_hf_dir={FIX}/llama_rm",
  "--config.world.num_demonstrations=96",
  "--config.sft.save_every=3",
  "--config.sft.gold_eval_prompts=4",
  "--config.ppo.num_iterations=1",
  "--config.ppo.eval_prompts=4",
  "--config.ppo.eval_every=1",
  "--config.mesh.data=4",
]
DRIVER = (
  "import sys; from rlhf_jax import cli; wd, args = sys.argv[1], sys.argv[2:]; "
  "[cli.main([s, '--workdir', wd, *args]) == 0 or sys.exit(9) for s in ('sft', 'ppo')]"
)


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _params(directory: str):
  info = checkpoints.params_info(directory)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
    abstract_params(info["model"], tuple(info.get("heads") or ("lm",))),
  )
  return jax.tree.leaves(jax.device_get(checkpoints.load_params(directory, like, info["model"])))


def _start(cmd: list[str], port: int, logs, repo_root) -> list[subprocess.Popen]:
  """Process i of two, output to logs[i]."""
  return [
    subprocess.Popen(
      cmd,
      cwd=repo_root,
      stdout=open(log, "w"),
      stderr=subprocess.STDOUT,
      env=_env(
        2,
        RLHF_JAX_COORDINATOR=f"127.0.0.1:{port}",
        RLHF_JAX_NUM_PROCESSES="2",
        RLHF_JAX_PROCESS_ID=str(i),
      ),
    )
    for i, log in enumerate(logs)
  ]


def test_a_sigterm_to_one_process_stops_both_at_one_step(tmp_path, repo_root):
  """Process 1 alone gets the SIGTERM (process 0 writes the metrics and coordinates):
  the processes agree at the next logging step, both checkpoint it collectively and exit
  0, and the next run resumes there on both."""
  wd = str(tmp_path / "run")
  sft = ARGS[:3] + [
    "--config.world.num_demonstrations=96",
    "--config.sft.num_epochs=8",  # ~90 steps: the signal lands well inside the loop
    "--config.sft.log_every=2",
    "--config.sft.save_every=1000",  # no checkpoint but the one the signal asks for
    "--config.sft.gold_eval_prompts=4",
    "--config.mesh.data=4",
  ]
  cmd = [sys.executable, "-m", "rlhf_jax", "sft", "--workdir", wd, *sft]
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = _start(cmd, _port(), logs, repo_root)
  deadline = time.time() + 600
  metrics = f"{wd}/sft/metrics.jsonl"
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    p.wait(timeout=600)
  outs = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], [out[-3000:] for out in outs]
  stopped = [re.findall(r"SIGTERM: checkpointed step (\d+)", out) for out in outs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
  step = int(stopped[0][0])
  total = int(re.search(r"(\d+) steps", outs[0]).group(1))
  assert 0 < step < total and step % 2 == 0, (step, total)
  assert sorted(os.listdir(f"{wd}/sft/checkpoints")) == [str(step)]
  assert not os.path.exists(f"{wd}/sft/params.json")
  logs = [tmp_path / f"process{i}.resumed.log" for i in range(2)]
  procs = _start(cmd, _port(), logs, repo_root)
  for p in procs:
    p.wait(timeout=600)
  outs = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], [out[-3000:] for out in outs]
  assert all(f"sft: resuming from step {step}" in out for out in outs), outs[0][-2000:]
  rows = [r for r in metrics_io.read_metrics(f"{wd}/sft") if "sft/loss" in r]
  assert [r["step"] for r in rows] == list(range(2, total + 1, 2)) + ([total] if total % 2 else [])
  assert checkpoints.params_info(f"{wd}/sft") is not None


def test_two_processes_equal_one_process_on_four_devices(tmp_path, repo_root):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  cmd = lambda wd: [sys.executable, "-c", DRIVER, wd, *ARGS]
  ref = subprocess.run(cmd(one), cwd=repo_root, env=_env(4), capture_output=True, text=True)
  assert ref.returncode == 0, ref.stderr[-3000:]
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = _start(cmd(two), _port(), logs, repo_root)
  for p in procs:
    p.wait(timeout=900)
  outs = [log.read_text() for log in logs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert "sft: resuming" not in outs[0] and "ppo: RM score" in outs[0]
  for stage in ("sft", "ppo"):
    a, b = _params(f"{one}/{stage}"), _params(f"{two}/{stage}")
    for x, y in zip(a, b, strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  # ... and they moved: PPO changed the SFT policy
  assert any(
    not np.array_equal(x, y)
    for x, y in zip(_params(f"{one}/sft"), _params(f"{one}/ppo"), strict=True)
  )
  # only process 0 wrote the metrics: the same rows as the lone process's
  with open(f"{one}/sft/metrics.jsonl") as f, open(f"{two}/sft/metrics.jsonl") as g:
    mine, theirs = [json.loads(x) for x in f], [json.loads(x) for x in g]
  assert [r["step"] for r in mine] == [r["step"] for r in theirs]
  np.testing.assert_allclose(
    [r["sft/loss"] for r in mine if "sft/loss" in r],
    [r["sft/loss"] for r in theirs if "sft/loss" in r],
    rtol=1e-5,
  )
  assert sorted(os.listdir(f"{two}/sft/checkpoints")) == sorted(
    os.listdir(f"{one}/sft/checkpoints")
  )
