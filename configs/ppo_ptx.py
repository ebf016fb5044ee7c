"""Stage 4: PPO-ptx — PPO plus gamma_ptx x the pretraining LM loss in every policy step.

rlhf-jax ppo_ptx --config configs/ppo_ptx.py --workdir DIR           # small-scale defaults
rlhf-jax ppo_ptx --config configs/ppo_ptx.py:paper --workdir DIR     # gamma_ptx 27.8, ratio 8
rlhf-jax ppo_ptx --config configs/ppo_ptx.py:runlocal --workdir DIR
rlhf-jax ppo_ptx --config configs/ppo_ptx.py --config.ppo_ptx.ptx_coef=0 --workdir DIR  # = PPO

Needs `DIR/sft` and `DIR/rm`; writes `DIR/ppo_ptx`. Next to the PPO metrics it logs
`ppo/ptx_loss`, the pretraining LM loss of the policy, which PPO-ptx keeps near the SFT
model's (the alignment tax the paper's ptx term reduces). Presets as configs/ppo.py.
"""

from configs import ppo as ppo_config


def get_config(arg=None):
  return ppo_config.get_config(arg, stage="ppo_ptx")
