"""Jit-compiled sampler with a KV cache.

Prompts come LEFT-padded (`tokenizer.pad_left`), so after one prefill every row's next
token goes to the same cache slot and a decode step is one `[B, 1]` forward pass. Rows
keep their own RoPE positions (a left-padded prompt sees the positions an unpadded one
would) and padding is masked by segment id 0.

`sample` returns, for `N = max_new_tokens`:
  tokens   int32[B, N]  sampled ids; PAD after a row's EOS
  logprobs f32[B, N]    log-prob of each sampled id under the model's own distribution,
                        `log_softmax(logits)` (no temperature / top-k / top-p), 0 on pad;
                        the behaviour policy's log-probs PPO needs at temperature 1
  mask     bool[B, N]   True for response tokens, the EOS included
  lengths  int32[B]     number of response tokens (`mask.sum(-1)`)

It compiles once per (model, prompt shape, N, top_k, top-p on/off, use_cache); the
temperature and top-p values are traced, so changing them does not recompile.

Where its time goes on CPU (issue 11, README "Benchmarks"): the prefill is one forward
of the prompts that attends over their P slots and computes logits at the last position
only; a decode step writes one slot of each layer's KV cache in place (the cache is
[B, Hkv, S, D], the layout the attention dots read). What is left per step is the [B, E]
weight matmuls, reading the whole cache (bandwidth), and the Gumbel noise (V threefry
draws per row); tokens are those `jax.random.categorical` draws for the same rng.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.models import Transformer, TransformerConfig, init_cache
from rlhf_jax.models.transformer import grow_cache
from rlhf_jax.tokenizer import BOS_ID, PAD_ID, pad_left


class SampleOutput(NamedTuple):
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  lengths: jax.Array


def prompt_layout(prompt_tokens: jax.Array, pad_id: int = PAD_ID):
  """Segment ids (1 = token, 0 = pad), RoPE positions and lengths of left-padded prompts.

  A prompt runs from its first non-pad token on: where the pad id is also a piece of the
  vocabulary (id 0 of a byte-level BPE), the prompt may hold it after its start (a BOS
  or the chat template's first token)."""
  seg = (jnp.cumsum(prompt_tokens != pad_id, axis=1) > 0).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  return seg, positions, seg.sum(axis=1)


def filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
  """Top-k then nucleus (top-p) filtering; removed entries become -inf. logits: f[B, V]."""
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the top token always).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, axis=-1)` (the first maximum; the first NaN if there is one).

  XLA:CPU lowers argmax to a (value, index) reduce that does not vectorise; a max and a
  min over the indices that hold it are two plain reductions, which make a Gumbel draw
  at [64, 1024] about 3x faster. Same result, so sampling draws the same tokens.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  hit = (x == top) | jnp.isnan(x)
  return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


def _choose(rng, logits, temperature, top_k, top_p):
  """One token per row, and its log-prob under the unfiltered distribution."""

  def sampled():
    scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    # = jax.random.categorical(rng, scaled), with the faster argmax.
    return argmax(jax.random.gumbel(rng, scaled.shape, scaled.dtype) + scaled)

  # A cond, not a where: only one of the two runs (both do if the temperature is vmapped).
  token = jax.lax.cond(temperature > 0, sampled, lambda: argmax(logits)).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp


@functools.partial(
  jax.jit,
  static_argnames=(
    "cfg",
    "max_new_tokens",
    "top_k",
    "use_top_p",
    "use_cache",
    "stop_at_eos",
    "group",
  ),
)
def sample_tokens(
  params,
  prompt_tokens,
  rng,
  temperature,
  top_p,
  *,
  cfg: TransformerConfig,
  max_new_tokens: int,
  top_k: int,
  use_top_p: bool,
  use_cache: bool,
  stop_at_eos: bool,
  group: int = 1,
) -> SampleOutput:
  """The jitted sampler (what `sample` calls; jitted code such as PPO's rollout calls it
  directly). `temperature` and `top_p` are traced f32[] (changing them does not
  recompile); the keyword arguments are static. `group` > 1: that many samples of each
  prompt (rows `b * group + j`), the prompt prefilled once (see `sample`)."""
  model = Transformer(cfg)
  if group > 1 and not use_cache:
    prompt_tokens = jnp.repeat(prompt_tokens, group, axis=0)
  b, p = prompt_tokens.shape
  n = max_new_tokens
  seg, positions, lengths = prompt_layout(prompt_tokens)
  top_p = top_p if use_top_p else None

  if use_cache:
    # The prefill attends over the prompt's p slots only (not p + n), and computes the
    # logits of the last position only; the cache then grows by the n decode slots.
    out, cache = model.apply(
      {"params": params},
      prompt_tokens,
      positions,
      seg,
      cache=init_cache(cfg, b, p),
      cache_index=0,
      span=(p - 1, p),
    )
    cache = grow_cache(cache, n)
    if group > 1:
      # Each prompt's cache (and next-token logits) serve its `group` continuations.
      copies = lambda x: jnp.repeat(x, group, axis=0)
      cache, out, lengths = jax.tree.map(copies, cache), {"lm": copies(out["lm"])}, copies(lengths)
      b = b * group

    def step(cache, token, i):
      """Logits for the token after `token`, which sits at slot p + i - 1."""
      out, cache = model.apply(
        {"params": params},
        token[:, None],
        (lengths + i - 1)[:, None],
        jnp.ones((b, 1), jnp.int32),
        cache=cache,
        cache_index=p + i - 1,
      )
      return cache, out["lm"][:, 0]

  else:
    # No cache: every step re-runs the whole (fixed-size) buffer. Baseline for benchmarks.
    cache = {
      "tokens": jnp.concatenate([prompt_tokens, jnp.zeros((b, n), jnp.int32)], axis=1),
      "seg": jnp.concatenate([seg, jnp.zeros((b, n), jnp.int32)], axis=1),
    }
    full_pos = jnp.concatenate([positions, lengths[:, None] + jnp.arange(n)[None]], axis=1)
    out, _ = model.apply({"params": params}, prompt_tokens, positions, seg)

    def step(cache, token, i):
      slot = p + i - 1
      cache = {
        "tokens": jax.lax.dynamic_update_slice(cache["tokens"], token[:, None], (0, slot)),
        "seg": jax.lax.dynamic_update_slice(cache["seg"], jnp.ones((b, 1), jnp.int32), (0, slot)),
      }
      out, _ = model.apply({"params": params}, cache["tokens"], full_pos, cache["seg"])
      logits = jax.lax.dynamic_index_in_dim(out["lm"], slot, axis=1, keepdims=False)
      return cache, logits

  def emit(state, logits, i):
    """Sample token i from `logits`, write it, and update which rows are done."""
    tokens, logprobs, mask, done = state
    token, logp = _choose(jax.random.fold_in(rng, i), logits, temperature, top_k, top_p)
    live = ~done
    token = jnp.where(live, token, PAD_ID)
    tokens = tokens.at[:, i].set(token)
    logprobs = logprobs.at[:, i].set(jnp.where(live, logp, 0.0))
    mask = mask.at[:, i].set(live)
    if stop_at_eos:
      done = done | (token == cfg.eos_id)
    return (tokens, logprobs, mask, done), token

  state = (
    jnp.full((b, n), PAD_ID, jnp.int32),
    jnp.zeros((b, n), jnp.float32),
    jnp.zeros((b, n), bool),
    jnp.zeros((b,), bool),
  )
  state, token = emit(state, out["lm"][:, -1], 0)

  def cond(carry):
    i, _, _, state = carry
    return (i < n) & ~jnp.all(state[3])

  def body(carry):
    i, cache, token, state = carry
    cache, logits = step(cache, token, i)
    state, token = emit(state, logits, i)
    return i + 1, cache, token, state

  _, _, _, (tokens, logprobs, mask, _) = jax.lax.while_loop(
    cond, body, (jnp.asarray(1, jnp.int32), cache, token, state)
  )
  return SampleOutput(tokens, logprobs, mask, mask.sum(axis=1).astype(jnp.int32))


def sample(
  cfg: TransformerConfig,
  params,
  prompt_tokens: jax.Array,
  rng: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  stop_at_eos: bool = True,
  use_cache: bool = True,
  group: int = 1,
) -> SampleOutput:
  """Sample up to `max_new_tokens` per left-padded prompt (int32[B, P]).

  `temperature=0` is greedy; `stop_at_eos=False` always samples exactly
  `max_new_tokens` (EOS is then an ordinary token). `group` = k > 1 samples each prompt
  k times ([B * k, ...] outputs, prompt-major: row b * k + j is prompt b's j-th): the
  prompt is prefilled once and its KV cache copied to its k rows, so the prefill costs
  one row per prompt instead of k. The same as sampling `jnp.repeat(prompts, k, 0)`
  with the same rng (the decode steps are that call's, row for row).
  """
  return sample_tokens(
    params,
    jnp.asarray(prompt_tokens, jnp.int32),
    rng,
    jnp.asarray(temperature, jnp.float32),
    jnp.asarray(top_p, jnp.float32),
    cfg=cfg,
    max_new_tokens=int(max_new_tokens),
    top_k=int(top_k),
    use_top_p=float(top_p) < 1.0,
    use_cache=use_cache,
    stop_at_eos=stop_at_eos,
    group=int(group),
  )


def sample_prompts(
  cfg: TransformerConfig,
  params,
  prompts: Sequence[list[int]],
  rng: jax.Array,
  *,
  rows: int,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_p: float = 1.0,
  mesh=None,
  sample_fn=None,
) -> tuple[np.ndarray, np.ndarray]:
  """Replies to any number of prompts (token ids), `rows` prompts per sampler call.

  Returns their ids int32[N, max_new_tokens] and mask bool[N, max_new_tokens] (EOS
  included) on the host. Every call has `rows` rows (the last filled with one-token
  prompts) and its prompts left-padded to a multiple of 32 tokens, so the sampler
  compiles for few shapes; the call starting at prompt i draws from `fold_in(rng, i)`.
  With a `mesh`, each call's rows are split over its (data, fsdp) devices. `sample_fn`
  (params, batch, rng, *, max_new_tokens, temperature, top_p) -> SampleOutput replaces
  `sample` (best-of-n's: `stages/best_of_n.py`).
  """
  if sample_fn is None:
    sample_fn = functools.partial(sample, cfg)
  tokens = [np.zeros((0, max_new_tokens), np.int32)]
  masks = [np.zeros((0, max_new_tokens), bool)]
  for start in range(0, len(prompts), rows):
    chunk = list(prompts[start : start + rows])
    n = len(chunk)
    chunk += [[BOS_ID]] * (rows - n)
    length = -(-max(len(c) for c in chunk) // 32) * 32
    batch = pad_left(chunk, length)
    if mesh is not None:
      batch = sharding.put_batch({"t": batch}, mesh)["t"]
    out = sample_fn(
      params,
      batch,
      jax.random.fold_in(rng, start),
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
    )
    tokens.append(sharding.to_host(out.tokens)[:n])
    masks.append(sharding.to_host(out.mask)[:n])
  return np.concatenate(tokens), np.concatenate(masks)
