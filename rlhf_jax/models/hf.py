"""Hugging Face LLaMA-family checkpoints in and out of our parameter pytree.

  rlhf-jax import-hf --src HF_DIR --dst DIR          # -> DIR/params, params.json, tokenizer.model
  rlhf-jax export-hf --workdir RUN --policy ppo --dst OUT   # -> OUT in the HF layout
  --config.init.hf_dir=HF_DIR                          # start a run from it (configs/default.py)

What is read: `config.json` (LlamaForCausalLM / MistralForCausalLM, or
...ForSequenceClassification with one label as a reward model), the weights as
`model.safetensors` or shards named by `model.safetensors.index.json` (read with the
`safetensors` package, no PyTorch), and the SentencePiece `tokenizer.model`.

This module is config.json (read and written) and the import (`import_checkpoint`).
The tensors' names and layouts and their reading, slice by slice onto a mesh, are in
`rlhf_jax.models.hf_tensors`; writing an HF directory (`export_checkpoint`, `save`) is
in `rlhf_jax.models.hf_export`.

A reward model (`scalar` head) maps to `LlamaForSequenceClassification`: `score.weight`
is our scalar kernel; HF's score has no bias, so ours (which holds the RM's
normalisation, `rm.py`) is written as `config.json["rlhf_jax_score_bias"]`. HF pools a
sequence-classification model at each row's last non-pad token (`pad_token_id`, 0
here), which is our last response token (EOS) when rows are right-padded with 0: the
reward is `score(h[last]) + rlhf_jax_score_bias`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from rlhf_jax import models
from rlhf_jax.errors import UserInputError
from rlhf_jax.models.hf_tensors import load_params

# architecture -> our head
ARCHITECTURES = {
  "LlamaForCausalLM": "lm",
  "MistralForCausalLM": "lm",
  "LlamaForSequenceClassification": "scalar",
  "MistralForSequenceClassification": "scalar",
}
MODEL_TYPES = ("llama", "mistral")
SCORE_BIAS_KEY = "rlhf_jax_score_bias"
TOKENIZER = "tokenizer.model"
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
)


# --- config.json ---------------------------------------------------------------------------


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


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
  # transformers < 5 writes rope_theta (+ rope_scaling); 5 writes rope_parameters.
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise UserInputError(f"{where}: rope type {kind!r}: only plain RoPE is supported")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_fields(hf: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
  """Our `config.model` fields (SHAPE_FIELDS) for an HF config; a UserInputError naming
  the key for anything our transformer does not compute."""
  head_of(hf, where)
  if hf.get("model_type") not in MODEL_TYPES:
    raise UserInputError(
      f"{where}: model_type {hf.get('model_type')!r}: unsupported "
      f"(supported: {', '.join(MODEL_TYPES)})"
    )
  for key, want in (
    ("hidden_act", "silu"),
    ("attention_bias", False),
    ("mlp_bias", False),
    ("pretraining_tp", 1),
  ):
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
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  if window:  # Mistral: exact as long as no sequence outgrows the window
    max_len = min(max_len, int(window))
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
    "rope_theta": _rope_theta(hf, where),
    "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
  }


def hf_config(
  model: Mapping[str, Any], head: str = "lm", *, dtype: str = "float32", score_bias: float = 0.0
) -> dict[str, Any]:
  """config.json for our `config.model` fields (the inverse of `model_fields`)."""
  head_dim = model.get("head_dim") or model["d_model"] // model["n_heads"]
  theta = float(model.get("rope_theta", 10000.0))
  cfg = {
    "architectures": ["LlamaForCausalLM" if head == "lm" else "LlamaForSequenceClassification"],
    "model_type": "llama",
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
    "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # by 5
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": bool(model.get("tie_embeddings", False)),
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": dtype,
    "dtype": dtype,
  }
  if head == "scalar":
    cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    cfg[SCORE_BIAS_KEY] = float(score_bias)
  return cfg


# --- import: HF directory -> our export -------------------------------------------------------


def tokenizer_file(hf_dir: str) -> str:
  path = os.path.join(hf_dir, TOKENIZER)
  if not os.path.exists(path):
    raise UserInputError(f"{path}: not found (a SentencePiece tokenizer.model is needed)")
  return path


def import_checkpoint(
  src: str,
  dst: str,
  *,
  model: Mapping[str, Any] | None = None,
  dtype: str = "float32",
  mesh=None,
  rules=(),
  **meta,
) -> dict[str, Any]:
  """Convert an HF directory into our export layout in `dst` (a stage directory):
  `params` (Orbax), `params.json` (model fields, heads, where from) and a copy of the
  tokenizer. `model` is our config.model (default: config.json's shape with `dtype`
  parameters). Returns params.json's contents."""
  from rlhf_jax import tokenizer as tokenizer_lib
  from rlhf_jax.train import checkpoints

  hf = read_config(src)
  where = os.path.join(src, "config.json")
  fields = model_fields(hf, where)
  if model is None:  # f32, no dropout, no remat: TransformerConfig's defaults
    from rlhf_jax.models.transformer import TransformerConfig

    defaults = {
      f.name: f.default
      for f in dataclasses.fields(TransformerConfig)
      if f.default is not dataclasses.MISSING
    }
    model = {**defaults, **fields, "size": "imported", "param_dtype": dtype}
  else:
    model = dict(model)
    diff = [
      f"{k}={fields[k]} (checkpoint) vs {model.get(k)} (config)"
      for k in SHAPE_FIELDS
      if model.get(k) != fields[k]
    ]
    if diff:
      raise UserInputError(f"{where}: model mismatch: {'; '.join(diff)}")
  head = head_of(hf, where)
  heads = (head,)
  tok_src = tokenizer_file(src)
  tok = tokenizer_lib.load(tok_src)  # checks the reserved ids before anything is written
  if tok.vocab_size > fields["vocab_size"]:
    raise UserInputError(
      f"{tok_src}: {tok.vocab_size} pieces > vocab_size={fields['vocab_size']} of {where}"
    )
  bias = float(hf.get(SCORE_BIAS_KEY, 0.0))
  like = models.abstract_params(model, heads, mesh, rules)
  params = load_params(
    src, like, heads=heads, tie_embeddings=fields["tie_embeddings"], score_bias=bias
  )
  tok_dst = os.path.join(os.path.abspath(dst), TOKENIZER)

  def copy():
    os.makedirs(dst, exist_ok=True)
    copy_tokenizer(tok_src, dst)

  from rlhf_jax import distributed

  distributed.first(f"import {dst}", copy)
  info = {
    "heads": list(heads),
    "imported_from": os.path.abspath(src),
    "tokenizer": tok_dst,
    **({"reward_bias": bias} if head == "scalar" else {}),
    **meta,
  }
  checkpoints.export_params(dst, params, model, **info)
  return checkpoints.params_info(dst)


# transformers' tokenizer files that travel with a tokenizer.model they sit beside
HF_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
)


def copy_tokenizer(path: str, directory: str) -> list[str]:
  """Copy `path` (a tokenizer.model) and the transformers files beside it; returns names."""
  shutil.copyfile(path, os.path.join(directory, TOKENIZER))
  src = os.path.dirname(os.path.abspath(path))
  names = [n for n in HF_TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(directory, n))
  return [TOKENIZER, *names]
