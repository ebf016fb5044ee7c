"""GRPO (Shao et al. 2024): the RLOO stage (`stages/rloo.py`) with GRPO's choices —
group-normalised advantages, the KL to SFT as a loss term with the k3 estimator — in its
own section (`config.grpo`) and directory `DIR/grpo`, logging `grpo/...`.

  rlhf-jax grpo --config configs/rloo.py --workdir DIR
  rlhf-jax grpo --config configs/rloo.py --config.grpo.advantage=group_mean --workdir D2  # no std
"""

from __future__ import annotations

from typing import Any

import ml_collections

from rlhf_jax.stages import rloo

STAGE = "grpo"


def grpo_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  return rloo.rloo_config(runlocal, advantage="group_norm", kl_in="loss")


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  rloo.validate(c, key)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return rloo.train_and_evaluate(config, workdir, stage=STAGE)
