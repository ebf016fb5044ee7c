"""Reward-model accuracy against model size, on one set of comparisons.

  python experiments/rm_scaling.py --workdir runs/rm --shared runs/stages

RMs of d_model 64 (2 layers), 128 (2 layers, the default) and 192 (3 layers), each
initialised from an SFT model of its own size (pretrained and fine-tuned as the default
recipe does), all trained on the same comparisons: experiments/rm_scaling.py passes the
default run's rankings as `comparisons.user_train` / `user_validation`.
"""

from configs import default
from configs.sweeps import sizes

STAGES = ("rm",)
METRICS = ("rm.val_accuracy", "rm.val_gold_accuracy")


def get_config(arg=None):
  return default.get_config(arg)


def get_hyper(h):
  return sizes.sizes(h)
