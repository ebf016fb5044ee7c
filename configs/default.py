"""The main job on the default world, on a CPU: every stage's settings in one config.

rlhf-jax pipeline --config configs/default.py --workdir /tmp/rlhf   # all stages + eval
rlhf-jax config --config configs/default.py:size=s     # print it, with a bigger model
rlhf-jax config --config configs/default.py:runlocal   # the test-sized preset
rlhf-jax pipeline --config configs/default.py:quick --workdir /tmp/q   # ~2 min, see QUICK

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
from rlhf_jax import config_lib, evaluate
from rlhf_jax.data import world
from rlhf_jax.stages import comparisons, ppo_ptx, pretrain, rm, sft
from rlhf_jax.stages.ppo import settings as ppo_settings
from rlhf_jax.train import optim

# `quick`: runlocal's dataset sizes and step counts on an easier world (two families,
# four entities, small operands, one turn) with the tiny model's widths, a little more
# pretraining, SFT and RM data, so that every stage learns something real in about two
# minutes: the runlocal model (d_model 64) answers "The answer is 0." to every
# arithmetic prompt, leaving PPO nothing to improve. The tests run this preset end to end.
QUICK = {
  "world.family_weights.sort": 0.0,
  "world.family_weights.reverse": 0.0,
  "world.family_weights.count": 0.0,
  "world.family_weights.open": 0.0,
  "world.num_entities": 4,
  "world.max_operand": 4,
  "world.max_factor": 3,
  "world.multi_turn_rate": 0.0,
  "world.num_demonstrations": 1000,
  "world.num_prompts": 400,
  "world.num_prompts_val": 100,
  "model.d_model": 128,
  "model.n_kv_heads": 4,
  "model.mlp_dim": 512,
  "pretrain.num_steps": 300,
  "pretrain.batch_size": 16,
  "pretrain.eval_every": 150,
  "pretrain.save_every": 150,
  "sft.num_epochs": 4,
  "sft.save_every": 100,
  "rm.num_epochs": 2,
  "rm.save_every": 100,
  "comparisons.num_prompts": 0,
  "comparisons.num_prompts_val": 0,
  "eval.num_prompts": 0,
}
QUICK_PPO = {  # for both config.ppo and config.ppo_ptx
  "num_iterations": 24,
  "optim.lr": 3e-4,
  "value_optim.lr": 3e-4,
  "log_every": 4,
  "eval_every": 24,
  "eval_prompts": 100,
  "save_every": 12,
}


def get_config(arg=None):
  arg = common.parse_arg(arg, size="tiny", runlocal=False, quick=False)
  runlocal = arg.runlocal or arg.quick
  c = ml_collections.ConfigDict()
  c.seed = 0  # every random choice of a run derives from this
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 1024  # SentencePiece pieces, incl. 256 byte-fallback pieces
  c.tokenizer.path = ""  # a given .model file; "" = train one on the pretraining corpus
  c.world = world.world_config(runlocal=runlocal)  # the generated world (data/world.py)
  size = "runlocal" if runlocal else arg.size
  c.model = common.model_config(size, vocab_size=c.tokenizer.vocab_size)
  # Hugging Face LLaMA-family checkpoints (dirs with config.json, *.safetensors and
  # tokenizer.model) standing in for a stage's output; they set config.model's shape and
  # the tokenizer (rlhf_jax/models/hf.py, config_lib.apply_init).
  c.init = ml_collections.ConfigDict()
  c.init.hf_dir = ""  # the pretrained LM: the pretrain stage imports it, SFT starts from it
  c.init.sft_hf_dir = ""  # an SFT policy: comparisons, RM and PPO start from it
  c.init.rm_hf_dir = ""  # a reward model (...ForSequenceClassification, 1 label)
  c.mesh = common.mesh_config()
  # Non-finite losses / gradients: skip the step, restore the last good checkpoint after
  # max_bad_steps in a row at lr x lr_factor (rlhf_jax/train/optim.py, README "Reliability").
  c.guard = optim.guard_config()
  c.sampling = common.sampling_config()
  # LoRA adapters instead of full fine-tuning (rank > 0; rlhf_jax/lora.py), in SFT, RM, PPO
  c.lora = common.lora_config()
  c.pretrain = pretrain.pretrain_config(runlocal=runlocal)  # stage 1
  c.sft = sft.sft_config(runlocal=runlocal)  # stage 2
  c.comparisons = comparisons.comparisons_config(runlocal=runlocal)  # stage 3a
  c.rm = rm.rm_config(runlocal=runlocal)  # stage 3b
  c.ppo = ppo_settings.ppo_config(runlocal=runlocal)  # stage 4: PPO
  c.ppo_ptx = ppo_ptx.ppo_ptx_config(runlocal=runlocal)  # stage 4: PPO-ptx
  c.eval = evaluate.eval_config(runlocal=runlocal)  # evaluation (rlhf_jax/evaluate/)
  if arg.quick:
    settings = dict(QUICK)
    for section in ("ppo", "ppo_ptx"):
      settings.update({f"{section}.{k}": v for k, v in QUICK_PPO.items()})
    for key, value in settings.items():
      config_lib.apply_override(c, key, str(value))
  return c.lock()
