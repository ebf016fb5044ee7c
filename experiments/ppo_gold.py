"""Does PPO against the learnt reward model raise the gold-judge score? (direction check)

  python experiments/ppo_gold.py --workdir DIR                    # DIR holds sft/ and rm/
  python experiments/ppo_gold.py --workdir DIR --stage ppo_ptx --config configs/ppo_ptx.py
  python experiments/ppo_gold.py --workdir DIR --config.ppo.num_iterations=50

Needs a work directory where the earlier stages ran (`rlhf-jax pretrain / sft /
comparisons / rm`, same config). Scores the SFT policy and then the PPO policy on the
same validation prompts with the gold judge (greedy responses, `ppo.gold_eval`), runs the
stage (or reuses a finished one), and prints the RM score over the run (first vs last
logged iterations), the gold score before and after, and one JSON line. The test suite
checks the RM-score direction with a synthetic reward model; this is the check with the
real ones, too slow for the suite.
"""

from __future__ import annotations

import argparse
import json

import jax

from rlhf_jax import config_lib, sharding, train_lib
from rlhf_jax.stages import common, comparisons, ppo


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--config", default="configs/ppo.py")
  ap.add_argument("--stage", default="ppo", choices=ppo.STAGES)
  ap.add_argument("--eval-prompts", type=int, default=256)
  args, rest = ap.parse_known_args(argv)
  overrides, _ = config_lib.parse_overrides(rest)
  config = config_lib.get(args.config, overrides)
  c = config[args.stage]
  tok = common.load_tokenizer(config, args.workdir)
  setup = ppo.make_setup(config, c, key=args.stage)
  _, val_src = ppo.prompt_sources(config, args.workdir, c)
  records = [val_src[i] for i in range(min(len(val_src), args.eval_prompts))]

  def gold(params):
    with sharding.use(setup.mesh, setup.rules):
      out = ppo.gold_eval(setup, params, tok, records, c=c, seed=config.seed)
    return out[f"{ppo.PREFIX}/gold_score"]

  sft = comparisons.load_sft(config, args.workdir, setup.mesh, setup.rules)
  before = gold(sft)
  ppo.train_and_evaluate(config, args.workdir, stage=args.stage)
  out_dir = common.stage_dir(args.workdir, args.stage)
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), sft)
  after = gold(train_lib.load_params(out_dir, like, config.model.to_dict()))
  rows = [r for r in train_lib.read_metrics(out_dir) if f"{ppo.PREFIX}/score" in r]
  k = max(1, len(rows) // 5)
  mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)
  out = {
    "stage": args.stage,
    "iterations": c.num_iterations,
    "eval_prompts": len(records),
    "rm_score_first": mean(rows[:k], f"{ppo.PREFIX}/score"),
    "rm_score_last": mean(rows[-k:], f"{ppo.PREFIX}/score"),
    "kl_last": mean(rows[-k:], f"{ppo.PREFIX}/kl"),
    "gold_sft": before,
    "gold_after": after,
  }
  print(f"{args.stage}: RM score {out['rm_score_first']:.3f} -> {out['rm_score_last']:.3f} "
        f"(first / last {k} logged iterations), KL {out['kl_last']:.2f}; gold score "
        f"{before:.3f} (SFT) -> {after:.3f} on {len(records)} validation prompts")  # fmt: skip
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
