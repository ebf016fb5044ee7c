"""Stage 4b: PPO-ptx — PPO plus gamma_ptx x the pretraining LM loss in every policy step.

  rlhf-jax ppo_ptx --config configs/ppo_ptx.py --workdir DIR

The paper's remedy for the alignment tax: the same iteration as PPO (stages/ppo/) with
pretraining rows mixed into each minibatch, its own config section (`config.ppo_ptx`,
`ptx_coef` > 0) and its own directory `DIR/ppo_ptx`. It logs PPO's metrics (`ppo/...`)
and `ppo/ptx_loss`, the policy's pretraining LM loss.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from rlhf_jax.stages.ppo import driver, settings

STAGE = "ppo_ptx"


def ppo_ptx_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """The `config.ppo_ptx` section: PPO's with gamma_ptx = 1."""
  return settings.ppo_config(runlocal=runlocal, ptx=True)


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  """Its fields inside PPO's `settings.RANGES` (the registry's config hook)."""
  settings.validate_ranges(c, key)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """PPO-ptx from the SFT and RM exports (or resume); export the final policy."""
  return driver.train_and_evaluate(config, workdir, stage=STAGE)
