"""LoRA (Hu et al., 2021): low-rank adapters on the transformer's projections, trained
while the model they adapt stays frozen.

A target projection's kernel W [in..., out...] (our layouts: q/k/v [E, H, D], o [H, D, E],
gate/up [E, M], down [M, E]) gets A [in..., r] and B [r, out...]; the adapted projection
computes  x W + (alpha / r) dropout(x) A B  (`models.transformer.project`). A starts as
PEFT's (uniform in +-1/sqrt(fan_in)), B at zero, so the adapted model starts exactly as
the base one; `merge` folds the adapters into the kernels: W + (alpha / r) A B.

What a LoRA stage trains is a tree {"lora": adapters, + a head trained fully (the reward
model's new scalar head, as PEFT's `modules_to_save`)}, adapters laid out as
{"layer_<i>": {"attn" | "mlp": {target: {"a": A, "b": B}}}}. `attach` lays it over the
frozen base for a forward pass (no copy of the base: the model reads `<target>_lora`
beside each kernel), `merge` writes it into the base for an export. A and B carry their
kernel's logical axis names with `lora_rank` between (unsharded unless a rule names it),
so the mesh rules lay them out as their kernels.

`config.lora` (configs/common.py `lora_config`) turns LoRA on (rank > 0) for the stages
registered with `lora=True` (`registry.lora_stages`): rank, alpha, dropout, targets,
`value` (PPO's value model gets adapters too) and `stages`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import ranges
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import registry

Params = Any
KEY = "lora"  # the adapters' key in a trained tree
RANK_AXIS = "lora_rank"  # logical name of the rank axis of A and B
# target -> (module, input dims of its kernel, the module's name in an HF LLaMA layer)
TARGETS = {
  "q": ("attn", 1, "self_attn.q_proj"),
  "k": ("attn", 1, "self_attn.k_proj"),
  "v": ("attn", 1, "self_attn.v_proj"),
  "o": ("attn", 2, "self_attn.o_proj"),
  "gate": ("mlp", 1, "mlp.gate_proj"),
  "up": ("mlp", 1, "mlp.up_proj"),
  "down": ("mlp", 1, "mlp.down_proj"),
}
RANGES = {"rank": ">= 0", "alpha": "> 0", "dropout": "[0, 1)"}
# Adapter init keys derive from a stage's init key folded with this (a step's keys fold
# in the step number: never this large).
RNG_SALT = 0x4C6F5241


@dataclasses.dataclass(frozen=True)
class Settings:
  """One stage's LoRA: `config.lora` with its targets parsed (hashable: a jit's static)."""

  rank: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]
  value: bool = False  # PPO: the value model trains adapters (+ its head) too

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
  """`"q,k,v"` -> ("q", "k", "v"), in TARGETS' order, each once."""
  names = {t.strip() for t in str(text).split(",") if t.strip()}
  return tuple(t for t in TARGETS if t in names)


def validate(section: Mapping[str, Any], key: str = KEY) -> None:
  """`config.lora`'s numbers in `RANGES`, its targets and stages known; errors name the key."""
  ranges.check(section, key, RANGES)
  names = [t.strip() for t in str(section.get("targets", "")).split(",") if t.strip()]
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names:
    what = f"unknown {unknown[0]!r}" if unknown else "empty"
    raise UserInputError(f"config.{key}.targets: {what} (known: {','.join(TARGETS)})")
  adaptable = [s.name for s in registry.stages() if s.lora]
  for name in [s.strip() for s in str(section.get("stages", "")).split(",") if s.strip()]:
    if name not in adaptable:
      raise UserInputError(
        f"config.{key}.stages: {name!r} trains no LoRA adapters (those that do: "
        f"{', '.join(adaptable)})"
      )


def settings(config, stage: str) -> Settings | None:
  """The LoRA `stage` trains with under `config.lora`, or None (off, or not for it)."""
  section = config.get(KEY)
  if stage not in registry.lora_stages(section):
    return None
  return Settings(
    rank=int(section["rank"]),
    alpha=float(section["alpha"]),
    dropout=float(section["dropout"]),
    targets=parse_targets(section["targets"]),
    value=bool(section.get("value", False)),
  )


# --- adapters -----------------------------------------------------------------------------


def _layers(params) -> list[str]:
  n = 0
  while f"layer_{n}" in params:
    n += 1
  return [f"layer_{i}" for i in range(n)]


def init(params, s: Settings, rng: jax.Array) -> Params:
  """Fresh adapters for the target kernels of `params` (plain arrays, or Flax's logically
  partitioned boxes: then A and B are boxed with their kernel's axis names).

  A f[in..., r] ~ U(+-1/sqrt(fan_in)) (PEFT's kaiming-uniform, fan_in = prod(in...)),
  B f[r, out...] = 0, both in the kernel's dtype; each from its own fold of `rng`.
  """
  out: dict = {}
  for i, layer in enumerate(_layers(params)):
    for j, t in enumerate(s.targets):
      module, n_in, _ = TARGETS[t]
      kernel = params[layer][module][t]
      boxed = isinstance(kernel, nn.Partitioned)
      w = kernel.value if boxed else kernel
      bound = 1.0 / math.sqrt(math.prod(w.shape[:n_in]))
      key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
      a = jax.random.uniform(key, (*w.shape[:n_in], s.rank), w.dtype, -bound, bound)
      b = jnp.zeros((s.rank, *w.shape[n_in:]), w.dtype)
      if boxed:
        a = nn.LogicallyPartitioned(a, (*kernel.names[:n_in], RANK_AXIS))
        b = nn.LogicallyPartitioned(b, (RANK_AXIS, *kernel.names[n_in:]))
      out.setdefault(layer, {}).setdefault(module, {})[t] = {"a": a, "b": b}
  return out


def trainable(params, s: Settings, rng: jax.Array, keep: tuple[str, ...] = ()) -> Params:
  """What a LoRA stage trains of `params`: fresh adapters, and the top-level entries
  `keep` (a head trained fully, e.g. "scalar_head") as they are."""
  return {KEY: init(params, s, rng), **{k: params[k] for k in keep}}


def frozen(params, keep: tuple[str, ...] = ()) -> Params:
  """The base a LoRA stage keeps frozen: `params` less the entries it trains fully."""
  return {k: v for k, v in params.items() if k not in keep}


def _fold(base, trained, fn) -> Params:
  """`base` with `trained`'s full entries laid over it and `fn(module params, target,
  adapters)` applied for every adapted target (a shallow copy: no array is copied)."""
  out = {**base, **{k: v for k, v in trained.items() if k != KEY}}
  for layer, modules in trained[KEY].items():
    out[layer] = dict(out[layer])
    for module, targets in modules.items():
      m = dict(out[layer][module])
      for t, ab in targets.items():
        fn(m, t, ab)
      out[layer][module] = m
  return out


def attach(base, trained, s: Settings) -> Params:
  """The params the adapted model reads: `base` with the adapters beside their kernels as
  `<target>_lora` = {"a": A, "b": (alpha / r) B} (`models.transformer.project`) and a
  fully trained head in place. Differentiate through it w.r.t. `trained` only."""

  def put(m, t, ab):
    m[f"{t}_lora"] = {"a": ab["a"], "b": ab["b"] * s.scale}

  return _fold(base, trained, put)


def delta(a: jax.Array, b: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
  """f32[shape]: (alpha / r) A B for A f[in..., r], B f[r, out...] laid out as the kernel."""
  r = a.shape[-1]
  ab = jnp.dot(
    a.reshape(-1, r).astype(jnp.float32),
    b.reshape(r, -1).astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  return (scale * ab).reshape(shape)


def merge(base, trained, s: Settings) -> Params:
  """Plain params (the base model's tree): every target kernel W + (alpha / r) A B, summed
  in f32 and stored in W's dtype, and a fully trained head in place."""

  def fold(m, t, ab):
    w = m[t]
    m[t] = (w.astype(jnp.float32) + delta(ab["a"], ab["b"], w.shape, s.scale)).astype(w.dtype)

  return _fold(base, trained, fold)


def count(trained) -> int:
  """Parameters in a trained tree (adapters and any head)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(trained))
