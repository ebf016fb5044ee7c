"""Pretraining and SFT stages: losses fall, prompt tokens never reach the SFT loss, and a
step on 8 fake devices equals one device. (A SIGKILLed SFT run resumes bitwise:
tests/test_preemption.py.)"""

import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import config_lib, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import common, lm, pretrain, sft
from rlhf_jax.train import checkpoints, metrics_io, optim

RUNLOCAL = "configs/default.py:runlocal"


def _config(*overrides):
  return config_lib.get(RUNLOCAL, [o.split("=", 1) for o in overrides])


@pytest.fixture(scope="module")
def pretrained(runlocal_pretrained):
  """A work directory with the runlocal world prepared and pretraining done (shared:
  tests that write copy it)."""
  return runlocal_pretrained


def _losses(workdir, stage, key):
  return [r[key] for r in metrics_io.read_metrics(f"{workdir}/{stage}") if key in r]


def test_pretrain_loss_falls_and_exports(pretrained):
  losses = _losses(pretrained, "pretrain", "pretrain/loss")
  assert losses[-1] < losses[0] - 1.0, losses
  info = checkpoints.params_info(f"{pretrained}/pretrain")
  assert info["model"]["d_model"] == 64 and "pretrain/heldout_loss" in info["metrics"]
  assert os.path.isdir(f"{pretrained}/pretrain/tb")
  # A second call skips the completed stage.
  assert pretrain.train_and_evaluate(_config(), pretrained) == info["metrics"]


@pytest.mark.slow  # a whole SFT stage (its step: the strategy test below)
def test_sft_loss_falls_from_pretrained(pretrained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  out = sft.train_and_evaluate(
    _config("sft.pretrain_mix=0.0", "sft.num_epochs=3", "sft.log_every=1"), workdir
  )
  losses = _losses(workdir, "sft", "sft/loss")
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  assert 0.0 <= out["sft/gold_score"] <= 1.0 and np.isfinite(out["sft/val_loss"])


def test_sft_loss_ignores_prompt_tokens(pretrained):
  config = _config()
  tok = common.load_tokenizer(config, pretrained)
  src = common.world_source(config, pretrained, "demonstrations", "train")
  batch = next(iter(pipeline.sft_batches(src, tok, batch_size=4, seq_len=96, seed=0)))
  mask = batch["loss_mask"]
  assert 0 < mask.sum() < (batch["segment_ids"] > 0).sum()  # some tokens are prompt
  logits = jax.random.normal(jax.random.key(0), (*batch["tokens"].shape, tok.vocab_size))
  base = lm.lm_loss(logits, batch["tokens"], mask)
  changed = np.where(mask == 0, (batch["tokens"] + 7) % tok.vocab_size, batch["tokens"])
  assert not np.array_equal(changed, batch["tokens"])
  again = lm.lm_loss(logits, changed, mask)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(again))
  # ...while changing a response token does change it.
  t = np.argwhere(mask[:, 1:] > 0)[0] + [0, 1]
  other = batch["tokens"].copy()
  other[t[0], t[1]] = (other[t[0], t[1]] + 1) % tok.vocab_size
  assert float(lm.lm_loss(logits, other, mask)[0]) != float(base[0])


def _params(path):
  return ocp.StandardCheckpointer().restore(path)


# Each sharding strategy is a mesh shape (data, fsdp, tensor): data parallel, FSDP
# (parameters and optimiser state over `fsdp`), tensor parallel (heads / MLP / vocab
# over `tensor`) and their combinations.
STRATEGIES = {
  "dp": (8, 1, 1),
  "fsdp": (1, 8, 1),
  "tp": (1, 1, 2),
  "fsdp_tp": (1, 4, 2),
  "dp_fsdp_tp": (2, 2, 2),
}


def _lm_step(pretrained, mesh):
  """One SFT step (the LM step on demonstrations: loss on assistant tokens only) on `mesh`;
  pretraining's step is the same function (its real stage runs in `pretrained`)."""
  cfg = _config(*(f"mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh, strict=True)))
  tok = common.load_tokenizer(cfg, pretrained)
  src = common.world_source(cfg, pretrained, "demonstrations", "train")
  batch = next(iter(pipeline.sft_batches(src, tok, batch_size=8, seq_len=64, seed=0)))
  devices = jax.devices()[: int(np.prod(mesh))]
  setup = common.create_state(cfg, cfg.pretrain.optim, 10, devices=devices)
  assert setup.mesh.devices.size == len(devices)
  step = common.jit_step(
    lm.train_step,
    setup,
    lm.LM_BATCH_NDIMS,
    model_cfg=setup.model_cfg,
    tx=setup.tx,
    schedule=optim.lr_schedule(cfg.pretrain.optim, 10),
  )
  with sharding.use(setup.mesh, setup.rules):
    state, metrics = step(setup.state, sharding.put_batch(batch, setup.mesh))
  return state, float(metrics["train/loss"])


@pytest.fixture(scope="module")
def single_device_step(pretrained):
  state, loss = _lm_step(pretrained, (1, 1, 1))
  return jax.device_get(state.params), loss


# (the fast tier runs the combination of all three; each alone is in the slow one)
@pytest.mark.parametrize(
  "strategy",
  [s if s == "dp_fsdp_tp" else pytest.param(s, marks=pytest.mark.slow) for s in sorted(STRATEGIES)],
)
def test_train_step_under_each_strategy_equals_single_device(
  pretrained, single_device_step, strategy
):
  assert jax.device_count() == 8
  mesh = STRATEGIES[strategy]
  state, loss = _lm_step(pretrained, mesh)
  data, fsdp, tensor = mesh
  gate = state.params["layer_0"]["mlp"]["gate"]  # [embed, mlp]
  want = P("fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None)
  assert _spec(gate) == want
  # the optimiser state is laid out as the parameters (sharded with them under FSDP)
  mu = [x for x in jax.tree.leaves(state.opt_state) if x.shape == gate.shape]
  assert mu and all(_spec(x) == want for x in mu)
  p1, l1 = single_device_step
  assert l1 == pytest.approx(loss, rel=1e-5)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(jax.device_get(state.params)), strict=True):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)


def _spec(x):
  """The PartitionSpec with trailing / size-1 axes normalised away."""
  spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
  size = dict(x.sharding.mesh.shape)
  norm = lambda a: (
    None if a is None or all(size[n] == 1 for n in ((a,) if isinstance(a, str) else a)) else a
  )
  return P(*[norm(a) for a in spec])


def test_sft_refuses_a_pretrained_model_of_another_size(pretrained, tmp_path, capsys):
  from rlhf_jax import cli

  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  argv = ["sft", "--config", RUNLOCAL, "--workdir", workdir, "--config.model.d_model=32"]
  assert cli.main(argv) == 2  # the settings pretraining recorded say so first
  err = capsys.readouterr().err.strip()
  assert "pretrain: made with other settings (config.model.d_model: 64 there, 32 now" in err
  os.remove(f"{workdir}/pretrain/provenance.json")  # (as written by an older version)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and f"{workdir}/pretrain" in err
  assert "d_model=64 (checkpoint) vs 32 (config)" in err
  shutil.rmtree(f"{workdir}/pretrain")
  assert cli.main(argv[:-1]) == 2
  assert "no exported parameters" in capsys.readouterr().err


def test_corrupted_latest_checkpoint_falls_back_to_previous(pretrained, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  stage = f"{workdir}/pretrain"
  before = _params(f"{stage}/params")
  # Pretend the run died right after its last checkpoint, which then got corrupted.
  os.remove(f"{stage}/params.json")
  steps = sorted(int(d) for d in os.listdir(f"{stage}/checkpoints") if d.isdigit())
  assert len(steps) == 2
  latest = f"{stage}/checkpoints/{steps[-1]}/state"
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  capsys.readouterr()
  pretrain.train_and_evaluate(_config(), workdir)
  out = capsys.readouterr().out
  assert f"checkpoint {stage}/checkpoints/{steps[-1]} is unreadable" in out
  assert f"resuming from step {steps[0]}" in out
  after = _params(f"{stage}/params")
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_checkpoint_of_another_config_is_an_error_that_moves_nothing(pretrained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  ckpts = f"{workdir}/pretrain/checkpoints"
  os.remove(f"{workdir}/pretrain/params.json")  # as if killed after its last checkpoint
  before = {d: sorted(os.listdir(f"{ckpts}/{d}")) for d in os.listdir(ckpts)}
  cases = {  # another state tree; another shape
    "pretrain.optim.ema_decay=0.99": r"ema\.\S+: not in the checkpoint",
    "model.mlp_dim=136": r"params\.\S+: float32\[[\d, ]+\] in the checkpoint, float32\[[\d, ]*136",
  }
  for override, names in cases.items():
    with pytest.raises(UserInputError) as e:
      pretrain.train_and_evaluate(_config(override), workdir)
    msg = str(e.value)
    assert "\n" not in msg and re.search(names, msg), msg
    assert "another train state" in msg and "new --workdir" in msg
    assert {d: sorted(os.listdir(f"{ckpts}/{d}")) for d in os.listdir(ckpts)} == before


def test_gradient_accumulation_equals_the_whole_batch(pretrained):
  """4 microbatches one at a time give the step the whole batch gives (the loss is a
  sum over targets divided by their count, so unequal microbatches weigh right)."""
  cfg = _config("model.n_layers=1")  # (the math does not depend on the depth)
  tok = common.load_tokenizer(cfg, pretrained)
  src = common.world_source(cfg, pretrained, "demonstrations", "train")
  batch = next(iter(pipeline.sft_batches(src, tok, batch_size=8, seq_len=64, seed=0)))
  setup = common.create_state(cfg, cfg.sft.optim, 10, devices=jax.devices()[:2])
  kw = dict(model_cfg=setup.model_cfg, tx=setup.tx, schedule=optim.lr_schedule(cfg.sft.optim, 10))
  state0 = jax.device_get(setup.state)
  out = {}
  for n in (1, 4):
    step = jax.jit(lambda s, b, n=n: lm.train_step(s, b, grad_accum=n, **kw))
    state, metrics = step(jax.device_put(state0), batch)
    out[n] = (jax.device_get(state.params), jax.device_get(metrics))
  assert out[1][1]["train/targets"] == out[4][1]["train/targets"]
  np.testing.assert_allclose(out[1][1]["train/loss"], out[4][1]["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(out[1][1]["train/grad_norm"], out[4][1]["train/grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[4][0]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  # the microbatches really are taken one at a time: a scan over 4 of 2 rows
  hlo = jax.jit(lambda s, b: lm.train_step(s, b, grad_accum=4, **kw)).lower(state0, batch)
  assert "while" in hlo.as_text()


@pytest.mark.slow  # three more compiles of the step
def test_bf16_compute_keeps_f32_master_weights(pretrained):
  """model.dtype=bfloat16 computes in bf16 from f32 parameters (the master weights the
  optimiser updates); model.param_dtype=bfloat16 stores them in bf16 instead."""
  tok = common.load_tokenizer(_config(), pretrained)
  src = common.world_source(_config(), pretrained, "pretrain", "train")
  batch = next(iter(pipeline.pretrain_batches(src, tok, batch_size=8, seq_len=64, seed=0)))
  out = {}
  for dtype, param_dtype in (
    ("float32", "float32"),
    ("bfloat16", "float32"),
    ("bfloat16", "bfloat16"),
  ):
    cfg = _config(f"model.dtype={dtype}", f"model.param_dtype={param_dtype}", "model.n_layers=1")
    setup = common.create_state(cfg, cfg.pretrain.optim, 10, devices=jax.devices()[:1])
    kw = dict(
      model_cfg=setup.model_cfg, tx=setup.tx, schedule=optim.lr_schedule(cfg.pretrain.optim, 10)
    )
    state, metrics = jax.jit(lambda s, b, kw=kw: lm.train_step(s, b, **kw))(setup.state, batch)
    kinds = {x.dtype for x in jax.tree.leaves(state.params) if x.ndim >= 2}  # (norms: f32)
    out[(dtype, param_dtype)] = (kinds, float(metrics["train/loss"]))
  assert out[("bfloat16", "float32")][0] == {np.dtype("float32")}
  assert out[("bfloat16", "bfloat16")][0] == {jax.numpy.dtype("bfloat16")}
  ref = out[("float32", "float32")][1]
  for key, tol in ((("bfloat16", "float32"), 0.02), (("bfloat16", "bfloat16"), 0.05)):
    assert out[key][1] == pytest.approx(ref, rel=tol) and out[key][1] != ref
