"""gamma_ptx ablation (InstructGPT Fig. 33): the weight of the pretraining loss in PPO-ptx.

  rlhf-jax sweep --config configs/sweeps/ptx.py --workdir runs/ptx

One SFT and one reward model (the default world's), then PPO-ptx at each gamma_ptx for
three seeds (`ppo_ptx.seed`), each evaluated on the 500 held-out prompts; gamma_ptx = 0
is plain PPO. The table: gold win rate against SFT and the alignment tax (held-out LM
loss, zero-shot accuracy), mean ± 95% CI over seeds. About 35 min on a 2-core CPU.

The paper (Fig. 33): a large enough pretraining coefficient removes most of the
regressions on public NLP datasets at little cost in reward; it uses 27.8.
"""

from configs import default

STAGES = ("ppo_ptx",)
METRICS = (
  "policies.ppo_ptx.winrate_vs_sft",
  "policies.ppo_ptx.gold_score",
  "policies.ppo_ptx.kl_to_sft",
  "policies.ppo_ptx.heldout_lm_loss",
  "policies.ppo_ptx.zero_shot_mean",
  "policies.sft.heldout_lm_loss",
  "policies.sft.zero_shot_mean",
)
GAMMAS = (0.0, 1.0, 3.0, 10.0, 27.8, 100.0)


def get_config(arg=None):
  return default.get_config(arg)


def get_hyper(h):
  return h.product(
    [h.sweep("config.ppo_ptx.ptx_coef", GAMMAS), h.sweep("config.ppo_ptx.seed", [0, 1, 2])]
  )
