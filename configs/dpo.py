"""DPO / IPO (rlhf_jax/stages/dpo.py) on the default recipe's comparisons, SFT the
reference.

rlhf-jax pipeline --config configs/dpo.py --workdir DIR   # the recipe, DPO beside PPO, eval
rlhf-jax dpo      --config configs/dpo.py --workdir DIR   # DPO alone (DIR has comparisons)
rlhf-jax dpo      --config configs/dpo.py --config.dpo.loss=ipo --workdir DIR2
rlhf-jax pipeline --config configs/dpo.py:runlocal --workdir /tmp/d   # test-sized

Presets as configs/default.py (size=, runlocal, quick). A separate file because the
default pipeline does not run DPO (its results stay those of the recipe).
"""

from configs import common, default
from rlhf_jax.stages import dpo


def get_config(arg=None):
  runlocal = common.parse_arg(arg, size="tiny", runlocal=False, quick=False)
  c = default.get_config(arg).unlock()
  c.dpo = dpo.dpo_config(runlocal=runlocal.runlocal or runlocal.quick)
  return c.lock()
