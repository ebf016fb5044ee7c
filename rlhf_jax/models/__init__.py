"""Models: the LLaMA-family transformer with LM and scalar heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.models.transformer import (
  Cache,
  Transformer,
  TransformerConfig,
  attention_mask,
  count_params,
  init_cache,
  rope,
)

__all__ = [
  "Cache",
  "Transformer",
  "TransformerConfig",
  "apply",
  "attention_mask",
  "count_params",
  "init_cache",
  "init_params",
  "rope",
]


def init_params(
  cfg: TransformerConfig,
  rng: jax.Array,
  mesh: Mesh | None = None,
  rules=(),
  heads: tuple[str, ...] = ("lm",),
):
  """Parameters (a plain pytree) created on `mesh`, or on the default device.

  Returns `(params, shardings)`; `shardings` is None without a mesh. `heads` chooses
  which heads get parameters ("lm", "scalar").
  """
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  init_fn = lambda r: model.init(r, tokens, heads=heads)["params"]
  if mesh is None:
    import flax.linen as nn

    return jax.jit(lambda r: nn.unbox(init_fn(r)))(rng), None
  return sharding.init_sharded(init_fn, mesh, rules, rng)


def apply(cfg: TransformerConfig, params, tokens, *args, **kwargs):
  """`Transformer(cfg).apply` on a plain params tree; returns `(outputs, cache)`."""
  return Transformer(cfg).apply({"params": params}, tokens, *args, **kwargs)
