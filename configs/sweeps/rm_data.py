"""Reward-model accuracy against the number of training comparisons.

  rlhf-jax sweep --config configs/sweeps/rm_data.py --workdir runs/rm_data

The default world's comparisons (K = 4..9 SFT samples ranked by the labelers); the RM
trains on the first 125 ... 2,000 of them (`rm.max_comparisons`), three data orders
each (`rm.seed`), and is scored on all 500 validation comparisons against the labelers
and against the gold judge's order. experiments/rm_scaling.py adds RM size.
"""

from configs import default

STAGES = ("rm",)
METRICS = ("rm.val_accuracy", "rm.val_gold_accuracy")


def get_config(arg=None):
  return default.get_config(arg)


def get_hyper(h):
  return h.product(
    [
      h.sweep("config.rm.max_comparisons", [125, 250, 500, 1000, 2000]),
      h.sweep("config.rm.seed", [0, 1, 2]),
    ]
  )
