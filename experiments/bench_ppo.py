"""Throughput of one PPO iteration and where its time goes.

  python experiments/bench_ppo.py                         # configs/ppo.py (default size)
  python experiments/bench_ppo.py --config configs/ppo.py:size=s --iters 3

Times, side by side, three jit-compiled functions on the same prompts and parameters:

  sample     the KV-cache sampler alone (`sampling._sample`, as the rollout calls it)
  rollout    sample + reference log-probs + values + RM score (one forward each)
  iteration  the whole `ppo.train_step`: rollout + rewards + GAE + the update
             (num_epochs x num_minibatches policy and value steps)

and, as the reference for the update, a plain LM train step of the policy on one
minibatch of prompt + response rows (`lm.train_step`) times the updates per iteration.

It reports episodes/s of the iteration, with the shares of sampling, scoring (rollout -
sample) and the update (iteration - rollout). Parameters are random (the RM and value
are a scalar-head model, the reference a copy of the policy): a random policy never
emits EOS, so every response runs to max_new_tokens — the sampler's worst case.
Prompts are random tokens, left-padded, 16..prompt_len long. Prints a table and, last,
one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_lib, sampling, sharding, train_lib
from rlhf_jax.models import init_params
from rlhf_jax.stages import lm, ppo


def _time(fn, *args, iters: int) -> tuple[float, float]:
  """(compile + first call seconds, mean seconds per call over `iters` calls)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(fn(*args))
  return first, (time.perf_counter() - t) / iters


def random_run(config, c):
  """(setup, models, batch) of a PPO run with random parameters and random prompts:
  `models` are `ppo.init_state`'s keyword arguments (the RM and value a scalar-head
  model, the reference the policy)."""
  setup = ppo.make_setup(config, c)
  cfg = setup.model_cfg
  policy, _ = init_params(cfg, jax.random.PRNGKey(0), setup.mesh, setup.rules)
  scalar, _ = init_params(cfg, jax.random.PRNGKey(1), setup.mesh, setup.rules, ("scalar",))
  models = {"policy": policy, "value": scalar, "ref": policy, "reward": scalar}
  rng = np.random.default_rng(0)
  lengths = rng.integers(16, c.prompt_len + 1, c.batch_size)
  prompts = np.zeros((c.batch_size, c.prompt_len), np.int32)
  for i, n in enumerate(lengths):
    prompts[i, c.prompt_len - n :] = [1, *rng.integers(4, cfg.vocab_size, n - 1)]
  return setup, models, sharding.put_batch({"prompt_tokens": prompts}, setup.mesh)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/ppo.py")
  ap.add_argument("--iters", type=int, default=5)
  args, rest = ap.parse_known_args(argv)
  overrides, _ = config_lib.parse_overrides(rest)
  config = config_lib.get(args.config, overrides)
  c = config.ppo
  setup, models, batch = random_run(config, c)
  cfg, policy = setup.model_cfg, models["policy"]
  state = ppo.init_state(setup, c, **models)
  rng = np.random.default_rng(1)
  key = jax.random.PRNGKey(0)

  sample = jax.jit(lambda params, p: sampling._sample(
    params, p, key, jnp.float32(c.temperature), jnp.float32(c.top_p), cfg=cfg,
    max_new_tokens=c.max_new_tokens, top_k=c.top_k, use_top_p=c.top_p < 1.0, use_cache=True,
    stop_at_eos=True,
  ))  # fmt: skip
  rollout = jax.jit(functools.partial(ppo.rollout, model_cfg=cfg, c=c))
  step = ppo.jit_train_step(setup, c)
  # The reference for the update: a plain LM train step of the policy on one minibatch
  # of prompt + response rows (`lm.train_step`), times the updates per iteration.
  mb_rows, seq = c.batch_size // c.num_minibatches, c.prompt_len + c.max_new_tokens
  lm_state = train_lib.TrainState.create(jax.tree.map(jnp.copy, policy), setup.policy_tx, key)
  lm_batch = {
    "tokens": jnp.asarray(rng.integers(4, cfg.vocab_size, (mb_rows, seq)), jnp.int32),
    "segment_ids": jnp.ones((mb_rows, seq), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (mb_rows, seq)),
    "loss_mask": jnp.ones((mb_rows, seq), jnp.float32),
  }
  lm_step = jax.jit(functools.partial(
    lm.train_step, model_cfg=cfg, tx=setup.policy_tx, schedule=lambda s: 0.0
  ))  # fmt: skip
  with sharding.use(setup.mesh, setup.rules):
    compile_s, sample_s = _time(sample, state.policy, batch["prompt_tokens"], iters=args.iters)
    compile_r, rollout_s = _time(
      rollout, state, batch["prompt_tokens"], key, iters=args.iters
    )  # fmt: skip
    _, lm_step_s = _time(lambda: lm_step(lm_state, lm_batch), iters=args.iters)
    # The state is threaded through (train_step donates it), as in training.
    box = [state]

    def iteration():
      box[0], metrics = step(box[0], batch)
      return metrics

    compile_i, iteration_s = _time(iteration, iters=args.iters)
  updates = c.num_epochs * c.num_minibatches
  tokens = c.batch_size * c.max_new_tokens
  out = {
    "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
    "params": int(sum(x.size for x in jax.tree.leaves(policy))),
    "batch": c.batch_size,
    "prompt_len": c.prompt_len,
    "max_new_tokens": c.max_new_tokens,
    "updates_per_iteration": c.num_epochs * c.num_minibatches,
    "sample_s": sample_s,
    "rollout_s": rollout_s,
    "iteration_s": iteration_s,
    "episodes_per_s": c.batch_size / iteration_s,
    "sample_episodes_per_s": c.batch_size / sample_s,
    "sample_tokens_per_s": tokens / sample_s,
    "share_sample": sample_s / iteration_s,
    "share_score": (rollout_s - sample_s) / iteration_s,
    "share_update": (iteration_s - rollout_s) / iteration_s,
    "lm_step_s": lm_step_s,
    "lm_steps_s": updates * lm_step_s,
    "compile_s": {"sample": compile_s, "rollout": compile_r, "iteration": compile_i},
  }
  print(f"device {out['device']}, jax {jax.__version__}; {out['params']:,} params; "
        f"{c.batch_size} episodes x ({c.prompt_len} prompt + {c.max_new_tokens} new) tokens; "
        f"{out['updates_per_iteration']} updates / iteration")  # fmt: skip
  print(f"{'':12}{'s / call':>10}{'episodes/s':>12}{'share':>8}")
  rows = [
    ("sample", sample_s, out["share_sample"]),
    ("score", rollout_s - sample_s, out["share_score"]),
    ("update", iteration_s - rollout_s, out["share_update"]),
    ("iteration", iteration_s, 1.0),
  ]
  for name, s, share in rows:
    print(f"{name:12}{s:10.3f}{c.batch_size / s:12.1f}{share:8.1%}")
  print(f"reference: {updates} plain LM train steps of the policy on {mb_rows} x {seq} tokens "
        f"(lm.train_step) {updates * lm_step_s:.3f} s vs the update "
        f"{iteration_s - rollout_s:.3f} s (policy + value)")  # fmt: skip
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
