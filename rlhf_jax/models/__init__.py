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
  "abstract_params",
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


def abstract_params(model, heads: tuple[str, ...] = ("lm",), mesh: Mesh | None = None, rules=()):
  """ShapeDtypeStructs of the parameters of a model with `heads` (nothing allocated),
  with their shardings on `mesh` when given. `model`: `config.model` or a params.json
  "model" dict."""
  import flax.linen as nn

  cfg = TransformerConfig.from_config(model)
  init = lambda r: Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32), heads=heads)["params"]
  with nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    if mesh is None:
      return nn.unbox(abstract)
    shardings = nn.unbox(sharding.logical_shardings(abstract, mesh, rules))
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), shardings
  )


def apply(cfg: TransformerConfig, params, tokens, *args, **kwargs):
  """`Transformer(cfg).apply` on a plain params tree; returns `(outputs, cache)`."""
  return Transformer(cfg).apply({"params": params}, tokens, *args, **kwargs)
