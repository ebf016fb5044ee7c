"""RLOO and GRPO against beta (their KL coefficient), three seeds, on one SFT and RM.

  rlhf-jax sweep --config configs/sweeps/rloo.py --workdir runs/rloo_beta

Each point trains both stages (configs/rloo.py) at one beta and seed (`rloo.seed`,
`grpo.seed`: sampling and minibatch order) and evaluates both policies. Not a vmapped
group (`--vmap` groups PPO only; RLOO / GRPO have no `group` module): the points train one
after another, or N at a time with `--workers N`.
"""

from configs import rloo

STAGES = ("rloo", "grpo")
METRICS = tuple(
  f"policies.{p}.{m}"
  for p in ("rloo", "grpo")
  for m in ("winrate_vs_sft", "gold_score", "kl_to_sft", "heldout_lm_loss")
)


def get_config(arg=None):
  return rloo.get_config(arg)


def get_hyper(h):
  return h.product(
    [
      h.zipit(
        [
          h.sweep("config.rloo.kl_coef", [0.03, 0.1, 0.3]),
          h.sweep("config.grpo.kl_coef", [0.03, 0.1, 0.3]),
        ]
      ),
      h.zipit([h.sweep("config.rloo.seed", [0, 1, 2]), h.sweep("config.grpo.seed", [0, 1, 2])]),
    ]
  )
