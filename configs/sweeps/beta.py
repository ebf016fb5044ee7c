"""beta ablation (InstructGPT Figs. 34 and 36): the KL coefficient of PPO, without ptx.

  rlhf-jax sweep --config configs/sweeps/beta.py --workdir runs/beta

One SFT and one reward model (the default world's), then PPO at each beta for three
seeds (`ppo.seed`: rollout sampling and minibatch order), each evaluated on the 500
held-out prompts. The table: gold win rate against SFT, gold score, KL to SFT and the
alignment tax (held-out LM loss, zero-shot accuracy), mean ± 95% CI over seeds.
About 40 min on a 2-core CPU (5 min of shared stages, then ~85 s per point).

The paper (Figs. 34, 36): raising the KL coefficient does not remove the regressions
on public NLP datasets that PPO causes; mixing in pretraining gradients (PPO-ptx,
configs/sweeps/ptx.py) does.
"""

from configs import default

STAGES = ("ppo",)
METRICS = (
  "policies.ppo.winrate_vs_sft",
  "policies.ppo.gold_score",
  "policies.ppo.kl_to_sft",
  "policies.ppo.heldout_lm_loss",
  "policies.ppo.zero_shot_mean",
  "policies.sft.heldout_lm_loss",
  "policies.sft.zero_shot_mean",
)
BETAS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0)


def get_config(arg=None):
  return default.get_config(arg)


def get_hyper(h):
  return h.product([h.sweep("config.ppo.kl_coef", BETAS), h.sweep("config.ppo.seed", [0, 1, 2])])
