"""Two processes on 127.0.0.1 (CPU backend, gloo; 2 fake devices each) train a few real
SFT steps and one PPO iteration and end with the parameters one process on 4 fake
devices ends with: the same global batches, the same mesh, collective checkpoints."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.models import abstract_params
from rlhf_jax.train import checkpoints

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


def test_two_processes_equal_one_process_on_four_devices(tmp_path, repo_root):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  cmd = lambda wd: [sys.executable, "-c", DRIVER, wd, *ARGS]
  ref = subprocess.run(cmd(one), cwd=repo_root, env=_env(4), capture_output=True, text=True)
  assert ref.returncode == 0, ref.stderr[-3000:]
  port = _port()
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = [
    subprocess.Popen(
      cmd(two),
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
