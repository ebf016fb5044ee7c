"""Per-stage training throughput: tokens/s and MFU of each stage's jitted train step.

  python experiments/bench_stages.py                      # configs/default.py (tiny)
  python experiments/bench_stages.py --config configs/default.py:size=s

Runs the real `train_step` of pretraining, SFT (dropout on) and the reward model on
batches of the configured shapes (random tokens; the steps do not look at content),
on the config's mesh, and reports, against an f32 matmul peak measured in the same
run: step time, tokens/s, achieved GFLOP/s and MFU. FLOPs: 6 x matmul parameters x
tokens + attention (forward + backward); the RM counts its scalar head, not the LM head.
The RM runs in both layouts on the same number of comparisons per step: `rm` padded
(K x seq_len per comparison) and `rm_packed` (one row of packed_len; the `packed` line
gives the step-time ratio). Token slots are counted, padding included. A final JSON
line carries the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, ".")

from experiments.bench_model import matmul_peak  # noqa: E402
from rlhf_jax import config_lib, sharding  # noqa: E402
from rlhf_jax.stages import common, lm, rm  # noqa: E402
from rlhf_jax.train import optim  # noqa: E402


def lm_batch(rng, batch, seq, vocab):
  return {
    "tokens": rng.integers(4, vocab, (batch, seq)).astype(np.int32),
    "segment_ids": np.ones((batch, seq), np.int32),
    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    "loss_mask": np.ones((batch, seq), np.float32),
  }


def rm_batch(rng, batch, k, seq, vocab):
  shape = (batch, k, seq)
  return {
    "tokens": rng.integers(4, vocab, shape).astype(np.int32),
    "segment_ids": np.ones(shape, np.int32),
    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), shape).copy(),
    "last_index": np.full((batch, k), seq - 1, np.int32),
    "rank": np.broadcast_to(np.arange(k, dtype=np.int32), (batch, k)).copy(),
  }


def rm_packed_batch(rng, batch, k, length, vocab):
  """A prompt of length // (2k) tokens, then k responses sharing the rest."""
  p = length // (2 * k)
  seg = np.concatenate([[1] * p, np.repeat(2 + np.arange(k), (length - p) // k)])
  seg = np.pad(seg, (0, length - len(seg)))
  ends = np.flatnonzero(np.diff(np.append(seg, -1)))[1 : k + 1]
  return {
    "tokens": rng.integers(4, vocab, (batch, length)).astype(np.int32),
    "segment_ids": np.broadcast_to(seg.astype(np.int32), (batch, length)).copy(),
    "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
    "last_index": np.broadcast_to(ends.astype(np.int32), (batch, k)).copy(),
    "rank": np.broadcast_to(np.arange(k, dtype=np.int32), (batch, k)).copy(),
  }


def time_steps(setup, step_fn, batch, repeats):
  put = sharding.put_batch(batch, setup.mesh)
  state = setup.state
  t0 = time.perf_counter()
  state, m = step_fn(state, put)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = step_fn(state, put)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return statistics.median(times), compile_s


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/default.py")
  ap.add_argument("--repeats", type=int, default=10)
  args, rest = ap.parse_known_args()
  overrides, _ = config_lib.parse_overrides(rest)
  config = config_lib.get(args.config, overrides)
  rng = np.random.default_rng(0)
  vocab = config.model.vocab_size
  dev = jax.devices()[0]
  print(f"device: {dev.platform} x{jax.device_count()}, model {config.model.size}")
  peak, n = matmul_peak()
  print(f"matmul peak (f32, {n}x{n}): {peak:.1f} GFLOP/s")
  rows = []

  for stage, sc, dropout in (
    ("pretrain", config.pretrain, 0.0),
    ("sft", config.sft, config.sft.dropout),
  ):
    setup = common.create_state(config, sc.optim, 100, dropout=dropout)
    step = common.jit_step(
      lm.train_step,
      setup,
      lm.LM_BATCH_NDIMS,
      model_cfg=setup.model_cfg,
      tx=setup.tx,
      schedule=optim.lr_schedule(sc.optim, 100),
      prefix=stage,
    )
    with sharding.use(setup.mesh, setup.rules):
      dt, comp = time_steps(
        setup, step, lm_batch(rng, sc.batch_size, sc.seq_len, vocab), args.repeats
      )
    tokens = sc.batch_size * sc.seq_len
    flops = lm.model_flops_per_step(setup.model_cfg, sc.batch_size, sc.seq_len)
    rows.append((stage, f"{sc.batch_size}x{sc.seq_len}", dt, comp, tokens, flops))

  c = config.rm
  k = c.max_responses
  packed_len = c.packed_len or k * c.seq_len
  layouts = (
    ("rm", rm.BATCH_NDIMS, rm_batch(rng, c.batch_size, k, c.seq_len, vocab), c.batch_size * k),
    (
      "rm_packed",
      rm.PACKED_BATCH_NDIMS,
      rm_packed_batch(rng, c.batch_size, k, packed_len, vocab),
      c.batch_size,
    ),
  )
  for name, ndims, batch, seqs in layouts:
    setup = rm.create_state(config, 100)
    step = common.jit_step(
      rm.train_step,
      setup,
      ndims,
      model_cfg=setup.model_cfg,
      tx=setup.tx,
      schedule=optim.lr_schedule(c.optim, 100),
    )
    with sharding.use(setup.mesh, setup.rules):
      dt, comp = time_steps(setup, step, batch, args.repeats)
    t = batch["tokens"].shape[-1]
    flops = lm.model_flops_per_step(setup.model_cfg, seqs, t, lm_head=False)
    shape = "x".join(str(d) for d in batch["tokens"].shape)
    rows.append((name, shape, dt, comp, seqs * t, flops))

  head = ("stage", "batch", "ms/step", "tokens/s", "GFLOP/s", "MFU", "compile")
  print("{:10s} {:>12s} {:>9s} {:>10s} {:>8s} {:>6s} {:>8s}".format(*head))
  out = {
    "device": f"{dev.platform}",
    "model": config.model.size,
    "matmul_peak_gflops": round(peak, 1),
  }
  for stage, shape, dt, comp, tokens, flops in rows:
    gf = flops / dt / 1e9
    mfu = 100 * gf / peak
    print(
      f"{stage:10s} {shape:>12s} {dt * 1e3:9.1f} {tokens / dt:10,.0f} {gf:8.1f} {mfu:5.1f}% ",
      end="",
    )
    print(f"{comp:7.1f}s")
    out[stage] = {"tokens_per_s": round(tokens / dt), "mfu": round(gf / peak, 4)}
    out[stage]["ms_per_step"] = round(dt * 1e3, 2)
  ratio = rows[-2][2] / rows[-1][2]
  print(f"packed: the RM step on {c.batch_size} comparisons {ratio:.2f}x faster than padded")
  out["rm_packed_speedup"] = round(ratio, 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
