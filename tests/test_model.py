"""Transformer: KV-cache decoding equals full forward passes; segments isolate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import TransformerConfig, apply, init_cache, init_params
from rlhf_jax.sampling import prompt_layout
from rlhf_jax.tokenizer import pad_left

CFG = TransformerConfig(
  vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_len=64
)


# Qwen2's q/k/v biases, Qwen3's q/k norms and LLaMA 3's RoPE scaling at once (all three
# frequency bands occur at head_dim 8 with an original length of 64)
QWEN = dataclasses.replace(
  CFG, qkv_bias=True, qk_norm=True, rope_type="llama3", rope_factor=4.0, rope_original_max_len=64
)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0), heads=("lm", "scalar"))[0]


@pytest.fixture(scope="module")
def qwen_params():
  """QWEN's parameters with its biases and norm scales away from their init (0 and 1)."""
  params = init_params(QWEN, jax.random.key(0), heads=("lm", "scalar"))[0]
  for i in range(QWEN.n_layers):
    attn = params[f"layer_{i}"]["attn"]
    for j, name in enumerate(("q_bias", "k_bias", "v_bias")):
      attn[name] = jax.random.normal(jax.random.key(10 * i + j), attn[name].shape)
    for name in ("q_norm", "k_norm"):
      scale = attn[name]["scale"]
      attn[name]["scale"] = scale + 0.3 * jax.random.normal(jax.random.key(i), scale.shape)
  return params


# Jitted (one compile per shape) rather than op by op: the model is the same either way.
_apply = jax.jit(apply, static_argnums=0, static_argnames=("heads", "deterministic"))


def _full_logits(params, seqs, cfg=CFG):
  """Each sequence's logits as alone (its own row, right-padded: padding after a causal
  sequence changes none of its positions), from one call."""
  n = max(len(s) for s in seqs)
  tokens = np.zeros((len(seqs), n), np.int32)
  seg = np.zeros((len(seqs), n), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)], seg[i, : len(s)] = s, 1
  pos = np.broadcast_to(np.arange(n, dtype=np.int32), tokens.shape)
  out, _ = _apply(cfg, params, tokens, pos, seg)
  return [np.asarray(out["lm"][i, : len(s)]) for i, s in enumerate(seqs)]


@pytest.mark.parametrize("cfg", [CFG, QWEN], ids=["llama", "qwen_llama3"])
def test_kv_cache_decode_matches_full_forward_at_every_position(cfg, request):
  params = request.getfixturevalue("params" if cfg is CFG else "qwen_params")
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(4, 97, n)) for n in (7, 2, 4)]
  continuations = [list(rng.integers(4, 97, 5)) for _ in prompts]
  tokens = pad_left(prompts)
  b, p = tokens.shape
  seg, pos, lengths = prompt_layout(jnp.asarray(tokens))
  cache = init_cache(cfg, b, p + 5)
  out, cache = _apply(cfg, params, jnp.asarray(tokens), pos, seg, cache=cache, cache_index=0)
  got = [[np.asarray(out["lm"][i, p - 1])] for i in range(b)]
  for t in range(5):
    step = jnp.asarray([[c[t]] for c in continuations], jnp.int32)
    out, cache = _apply(
      cfg,
      params,
      step,
      (lengths + t)[:, None],
      jnp.ones((b, 1), jnp.int32),
      cache=cache,
      cache_index=jnp.int32(p + t),
    )
    for i in range(b):
      got[i].append(np.asarray(out["lm"][i, 0]))
  full = _full_logits(params, [a + c for a, c in zip(prompts, continuations, strict=True)], cfg)
  for i in range(b):
    # Logits after the last prompt token and after each decoded token.
    want = full[i][len(prompts[i]) - 1 :]
    np.testing.assert_allclose(np.stack(got[i]), want, atol=1e-5, rtol=1e-5)
  # The prefill also reproduces every prompt position of the unpadded row.
  out_pref, _ = _apply(cfg, params, jnp.asarray(tokens), pos, seg)
  alone = _full_logits(params, prompts, cfg)
  seg_np = np.asarray(seg)
  for i in range(b):
    real = np.asarray(out_pref["lm"][i])[seg_np[i] == 1]
    np.testing.assert_allclose(real, alone[i], atol=1e-5, rtol=1e-5)


def test_packed_segments_equal_separate_forward_passes(params):
  a, b = [5, 6, 7, 8], [9, 10, 11]
  tokens = jnp.asarray([a + b + [0]], jnp.int32)
  seg = jnp.asarray([[1] * 4 + [2] * 3 + [0]], jnp.int32)
  pos = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0]], jnp.int32)
  out, _ = _apply(CFG, params, tokens, pos, seg, heads=("lm", "scalar"))
  alone = _full_logits(params, [a, b])
  np.testing.assert_allclose(out["lm"][0, :4], alone[0], atol=1e-5)
  np.testing.assert_allclose(out["lm"][0, 4:7], alone[1], atol=1e-5)
  assert out["scalar"].shape == (1, 8)
  assert np.isfinite(np.asarray(out["lm"])).all()  # the padding row stays finite


def test_grouped_kv_heads_and_bf16_shapes():
  cfg = TransformerConfig(
    vocab_size=50,
    d_model=32,
    n_layers=1,
    n_heads=4,
    n_kv_heads=1,
    mlp_dim=32,
    dtype="bfloat16",
    tie_embeddings=True,
    remat="full",
  )
  params, _ = init_params(cfg, jax.random.key(1))
  assert "lm_head" not in params  # tied: logits come from the embedding
  assert params["layer_0"]["attn"]["k"].shape == (32, 1, 8)
  out, _ = _apply(cfg, params, jnp.ones((2, 5), jnp.int32))
  assert out["lm"].dtype == jnp.float32 and out["lm"].shape == (2, 5, 50)


def test_dropout_is_active_only_when_not_deterministic():
  cfg = TransformerConfig(
    vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, mlp_dim=32, dropout=0.5
  )
  params, _ = init_params(cfg, jax.random.key(1))
  x = jnp.ones((1, 6), jnp.int32)
  det, _ = _apply(cfg, params, x)
  det2, _ = _apply(cfg, params, x)
  drop, _ = _apply(cfg, params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(det["lm"], det2["lm"])
  assert not np.allclose(det["lm"], drop["lm"])


def test_weight_decay_spares_qkv_biases_and_norms(qwen_params):
  """AdamW decays matrices only: Qwen2's q/k/v biases are [heads, head_dim], yet biases."""
  from rlhf_jax.train import optim

  c = optim.optim_config(schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip=0.0)
  tx = optim.make_optimizer(c, total_steps=10)
  zero = jax.tree.map(jnp.zeros_like, qwen_params)
  updates, _ = tx.update(zero, tx.init(qwen_params), qwen_params)
  attn = updates["layer_0"]["attn"]
  assert not np.any(attn["q_bias"]) and not np.any(attn["q_norm"]["scale"])
  assert np.all(np.asarray(attn["q"]) != 0)  # (zero gradients: the decay alone)
