"""Presets for TPU pod slices and multi-node GPUs: the default recipe at 1B / 7B scale.

  rlhf-jax plan --config configs/scale.py:preset=tpu_7b --devices 64       # size it first
  rlhf-jax pipeline --config configs/scale.py:preset=tpu_7b \\
    --config.init.hf_dir=/gcs-fuse/Llama-2-7b-hf --workdir /gcs-fuse/runs/7b   # every host

experiments/launch/{tpu_pod,gpu_multinode}.sh launch them. A preset fixes the model
shape (`1b`: TinyLlama-1.1B, `7b`: LLaMA-2-7B; with `config.init.hf_dir` the checkpoint's
shape and tokenizer win), bf16 compute over f32 master weights, per-layer remat, the
mesh (its `-1` axis takes the devices the others leave, so one preset serves several
slice sizes) and the paper's batch sizes, with gradient accumulation where a batch's
activations would not fit. Sized with `rlhf-jax plan` (README, "Scaling out"):

- `tpu_1b`: v4-32 (16 chips, 32 GiB), FSDP over 16; remat dots.
- `tpu_7b`: v5p-128 (64 chips, 95 GiB), FSDP 16 x tensor 4 (data takes the rest).
- `gpu_1b`: one node of 8 x 80 GB, FSDP over the 8 GPUs.
- `gpu_7b`: 2+ nodes of 8 x 80 GB: tensor 8 inside a node (NVLink), data across nodes;
  full remat.

None of these can run on the 2-core CPU this project is developed on; they are checked
by `rlhf-jax plan` and by `tests/test_plan.py` (they load, and each stage fits).
"""

from configs import common
from configs import default as default_config

PRESETS = {
  # name: model size, mesh (data, fsdp, tensor), remat, grad_accum of pretrain / SFT /
  # RM, PPO minibatches (of the paper's 512 episodes)
  "tpu_1b": ("1b", (-1, 16, 1), "dots", (8, 2, 2), 8),
  "tpu_7b": ("7b", (-1, 16, 4), "dots", (2, 1, 1), 8),
  "gpu_1b": ("1b", (-1, 8, 1), "dots", (4, 1, 2), 8),
  "gpu_7b": ("7b", (-1, 1, 8), "full", (8, 2, 2), 16),
}
CAPACITY_GIB = {"tpu_1b": 32, "tpu_7b": 95, "gpu_1b": 80, "gpu_7b": 80}  # per device
DEVICES = {"tpu_1b": 16, "tpu_7b": 64, "gpu_1b": 8, "gpu_7b": 16}  # the slice each was sized on


def get_config(arg=None):
  arg = common.parse_arg(arg, preset="tpu_1b")
  if arg.preset not in PRESETS:
    from rlhf_jax.errors import UserInputError

    raise UserInputError(
      f"config arg 'preset': unknown {arg.preset!r} (known: {', '.join(PRESETS)})"
    )
  size, (data, fsdp, tensor), remat, accum, minibatches = PRESETS[arg.preset]
  c = default_config.get_config(f"size={size}")
  with c.unlocked():
    c.tokenizer.vocab_size = 32000  # LLaMA's tokenizer (from config.init.hf_dir or .path)
    c.model.vocab_size = 32000
    c.model.dtype = "bfloat16"  # compute; the parameters (master weights) stay f32
    c.model.remat = remat
    c.model.max_len = 4096
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    c.pretrain.batch_size, c.pretrain.seq_len = 512, 2048
    c.sft.batch_size, c.sft.seq_len = 128, 2048
    c.comparisons.batch_size, c.comparisons.max_prompt_len = 512, 512
    c.comparisons.max_new_tokens = 256
    c.rm.batch_size, c.rm.seq_len, c.rm.eval_batch_size = 64, 1024, 64  # 64 prompts x K
    # A packed comparison: the prompt once (<= 512) and 9 responses (<= 256 each).
    c.rm.packed_len = 512 + 9 * 256
    for stage, n in zip(("pretrain", "sft", "rm"), accum, strict=True):
      c[stage].optim.grad_accum = n
    for section in ("ppo", "ppo_ptx"):  # the paper: 512 episodes, minibatches of 64
      p = c[section]
      p.batch_size, p.num_minibatches, p.num_epochs = 512, minibatches, 1
      p.prompt_len, p.max_new_tokens, p.ptx_seq_len = 512, 256, 1024
  return c.lock()
