"""Decoder-only transformer (LLaMA family) in Flax Linen, with logical axis names.

RoPE, RMSNorm, SwiGLU, grouped KV heads, optional tied embeddings, dropout, param and
compute dtypes from the config; optionally Qwen2's q/k/v biases, Qwen3's q/k RMSNorm and
LLaMA 3's RoPE frequency scaling (off by default: then none of their ops is traced), and
LoRA adapters on any projection whose params hold them (`project`, rlhf_jax/lora.py).
Every parameter and activation carries logical axis names (`vocab`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`; activations `activation_batch`, ...), which
`rlhf_jax.sharding` maps to the `(data, fsdp, tensor)` mesh; with no mesh and no rules
the annotations are no-ops.

Attention is masked by segment ids rather than by a padding mask: token `q` attends to
key `k` iff `slot(k) <= slot(q)`, `seg(k) == seg(q)` and `seg(k) != 0`. One rule covers
packed pretraining rows (several documents per row), right-padded SFT/RM rows and
left-padded prompts for the sampler (positions are passed in, so a left-padded prompt
sees the same RoPE positions as an unpadded one). With `shared_prefix`, segment 1 is
also visible to every later segment of its row: a reward model's packed comparison (one
prompt, then its K responses) encodes the prompt once and each response against it.

Two heads on the final hidden state: LM logits, and a scalar (reward / value) head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array
# KV cache: {"layers": [{"k": f[B, Hkv, S, D], "v": f[B, Hkv, S, D]}] * L,
#            "segment_ids": int[B, S]}  (segment id of every slot; 0 = empty or padding)
Cache = dict[str, Any]

_NEG = -1e30  # finite, so a fully masked row (padding) softmaxes to uniform, not NaN
ROPE_TYPES = ("default", "llama3")
# llama3 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original max length)
RopeScaling = tuple[float, float, float, int]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  mlp_dim: int
  head_dim: int = 0  # 0 = d_model // n_heads
  max_len: int = 2048
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dropout: float = 0.0
  lora_dropout: float = 0.0  # on LoRA adapters' input while training (rlhf_jax/lora.py)
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots (save matmul outputs)
  # Qwen-family attention (rlhf_jax.models.hf_config): off, the LLaMA block.
  qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2; o has none)
  qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE (Qwen3)
  # RoPE frequencies: "default" (theta ** (-2i / D)) | "llama3" (LLaMA 3.x: rescaled by
  # the fields below as transformers' `_compute_llama3_parameters`; unused by default)
  rope_type: str = "default"
  rope_factor: float = 8.0  # llama3: long wavelengths' frequencies divided by this
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original / this are scaled
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original / this are kept
  rope_original_max_len: int = 8192  # llama3: the context length before scaling
  # The token that ends a reply: a sampler stops at it (the tokenizer's `eos_id`, which a
  # chat template's end of turn sets: ChatML's <|im_end|>, LLaMA 3's <|eot_id|>).
  eos_id: int = 2

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type {self.rope_type!r}: must be one of {ROPE_TYPES}")

  @classmethod
  def from_config(
    cls, c: ml_collections.ConfigDict | Mapping[str, Any], **overrides
  ) -> TransformerConfig:
    """From `config.model` (or a params.json "model" dict); other keys are ignored."""
    fields = {f.name for f in dataclasses.fields(cls)}
    items = c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)
    kw = {k: v for k, v in items.items() if k in fields}
    kw.update(overrides)
    return cls(**kw)

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def rope_scaling(self) -> RopeScaling | None:
    """The llama3 frequency scaling, or None for plain RoPE."""
    if self.rope_type == "default":
      return None
    return (
      self.rope_factor,
      self.rope_low_freq_factor,
      self.rope_high_freq_factor,
      self.rope_original_max_len,
    )

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)


def _constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  return nn.with_logical_constraint(x, names)


_DEFAULT_INIT = nn.initializers.lecun_normal()


def _fan_in(n_in: int, ndim: int):
  """Truncated-normal init with variance 1/fan_in over the first `n_in` dims."""
  return nn.initializers.variance_scaling(
    1.0,
    "fan_in",
    "truncated_normal",
    in_axis=tuple(range(n_in)),
    out_axis=tuple(range(n_in, ndim)),
  )


def _init(names: tuple[str | None, ...], init=_DEFAULT_INIT):
  return nn.with_logical_partitioning(init, names)


def dense(x: Array, kernel: Array, n_in: int = 1, out_dtype=None) -> Array:
  """Contract the last `n_in` dims of x with the first `n_in` of kernel, as ONE 2-D matmul.

  Flattening to [rows, in] x [in, out] matters on CPU: XLA lowers the weight gradient
  of a 3-D dot (two contracting dims) about 2x slower than the same 2-D matmul.
  """
  lead, out = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
  k_in = math.prod(kernel.shape[:n_in])
  y = jnp.dot(x.reshape(-1, k_in), kernel.reshape(k_in, -1), preferred_element_type=out_dtype)
  return y.reshape(*lead, *out)


def project(module: nn.Module, name: str, x: Array, kernel: Array, n_in: int, deterministic: bool):
  """x's last `n_in` dims through `kernel` (in the compute dtype), plus LoRA's path
  dropout(x) A B when the params hold adapters `<name>_lora` = {"a": f[in..., r],
  "b": f[r, out...]} (b scaled by alpha / r: `rlhf_jax.lora.attach`); else the matmul alone."""
  cfg = module.cfg
  y = dense(x, kernel.astype(cfg.compute_dtype), n_in)
  if not module.has_variable("params", f"{name}_lora"):
    return y
  ab = module.get_variable("params", f"{name}_lora")
  x = nn.Dropout(cfg.lora_dropout, name=f"{name}_lora_dropout")(x, deterministic=deterministic)
  h = dense(x, ab["a"].astype(cfg.compute_dtype), n_in)  # [..., r]
  return y + dense(h, ab["b"].astype(cfg.compute_dtype))


def rope(x: Array, positions: Array, theta: float, scaling: RopeScaling | None = None) -> Array:
  """Rotary embedding, rotate-half convention (as Hugging Face LLaMA).

  x: f[B, T, H, D]; positions: int[B, T]. Computed in f32.
  """
  return rotate(x, rope_angles(positions, x.shape[-1], theta, scaling))


def rope_frequencies(d: int, theta: float, scaling: RopeScaling | None = None) -> Array:
  """f32[D/2]: the angle per position of each pair of dims; `scaling`: llama3's."""
  freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
  if scaling is None:
    return freq
  return llama3_frequencies(freq, *scaling)


def llama3_frequencies(
  freq: Array, factor: float, low_freq_factor: float, high_freq_factor: float, original: int
) -> Array:
  """LLaMA 3.x's RoPE scaling, op for op as transformers' `_compute_llama3_parameters`
  (in f32): frequencies whose wavelength is shorter than original / high_freq_factor are
  kept, longer than original / low_freq_factor divided by `factor`, and those between
  interpolated smoothly from one to the other."""
  low_freq_wavelen = original / low_freq_factor
  high_freq_wavelen = original / high_freq_factor
  wavelen = 2 * math.pi / freq
  scaled = jnp.where(wavelen > low_freq_wavelen, freq / factor, freq)
  smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_angles(
  positions: Array, d: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[Array, Array]:
  """(cos, sin) of the RoPE angles, f32[B, T, 1, D] each; positions: int[B, T]."""
  freq = rope_frequencies(d, theta, scaling)  # [D/2]
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, D/2]
  angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  return jnp.cos(angle), jnp.sin(angle)


def rope_table_angles(
  positions: Array, d: int, theta: float, size: int, scaling: RopeScaling | None = None
) -> tuple[Array, Array]:
  """`rope_angles` looked up in a table of positions [0, size), for decoding.

  XLA fuses cos and sin into every consumer, so computed from the positions they are
  re-evaluated for every layer and head in every decode step (~5% of the sampler's time
  at d_model 256); the table does not depend on the step, and a lookup is a cheap
  gather. Positions outside the table give NaN.
  """
  cos, sin = rope_angles(jnp.arange(size)[None], d, theta, scaling)
  look = lambda table: jnp.take(table[0], positions, axis=0, mode="fill", fill_value=jnp.nan)
  return look(cos), look(sin)


def rotate(x: Array, angles: tuple[Array, Array]) -> Array:
  """x: f[B, T, H, D] rotated by `rope_angles`' (cos, sin)."""
  cos, sin = angles
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any
  axis: str = "norm"  # the logical name of the normalised (last) axis

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", _init((self.axis,), nn.initializers.ones), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def attention_mask(
  q_seg: Array, q_slot: Array, k_seg: Array, k_slot: Array, shared_prefix: bool = False
) -> Array:
  """bool[B, 1, 1, T, S]: causal by slot, same segment (or, with `shared_prefix`, a key
  of segment 1 for any non-padding query), key not padding.

  q_seg: int[B, T]; q_slot: int[T]; k_seg: int[B, S]; k_slot: int[S].
  """
  causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
  same = q_seg[:, :, None] == k_seg[:, None, :]  # [B, T, S]
  if shared_prefix:
    same |= (k_seg[:, None, :] == 1) & (q_seg[:, :, None] != 0)
  mask = causal[None] & same & (k_seg[:, None, :] != 0)
  return mask[:, None, None]


class Attention(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(
    self,
    x: Array,  # f[B, T, E]
    angles: tuple[Array, Array],  # RoPE (cos, sin) f32[B, T, 1, D], from `rope_angles`
    mask: Array,  # bool[B, 1, 1, T, S] from `attention_mask`
    cache: Cache | None,  # {"k", "v": f[B, Hkv, S, D]} or None (then S == T)
    cache_index: Array | None,
    deterministic: bool,
  ) -> tuple[Array, Cache | None]:
    cfg = self.cfg
    h, hk, d = cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head

    def proj(name, shape, names, n_in, inp):
      # Kernels are created in their final rank (not flat-then-reshaped as in Flax's
      # DenseGeneral), so their logical-axis constraints hold at every rank.
      kernel = self.param(name, _init(names, _fan_in(n_in, len(shape))), shape, cfg.params_dtype)
      return project(self, name, inp, kernel, n_in, deterministic)

    e = x.shape[-1]

    def qkv(name, n, names):
      y = proj(name, (e, n, d), names, 1, x)
      if cfg.qkv_bias:  # (Qwen2) laid out as the kernel's output axes
        init = _init(names[1:], nn.initializers.zeros)
        y = y + self.param(f"{name}_bias", init, (n, d), cfg.params_dtype).astype(y.dtype)
      return y

    def norm(name, y):  # (Qwen3) each head's q / k normalised over head_dim
      if not cfg.qk_norm:
        return y
      return RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, axis="head_dim", name=name)(
        y
      )

    q = norm("q_norm", qkv("q", h, ("embed", "heads", "head_dim")))
    k = norm("k_norm", qkv("k", hk, ("embed", "kv_heads", "head_dim")))
    v = qkv("v", hk, ("embed", "kv_heads", "head_dim"))
    q, k = rotate(q, angles), rotate(k, angles)
    q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", "head_dim"))

    b, t = x.shape[:2]
    qg = q.reshape(b, t, hk, h // hk, d)
    if cache is None:
      k_spec = "bskd"
    else:
      # Write this chunk at [cache_index, cache_index + T) and attend over the cache.
      # The cache is [B, Hkv, S, D], the operand layout of the attention dots: stored as
      # [B, S, Hkv, D], XLA transposed the whole cache in every decode step.
      zero = jnp.zeros((), jnp.int32)
      at = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
      names = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")
      write = lambda c, new: _constrain(
        jax.lax.dynamic_update_slice(c, new.transpose(0, 2, 1, 3).astype(c.dtype), at), names
      )
      ck, cv = write(cache["k"], k), write(cache["v"], v)
      cache = {"k": ck, "v": cv}
      k, v, k_spec = ck.astype(x.dtype), cv.astype(x.dtype), "bksd"
    logits = jnp.einsum(f"btkgd,{k_spec}->bkgts", qg, k).astype(jnp.float32) * (d**-0.5)
    logits = jnp.where(mask, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    probs = nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
    out = jnp.einsum(f"bkgts,{k_spec}->btkgd", probs, v).reshape(b, t, h, d)
    out = proj("o", (h, d, e), ("heads", "head_dim", "embed"), 2, out)
    return out, cache


class MLP(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.cfg

    def proj(name, shape, names, inp):
      kernel = self.param(name, _init(names, _fan_in(1, 2)), shape, cfg.params_dtype)
      return project(self, name, inp, kernel, 1, deterministic)

    e = x.shape[-1]
    gate = proj("gate", (e, cfg.mlp_dim), ("embed", "mlp"), x)
    up = proj("up", (e, cfg.mlp_dim), ("embed", "mlp"), x)
    hidden = nn.silu(gate) * up
    hidden = _constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    hidden = nn.Dropout(cfg.dropout)(hidden, deterministic=deterministic)
    return proj("down", (cfg.mlp_dim, e), ("mlp", "embed"), hidden)


class Block(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, angles, mask, cache, cache_index, deterministic):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
    y, cache = Attention(cfg, name="attn")(
      norm("attn_norm")(x), angles, mask, cache, cache_index, deterministic
    )
    x = x + nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    y = MLP(cfg, name="mlp")(norm("mlp_norm")(x), deterministic)
    x = x + nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, cache


_REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """Decoder-only LM. `__call__` returns `(outputs, new_cache)`.

  `heads` picks what is computed from the final hidden state: any of "lm" (logits
  f32[B, T, V]), "scalar" (f32[B, T]) and "hidden" (f[B, T, E]); `outputs` is a dict
  keyed by those names. `span=(start, stop)` computes them on positions [start, stop)
  only (T = stop - start): the sampler's prefill needs the last position's logits, and
  PPO's the response positions' only, so no vocabulary-sized matmul or softmax is spent
  on the rest. Initialise with `heads=("lm", "scalar")` to create both heads.
  """

  cfg: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens: Array,  # int[B, T]
    positions: Array | None = None,  # int[B, T]; default arange
    segment_ids: Array | None = None,  # int[B, T]; 0 = padding; default all ones
    cache: Cache | None = None,  # from `init_cache`
    cache_index: Array | None = None,  # int[]: slot of tokens[:, 0] in the cache
    deterministic: bool = True,
    heads: tuple[str, ...] = ("lm",),
    span: tuple[int, int] | None = None,  # static: the heads on positions [start, stop)
    shared_prefix: bool = False,  # static: segment 1 is every later segment's prefix
  ) -> tuple[dict[str, Array], Cache | None]:
    cfg = self.cfg
    if shared_prefix and cache is not None:
      raise ValueError("shared_prefix is for whole-sequence forwards, not the KV cache")
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.params_dtype,
      embedding_init=_init(("vocab", "embed"), nn.initializers.normal(1.0)),
      name="embed",
    )
    x = embed(tokens)
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(6,))
    if cache is None:
      slots = jnp.arange(t)
      mask = attention_mask(segment_ids, slots, segment_ids, slots, shared_prefix)
      layer_caches, new_cache = [None] * cfg.n_layers, None
      angles = rope_angles(positions, cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
    else:
      idx = jnp.asarray(cache_index, jnp.int32)
      zero = jnp.zeros((), jnp.int32)
      kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (zero, idx))
      s = kv_seg.shape[1]
      mask = attention_mask(segment_ids, idx + jnp.arange(t), kv_seg, jnp.arange(s))
      layer_caches, new_cache = cache["layers"], {"segment_ids": kv_seg, "layers": []}
      # A token's position never exceeds its slot, so the cache's S slots bound them.
      angles = rope_table_angles(positions, cfg.dim_per_head, cfg.rope_theta, s, cfg.rope_scaling)
    for i in range(cfg.n_layers):
      x, c = block(cfg, name=f"layer_{i}")(
        x, angles, mask, layer_caches[i], cache_index, deterministic
      )
      if new_cache is not None:
        new_cache["layers"].append(c)
    if span is not None:
      x = x[:, span[0] : span[1]]
    x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.params_dtype, name="final_norm")(x)

    out = {}
    if "hidden" in heads:
      out["hidden"] = x
    if "lm" in heads:
      if cfg.tie_embeddings:
        kernel = embed.embedding.T
      else:
        shape, names = (cfg.d_model, cfg.vocab_size), ("embed", "vocab")
        kernel = self.param("lm_head", _init(names, _fan_in(1, 2)), shape, cfg.params_dtype)
      # Accumulated and returned in f32: rounding bf16 logits was left to XLA's fusions,
      # so the same forward in two programs (rollout, update) differed by up to 1e-2.
      logits = dense(x, kernel.astype(cfg.compute_dtype), out_dtype=jnp.float32)
      logits = _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
      out["lm"] = logits.astype(jnp.float32)
    if "scalar" in heads:
      out["scalar"] = nn.Dense(
        1,
        dtype=jnp.float32,
        param_dtype=cfg.params_dtype,
        kernel_init=_init(("embed", None), nn.initializers.zeros),
        bias_init=_init((None,), nn.initializers.zeros),
        name="scalar_head",
      )(x.astype(jnp.float32))[..., 0]
    return out, new_cache


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty KV cache for `length` slots (zeros; every slot's segment id 0)."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch, cfg.n_kv_heads, length, cfg.dim_per_head)
  layers = [
    {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)
  ]
  return {"layers": layers, "segment_ids": jnp.zeros((batch, length), jnp.int32)}


def grow_cache(cache: Cache, n: int) -> Cache:
  """`cache` with `n` more empty slots at the end (segment id 0)."""
  pad = lambda x, axis: jnp.pad(x, [(0, n if a == axis else 0) for a in range(x.ndim)])
  layers = [{k: pad(v, 2) for k, v in layer.items()} for layer in cache["layers"]]
  return {"layers": layers, "segment_ids": pad(cache["segment_ids"], 1)}


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
