"""A Hugging Face `config.json` read into our `config.model` fields, and written back.

Families (by `model_type`, which decides what transformers computes; `architectures`
decides the head):

  llama, mistral   LLaMA block: RoPE, RMSNorm, SwiGLU, grouped KV heads (LLaMA 2/3.x,
                   TinyLlama, SmolLM2, Mistral); optional `head_dim`, tied embeddings
  qwen2            + biases on the q, k and v projections (`qkv_bias`)
  qwen3            + RMSNorm over head_dim on q and k before RoPE (`qk_norm`)

RoPE: plain (`rope_theta`) or LLaMA 3.x's frequency scaling (`rope_type` "llama3" with
its factor, low / high frequency factors and original context length), read from
`rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (< 5) and written
in both forms. A sliding window (Mistral, Qwen with `use_sliding_window`) caps
`max_len` at the window, where full attention is the same computation. Anything else
our transformer does not compute is a UserInputError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from rlhf_jax.errors import UserInputError
from rlhf_jax.models.transformer import ROPE_TYPES, TransformerConfig

# architecture -> our head
ARCHITECTURES = {
  "LlamaForCausalLM": "lm",
  "MistralForCausalLM": "lm",
  "Qwen2ForCausalLM": "lm",
  "Qwen3ForCausalLM": "lm",
  "LlamaForSequenceClassification": "scalar",
  "MistralForSequenceClassification": "scalar",
  "Qwen2ForSequenceClassification": "scalar",
  "Qwen3ForSequenceClassification": "scalar",
}
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SCORE_BIAS_KEY = "rlhf_jax_score_bias"
# what our config takes from config.json
SHAPE_FIELDS = (
  "vocab_size",
  "d_model",
  "n_layers",
  "n_heads",
  "n_kv_heads",
  "mlp_dim",
  "head_dim",
  "max_len",
  "rope_theta",
  "norm_eps",
  "tie_embeddings",
  "qkv_bias",
  "qk_norm",
  "rope_type",
  "rope_factor",
  "rope_low_freq_factor",
  "rope_high_freq_factor",
  "rope_original_max_len",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
# llama3's keys in rope_parameters / rope_scaling -> our fields
_LLAMA3_KEYS = {
  "factor": "rope_factor",
  "low_freq_factor": "rope_low_freq_factor",
  "high_freq_factor": "rope_high_freq_factor",
  "original_max_position_embeddings": "rope_original_max_len",
}


def read_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise UserInputError(f"{path}: not found (a Hugging Face model directory has config.json)")
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserInputError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise UserInputError(f"{path}: expected a JSON object")
  return cfg


def head_of(hf: Mapping[str, Any], where: str = "config.json") -> str:
  """'lm' or 'scalar': what the checkpoint's architecture ends in."""
  archs = hf.get("architectures") or []
  known = [a for a in archs if a in ARCHITECTURES]
  if not known:
    raise UserInputError(
      f"{where}: architectures {archs}: unsupported (supported: {', '.join(ARCHITECTURES)})"
    )
  head = ARCHITECTURES[known[0]]
  if head == "scalar" and int(hf.get("num_labels", len(hf.get("id2label") or {0: 0}))) != 1:
    raise UserInputError(f"{where}: num_labels: a reward model has 1 label")
  return head


def _rope(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  """Our rope_* fields. transformers < 5 writes rope_theta (+ rope_scaling); 5 writes
  rope_parameters; like transformers 5, rope_scaling wins where both are given."""
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  params = hf.get(key) or {}
  if not isinstance(params, Mapping):
    raise UserInputError(f"{where}: {key}: expected an object, got {params!r}")
  out = {k: _DEFAULTS[k] for k in _LLAMA3_KEYS.values()}
  out["rope_theta"] = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.get("rope_type") or params.get("type") or "default"
  if kind not in ROPE_TYPES:
    raise UserInputError(
      f"{where}: {key}.rope_type: rope type {kind!r} unsupported (supported: "
      f"{', '.join(ROPE_TYPES)})"
    )
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise UserInputError(f"{where}: partial_rotary_factor={partial!r}: unsupported (only 1.0)")
  out["rope_type"] = kind
  if kind == "llama3":
    # (transformers: a top-level original_max_position_embeddings wins, then the one in
    # the rope dict, then max_position_embeddings)
    params = {"original_max_position_embeddings": hf.get("max_position_embeddings"), **params}
    if "original_max_position_embeddings" in hf:
      params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    for theirs, ours in _LLAMA3_KEYS.items():
      value = params.get(theirs)
      if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise UserInputError(f"{where}: {key}.{theirs}: expected a positive number, got {value!r}")
      out[ours] = int(value) if ours == "rope_original_max_len" else float(value)
    if out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
      raise UserInputError(
        f"{where}: {key}.high_freq_factor: must exceed low_freq_factor "
        f"({out['rope_high_freq_factor']} <= {out['rope_low_freq_factor']})"
      )
  return out


def _window(hf: Mapping[str, Any]) -> int | None:
  """The sliding window some layer attends within, or None. transformers nulls the
  window without `use_sliding_window` (Qwen; Mistral has no such key), and a layer
  slides when `layer_types` says so (without it, Qwen slides from `max_window_layers`
  on and Mistral everywhere; capped whenever any may, which is exact either way)."""
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  types = hf.get("layer_types")
  if window and isinstance(types, list) and "sliding_attention" not in types:
    return None
  return int(window) if window else None


def model_fields(hf: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
  """Our `config.model` fields (SHAPE_FIELDS) for an HF config; a UserInputError naming
  the key for anything our transformer does not compute."""
  head_of(hf, where)
  kind = hf.get("model_type")
  if kind not in MODEL_TYPES:
    raise UserInputError(
      f"{where}: model_type {kind!r}: unsupported (supported: {', '.join(MODEL_TYPES)})"
    )
  unsupported = [("hidden_act", "silu"), ("mlp_bias", False), ("pretraining_tp", 1)]
  if kind != "qwen2":  # (Qwen2 has q/k/v biases and no o bias, whatever the key says)
    unsupported.append(("attention_bias", False))  # q, k, v *and* o biases
  for key, want in unsupported:
    if key in hf and hf[key] != want:
      raise UserInputError(f"{where}: {key}={hf[key]!r}: unsupported (only {want!r})")
  for key in (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
  ):
    if not isinstance(hf.get(key), int) or hf[key] <= 0:
      raise UserInputError(f"{where}: {key}: expected a positive integer, got {hf.get(key)!r}")
  n_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
  max_len = int(hf.get("max_position_embeddings", 2048))
  window = _window(hf)
  if window:  # exact as long as no sequence outgrows the window
    max_len = min(max_len, window)
  return {
    "vocab_size": hf["vocab_size"],
    "d_model": hf["hidden_size"],
    "n_layers": hf["num_hidden_layers"],
    "n_heads": n_heads,
    "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
    "mlp_dim": hf["intermediate_size"],
    # 0 = d_model // n_heads, as our configs write it
    "head_dim": 0 if head_dim * n_heads == hf["hidden_size"] else head_dim,
    "max_len": max_len,
    "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    "qkv_bias": kind == "qwen2",
    "qk_norm": kind == "qwen3",
    **_rope(hf, where),
  }


def family(model: Mapping[str, Any]) -> str:
  """The model_type our fields export as: qwen3 (q/k norm), qwen2 (q/k/v biases), llama."""
  if model.get("qkv_bias") and model.get("qk_norm"):
    raise UserInputError(
      "config.model.qk_norm: with qkv_bias no Hugging Face architecture computes it "
      "(Qwen3's attention_bias adds an o bias too)"
    )
  return "qwen3" if model.get("qk_norm") else "qwen2" if model.get("qkv_bias") else "llama"


_CLASS = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def hf_config(
  model: Mapping[str, Any],
  head: str = "lm",
  *,
  dtype: str = "float32",
  score_bias: float = 0.0,
  token_ids: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """config.json for our `config.model` fields (the inverse of `model_fields`);
  `token_ids`: bos/eos/pad_token_id (default: our SentencePiece ids 1, 2, 0)."""
  kind = family(model)
  suffix = "ForCausalLM" if head == "lm" else "ForSequenceClassification"
  head_dim = model.get("head_dim") or model["d_model"] // model["n_heads"]
  theta = float(model.get("rope_theta", 10000.0))
  rope: dict[str, Any] = {"rope_type": model.get("rope_type", "default")}
  if rope["rope_type"] == "llama3":
    rope.update({theirs: model.get(ours, _DEFAULTS[ours]) for theirs, ours in _LLAMA3_KEYS.items()})
  cfg = {
    "architectures": [_CLASS[kind] + suffix],
    "model_type": kind,
    "vocab_size": model["vocab_size"],
    "hidden_size": model["d_model"],
    "intermediate_size": model["mlp_dim"],
    "num_hidden_layers": model["n_layers"],
    "num_attention_heads": model["n_heads"],
    "num_key_value_heads": model["n_kv_heads"],
    "head_dim": head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": model.get("max_len", 2048),
    "rms_norm_eps": float(model.get("norm_eps", 1e-5)),
    "rope_theta": theta,  # read by transformers < 5
    "rope_parameters": {**rope, "rope_theta": theta},  # by 5
    "rope_scaling": rope if rope["rope_type"] != "default" else None,  # by < 5
  }
  if kind == "llama":
    cfg.update(attention_bias=False, mlp_bias=False)
  else:
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=model["n_layers"])
    if kind == "qwen3":
      cfg["attention_bias"] = False
  cfg.update(
    tie_word_embeddings=bool(model.get("tie_embeddings", False)),
    **(token_ids or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
    torch_dtype=dtype,
    dtype=dtype,
  )
  if head == "scalar":
    cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    cfg[SCORE_BIAS_KEY] = float(score_bias)
  return cfg
