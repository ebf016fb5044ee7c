"""Test setup: 8 fake CPU devices (must be set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests build many jitted functions that compile to the same programs (the same step at
# the same shapes in several tests): a compilation cache, new for every session, lets
# the later ones load the executable instead of compiling it again. In this process
# only: the fresh processes of the slow tier compile for themselves (some are SIGKILLed,
# which would leave half-written entries in a shared cache).
_CACHE = tempfile.mkdtemp(prefix="rlhf_jax_xla_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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


@pytest.fixture(scope="session")
def runlocal_pretrained(tmp_path_factory, repo_root) -> str:
  """A work directory with the runlocal world prepared and pretraining done (read it, or
  copy it before writing: every test that uses it shares it)."""
  from rlhf_jax import config_lib, pipeline
  from rlhf_jax.stages import registry

  os.chdir(repo_root)
  workdir = str(tmp_path_factory.mktemp("runlocal") / "pretrained")
  config = config_lib.get("configs/default.py:runlocal")
  pipeline.run_stage(registry.get("pretrain"), config, workdir)  # (as the CLI runs it)
  return workdir
