"""gamma_ptx ablation (InstructGPT Fig. 33): the weight of the pretraining loss in PPO-ptx.

  python experiments/ablation_ptx.py --workdir runs/ptx --shared runs/stages

Runs configs/sweeps/ptx.py (gamma_ptx in {0, 1, 3, 10, 27.8, 100} x 3 seeds of PPO-ptx
on one SFT and one RM; gamma 0 is plain PPO; resumable) and writes
runs/ptx/ablation_ptx.{md,json,png}: per gamma the gold win rate against SFT, KL to SFT
and the alignment tax (held-out LM loss, zero-shot accuracy), mean ± 95% CI over the
seeds. About 35 min on a 2-core CPU (plus 5 min of stages unless `--shared` has them).

The paper: a large enough pretraining coefficient removes most of the regressions on
public NLP datasets at little cost in reward (Fig. 33); it uses 27.8.
"""

from __future__ import annotations

import ablation_beta  # (experiments/ is on sys.path when run as a script)

if __name__ == "__main__":
  ablation_beta.main(
    __doc__, "configs/sweeps/ptx.py", "ppo_ptx.ptx_coef", "ppo_ptx", "ablation_ptx", "gamma_ptx"
  )
