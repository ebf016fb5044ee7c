"""DPO and IPO against their beta, three seeds, on one SFT and one set of comparisons.

  rlhf-jax sweep --config configs/sweeps/dpo.py --workdir runs/dpo_beta

Each point is the `dpo` stage (configs/dpo.py; `dpo.seed`: the order of the
comparisons) evaluated on the held-out prompts; the table: gold win rate against SFT,
gold score, KL to SFT and held-out LM loss, mean ± 95% CI over seeds. DPO is not a
vmapped group (`--vmap` groups PPO only): the points train one after another, or N at a
time with `--workers N`. experiments/leaderboard.py selects on a dev split instead.
"""

from configs import dpo

STAGES = ("dpo",)
METRICS = (
  "policies.dpo.winrate_vs_sft",
  "policies.dpo.gold_score",
  "policies.dpo.kl_to_sft",
  "policies.dpo.heldout_lm_loss",
)


def get_config(arg=None):
  return dpo.get_config(arg)


def get_hyper(h):
  return h.product(
    [
      h.sweep("config.dpo.loss", ["dpo", "ipo"]),
      h.sweep("config.dpo.beta", [0.03, 0.1, 0.3, 1.0]),
      h.sweep("config.dpo.seed", [0, 1, 2]),
    ]
  )
