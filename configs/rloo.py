"""RLOO and GRPO (rlhf_jax/stages/rloo.py, grpo.py) on the default recipe's reward model.

rlhf-jax pipeline --config configs/rloo.py --workdir DIR   # the recipe, RLOO and GRPO beside PPO
rlhf-jax rloo     --config configs/rloo.py --workdir DIR   # RLOO alone (DIR has the RM)
rlhf-jax grpo     --config configs/rloo.py --workdir DIR   # GRPO alone
rlhf-jax pipeline --config configs/rloo.py:runlocal --workdir /tmp/r   # test-sized

Presets as configs/default.py (size=, runlocal, quick: PPO's quick iterations and
learning rate). A separate file because the default pipeline does not run these (its
results stay those of the recipe).
"""

from configs import common, default
from rlhf_jax import config_lib
from rlhf_jax.stages import grpo, rloo


def get_config(arg=None):
  preset = common.parse_arg(arg, size="tiny", runlocal=False, quick=False)
  c = default.get_config(arg).unlock()
  small = preset.runlocal or preset.quick
  c.rloo = rloo.rloo_config(runlocal=small)
  c.grpo = grpo.grpo_config(runlocal=small)
  if preset.quick:
    keys = ("num_iterations", "optim.lr", "log_every", "eval_every", "eval_prompts", "save_every")
    for section in ("rloo", "grpo"):
      for k in keys:
        config_lib.apply_override(c, f"{section}.{k}", str(default.QUICK_PPO[k]))
  return c.lock()
