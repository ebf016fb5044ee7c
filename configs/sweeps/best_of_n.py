"""Best-of-n against n and expert iteration against its iterations, three seeds.

  rlhf-jax sweep --config configs/sweeps/best_of_n.py --workdir runs/best_of_n

Best-of-n trains nothing: each point exports SFT with its n (`best_of_n.curve_prompts`
0: the stage's own curve, which does not depend on n, is measured by
`rlhf-jax best_of_n` or experiments/leaderboard.py) and evaluation samples n replies
per prompt (`eval.seed`: those samples). Expert iteration runs 1, 2 (the default, shared
by the n points) or 3 iterations at n = 16 (`expert_iteration.seed`: its data's samples).
Neither is a vmapped group: the points run one after another, or N at a time with
`--workers N`.
"""

from configs import best_of_n

STAGES = ("best_of_n", "expert_iteration")
METRICS = tuple(
  f"policies.{p}.{m}"
  for p in ("best_of_n", "expert_iteration")
  for m in ("winrate_vs_sft", "gold_score", "kl_to_sft", "heldout_lm_loss")
)


def get_config(arg=None):
  c = best_of_n.get_config(arg).unlock()
  c.best_of_n.curve_prompts = 0
  return c.lock()


def get_hyper(h):
  return h.product(
    [
      h.chainit(
        [
          h.sweep("config.best_of_n.n", [1, 4, 16, 64]),
          h.sweep("config.expert_iteration.iterations", [1, 3]),
        ]
      ),
      h.zipit(
        [
          h.sweep("config.expert_iteration.seed", [0, 1, 2]),
          h.sweep("config.eval.seed", [0, 1, 2]),
        ]
      ),
    ]
  )
