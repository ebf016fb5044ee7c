"""Many PPO runs in one vmapped program vs the same runs one after another.

  python experiments/bench_vmap.py                          # 8 runs, default size
  python experiments/bench_vmap.py --runs 4 --config configs/ppo.py:size=s

R runs that differ in beta and the learning rate (`settings.HPARAMS`) train either as one
`group.jit_group_step` call per iteration (states stacked on a run axis) or as R
calls of the single-run `iteration.jit_train_step`, on the same random parameters and prompts
as experiments/bench_ppo.py. Reported: steady-state episodes/s of both (compilation
excluded; the median over `--iters` iterations after one warm-up), the speed-up, the
compile times, and the wall time of R whole runs of `config.ppo.num_iterations` iterations
where each separate run compiles its own program (as separate processes do). Prints a
table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from bench_ppo import random_run  # (experiments/ is on sys.path when run as a script)

from rlhf_jax import config_lib, sharding
from rlhf_jax.stages.ppo import group, iteration, rollout


def _steps(step, state, batch, iters: int) -> tuple[float, float, object]:
  """(compile + first call s, median s per call over `iters` calls, final state)."""
  t = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return first, statistics.median(times), state


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/ppo.py")
  ap.add_argument("--runs", type=int, default=8)
  ap.add_argument("--iters", type=int, default=5)
  args, rest = ap.parse_known_args(argv)
  overrides, _ = config_lib.parse_overrides(rest)
  config = config_lib.get(args.config, overrides)
  c, runs = config.ppo, args.runs
  setup, models, batch = random_run(config, c)
  sections = []
  for r in range(runs):
    s = c.copy_and_resolve_references()
    s.kl_coef, s.optim.lr = 0.02 * (r + 1), 1e-4 * (1 + r % 3)
    sections.append(s)

  with sharding.use(setup.mesh, setup.rules):
    step = iteration.jit_train_step(setup, c)
    compile_1, one_s, _ = _steps(
      step, rollout.init_state(setup, sections[0], **models), batch, args.iters
    )
    states = [rollout.init_state(setup, s, **models) for s in sections]
    stack = jax.jit(
      lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
      out_shardings=group.stacked(setup.shardings, runs),
    )
    group_step = group.jit_group_step(setup, c, runs)
    compile_g, group_s, _ = _steps(group_step, stack(*states), batch, args.iters)

  n = c.num_iterations
  out = {
    "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
    "runs": runs,
    "episodes_per_iteration": c.batch_size,
    "params": int(sum(x.size for x in jax.tree.leaves(models["policy"]))),
    "sequential_s_per_iteration": one_s,
    "vmapped_s_per_iteration": group_s,
    "sequential_episodes_per_s": c.batch_size / one_s,
    "vmapped_episodes_per_s": runs * c.batch_size / group_s,
    "speedup": runs * one_s / group_s,
    "compile_s": {"single": compile_1 - one_s, "group": compile_g - group_s},
    "whole_runs_s": {
      "sequential": runs * (compile_1 - one_s + n * one_s),
      "vmapped": compile_g - group_s + n * group_s,
    },
  }
  out["whole_runs_speedup"] = out["whole_runs_s"]["sequential"] / out["whole_runs_s"]["vmapped"]
  print(
    f"device {out['device']}, jax {jax.__version__}; {out['params']:,} params; {runs} runs "
    f"x {c.batch_size} episodes x ({c.prompt_len} prompt + {c.max_new_tokens} new) tokens"
  )
  print(f"{'':28}{'s / iteration':>14}{'episodes/s':>12}{'compile s':>11}")
  print(
    f"{f'{runs} runs one after another':28}{runs * one_s:14.3f}"
    f"{out['sequential_episodes_per_s']:12.1f}{out['compile_s']['single']:11.1f}"
  )
  print(
    f"{f'{runs} runs vmapped':28}{group_s:14.3f}{out['vmapped_episodes_per_s']:12.1f}"
    f"{out['compile_s']['group']:11.1f}"
  )
  print(
    f"speed-up {out['speedup']:.2f}x; {runs} whole runs of {n} iterations (a compile each "
    f"when separate): {out['whole_runs_s']['sequential']:.0f} s vs "
    f"{out['whole_runs_s']['vmapped']:.0f} s ({out['whole_runs_speedup']:.2f}x)"
  )
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
