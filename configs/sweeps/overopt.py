"""Reward over-optimisation (Gao et al. 2022): proxy RM score and gold score along PPO
training, for reward models trained on 250 and on all 2,000 comparisons.

  rlhf-jax sweep --config configs/sweeps/overopt.py --workdir runs/overopt

PPO without a KL penalty (beta 0) for 80 iterations, the gold score of its temperature-1
replies to 128 validation prompts every 5 iterations, three seeds per reward model.
experiments/overoptimization.py plots both scores against sqrt(KL to SFT).
"""

from configs import default

STAGES = ("ppo",)
METRICS = (
  "rm.val_accuracy",
  "policies.ppo.winrate_vs_sft",
  "policies.ppo.gold_score",
  "policies.ppo.kl_to_sft",
)


def get_config(arg=None):
  c = default.get_config(arg)
  c.ppo.kl_coef = 0.0
  c.ppo.num_iterations = 80
  c.ppo.eval_every = 5
  c.ppo.eval_prompts = 128
  c.ppo.log_every = 5
  return c


def get_hyper(h):
  return h.product(
    [h.sweep("config.rm.max_comparisons", [250, 2000]), h.sweep("config.ppo.seed", [0, 1, 2])]
  )
