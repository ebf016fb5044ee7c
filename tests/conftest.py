"""Test setup: 8 fake CPU devices (must be set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO


@pytest.fixture(scope="session")
def run_cli(repo_root):
  """`rlhf-jax ARGV` in a fresh process on one CPU device, as a user runs it (from the
  repository root); returns the CompletedProcess (text stdout / stderr)."""
  import subprocess
  import sys

  def run(*argv: str, returncode: int = 0):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
      [sys.executable, "-m", "rlhf_jax", *argv],
      cwd=repo_root,
      env=env,
      capture_output=True,
      text=True,
    )
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc

  return run
