"""Three model sizes through the whole recipe: the Figure 1 analogue.

  rlhf-jax sweep --config configs/sweeps/sizes.py --workdir runs/sizes

Every stage (pretrain, SFT, comparisons, RM, PPO, PPO-ptx) at d_model 64 (2 layers),
128 (2 layers, the default `tiny`) and 192 (3 layers), on the default world.
experiments/figure1.py compares every policy with the largest SFT model.
"""

from configs import default

METRICS = (
  "rm.val_accuracy",
  "policies.*.winrate_vs_sft",
  "policies.*.gold_score",
  "policies.*.heldout_lm_loss",
)


def get_config(arg=None):
  return default.get_config(arg)


def get_hyper(h):
  return sizes(h)


def sizes(h):
  """The three model sizes (configs/sweeps/rm_size.py uses them too)."""
  return h.zipit(
    [
      h.sweep("config.model.d_model", [64, 128, 192]),
      h.sweep("config.model.n_layers", [2, 2, 3]),
      h.sweep("config.model.mlp_dim", [256, 512, 768]),
    ]
  )
