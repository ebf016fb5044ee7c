"""Presets shared by every config: model sizes, mesh and logical-axis rules, dtypes.

Config files build on these (`from configs import common`). Sizes are LLaMA-style
decoders; `1b` and `7b` follow TinyLlama-1.1B and LLaMA-2-7B shapes (for planning and
GPU/TPU runs, not for this CPU).
"""

import ml_collections

from rlhf_jax.config_lib import parse_arg  # noqa: F401  (re-exported for config files)

MODEL_SIZES = {
  # name: d_model, n_layers, n_heads, n_kv_heads, mlp_dim
  "runlocal": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128),
  "tiny": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_dim=512),
  "s": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=1024),
  "m": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_dim=2048),
  "l": dict(d_model=1024, n_layers=16, n_heads=16, n_kv_heads=8, mlp_dim=4096),
  "1b": dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, mlp_dim=5632),
  "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_dim=11008),
}

# Logical axis -> mesh axes. Parameters are sharded over `fsdp` on their embed dim and
# over `tensor` on heads / MLP / vocab; activations over (data, fsdp) on the batch.
LOGICAL_RULES = (
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("cache_batch", ("data", "fsdp")),
  ("cache_length", None),
  ("cache_kv_heads", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("norm", None),
)


def model_config(size: str, vocab_size: int = 1024) -> ml_collections.ConfigDict:
  """Transformer hyper-parameters for a named size (see MODEL_SIZES)."""
  if size not in MODEL_SIZES:
    from rlhf_jax.errors import UserInputError

    raise UserInputError(f"config arg 'size': unknown {size!r} (known: {', '.join(MODEL_SIZES)})")
  c = ml_collections.ConfigDict()
  c.size = size  # the preset these numbers came from (informational)
  c.vocab_size = vocab_size  # must equal tokenizer.vocab_size
  c.update(MODEL_SIZES[size])
  c.head_dim = 0  # 0 = d_model // n_heads
  c.max_len = 2048  # longest sequence (prompt + response) the model is used with
  c.rope_theta = 10_000.0
  c.norm_eps = 1e-5
  c.tie_embeddings = False
  c.dropout = 0.0
  c.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.param_dtype = "float32"  # storage dtype of parameters
  c.remat = "none"  # rematerialisation per layer: none | full | dots
  # Qwen-family attention and LLaMA 3's RoPE (set by a Hugging Face import, models/hf_config.py)
  c.qkv_bias = False  # biases on the q, k, v projections (Qwen2)
  c.qk_norm = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
  c.rope_type = "default"  # default | llama3 (LLaMA 3.x's frequency scaling, the 4 below)
  c.rope_factor = 8.0  # llama3: low frequencies divided by this
  c.rope_low_freq_factor = 1.0  # llama3: wavelengths > original_max_len / this are scaled
  c.rope_high_freq_factor = 4.0  # llama3: wavelengths < original_max_len / this are kept
  c.rope_original_max_len = 8192  # llama3: the context length the model was trained at
  c.eos_id = 2  # the token that ends a reply: set from config.tokenizer.path's tokenizer
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """A `(data, fsdp, tensor)` mesh; -1 takes the devices the other axes leave."""
  c = ml_collections.ConfigDict()
  c.data = -1
  c.fsdp = 1
  c.tensor = 1
  c.rules = LOGICAL_RULES
  return c


def sampling_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.max_new_tokens = 32  # response length limit
  c.temperature = 1.0  # 0 = greedy
  c.top_k = 0  # 0 = off
  c.top_p = 1.0  # 1 = off
  return c


def lora_config() -> ml_collections.ConfigDict:
  """`config.lora`: LoRA adapters (rlhf_jax/lora.py) instead of full fine-tuning."""
  c = ml_collections.ConfigDict()
  c.rank = 0  # r; 0 = off: every stage fine-tunes all its parameters
  c.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  c.dropout = 0.0  # on the adapters' input, as PEFT's lora_dropout (SFT, RM; PPO has none)
  # Projections that get adapters, of q,k,v,o,gate,up,down: all of them by default, as
  # QLoRA (Dettmers et al. 2023) found adapters on every linear layer needed to match full
  # fine-tuning, where q,v alone (the LoRA paper's) fell short; at rank 8 that is 0.3% of
  # LLaMA-2-7B's weights.
  c.targets = "q,k,v,o,gate,up,down"
  c.value = False  # PPO's value model trains adapters (+ its head) too; False: all of it
  # The stages that train adapters (comma-separated, of sft, rm, ppo, ppo_ptx,
  # expert_iteration); "" = all of them. The others always fine-tune fully.
  c.stages = ""
  return c
