"""`rlhf-jax plan`: memory per device of every stage, for a config on a mesh of N devices.

  rlhf-jax plan --config configs/scale.py:preset=tpu_7b --devices 64
  rlhf-jax plan --config configs/default.py:size=1b --devices 8 --config.mesh.fsdp=-1

Nothing is allocated and no device of that count is needed: parameter shapes come from
`jax.eval_shape`, their layout from the config's logical-axis rules on an
`AbstractMesh`, so every parameter's per-device shard is exact (the planner's counts
are the real model's: tests/test_plan.py). The rest is a model of what the train steps
keep alive:

- optimiser: AdamW's two moments in the parameters' dtype, sharded like them, plus the
  EMA copy when `optim.ema_decay` > 0; gradients: one more copy (alive during the step);
- activations: what backpropagation saves per layer for the tokens of one microbatch
  on one device (`batch / (data x fsdp) / grad_accum` rows), by remat policy: `none`
  keeps every layer's intermediates (norm outputs, q/k/v, attention probabilities, MLP
  hidden), `dots` only the matmul outputs, `full` only each layer's input (plus one
  layer's intermediates while it is recomputed); head and MLP widths are divided over
  `tensor`; plus the f32 logits (and their gradient) over the vocabulary;
- KV cache: keys and values of every layer for the sampler's rows on one device
  (comparisons: `comparisons.batch_size` rows; PPO: its episodes), over `tensor` on the
  KV heads.

XLA's own buffers, fragmentation and the input pipeline are not counted: keep ~10-20%
of the device's memory free.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import sharding
from rlhf_jax.models.transformer import Transformer, TransformerConfig
from rlhf_jax.stages import registry

GiB = 1 << 30


@dataclasses.dataclass
class StagePlan:
  stage: str
  params: int  # parameters of every model the stage holds
  param_bytes: float  # per device
  optimizer_bytes: float
  grad_bytes: float
  activation_bytes: float
  kv_cache_bytes: float
  rows: int  # rows per device per microbatch (0: none)

  @property
  def total(self) -> float:
    return (
      self.param_bytes
      + self.optimizer_bytes
      + self.grad_bytes
      + self.activation_bytes
      + self.kv_cache_bytes
    )


def abstract_mesh(mesh_cfg: ml_collections.ConfigDict, n_devices: int):
  shape = sharding.mesh_shape(mesh_cfg, n_devices)
  return jax.sharding.AbstractMesh(
    shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape)
  )


def param_layout(model_cfg: TransformerConfig, heads, mesh, rules) -> list[tuple[Any, Any]]:
  """[(ShapeDtypeStruct, per-device shard shape)] for every parameter of the model."""
  import flax.linen as nn

  init = lambda r: Transformer(model_cfg).init(r, jnp.zeros((1, 8), jnp.int32), heads=heads)
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))["params"]
    specs = nn.get_partition_spec(boxed)
  out = []
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  leaves = jax.tree.leaves(nn.unbox(boxed))
  for leaf, spec in zip(leaves, jax.tree.leaves(specs, is_leaf=is_spec), strict=True):
    mesh_spec = (
      nn.logical_to_mesh_axes(tuple(spec), rules) if spec else jax.sharding.PartitionSpec()
    )
    shard = jax.sharding.NamedSharding(mesh, mesh_spec).shard_shape(leaf.shape)
    out.append((leaf, shard))
  return out


def _bytes(layout) -> tuple[int, float]:
  count = sum(math.prod(leaf.shape) for leaf, _ in layout)
  per_device = sum(math.prod(shard) * jnp.dtype(leaf.dtype).itemsize for leaf, shard in layout)
  return count, float(per_device)


def activation_bytes(
  model_cfg: TransformerConfig, rows: int, seq: int, tensor: int, lm_head: bool = True
) -> float:
  """Activations alive in one training microbatch of `rows` x `seq` tokens, one device:
  what the backward pass keeps for every layer, plus what one layer rematerialises."""
  m = model_cfg
  item = jnp.dtype(m.dtype).itemsize
  e, d = m.d_model, m.dim_per_head
  h, hk = m.n_heads / tensor, max(m.n_kv_heads / tensor, 1)
  tokens = rows * seq
  # per token: outputs of the weight matmuls (q k v, o, gate up, down), the elementwise
  # ones (residual, two norms, attention output, silu(gate) * up), and the attention
  # logits / probabilities (f32, one row of `seq` keys per head) with their gradient
  matmuls = (h + 2 * hk) * d + e + 2 * m.mlp_dim / tensor + e
  elementwise = 3 * e + h * d + m.mlp_dim / tensor
  attention = 2 * 4 * h * seq
  layer = tokens * ((matmuls + elementwise) * item + attention)
  kept = {  # per layer, by remat policy ("dots": matmuls without batch dims are saved,
    # the attention einsums have one and are recomputed)
    "none": layer,
    "dots": tokens * matmuls * item,
    "full": tokens * e * item,
  }[m.remat]
  recomputed = 0.0 if m.remat == "none" else layer  # one layer at a time
  vocab = m.vocab_size / tensor if lm_head else 1
  logits = tokens * vocab * 4 * 2  # f32 logits and their gradient
  return m.n_layers * kept + recomputed + logits


def kv_cache_bytes(model_cfg: TransformerConfig, rows: int, length: int, tensor: int) -> float:
  m = model_cfg
  kv_heads = max(m.n_kv_heads // tensor, 1)
  return 2.0 * m.n_layers * rows * length * kv_heads * m.dim_per_head * jnp.dtype(m.dtype).itemsize


@dataclasses.dataclass
class _Context:
  """What every memory model reads: the config, the model, its two parameter layouts
  (`(count, bytes per device)`), the batch shards and the tensor axis."""

  config: ml_collections.ConfigDict
  model: TransformerConfig
  lm: tuple[int, float]
  scalar: tuple[int, float]
  batch_shards: int
  tensor: int

  def rows(self, batch: int, accum: int = 1) -> int:
    return max(1, batch // self.batch_shards // accum)


def _trained(x: _Context, stage: str, c, layout, seq: int, lm_head=True, k=1) -> StagePlan:
  """One model trained on rows of `seq` tokens (`k` sequences per batch element)."""
  accum = int(c.optim.get("grad_accum", 1))
  copies = 2 + (1 if c.optim.ema_decay else 0)
  r = x.rows(c.batch_size * k, accum)
  act = activation_bytes(x.model, r, seq, x.tensor, lm_head)
  return StagePlan(stage, layout[0], layout[1], copies * layout[1], layout[1], act, 0.0, r)


def _lm(x: _Context, stage: str, c) -> StagePlan:
  """An LM trained on token rows (pretraining, SFT)."""
  return _trained(x, stage, c, x.lm, c.seq_len)


def _ranking(x: _Context, stage: str, c) -> StagePlan:
  """A scalar-head model trained on K responses per element (the reward model): one
  packed row of `packed_len` or K padded rows of `seq_len`."""
  if c.get("packed_len"):
    return _trained(x, stage, c, x.scalar, c.packed_len, lm_head=False)
  return _trained(x, stage, c, x.scalar, c.seq_len, lm_head=False, k=c.max_responses)


def _sampler(x: _Context, stage: str, c) -> StagePlan:
  """An LM sampling `batch_size` rows with a KV cache (the comparisons)."""
  r = x.rows(c.batch_size)
  kv = kv_cache_bytes(x.model, r, c.max_prompt_len + c.max_new_tokens, x.tensor)
  logits = r * c.max_prompt_len * x.model.vocab_size / x.tensor * 4  # the prefill's logits
  return StagePlan(stage, x.lm[0], x.lm[1], 0.0, 0.0, logits, kv, r)


def _actor_critic(x: _Context, stage: str, c) -> StagePlan:
  """Policy, reference, value and reward models; policy and value optimised (PPO)."""
  seq = c.prompt_len + c.max_new_tokens
  count = 2 * x.lm[0] + 2 * x.scalar[0]
  params = 2 * x.lm[1] + 2 * x.scalar[1]
  trained_bytes = x.lm[1] + x.scalar[1]  # policy and value reach an optimiser
  copies = 2 + (1 if c.optim.ema_decay else 0)
  mb = x.rows(c.batch_size // c.num_minibatches)
  ptx = x.rows(int(round(c.batch_size * c.ptx_ratio)) // c.num_minibatches) if c.ptx_coef else 0
  act = activation_bytes(x.model, mb, seq, x.tensor)
  act += activation_bytes(x.model, mb, seq, x.tensor, lm_head=False)
  if ptx:
    act += activation_bytes(x.model, ptx, c.ptx_seq_len, x.tensor)
  kv = kv_cache_bytes(x.model, x.rows(c.batch_size), seq, x.tensor)
  return StagePlan(stage, count, params, copies * trained_bytes, trained_bytes, act, kv, mb)


# A stage's registered `memory` names its model here.
MEMORY_MODELS = {"lm": _lm, "ranking": _ranking, "sampler": _sampler, "actor_critic": _actor_critic}


def plan(config: ml_collections.ConfigDict, n_devices: int) -> tuple[Any, list[StagePlan]]:
  """(the mesh, a StagePlan per planned stage in `config`) on `n_devices` devices."""
  mesh = abstract_mesh(config.mesh, n_devices)
  rules = sharding.rules(config.mesh)
  size = dict(zip(sharding.MESH_AXES, mesh.axis_sizes, strict=True))
  model = TransformerConfig.from_config(config.model)
  x = _Context(
    config,
    model,
    _bytes(param_layout(model, ("lm",), mesh, rules)),
    _bytes(param_layout(model, ("scalar",), mesh, rules)),
    size["data"] * size["fsdp"],
    size["tensor"],
  )
  plans = [
    MEMORY_MODELS[stage.memory](x, stage.name, section)
    for stage, section in registry.iter_sections(config)
    if stage.memory
  ]
  return mesh, plans


def format_plan(
  config: ml_collections.ConfigDict, mesh, plans: list[StagePlan], capacity_gib: float = 0.0
) -> str:
  """The table `rlhf-jax plan` prints."""
  m = config.model
  shape = dict(zip(sharding.MESH_AXES, mesh.axis_sizes, strict=True))
  lines = [
    f"model {m.get('size', '?')}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads "
    f"({m.n_kv_heads} KV), mlp {m.mlp_dim}, vocab {m.vocab_size}; params {m.param_dtype}, "
    f"compute {m.dtype}, remat {m.remat}",
    f"mesh {shape} = {math.prod(mesh.axis_sizes)} devices",
    "",
    f"{'stage':12s} {'params':>14s} {'rows/dev':>8s} {'params':>9s} {'optimizer':>9s} "
    f"{'grads':>9s} {'activations':>11s} {'KV cache':>9s} {'total':>9s}   (GiB per device)",
  ]
  for p in plans:
    g = lambda x: f"{x / GiB:9.2f}"
    fits = ""
    if capacity_gib:
      fits = "  fits" if p.total / GiB <= capacity_gib else "  DOES NOT FIT"
    lines.append(
      f"{p.stage:12s} {p.params:14,d} {p.rows:8d} {g(p.param_bytes)} {g(p.optimizer_bytes)} "
      f"{g(p.grad_bytes)} {p.activation_bytes / GiB:11.2f} {g(p.kv_cache_bytes)} "
      f"{g(p.total)}{fits}"
    )
  return "\n".join(lines)
