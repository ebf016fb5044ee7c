"""DPO / IPO: the losses against hand-computed values, the responses' log-probs against a
plain loop of unpacked forward passes, a step on the 8-device mesh against one device,
and the stage end to end (the reference's log-ratio 0 at the start, a bitwise resume)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rm import _toy_rankings, tok  # noqa: F401  (the toy tokenizer fixture)

from rlhf_jax import config_lib, pipeline, sharding
from rlhf_jax.data import ranking
from rlhf_jax.models import apply, init_params
from rlhf_jax.stages import common, dpo
from rlhf_jax.train import metrics_io, optim

sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_by_hand():
  # One comparison of K = 3 ranked 0 > 2 > 1, one of K = 2 (1 > 0), one padded element.
  h = jnp.asarray([[0.5, -0.2, 0.1], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]])
  rank = jnp.asarray([[0, 2, 1], [1, 0, -1], [-1, -1, -1]])
  beta = 0.1
  first = -(
    math.log(sigmoid(beta * (0.5 - 0.1)))
    + math.log(sigmoid(beta * (0.5 + 0.2)))
    + math.log(sigmoid(beta * (0.1 + 0.2)))
  )
  second = -math.log(sigmoid(beta * (0.7 - 0.3)))
  total, count = dpo.preference_loss_sum(h, rank, beta, "dpo")
  assert float(count) == 2.0
  assert float(total) == pytest.approx(first / 3 + second, rel=1e-6)


def test_ipo_loss_by_hand():
  h = jnp.asarray([[0.5, -0.2, 0.1], [0.3, 0.7, 0.0]])
  rank = jnp.asarray([[0, 2, 1], [1, 0, -1]])
  beta = 0.25  # margin 1 / (2 beta) = 2
  first = ((0.5 - 0.1 - 2) ** 2 + (0.5 + 0.2 - 2) ** 2 + (0.1 + 0.2 - 2) ** 2) / 3
  second = (0.7 - 0.3 - 2) ** 2
  total, count = dpo.preference_loss_sum(h, rank, beta, "ipo")
  assert float(count) == 2.0
  assert float(total) == pytest.approx(first + second, rel=1e-6)


def _toy_config(extra=()):
  overrides = [
    ("tokenizer.vocab_size", "300"),
    ("model.vocab_size", "300"),
    ("model.n_layers", "1"),
  ]
  return config_lib.get("configs/dpo.py:runlocal", [*overrides, *extra])


def _packed(tok, n=6, seed=3, k_range=(2, 5), packed_len=160, max_responses=4):  # noqa: F811
  records = _toy_rankings(n, seed=seed, k_range=k_range)
  batches, stats = ranking.fixed_batches(
    records,
    tok,
    batch_size=n,
    seq_len=packed_len,
    max_responses=max_responses,
    packed_len=packed_len,
  )
  assert stats["truncated"] == 0
  return records, next(batches)


def test_response_logps_equal_a_loop_of_unpacked_sequences(tok):  # noqa: F811
  config = _toy_config()
  model_cfg = common.model_config(config)
  params, _ = init_params(model_cfg, jax.random.PRNGKey(1))
  records, batch = _packed(tok)
  got = np.asarray(dpo.response_logps(model_cfg, params, batch))
  for b, rec in enumerate(records):
    prompt = tok.encode_prompt(rec["messages"])
    for k, text in enumerate(rec["responses"]):
      ids = prompt + tok.encode_response(text)
      x = jnp.asarray([ids])
      out, _ = apply(model_cfg, params, x, jnp.arange(len(ids))[None], jnp.ones_like(x))
      logp = jax.nn.log_softmax(np.asarray(out["lm"][0], np.float64), axis=-1)
      want = sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
      assert got[b, k] == pytest.approx(want, abs=2e-4), (b, k)
    assert (got[b, len(rec["responses"]) :] == 0).all()


def test_step_on_eight_devices_equals_one(tok):  # noqa: F811
  config = _toy_config([("mesh.data", "2"), ("mesh.fsdp", "2"), ("mesh.tensor", "2")])
  setup = common.create_state(config, config.dpo.optim, 10)
  _, batch = _packed(tok, n=8, seed=4)
  rng = np.random.default_rng(0)
  batch = {k: batch[k] for k in dpo.BATCH_NDIMS if k != "ref_logp"}
  batch["ref_logp"] = rng.normal(size=batch["rank"].shape).astype(np.float32)
  kw = dict(
    model_cfg=setup.model_cfg,
    tx=setup.tx,
    schedule=optim.lr_schedule(config.dpo.optim, 10),
    beta=0.1,
  )
  state0 = jax.device_get(setup.state)
  step = common.jit_step(dpo.train_step, setup, dpo.BATCH_NDIMS, **kw)
  with sharding.use(setup.mesh, setup.rules):
    state, metrics = setup.state, None
    for _ in range(2):
      state, metrics = step(state, sharding.put_batch(batch, setup.mesh))
  single = jax.jit(lambda s, b: dpo.train_step(s, b, **kw))
  ref, ref_metrics = jax.device_put(state0, jax.devices()[0]), None
  for _ in range(2):
    ref, ref_metrics = single(ref, jax.device_put(batch, jax.devices()[0]))
  np.testing.assert_allclose(metrics["dpo/loss"], ref_metrics["dpo/loss"], rtol=1e-5)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4),
    jax.device_get(state.params),
    jax.device_get(ref.params),
  )


def test_validation_names_the_loss_and_beta():
  from rlhf_jax.errors import UserInputError

  for key, value in (("dpo.loss", "kto"), ("dpo.beta", "0")):
    with pytest.raises(UserInputError, match=key.replace(".", r"\.")):
      config_lib.validate(_toy_config([(key, value)]))


ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device, as the CLI runs


def _dpo_command(workdir):
  import sys

  cmd = [sys.executable, "-m", "rlhf_jax", "dpo", "--config", "configs/dpo.py:runlocal"]
  return [*cmd, "--config.dpo.save_every=2", "--workdir", workdir]


@pytest.fixture(scope="module")
def run(tmp_path_factory, repo_root):
  """The runlocal inputs (in this process), then the DPO stage by its command."""
  import subprocess

  os.chdir(repo_root)
  d = str(tmp_path_factory.mktemp("dpo") / "run")
  config = config_lib.get("configs/dpo.py:runlocal", [("dpo.save_every", "2")])
  pipeline.run(config, d, only=("data", "pretrain", "sft", "comparisons"))
  done = subprocess.run(_dpo_command(d), cwd=repo_root, env=ENV, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return d, config


@pytest.mark.slow
def test_stage_starts_at_the_reference_and_learns_the_comparisons(run):
  d, _ = run
  rows = metrics_io.read_metrics(f"{d}/dpo")
  # Step 0 is SFT itself: every log-ratio 0, the loss log 2.
  first = next(r for r in rows if "dpo/val_loss" in r)
  assert first["step"] == 0 and first["dpo/val_loss"] == pytest.approx(math.log(2), abs=1e-4)
  train = [r for r in rows if "dpo/loss" in r]
  assert train[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-3)
  # Then it learns its comparisons: the best response's log-ratio rises above the worst's.
  late = train[-2:]
  assert np.mean([r["dpo/logratio_best"] - r["dpo/logratio_worst"] for r in late]) > 0.5, late
  assert np.mean([r["dpo/accuracy"] for r in late]) > 0.6, late
  with open(f"{d}/dpo/params.json") as f:
    info = json.load(f)
  assert info["metrics"]["dpo/gold_score"] >= 0.0


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise(run, tmp_path, repo_root):
  """Killed (SIGKILL) between its first checkpoint and its export, the stage resumes and
  ends with the uninterrupted run's parameters and metrics."""
  import shutil
  import signal
  import subprocess
  import time

  d, _ = run
  cut = str(tmp_path / "cut")
  shutil.copytree(d, cut, symlinks=True, ignore=lambda src, names: ["dpo"] if src == d else [])
  cmd = _dpo_command(cut)
  proc = subprocess.Popen(cmd, cwd=repo_root, env=ENV, stdout=subprocess.DEVNULL)
  ckpts, caught, end = f"{cut}/dpo/checkpoints", False, time.time() + 600
  while time.time() < end and proc.poll() is None:
    if os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):
      caught = not os.path.exists(f"{cut}/dpo/params.json")
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert caught, "not caught between its first checkpoint and its export"
  done = subprocess.run(cmd, cwd=repo_root, env=ENV, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming from step" in done.stdout
  a = jax.tree.leaves(_params(f"{d}/dpo/params"))
  b = jax.tree.leaves(_params(f"{cut}/dpo/params"))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("per_s")} for r in rows]
  assert strip(metrics_io.read_metrics(f"{cut}/dpo")) == strip(metrics_io.read_metrics(f"{d}/dpo"))


def _params(path):
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


@pytest.mark.slow
def test_dpo_beats_sft_on_the_quick_world(tmp_path, repo_root):
  """The quick preset's world (runlocal sizes, an easier world): DPO's replies to the
  held-out prompts score higher with the gold judge than SFT's (direction, not a
  threshold)."""
  os.chdir(repo_root)
  config = config_lib.get("configs/dpo.py:quick")
  summary = pipeline.run(
    config, str(tmp_path), only=("data", "pretrain", "sft", "comparisons", "dpo", "eval")
  )
  dpo_, sft_ = summary["policies"]["dpo"], summary["policies"]["sft"]
  assert dpo_["gold_score"] > sft_["gold_score"], (dpo_, sft_)
  assert dpo_["winrate_vs_sft"] > 0.5
