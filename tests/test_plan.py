"""The memory planner: its parameter counts and per-device parameter bytes are the real
model's, its activation model tracks XLA's own buffer sizes, and the scale presets fit
the devices they were sized for."""

import jax
import numpy as np
import pytest

from configs import scale
from rlhf_jax import config_lib, plan, sharding
from rlhf_jax.models import count_params, init_params
from rlhf_jax.stages import common, lm
from rlhf_jax.train import optim


@pytest.mark.parametrize(
  "spec", ["configs/default.py:runlocal", "configs/default.py", "configs/scale.py:preset=tpu_7b"]
)
def test_parameter_counts_are_the_real_models(spec):
  config = config_lib.get(spec)
  cfg = common.model_config(config)
  real = {
    h: count_params(
      jax.eval_shape(lambda r, h=h: init_params(cfg, r, heads=(h,))[0], jax.random.key(0))
    )
    for h in ("lm", "scalar")
  }
  _, plans = plan.plan(config, 64)
  by = {p.stage: p for p in plans}
  assert by["pretrain"].params == by["sft"].params == real["lm"]
  assert by["rm"].params == real["scalar"]
  assert by["ppo"].params == 2 * real["lm"] + 2 * real["scalar"]  # policy, ref, value, reward


def test_per_device_parameter_bytes_are_the_real_shards():
  """On 8 fake devices, (data, fsdp, tensor) = (2, 2, 2): the planner's bytes per device
  equal the bytes of the shards the sharded init actually puts on device 0."""
  config = config_lib.get(
    "configs/default.py:runlocal", [("mesh.data", "2"), ("mesh.fsdp", "2"), ("mesh.tensor", "2")]
  )
  mesh, plans = plan.plan(config, 8)
  by = {p.stage: p for p in plans}
  real_mesh = sharding.make_mesh(config.mesh)
  for heads, stage in ((("lm",), "pretrain"), (("scalar",), "rm")):
    params, _ = init_params(
      common.model_config(config),
      jax.random.key(0),
      real_mesh,
      sharding.rules(config.mesh),
      heads=heads,
    )
    on_device0 = sum(
      s.data.nbytes
      for x in jax.tree.leaves(params)
      for s in x.addressable_shards
      if s.device == jax.devices()[0]
    )
    assert by[stage].param_bytes == on_device0
    assert by[stage].optimizer_bytes == 2 * on_device0  # AdamW's two moments
  # and a sharded layout really divides the memory: 8 devices, 1/4 of the matrices each
  _, one = plan.plan(config_lib.get("configs/default.py:runlocal", [("mesh.data", "1")]), 1)
  assert by["pretrain"].param_bytes < one[0].param_bytes / 2


def test_activation_model_tracks_xlas_buffers():
  """The activation estimate of a train step (no remat) against the temporary memory
  XLA assigns when it compiles that step on this CPU: within a factor of 2."""
  for batch, seq in ((16, 256),):
    config = config_lib.get(
      "configs/default.py",
      [("pretrain.batch_size", str(batch)), ("pretrain.seq_len", str(seq)), ("mesh.data", "1")],
    )
    setup = common.create_state(config, config.pretrain.optim, 10, devices=jax.devices()[:1])
    kw = dict(
      model_cfg=setup.model_cfg,
      tx=setup.tx,
      schedule=optim.lr_schedule(config.pretrain.optim, 10),
    )
    b = {k: np.zeros((batch, seq), np.int32) for k in ("tokens", "segment_ids", "positions")}
    b["loss_mask"] = np.ones((batch, seq), np.float32)
    compiled = (
      jax.jit(lambda s, x, kw=kw: lm.train_step(s, x, **kw)).lower(setup.state, b).compile()
    )
    xla = compiled.memory_analysis().temp_size_in_bytes
    p = plan.plan(config, 1)[1][0]
    assert 0.5 < (p.activation_bytes + p.grad_bytes) / xla < 2.0, (batch, seq)
  # remat and gradient accumulation shrink the estimate as they should
  base = plan.activation_bytes(setup.model_cfg, 16, 256, 1)
  import dataclasses

  for remat in ("dots", "full"):
    assert (
      plan.activation_bytes(dataclasses.replace(setup.model_cfg, remat=remat), 16, 256, 1) < base
    )
  assert plan.activation_bytes(setup.model_cfg, 4, 256, 1) == pytest.approx(base / 4)


@pytest.mark.parametrize("preset", sorted(scale.PRESETS))
def test_scale_presets_fit_their_devices(preset):
  config = config_lib.get(f"configs/scale.py:preset={preset}")
  _, plans = plan.plan(config, scale.DEVICES[preset])
  for p in plans:
    assert p.total / plan.GiB < 0.9 * scale.CAPACITY_GIB[preset], (preset, p.stage, p.total)


@pytest.mark.slow
def test_plan_command_prints_every_stage(run_cli):
  out = run_cli(
    "plan", "--config", "configs/scale.py:preset=tpu_7b", "--devices", "64", "--capacity-gib", "95"
  ).stdout
  assert "mesh {'data': 1, 'fsdp': 16, 'tensor': 4} = 64 devices" in out
  for stage in ("pretrain", "sft", "comparisons", "rm", "ppo", "ppo_ptx"):
    assert any(line.startswith(stage) and line.endswith("fits") for line in out.splitlines())
  assert "6,738,415,616" in out
