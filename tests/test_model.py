"""Transformer: KV-cache decoding equals full forward passes; segments isolate."""

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


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0), heads=("lm", "scalar"))[0]


def _full_logits(params, seq):
  out, _ = apply(CFG, params, jnp.asarray([seq], jnp.int32))
  return np.asarray(out["lm"][0])


def test_kv_cache_decode_matches_full_forward_at_every_position(params):
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(4, 97, n)) for n in (7, 2, 4)]
  continuations = [list(rng.integers(4, 97, 5)) for _ in prompts]
  tokens = pad_left(prompts)
  b, p = tokens.shape
  seg, pos, lengths = prompt_layout(jnp.asarray(tokens))
  cache = init_cache(CFG, b, p + 5)
  out, cache = apply(CFG, params, jnp.asarray(tokens), pos, seg, cache=cache, cache_index=0)
  got = [[np.asarray(out["lm"][i, p - 1])] for i in range(b)]
  for t in range(5):
    step = jnp.asarray([[c[t]] for c in continuations], jnp.int32)
    out, cache = apply(
      CFG,
      params,
      step,
      (lengths + t)[:, None],
      jnp.ones((b, 1), jnp.int32),
      cache=cache,
      cache_index=p + t,
    )
    for i in range(b):
      got[i].append(np.asarray(out["lm"][i, 0]))
  for i in range(b):
    full = _full_logits(params, prompts[i] + continuations[i])
    # Logits after the last prompt token and after each decoded token.
    want = full[len(prompts[i]) - 1 :]
    np.testing.assert_allclose(np.stack(got[i]), want, atol=1e-5, rtol=1e-5)
    # The prefill also reproduces every prompt position of the unpadded row.
  seg_np = np.asarray(seg)
  for i in range(b):
    out_pref, _ = apply(CFG, params, jnp.asarray(tokens), pos, seg)
    real = np.asarray(out_pref["lm"][i])[seg_np[i] == 1]
    np.testing.assert_allclose(real, _full_logits(params, prompts[i]), atol=1e-5, rtol=1e-5)


def test_packed_segments_equal_separate_forward_passes(params):
  a, b = [5, 6, 7, 8], [9, 10, 11]
  tokens = jnp.asarray([a + b + [0]], jnp.int32)
  seg = jnp.asarray([[1] * 4 + [2] * 3 + [0]], jnp.int32)
  pos = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0]], jnp.int32)
  out, _ = apply(CFG, params, tokens, pos, seg, heads=("lm", "scalar"))
  np.testing.assert_allclose(out["lm"][0, :4], _full_logits(params, a), atol=1e-5)
  np.testing.assert_allclose(out["lm"][0, 4:7], _full_logits(params, b), atol=1e-5)
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
  out, _ = apply(cfg, params, jnp.ones((2, 5), jnp.int32))
  assert out["lm"].dtype == jnp.float32 and out["lm"].shape == (2, 5, 50)


def test_dropout_is_active_only_when_not_deterministic():
  cfg = TransformerConfig(
    vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, mlp_dim=32, dropout=0.5
  )
  params, _ = init_params(cfg, jax.random.key(1))
  x = jnp.ones((1, 6), jnp.int32)
  det, _ = apply(cfg, params, x)
  det2, _ = apply(cfg, params, x)
  drop, _ = apply(cfg, params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(det["lm"], det2["lm"])
  assert not np.allclose(det["lm"], drop["lm"])
