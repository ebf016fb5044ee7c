"""Best-of-n of SFT by the reward model (rlhf_jax/stages/best_of_n.py: no training) and
expert iteration, SFT on the policy's own best-of-n replies (stages/expert_iteration.py).

rlhf-jax pipeline  --config configs/best_of_n.py --workdir DIR   # the recipe + best-of-n
rlhf-jax best_of_n --config configs/best_of_n.py --workdir DIR   # DIR has SFT and the RM
rlhf-jax best_of_n --config configs/best_of_n.py --config.best_of_n.n=64 --workdir D2
rlhf-jax expert_iteration --config configs/best_of_n.py --workdir DIR

Presets as configs/default.py (size=, runlocal, quick). A separate file because the
default pipeline does not run it (its results stay those of the recipe).
"""

from configs import common, default
from rlhf_jax.stages import best_of_n, expert_iteration


def get_config(arg=None):
  preset = common.parse_arg(arg, size="tiny", runlocal=False, quick=False)
  c = default.get_config(arg).unlock()
  c.best_of_n = best_of_n.best_of_n_config(runlocal=preset.runlocal)
  # PPO's prompt length and eval's reply length: the curve predicts what eval measures
  c.best_of_n.prompt_len, c.best_of_n.max_new_tokens = c.ppo.prompt_len, c.eval.max_new_tokens
  c.expert_iteration = expert_iteration.expert_iteration_config(runlocal=preset.runlocal)
  ei = c.expert_iteration
  ei.prompt_len, ei.max_new_tokens = c.ppo.prompt_len, c.eval.max_new_tokens
  return c.lock()
