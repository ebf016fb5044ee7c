"""Stage 4: PPO against the reward model, from the SFT policy.

rlhf-jax ppo --config configs/ppo.py --workdir DIR                # small-scale defaults
rlhf-jax ppo --config configs/ppo.py:paper --workdir DIR          # the paper's PPO values
rlhf-jax ppo --config configs/ppo.py:runlocal --workdir DIR       # the test-sized preset
rlhf-jax ppo --config configs/ppo.py --config.ppo.kl_coef=0.05 --workdir DIR

Needs `DIR/sft` and `DIR/rm` (the earlier stages, same model size). Writes `DIR/ppo`.
`ppo/gold_score` is the gold judge's mean score of replies sampled at temperature 1 to
64 validation prompts, at iteration 0 (the SFT policy) and every `eval_every`. On the
default world (tiny model, 2 CPU cores, 62 s, from `rlhf-jax pipeline`) the mean RM score
(`ppo/score`) went 0.08 (iterations 1-5) -> 0.82 (36-40), the KL to the SFT policy
(`ppo/kl`) to 2.1 nats, and the gold score 0.306 (SFT) -> 0.504 (20) -> 0.517 (40).

Presets: `size` (model, configs/common.py), `runlocal`, `paper` (beta 0.02 fixed, clip
0.2, 1 epoch, gamma 1, lambda 0.95, value from the RM, EMA 0.992; `rlhf_jax.stages.ppo.
settings.PAPER`), `adaptive_kl` (Ziegler et al.'s controller instead of a fixed beta).
"""

from configs import common
from configs import default as default_config
from rlhf_jax.stages.ppo import settings


def get_config(arg=None, stage="ppo"):
  arg = common.parse_arg(arg, size="tiny", runlocal=False, paper=False, adaptive_kl=False)
  c = default_config.get_config(f"size={arg.size},runlocal={arg.runlocal}")
  section = c[stage]
  if arg.paper:
    settings.paper_preset(section, ptx=stage == "ppo_ptx")
  if arg.adaptive_kl:
    section.kl_controller = "adaptive"  # beta starts at kl_coef, moves toward kl_target
  return c.lock()
