"""The main job on the default world, on a CPU: every stage's settings in one config.

rlhf-jax pipeline --config configs/default.py --workdir /tmp/rlhf   # all stages + eval
rlhf-jax config --config configs/default.py:size=s     # print it, with a bigger model
rlhf-jax config --config configs/default.py:runlocal   # the test-sized preset

One stage at a time (each resumes, and is skipped once complete):
rlhf-jax data        --config configs/default.py --workdir /tmp/rlhf   # datasets + tokenizer
rlhf-jax pretrain    --config configs/default.py --workdir /tmp/rlhf   # 1. LM
rlhf-jax sft         --config configs/default.py --workdir /tmp/rlhf   # 2. demonstrations
rlhf-jax comparisons --config configs/default.py --workdir /tmp/rlhf   # 3a. K samples ranked
rlhf-jax rm          --config configs/default.py --workdir /tmp/rlhf   # 3b. reward model
rlhf-jax ppo         --config configs/default.py --workdir /tmp/rlhf   # 4. PPO
rlhf-jax ppo_ptx     --config configs/default.py --workdir /tmp/rlhf   # 4. PPO-ptx
rlhf-jax eval        --config configs/default.py --workdir /tmp/rlhf   # summary + report
"""

import ml_collections

from configs import common
from rlhf_jax import evaluate
from rlhf_jax.data import world
from rlhf_jax.stages import comparisons, ppo, pretrain, rm, sft


def get_config(arg=None):
  arg = common.parse_arg(arg, size="tiny", runlocal=False)
  c = ml_collections.ConfigDict()
  c.seed = 0  # every random choice of a run derives from this
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 1024  # SentencePiece pieces, incl. 256 byte-fallback pieces
  c.tokenizer.path = ""  # a given .model file; "" = train one on the pretraining corpus
  c.world = world.world_config(runlocal=arg.runlocal)  # the generated world (data/world.py)
  size = "runlocal" if arg.runlocal else arg.size
  c.model = common.model_config(size, vocab_size=c.tokenizer.vocab_size)
  c.mesh = common.mesh_config()
  c.sampling = common.sampling_config()
  c.pretrain = pretrain.pretrain_config(runlocal=arg.runlocal)  # stage 1
  c.sft = sft.sft_config(runlocal=arg.runlocal)  # stage 2
  c.comparisons = comparisons.comparisons_config(runlocal=arg.runlocal)  # stage 3a
  c.rm = rm.rm_config(runlocal=arg.runlocal)  # stage 3b
  c.ppo = ppo.ppo_config(runlocal=arg.runlocal)  # stage 4: PPO
  c.ppo_ptx = ppo.ppo_config(runlocal=arg.runlocal, ptx=True)  # stage 4: PPO-ptx
  c.eval = evaluate.eval_config(runlocal=arg.runlocal)  # evaluation (rlhf_jax/evaluate.py)
  return c.lock()
