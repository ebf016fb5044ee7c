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
  KV heads;
- LoRA (`config.lora`, for the stages it applies to): the frozen base counted once (in
  PPO the reference is the policy's base), the adapters beside it, and gradients and
  optimiser moments of what is trained only (adapters, a new head); activations add each
  adapter's rank-wide output (and its dropped-out input when dropout is on). The table
  shows the config as it is; a second one shows each LoRA stage trained fully beside it.

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

from rlhf_jax import lora, sharding
from rlhf_jax.models.transformer import Transformer, TransformerConfig
from rlhf_jax.stages import registry

GiB = 1 << 30
MiB = 1 << 20


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
  trained: int = 0  # parameters that reach an optimiser
  full_total: float = 0.0  # with LoRA: the stage's total when it trains fully (else 0)
  full_trained: int = 0  # with LoRA: its trained parameters then

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


def param_layout(
  model_cfg: TransformerConfig, heads, mesh, rules, part=lambda params: params
) -> list[tuple[Any, Any]]:
  """[(ShapeDtypeStruct, per-device shard shape)] for every parameter of the model, or of
  `part(params)` (boxed: e.g. LoRA's adapters for them, `lora.init`)."""
  import flax.linen as nn

  model = Transformer(model_cfg)
  init = lambda r: part(model.init(r, jnp.zeros((1, 8), jnp.int32), heads=heads)["params"])
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
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


def adapter_activation_bytes(
  model_cfg: TransformerConfig, s: lora.Settings, rows: int, seq: int, dropout: bool
) -> float:
  """What LoRA adds to a microbatch's activations: per layer and target, A's output
  (rank wide) and, with dropout, the dropped-out input (in-dim wide)."""
  m = model_cfg
  ins = {"attn": m.d_model, "mlp": m.d_model, "o": m.n_heads * m.dim_per_head, "down": m.mlp_dim}
  width = sum(s.rank + (ins.get(t, ins[lora.TARGETS[t][0]]) if dropout else 0) for t in s.targets)
  return float(m.n_layers * rows * seq * width * jnp.dtype(m.dtype).itemsize)


def kv_cache_bytes(model_cfg: TransformerConfig, rows: int, length: int, tensor: int) -> float:
  m = model_cfg
  kv_heads = max(m.n_kv_heads // tensor, 1)
  return 2.0 * m.n_layers * rows * length * kv_heads * m.dim_per_head * jnp.dtype(m.dtype).itemsize


@dataclasses.dataclass
class _Context:
  """What every memory model reads: the config, the model, its two parameter layouts
  (`(count, bytes per device)`), the batch shards and the tensor axis; with LoRA, the
  stages it applies to, the adapters' layouts on each model and the scalar head's."""

  config: ml_collections.ConfigDict
  model: TransformerConfig
  lm: tuple[int, float]
  scalar: tuple[int, float]
  batch_shards: int
  tensor: int
  lora: dict = dataclasses.field(default_factory=dict)  # stage -> lora.Settings
  lm_adapters: tuple[int, float] = (0, 0.0)
  scalar_adapters: tuple[int, float] = (0, 0.0)
  head: tuple[int, float] = (0, 0.0)

  def rows(self, batch: int, accum: int = 1) -> int:
    return max(1, batch // self.batch_shards // accum)


def _plus(*layouts: tuple[int, float]) -> tuple[int, float]:
  return sum(n for n, _ in layouts), sum(b for _, b in layouts)


def _trained(
  x: _Context, stage: str, c, layout, seq: int, lm_head=True, k=1, adapters=(0, 0.0), head=None
) -> StagePlan:
  """One model trained on rows of `seq` tokens (`k` sequences per batch element); with
  LoRA for `stage`, its `adapters` (and `head`, trained fully) over the frozen rest."""
  accum = int(c.optim.get("grad_accum", 1))
  copies = 2 + (1 if c.optim.ema_decay else 0)
  r = x.rows(c.batch_size * k, accum)
  act = activation_bytes(x.model, r, seq, x.tensor, lm_head)
  trained, s = layout, x.lora.get(stage)
  if s is not None:
    trained = _plus(adapters, head or (0, 0.0))
    layout = _plus(layout, adapters)
    act += adapter_activation_bytes(x.model, s, r, seq, s.dropout > 0)
  return StagePlan(
    stage, layout[0], layout[1], copies * trained[1], trained[1], act, 0.0, r, trained[0]
  )


def _lm(x: _Context, stage: str, c) -> StagePlan:
  """An LM trained on token rows (pretraining, SFT)."""
  return _trained(x, stage, c, x.lm, c.seq_len, adapters=x.lm_adapters)


def _ranking(x: _Context, stage: str, c) -> StagePlan:
  """A scalar-head model trained on K responses per element (the reward model): one
  packed row of `packed_len` or K padded rows of `seq_len`."""
  kw = dict(lm_head=False, adapters=x.scalar_adapters, head=x.head)
  if c.get("packed_len"):
    return _trained(x, stage, c, x.scalar, c.packed_len, **kw)
  return _trained(x, stage, c, x.scalar, c.seq_len, k=c.max_responses, **kw)


def _sampler(x: _Context, stage: str, c) -> StagePlan:
  """An LM sampling `batch_size` rows with a KV cache (the comparisons)."""
  r = x.rows(c.batch_size)
  kv = kv_cache_bytes(x.model, r, c.max_prompt_len + c.max_new_tokens, x.tensor)
  logits = r * c.max_prompt_len * x.model.vocab_size / x.tensor * 4  # the prefill's logits
  return StagePlan(stage, x.lm[0], x.lm[1], 0.0, 0.0, logits, kv, r)


def _actor_critic(x: _Context, stage: str, c) -> StagePlan:
  """Policy, reference, value and reward models; policy and value optimised (PPO). With
  LoRA the policy is adapters over the reference (the base, held once), and with
  `lora.value` the value model adapters and a head over a trunk held already."""
  seq = c.prompt_len + c.max_new_tokens
  s = x.lora.get(stage)
  policy, value = x.lm, x.scalar  # what reaches an optimiser
  if s is not None:
    policy = x.lm_adapters
    value = _plus(x.scalar_adapters, x.head) if s.value else x.scalar
  count, params = _plus(x.lm, x.scalar, policy, value)  # + reference and reward models
  trained = _plus(policy, value)
  copies = 2 + (1 if c.optim.ema_decay else 0)
  mb = x.rows(c.batch_size // c.num_minibatches)
  ptx = x.rows(int(round(c.batch_size * c.ptx_ratio)) // c.num_minibatches) if c.ptx_coef else 0
  act = activation_bytes(x.model, mb, seq, x.tensor)
  act += activation_bytes(x.model, mb, seq, x.tensor, lm_head=False)
  if ptx:
    act += activation_bytes(x.model, ptx, c.ptx_seq_len, x.tensor)
  if s is not None:
    act += adapter_activation_bytes(x.model, s, mb * (2 if s.value else 1), seq, False)
    act += adapter_activation_bytes(x.model, s, ptx, c.ptx_seq_len, False)
  kv = kv_cache_bytes(x.model, x.rows(c.batch_size), seq, x.tensor)
  return StagePlan(stage, count, params, copies * trained[1], trained[1], act, kv, mb, trained[0])


# A stage's registered `memory` names its model here.
MEMORY_MODELS = {"lm": _lm, "ranking": _ranking, "sampler": _sampler, "actor_critic": _actor_critic}


def plan(config: ml_collections.ConfigDict, n_devices: int) -> tuple[Any, list[StagePlan]]:
  """(the mesh, a StagePlan per planned stage in `config`) on `n_devices` devices."""
  mesh = abstract_mesh(config.mesh, n_devices)
  rules = sharding.rules(config.mesh)
  size = dict(zip(sharding.MESH_AXES, mesh.axis_sizes, strict=True))
  model = TransformerConfig.from_config(config.model)
  full = _Context(
    config,
    model,
    _bytes(param_layout(model, ("lm",), mesh, rules)),
    _bytes(param_layout(model, ("scalar",), mesh, rules)),
    size["data"] * size["fsdp"],
    size["tensor"],
  )
  adapted = {n: lora.settings(config, n) for n in registry.lora_stages(config.get("lora"))}
  x = full
  if adapted:  # (one config.lora: the same adapters for every stage)
    s = next(iter(adapted.values()))
    adapters = lambda p: lora.init(p, s, jax.random.PRNGKey(0))
    x = dataclasses.replace(
      full,
      lora=adapted,
      lm_adapters=_bytes(param_layout(model, ("lm",), mesh, rules, adapters)),
      scalar_adapters=_bytes(param_layout(model, ("scalar",), mesh, rules, adapters)),
      head=_bytes(param_layout(model, ("scalar",), mesh, rules, lambda p: p["scalar_head"])),
    )
  plans = []
  for stage, section in registry.iter_sections(config):
    if stage.memory:
      p = MEMORY_MODELS[stage.memory](x, stage.name, section)
      if stage.name in adapted:
        without = MEMORY_MODELS[stage.memory](full, stage.name, section)
        p.full_total, p.full_trained = without.total, without.trained
      plans.append(p)
  return mesh, plans


def format_plan(
  config: ml_collections.ConfigDict, mesh, plans: list[StagePlan], capacity_gib: float = 0.0
) -> str:
  """The table `rlhf-jax plan` prints (in GiB; MiB when every stage takes under 1 GiB)."""
  m = config.model
  unit, name = (GiB, "GiB") if max((p.total for p in plans), default=0) >= GiB else (MiB, "MiB")
  shape = dict(zip(sharding.MESH_AXES, mesh.axis_sizes, strict=True))
  lines = [
    f"model {m.get('size', '?')}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads "
    f"({m.n_kv_heads} KV), mlp {m.mlp_dim}, vocab {m.vocab_size}; params {m.param_dtype}, "
    f"compute {m.dtype}, remat {m.remat}",
    f"mesh {shape} = {math.prod(mesh.axis_sizes)} devices",
    "",
    f"{'stage':12s} {'params':>14s} {'rows/dev':>8s} {'params':>9s} {'optimizer':>9s} "
    f"{'grads':>9s} {'activations':>11s} {'KV cache':>9s} {'total':>9s}   ({name} per device)",
  ]
  g = lambda x: f"{x / unit:9.2f}"
  for p in plans:
    fits = ""
    if capacity_gib:
      fits = "  fits" if p.total / GiB <= capacity_gib else "  DOES NOT FIT"
    lines.append(
      f"{p.stage:12s} {p.params:14,d} {p.rows:8d} {g(p.param_bytes)} {g(p.optimizer_bytes)} "
      f"{g(p.grad_bytes)} {p.activation_bytes / unit:11.2f} {g(p.kv_cache_bytes)} "
      f"{g(p.total)}{fits}"
    )
  adapted = [p for p in plans if p.full_total]
  if adapted:
    s = lora.settings(config, adapted[0].stage)
    lines += [
      "",
      f"LoRA rank {s.rank}, alpha {s.alpha:g} (scale {s.scale:g}), dropout {s.dropout:g}, on "
      f"{','.join(s.targets)}{' (and the value model)' if s.value else ''}; vs full fine-tuning:",
      f"{'stage':12s} {'trained':>14s} {'of full':>8s} {'full FT':>9s} {'LoRA':>9s} "
      f"{'saved':>9s}   ({name} per device)",
    ]
    for p in adapted:
      share = f"{100 * p.trained / max(p.full_trained, 1):7.2f}%"
      lines.append(
        f"{p.stage:12s} {p.trained:14,d} {share} {g(p.full_total)} {g(p.total)} "
        f"{g(p.full_total - p.total)}"
      )
  return "\n".join(lines)
