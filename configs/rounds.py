"""Iterated rounds (rlhf_jax/stages/rounds.py): the default recipe, then comparisons on
each round's policy's conversations -> RM -> PPO again, as ChatGPT was trained.

rlhf-jax rounds   --config configs/rounds.py --workdir /tmp/rounds   # data .. SFT + rounds
rlhf-jax rounds   --config configs/rounds.py --config.rounds.num_rounds=4 --workdir DIR
rlhf-jax rounds   --config configs/rounds.py:runlocal --workdir /tmp/r   # test-sized
rlhf-jax pipeline --config configs/rounds.py --workdir DIR   # + the plain stages and eval

The label budget (config.rounds.label_budget, 0 = the world's 2,000 train prompts) is
split across the rounds; experiments/rounds.py compares 1, 2 and 4 rounds and the design
choices at an equal budget. Presets as configs/default.py (size=, runlocal, quick).
"""

from configs import default
from rlhf_jax.stages import rounds


def get_config(arg=None):
  c = default.get_config(arg).unlock()
  c.rounds = rounds.rounds_config()
  # Gold score and KL every 5 iterations: each round's over-optimisation curve.
  for section in ("ppo", "ppo_ptx"):
    c[section].log_every = 1
    c[section].eval_every = 5 if c[section].num_iterations > 10 else 2
  return c.lock()
