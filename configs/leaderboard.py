"""Every method of the leaderboard (experiments/leaderboard.py) in one config: the
default recipe (PPO) and the sections of configs/dpo.py, configs/rloo.py and
configs/best_of_n.py (DPO/IPO, RLOO, GRPO, best-of-n, expert iteration).

rlhf-jax pipeline --config configs/leaderboard.py:quick --workdir DIR   # every method once

Presets as configs/default.py (size=, runlocal, quick).
"""

from configs import best_of_n, default, dpo, rloo


def get_config(arg=None):
  c = default.get_config(arg).unlock()
  for extra in (dpo.get_config(arg), rloo.get_config(arg), best_of_n.get_config(arg)):
    for key in extra:
      if key not in c:
        c[key] = extra[key]
  return c.lock()
