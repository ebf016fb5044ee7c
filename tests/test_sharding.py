"""The forward pass and a gradient step on a (data=2, fsdp=2, tensor=2) mesh of 8 fake
CPU devices equal the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from rlhf_jax import sharding
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import TransformerConfig, apply, init_params

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64)


def _mesh_cfg(data, fsdp, tensor):
  c = common.mesh_config()
  c.data, c.fsdp, c.tensor = data, fsdp, tensor
  return c


def _loss(params, tokens):
  out, _ = apply(CFG, params, tokens)
  logp = jax.nn.log_softmax(out["lm"][:, :-1])
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def _step(params, opt_state, tokens, opt):
  loss, grads = jax.value_and_grad(_loss)(params, tokens)
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def test_mesh_from_config_resolves_minus_one():
  assert sharding.mesh_shape(_mesh_cfg(-1, 2, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(_mesh_cfg(1, -1, 1), 8) == (1, 8, 1)
  with pytest.raises(UserInputError, match="config.mesh"):
    sharding.mesh_shape(_mesh_cfg(3, -1, 1), 8)
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_forward_and_grad_step_on_8_device_mesh_equal_single_device():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 64, (8, 16)), jnp.int32)
  opt = optax.adamw(1e-2)

  ref_params, _ = init_params(CFG, jax.random.key(0))
  ref_out, _ = jax.jit(lambda p, t: apply(CFG, p, t))(ref_params, tokens)
  ref_new, _, ref_loss = jax.jit(lambda p, s, t: _step(p, s, t, opt))(
    ref_params, opt.init(ref_params), tokens
  )

  mcfg = _mesh_cfg(2, 2, 2)
  mesh, rules = sharding.make_mesh(mcfg), sharding.rules(mcfg)
  params, shardings = init_params(CFG, jax.random.key(0), mesh, rules)
  # Parameters really are split: the MLP kernel over fsdp (embed) and tensor (mlp).
  gate = params["layer_0"]["mlp"]["gate"]
  assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert gate.addressable_shards[0].data.shape == (16, 32)
  batch = sharding.put_batch({"tokens": np.asarray(tokens)}, mesh)["tokens"]
  with sharding.use(mesh, rules):
    out, _ = jax.jit(lambda p, t: apply(CFG, p, t))(params, batch)
    opt_state = opt.init(params)
    new, _, loss = jax.jit(
      lambda p, s, t: _step(p, s, t, opt), out_shardings=(shardings, None, None)
    )(params, opt_state, batch)
  np.testing.assert_allclose(out["lm"], ref_out["lm"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
    new,
    ref_new,
  )
  assert new["layer_0"]["mlp"]["gate"].sharding.spec == gate.sharding.spec


def test_batch_placement_splits_rows_over_data_and_fsdp():
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  x = np.arange(8 * 3).reshape(8, 3)
  arr = sharding.put_batch({"x": x}, mesh)["x"]
  assert arr.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  assert arr.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(arr), x)


@pytest.mark.slow  # two states created and an Orbax round trip
def test_checkpoint_from_8_devices_restores_onto_2(tmp_path):
  """Orbax reshards on restore: a train state written from a (2, 2, 2) mesh of 8 devices
  comes back, value for value, laid out on a (1, 2, 1) mesh of 2 devices (FSDP only)."""
  from rlhf_jax import config_lib
  from rlhf_jax.stages import common
  from rlhf_jax.train import checkpoints

  def setup(mesh, seed):
    axes = zip(sharding.MESH_AXES, mesh, strict=True)
    overrides = [(f"mesh.{a}", str(n)) for a, n in axes] + [("seed", str(seed))]
    cfg = config_lib.get("configs/default.py:runlocal", overrides)
    devices = jax.devices()[: int(np.prod(mesh))]
    return common.create_state(cfg, cfg.pretrain.optim, 10, devices=devices)

  big = setup((2, 2, 2), seed=0)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(5, big.state, force=True)
  ckpt.close()
  small = setup((1, 2, 1), seed=1)  # other values, the layout to restore into
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"))
  restored, step = ckpt.restore_latest(small.state)
  ckpt.close()
  assert step == 5
  gate = restored.params["layer_0"]["mlp"]["gate"]
  assert gate.sharding.mesh.devices.size == 2
  assert gate.addressable_shards[0].data.shape == (gate.shape[0] // 2, gate.shape[1])
  for a, b in zip(
    jax.tree.leaves(jax.device_get(big.state)),
    jax.tree.leaves(jax.device_get(restored)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
