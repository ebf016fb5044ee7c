"""Throughput of one PPO iteration and of its phases, against a matmul peak measured here.

  python experiments/bench_ppo.py                    # the issue-11 workload (below)
  python experiments/bench_ppo.py --iters 15         # more timed iterations
  python experiments/bench_ppo.py --config configs/ppo.py:size=m --config.ppo.batch_size=256
  python experiments/bench_ppo.py --workload config --config configs/ppo.py   # a config as is

Workloads:
  issue   (default) `configs/ppo.py:size=s` (4 layers, d_model 256, 4 heads, SwiGLU 1024,
          vocab 1024, f32; 4,720,896 parameters) with ppo.batch_size 64, prompt_len 32,
          max_new_tokens 32, temperature 1, num_epochs 1, num_minibatches 4, kl_coef
          0.02; every prompt exactly prompt_len random tokens (no padding) and EOS never
          ends a row, so every episode has exactly max_new_tokens new tokens. `--config`
          and `--config.x=y` still apply (on top), e.g. for a larger model or batch.
  config  the config as given: prompts of 16..prompt_len random tokens, left-padded, and
          the rollout's own EOS stop (a random policy rarely emits EOS).

Policy, reference, value and reward are four separately initialised random models of
the config's size (value and reward with the scalar head). Three jit-compiled functions
are timed on the same prompts, interleaved with a jitted 2048x2048 @ 2048x2048 f32
matmul (the peak), one call of each per round, `--iters` rounds (>= 7) after 2 warm-up
rounds; every figure is the median over the rounds:

  sample     `sampling.sample_tokens` alone, as the rollout calls it -> generation
  rollout    sample + reference log-probs + values + RM score       -> scoring = rollout - sample
  iteration  `iteration.jit_train_step`: rollout + rewards + GAE + update
                                                                   -> update = iteration - rollout

FLOPs are counted from the model's shapes, not measured: a matmul of [m, k] x [k, n] is
2mkn, counted where our code runs it (every projection and the MLP of every token fed
through the trunk; the LM head where logits are computed: the prefill's last position
and each decode step in generation, the N positions that predict the response for the
reference and in the policy update; the scalar heads and the embedding gather are not counted);
attention counts the useful causal (query, key) pairs, 4 x layers x heads x head_dim
FLOPs each (QK^T and PV), not the masked slots the decode step also reads. Generation
feeds the B x P prompt tokens (prefill) and then B x (N - 1) sampled tokens through the
model; training is 3x the forward (forward + backward), for the policy and the value
model on every row once per epoch. GFLOP/s of a phase = its FLOPs / its median seconds;
"peak" = the matmul's median GFLOP/s in the same rounds. Prints a table, compile times
and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_lib, sampling, sharding
from rlhf_jax.models import TransformerConfig, count_params, init_params
from rlhf_jax.stages.ppo import iteration, rollout

ISSUE_CONFIG = "configs/ppo.py:size=s"
ISSUE_OVERRIDES = [
  ("ppo.batch_size", "64"),
  ("ppo.prompt_len", "32"),
  ("ppo.max_new_tokens", "32"),
  ("ppo.temperature", "1.0"),
  ("ppo.top_k", "0"),
  ("ppo.top_p", "1.0"),
  ("ppo.num_epochs", "1"),
  ("ppo.num_minibatches", "4"),
  ("ppo.kl_coef", "0.02"),
]
PEAK_N = 2048


def jit_sampler(cfg, c, key, stop_at_eos: bool):
  """`(params, prompts) -> Sampled`: the PPO rollout's sampler call, jitted, for timing."""
  return jax.jit(
    lambda params, p: sampling.sample_tokens(
      params,
      p,
      key,
      jnp.float32(c.temperature),
      jnp.float32(c.top_p),
      cfg=cfg,
      max_new_tokens=c.max_new_tokens,
      top_k=c.top_k,
      use_top_p=c.top_p < 1.0,
      use_cache=True,
      stop_at_eos=stop_at_eos,
    )
  )


class NoEosSampling:
  """`sampling` as `rollout.rollout` sees it, with EOS an ordinary token
  (`stop_at_eos=False`): the issue's fixed-length episodes. The rollout has no switch for
  it (yet)."""

  def __getattr__(self, name):
    return getattr(sampling, name)

  @staticmethod
  def sample_tokens(*args, **kwargs):
    return sampling.sample_tokens(*args, **{**kwargs, "stop_at_eos": False})


def model_flops(cfg: TransformerConfig, tokens: int, keys: int, logits: int) -> float:
  """Forward FLOPs of `tokens` tokens through the trunk attending to `keys` (query, key)
  pairs in all, with the LM head on `logits` of them (see the module docstring)."""
  e, h, kv, d, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head, cfg.mlp_dim
  per_token = cfg.n_layers * (2 * e * h * d + 2 * e * kv * d + 3 * e * f)  # q, o, k, v, mlp
  attention = 4 * cfg.n_layers * h * d * keys
  return 2.0 * per_token * tokens + attention + 2.0 * e * cfg.vocab_size * logits


def phase_flops(cfg: TransformerConfig, c) -> dict[str, float]:
  """FLOPs of generation, scoring and update of one iteration at B x (P + N) tokens."""
  b, p, n = c.batch_size, c.prompt_len, c.max_new_tokens
  t = p + n
  causal = t * (t + 1) // 2  # (query, key) pairs of one full row
  # Prefill: the prompt causally; decode step i feeds the token at slot p + i - 1, which
  # attends to p + i keys.
  prefill = model_flops(cfg, b * p, b * p * (p + 1) // 2, b)
  decode = model_flops(cfg, b * (n - 1), b * sum(p + i for i in range(1, n)), b * (n - 1))
  # The LM head on the N positions that predict the response (`rollout.forward`).
  row = lambda lm: model_flops(cfg, b * t, b * causal, b * n if lm else 0)
  # Reference (LM head), value and reward (scalar heads); the policy's log-probs at
  # temperature 1 are the sampler's (no forward).
  score = row(True) + 2 * row(False) + (row(True) if c.temperature != 1.0 else 0.0)
  update = c.num_epochs * 3 * (row(True) + row(False))  # policy + value, forward + backward
  return {"generation": prefill + decode, "scoring": score, "update": update}


def random_run(config, c, full_prompts: bool):
  """(setup, models, batch): four random models (`rollout.init_state`'s keyword arguments)
  and random prompts, on the config's mesh."""
  setup = rollout.make_setup(config, c)
  cfg = setup.model_cfg
  init = lambda seed, heads: init_params(
    cfg, jax.random.PRNGKey(seed), setup.mesh, setup.rules, heads
  )[0]
  models = {
    "policy": init(0, rollout.POLICY_HEADS),
    "ref": init(1, rollout.POLICY_HEADS),
    "value": init(2, rollout.VALUE_HEADS),
    "reward": init(3, rollout.VALUE_HEADS),
  }
  rng = np.random.default_rng(0)
  b, p = c.batch_size, c.prompt_len
  if full_prompts:
    prompts = rng.integers(4, cfg.vocab_size, (b, p)).astype(np.int32)
  else:
    prompts = np.zeros((b, p), np.int32)
    for i, k in enumerate(rng.integers(16, p + 1, b)):
      prompts[i, p - k :] = [1, *rng.integers(4, cfg.vocab_size, k - 1)]
  return setup, models, sharding.put_batch({"prompt_tokens": prompts}, setup.mesh)


def report(out: dict) -> str:
  """The table `main` prints, from its JSON (`out`; README renders it: readme_tables.py)."""
  lines = [
    f"device {out['device']}, jax {out['jax']}; {out['params']:,} params x 4 models; "
    f"{out['batch']} episodes x ({out['prompt_len']} prompt + {out['max_new_tokens']} new) "
    f"tokens ({out['new_tokens']} new in all); {out['updates_per_iteration']} updates / "
    f"iteration; medians of {out['rounds']} rounds",
    f"matmul peak (f32, {PEAK_N}^3): {out['matmul_peak_gflop_per_s']:.1f} GFLOP/s",
    f"{'':12}{'s':>8}{'episodes/s':>12}{'tokens/s':>10}{'GFLOP':>8}{'GFLOP/s':>9}"
    f"{'of peak':>9}{'share':>8}",
  ]
  for name, r in out["phases"].items():
    tok = f"{r['new_tokens_per_s']:10,.0f}" if "new_tokens_per_s" in r else f"{'':10}"
    lines.append(
      f"{name:12}{r['s']:8.3f}{r['episodes_per_s']:12.1f}{tok}{r['gflop']:8.1f}"
      f"{r['gflop_per_s']:9.1f}{r['share_of_peak']:9.1%}{r['share_of_iteration']:8.1%}"
    )
  compile_s = ", ".join(f"{k} {v:.1f}" for k, v in out["compile_s"].items())
  return "\n".join([*lines, f"compile + first call (s): {compile_s}"])


def command_line(out: dict) -> str:
  """The command line that ran `out`'s measurement (as far as its JSON tells)."""
  args = ["python experiments/bench_ppo.py"]
  if out["workload"] != "issue":
    args.append(f"--workload {out['workload']}")
  if out["config"] != (ISSUE_CONFIG if out["workload"] == "issue" else "configs/ppo.py"):
    args.append(f"--config {out['config']}")
  return " ".join([*args, *out.get("overrides", []), f"--iters {out['rounds']}"])


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workload", choices=("issue", "config"), default="issue")
  ap.add_argument(
    "--config", default=None, help=f"default: {ISSUE_CONFIG} (issue), configs/ppo.py (config)"
  )
  ap.add_argument("--iters", type=int, default=9, help="timed rounds (>= 7)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed rounds after compiling")
  ap.add_argument("--out", default="", help="also write the JSON here (README renders it)")
  args, rest = ap.parse_known_args(argv)
  if args.iters < 7:
    ap.error("--iters: at least 7 (the figures are medians)")
  overrides, rest = config_lib.parse_overrides(rest)
  if rest:
    ap.error(f"unknown arguments: {rest}")
  issue = args.workload == "issue"
  spec = args.config or (ISSUE_CONFIG if issue else "configs/ppo.py")
  config = config_lib.get(spec, (ISSUE_OVERRIDES if issue else []) + overrides)
  c = config.ppo
  setup, models, batch = random_run(config, c, full_prompts=issue)
  cfg = setup.model_cfg
  if issue:
    rollout.sampling = NoEosSampling()  # before anything is traced
  key = jax.random.PRNGKey(0)
  prompts = batch["prompt_tokens"]
  state = rollout.init_state(setup, c, **models)

  sample = jit_sampler(cfg, c, key, stop_at_eos=not issue)
  rollout_fn = jax.jit(functools.partial(rollout.rollout, model_cfg=cfg, c=c))
  step = iteration.jit_train_step(setup, c)
  a = jnp.asarray(np.random.default_rng(2).standard_normal((PEAK_N, PEAK_N)), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  box = [state]  # train_step donates the state: thread it through, as in training

  def one_iteration():
    box[0], metrics = step(box[0], batch)
    return metrics

  fns = {
    "sample": lambda: sample(box[0].policy, prompts),
    "rollout": lambda: rollout_fn(box[0], prompts, key),
    "iteration": one_iteration,
    "matmul": lambda: matmul(a),
  }
  compile_s, times = {}, {k: [] for k in fns}
  with sharding.use(setup.mesh, setup.rules):
    for name, fn in fns.items():  # compile + first call
      t = time.perf_counter()
      jax.block_until_ready(fn())
      compile_s[name] = time.perf_counter() - t
    for r in range(args.warmup + args.iters):
      for name, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn())
        if r >= args.warmup:
          times[name].append(time.perf_counter() - t)
    lengths = np.asarray(jax.device_get(fns["sample"]().lengths))
  med = {k: float(np.median(v)) for k, v in times.items()}
  peak = 2 * PEAK_N**3 / med["matmul"] / 1e9
  flops = phase_flops(cfg, c)
  b, n = c.batch_size, c.max_new_tokens
  phase_s = {
    "generation": med["sample"],
    "scoring": med["rollout"] - med["sample"],
    "update": med["iteration"] - med["rollout"],
  }
  new_tokens = int(lengths.sum())
  rows = {}
  for name, s in phase_s.items():
    gflops = flops[name] / s / 1e9
    rows[name] = {
      "s": s,
      "episodes_per_s": b / s,
      "gflop": flops[name] / 1e9,
      "gflop_per_s": gflops,
      "share_of_peak": gflops / peak,
      "share_of_iteration": s / med["iteration"],
    }
  rows["generation"]["new_tokens_per_s"] = new_tokens / phase_s["generation"]
  total = sum(flops.values())
  rows["iteration"] = {
    "s": med["iteration"],
    "episodes_per_s": b / med["iteration"],
    "gflop": total / 1e9,
    "gflop_per_s": total / med["iteration"] / 1e9,
    "share_of_peak": total / med["iteration"] / 1e9 / peak,
    "share_of_iteration": 1.0,
  }
  out = {
    "workload": args.workload,
    "config": spec,
    "overrides": [f"--config.{k}={v}" for k, v in overrides],
    "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
    "jax": jax.__version__,
    "params": int(count_params(box[0].policy)),
    "batch": b,
    "prompt_len": c.prompt_len,
    "max_new_tokens": n,
    "new_tokens": new_tokens,
    "updates_per_iteration": c.num_epochs * c.num_minibatches,
    "rounds": args.iters,
    "matmul_peak_gflop_per_s": peak,
    "phases": rows,
    "episodes_per_s": b / med["iteration"],
    "new_tokens_per_s": rows["generation"]["new_tokens_per_s"],
    "median_s": med,
    "compile_s": compile_s,
  }
  print(report(out))
  print(json.dumps(out))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
