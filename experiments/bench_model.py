"""Model benchmark: matmul peak, train-step MFU, sampler throughput with / without cache.

  python experiments/bench_model.py                 # the issue's shapes, ~3 min on 2 cores
  python experiments/bench_model.py --quick         # smaller sampler run

Prints, from one run on one machine:
  * a measured f32 matmul peak (best of several square sizes), the denominator of MFU;
  * train-step MFU of the LM (AdamW, next-token loss) at d_model 256, 4 layers, seq 128,
    batch 16, vocab 1024: model FLOPs (6 x matmul params x tokens + causal-attention
    score/value FLOPs, forward + backward) per second over that peak;
  * sampler throughput (new tokens/s) for batch 64 x 128 new tokens, with the KV cache
    and without it (re-running the full prefix every step).
A final JSON line carries the same figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import sampling
from rlhf_jax.models import TransformerConfig, apply, count_params, init_params
from rlhf_jax.stages import lm


def timeit(fn, *args, repeats: int, warmup: int = 1) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return times


def matmul_peak(sizes=(512, 1024, 2048), repeats: int = 5) -> tuple[float, int]:
  """Best f32 GFLOP/s of a jitted square matmul (median over repeats, best over sizes)."""
  best, best_n = 0.0, 0
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    t = statistics.median(timeit(f, a, b, repeats=repeats))
    gflops = 2 * n**3 / t / 1e9
    if gflops > best:
      best, best_n = gflops, n
  return best, best_n


def bench_train(cfg: TransformerConfig, batch: int, seq: int, repeats: int):
  params, _ = init_params(cfg, jax.random.key(0))
  opt = optax.adamw(1e-3)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, seq)))

  def loss_fn(p, tokens):
    logits = apply(cfg, p, tokens)[0]["lm"][:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, s, tokens):
    loss, g = jax.value_and_grad(loss_fn)(p, tokens)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = (params, opt.init(params))
  t0 = time.perf_counter()
  jax.block_until_ready(step(*state, tokens))
  compile_s = time.perf_counter() - t0

  def run(state):
    p, s, _ = step(*state, tokens)
    return p, s

  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state = jax.block_until_ready(run(state))
    times.append(time.perf_counter() - t)
  return statistics.median(times), compile_s


def bench_sampler(cfg, batch: int, prompt_len: int, new: int, use_cache: bool, repeats: int):
  params, _ = init_params(cfg, jax.random.key(0))
  prompts = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, prompt_len))
  kw = dict(max_new_tokens=new, temperature=1.0, stop_at_eos=False, use_cache=use_cache)
  run = lambda: sampling.sample(cfg, params, prompts, jax.random.key(1), **kw).tokens
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - t0
  times = timeit(run, repeats=repeats, warmup=0)
  return batch * new / statistics.median(times), compile_s


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--mlp", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--sample-batch", type=int, default=64)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--quick", action="store_true", help="uncached sampler on 32 tokens only")
  args = ap.parse_args()

  cfg = TransformerConfig(
    vocab_size=args.vocab,
    d_model=args.d_model,
    n_layers=args.layers,
    n_heads=args.heads,
    n_kv_heads=args.heads,
    mlp_dim=args.mlp,
    dtype=args.dtype,
  )
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}")
  peak, peak_n = matmul_peak()
  print(f"matmul peak (f32, {peak_n}x{peak_n}): {peak:8.1f} GFLOP/s")

  n_params = count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))[0]))
  step_s, compile_s = bench_train(cfg, args.batch, args.seq, args.repeats)
  flops = lm.model_flops_per_step(cfg, args.batch, args.seq)
  mfu = flops / step_s / 1e9 / peak
  tok_s = args.batch * args.seq / step_s
  print(
    f"train step: {n_params:,} params, batch {args.batch} x seq {args.seq}: "
    f"{step_s * 1e3:.1f} ms/step, {tok_s:,.0f} tokens/s, {flops / step_s / 1e9:.1f} GFLOP/s, "
    f"MFU {100 * mfu:.1f}% (compile {compile_s:.1f}s)"
  )

  cached, c_compile = bench_sampler(
    cfg, args.sample_batch, args.prompt_len, args.new_tokens, True, repeats=3
  )
  new_uncached = 32 if args.quick else args.new_tokens
  uncached, u_compile = bench_sampler(
    cfg, args.sample_batch, args.prompt_len, new_uncached, False, repeats=1
  )
  print(
    f"sampler, batch {args.sample_batch} x {args.new_tokens} new tokens: "
    f"KV cache {cached:,.0f} tokens/s (compile {c_compile:.1f}s); "
    f"no cache ({new_uncached} new) {uncached:,.0f} tokens/s; speed-up {cached / uncached:.1f}x"
  )
  print(
    json.dumps(
      {
        "device": f"{dev.platform}:{dev.device_kind}",
        "matmul_peak_gflops": round(peak, 1),
        "train_params": n_params,
        "train_step_ms": round(step_s * 1e3, 2),
        "train_tokens_per_s": round(tok_s),
        "train_mfu": round(mfu, 4),
        "sampler_cached_tokens_per_s": round(cached),
        "sampler_uncached_tokens_per_s": round(uncached),
        "sampler_speedup": round(cached / uncached, 1),
      }
    )
  )


if __name__ == "__main__":
  main()
