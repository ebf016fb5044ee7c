"""Sampler: greedy == step-by-step argmax, log-probs, EOS handling, one compile, meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from rlhf_jax import sampling, sharding
from rlhf_jax.models import TransformerConfig, apply, init_params
from rlhf_jax.tokenizer import EOS_ID, PAD_ID, pad_left

CFG = TransformerConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64)
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 10, 11, 12]]


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))[0]


_apply = jax.jit(apply, static_argnums=0)  # one compile per shape, not op by op


def _logits_alone(params, seqs):
  """f32[len(seq), V] of each sequence as if alone: its own row, right-padded (padding
  after a causal sequence changes none of its positions), all rows in one call."""
  n = max(len(s) for s in seqs)
  tokens, seg = np.zeros((len(seqs), n), np.int32), np.zeros((len(seqs), n), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)], seg[i, : len(s)] = s, 1
  pos = np.broadcast_to(np.arange(n, dtype=np.int32), tokens.shape)
  out, _ = _apply(CFG, params, tokens, pos, seg)
  return [np.asarray(out["lm"][i, : len(s)]) for i, s in enumerate(seqs)]


def test_greedy_equals_stepwise_argmax_and_logprobs(params):
  out = sampling.sample(
    CFG,
    params,
    pad_left(PROMPTS),
    jax.random.key(1),
    max_new_tokens=6,
    temperature=0.0,
    stop_at_eos=False,
  )
  seqs = [list(p) + [int(t) for t in out.tokens[b]] for b, p in enumerate(PROMPTS)]
  # Each position's logits come only from the tokens before it: every generated token is
  # the argmax after the prompt and the tokens generated before it.
  for b, (prompt, logits) in enumerate(zip(PROMPTS, _logits_alone(params, seqs), strict=True)):
    for i in range(6):
      step = logits[len(prompt) - 1 + i]
      nxt = int(np.argmax(step))
      assert int(out.tokens[b, i]) == nxt
      np.testing.assert_allclose(out.logprobs[b, i], jax.nn.log_softmax(step)[nxt], atol=1e-5)
  assert bool(out.mask.all())


def test_top_k_1_equals_greedy(params):
  kw = dict(max_new_tokens=5, stop_at_eos=False)
  greedy = sampling.sample(CFG, params, pad_left(PROMPTS), jax.random.key(1), temperature=0, **kw)
  top1 = sampling.sample(CFG, params, pad_left(PROMPTS), jax.random.key(7), top_k=1, **kw)
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)


def test_sampled_logprobs_equal_full_forward_log_softmax(params):
  out = sampling.sample(
    CFG,
    params,
    pad_left(PROMPTS),
    jax.random.key(3),
    max_new_tokens=5,
    temperature=1.3,
    top_p=0.9,
    stop_at_eos=False,
  )
  seqs = [list(p) + [int(t) for t in out.tokens[b]] for b, p in enumerate(PROMPTS)]
  for b, (seq, full) in enumerate(zip(seqs, _logits_alone(params, seqs), strict=True)):
    logp = jax.nn.log_softmax(full, axis=-1)
    p = len(PROMPTS[b])
    want = [logp[p - 1 + i, seq[p + i]] for i in range(5)]
    np.testing.assert_allclose(out.logprobs[b], want, atol=1e-5)


def test_uncached_sampler_matches_cached(params):
  kw = dict(max_new_tokens=5, temperature=1.0, stop_at_eos=False)
  a = sampling.sample(CFG, params, pad_left(PROMPTS), jax.random.key(4), **kw)
  b = sampling.sample(CFG, params, pad_left(PROMPTS), jax.random.key(4), use_cache=False, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_group_sampling_equals_k_separate_samples(params, use_cache):
  """k samples of each prompt from one prefill are the samples of the prompts repeated k
  times, drawn with the same rng: same tokens, masks and (to rounding) log-probs."""
  kw = dict(max_new_tokens=7, temperature=1.0, use_cache=use_cache)
  prompts = pad_left(PROMPTS)
  got = sampling.sample(CFG, params, prompts, jax.random.key(5), group=4, **kw)
  want = sampling.sample(CFG, params, np.repeat(prompts, 4, axis=0), jax.random.key(5), **kw)
  assert got.tokens.shape == (len(PROMPTS) * 4, 7)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.mask, want.mask)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  # (the k samples of a prompt differ: the rows are not copies of one draw)
  assert len({tuple(r) for r in np.asarray(got.tokens)[:4]}) > 1


def test_rows_stop_at_eos_and_are_masked_after(params):
  """Same rng with and without stopping: identical up to each row's first EOS, then pad."""
  prompts = pad_left([[1, 5 + i, 7, 8][: 2 + i % 3] for i in range(8)])
  kw = dict(max_new_tokens=48, temperature=1.0)
  free = sampling.sample(CFG, params, prompts, jax.random.key(5), stop_at_eos=False, **kw)
  out = sampling.sample(CFG, params, prompts, jax.random.key(5), **kw)
  free_toks, toks, mask = map(np.asarray, (free.tokens, out.tokens, out.mask))
  rows_with_eos = 0
  for b in range(prompts.shape[0]):
    eos = np.flatnonzero(free_toks[b] == EOS_ID)
    end = eos[0] + 1 if eos.size else 48
    rows_with_eos += bool(eos.size)
    np.testing.assert_array_equal(toks[b, :end], free_toks[b, :end])
    np.testing.assert_allclose(out.logprobs[b, :end], free.logprobs[b, :end], atol=1e-6)
    assert mask[b, :end].all() and not mask[b, end:].any()
    assert (toks[b, end:] == PAD_ID).all() and (np.asarray(out.logprobs)[b, end:] == 0).all()
    assert int(out.lengths[b]) == end
  assert rows_with_eos >= 2  # the seed is chosen so the test exercises stopping


def test_compiles_once_per_shape(params):
  sampling.sample_tokens.clear_cache()
  for t in (0.7, 1.0, 1.5):
    sampling.sample(
      CFG, params, pad_left(PROMPTS), jax.random.key(0), max_new_tokens=4, temperature=t, top_p=0.9
    )
  assert sampling.sample_tokens._cache_size() == 1


def test_filter_logits_top_p_hand_computed():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = sampling.filter_logits(logits, 0, jnp.asarray(0.8))
  # Mass before each token: 0, .5, .8, .95 -> keep the first two (< 0.8).
  assert np.isfinite(np.asarray(kept)).tolist() == [[True, True, False, False]]
  kept = sampling.filter_logits(logits, 3, None)
  assert np.isfinite(np.asarray(kept)).tolist() == [[True, True, True, False]]


def test_argmax_equals_jnp_argmax_with_ties_infs_and_nans():
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 3, (64, 257)).astype(np.float32)  # many ties
  x[1] = -np.inf
  x[2, 7] = x[2, 100] = np.inf
  x[3, [5, 9]] = np.nan
  x[4] = np.nan
  np.testing.assert_array_equal(sampling.argmax(jnp.asarray(x)), jnp.argmax(jnp.asarray(x), -1))


def test_draws_equal_jax_random_categorical(params):
  """The sampler's Gumbel-max (with its own argmax) is `jax.random.categorical` draw for
  draw: the same rng gives the same tokens."""
  logits = jax.random.normal(jax.random.key(0), (16, CFG.vocab_size)) * 3
  for i in range(4):
    rng = jax.random.fold_in(jax.random.key(2), i)
    got, _ = sampling._choose(rng, logits, jnp.float32(1.0), 0, None)
    np.testing.assert_array_equal(got, jax.random.categorical(rng, logits, axis=-1))


def test_sample_on_8_device_mesh_equals_single_device():
  """Under a (data, fsdp, tensor) = (2, 2, 2) mesh with the logical-axis rules (KV cache
  over data x fsdp and tensor) the sampler draws the same tokens as on one device."""
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  cfg = dataclasses.replace(CFG, vocab_size=64)  # divisible by the tensor axis
  prompts = pad_left([[1, 5 + i, 7, 8, 9][: 2 + i % 4] for i in range(8)])
  kw = dict(max_new_tokens=6, temperature=1.0, stop_at_eos=False)
  want = sampling.sample(
    cfg, init_params(cfg, jax.random.key(0))[0], prompts, jax.random.key(9), **kw
  )
  mcfg = common.mesh_config()
  mcfg.data, mcfg.fsdp, mcfg.tensor = 2, 2, 2
  mesh, rules = sharding.make_mesh(mcfg), sharding.rules(mcfg)
  params, _ = init_params(cfg, jax.random.key(0), mesh, rules)
  batch = sharding.put_batch({"p": np.asarray(prompts)}, mesh)["p"]
  with sharding.use(mesh, rules):
    got = sampling.sample(cfg, params, batch, jax.random.key(9), **kw)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
