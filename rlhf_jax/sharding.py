"""The device mesh, logical-axis rules, sharded parameter init and batch placement.

Sharding is data in the config (`config.mesh`: axis sizes and logical-axis rules), not
code: the model names its axes, `config.mesh.rules` maps names to mesh axes, and the
same train step runs on one device or many. Parameters are created directly on the
mesh by a jitted init whose output shardings come from `jax.eval_shape`, so the full
parameters are never materialised on one host.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import UserInputError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, ...]:
  """Axis sizes with the `-1` axis resolved; errors name the `mesh.*` key."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  named = lambda: dict(zip(MESH_AXES, sizes, strict=True))
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise UserInputError(f"config.mesh: {named()} does not divide {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise UserInputError(
      f"config.mesh: {named()} needs {math.prod(sizes)} devices, {n_devices} available"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh with Auto axis types (sharding by annotation)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def rules(mesh_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in mesh_cfg.rules)


@contextlib.contextmanager
def use(mesh: Mesh, logical_rules: Rules) -> Iterator[None]:
  """Trace and run under `mesh` with the logical-axis rules in force."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    yield


def logical_shardings(boxed_tree, mesh: Mesh, logical_rules: Rules):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (e.g. from eval_shape)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def init_sharded(init_fn, mesh: Mesh, logical_rules: Rules, *args):
  """Run `init_fn(*args)` (returning boxed Flax variables) directly onto the mesh.

  Returns `(variables, shardings)` with the boxes removed: plain pytrees of arrays,
  each laid out as its logical axis names and the rules say.
  """
  # Rules but no global mesh while tracing init: Flax's DenseGeneral initialises flat
  # kernels and reshapes them, and a rank-3 constraint on the flat value would fail.
  # The output shardings alone place every parameter.
  with nn.logical_axis_rules(logical_rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, logical_rules)
    shardings = nn.unbox(shardings)
    variables = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return variables, shardings


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over `(data, fsdp)`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from a global batch (split along the batch axis over data x fsdp).

  Every process holds the same global batch (`stages.common.batch_rows`) and copies
  only the rows of its own devices; on one process this is a sharded `device_put`.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_callback(
      v.shape, batch_sharding(mesh, v.ndim), lambda index, v=v: v[index]
    )
  return out


def to_host(x) -> np.ndarray:
  """A global array as one numpy array on every process (an all-gather across hosts
  when its shards live on several)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def round_to_batch_shards(n: int, mesh: Mesh) -> int:
  """`n` rows rounded up to a multiple of the mesh's data x fsdp devices (what a batch
  axis splits over)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return -(-n // shards) * shards
