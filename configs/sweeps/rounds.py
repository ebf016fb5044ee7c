"""Rounds at an equal label budget as a sweep: 1, 2 and 4 rounds, three seeds.

  rlhf-jax sweep --config configs/sweeps/rounds.py --workdir runs/rounds_sweep

Each point is the `rounds` stage (configs/rounds.py) on its seed's shared data,
pretraining and SFT; evaluation scores the last round's policy (`policies.rounds.*`) and
`summary.json` holds every round's numbers (`rounds`). experiments/rounds.py runs the
same settings and the design-choice ablations, sharing round 0 between the settings
that split the budget alike.
"""

from configs import rounds

STAGES = ("rounds",)
METRICS = (
  "policies.rounds.winrate_vs_sft",
  "policies.rounds.gold_score",
  "policies.rounds.kl_to_sft",
  "policies.rounds.heldout_lm_loss",
)


def get_config(arg=None):
  return rounds.get_config(arg)


def get_hyper(h):
  return h.product(
    [
      h.sweep("config.rounds.num_rounds", [1, 2, 4]),
      h.sweep("config.seed", [0, 1, 2]),
    ]
  )
