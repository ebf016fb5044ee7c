"""Hugging Face LLaMA / Qwen-family checkpoints in and out of our parameter pytree.

  rlhf-jax import-hf --src HF_DIR --dst DIR          # -> DIR/params, params.json, tokenizer
  rlhf-jax export-hf --workdir RUN --policy ppo --dst OUT   # -> OUT in the HF layout
  --config.init.hf_dir=HF_DIR                          # start a run from it (configs/default.py)

What is read: `config.json` (Llama / Mistral / Qwen2 / Qwen3 ...ForCausalLM, or
...ForSequenceClassification with one label as a reward model), the weights as
`model.safetensors` or shards named by `model.safetensors.index.json` (read with the
`safetensors` package, no PyTorch), and the tokenizer: a SentencePiece `tokenizer.model`
or a `tokenizer.json` with the files beside it (`tokenizer_file`; rlhf_jax.hf_tokenizer).

This module is the import (`import_checkpoint`); config.json, read and written, is
`rlhf_jax.models.hf_config` (its names are re-exported here). The tensors' names and
layouts and their reading, slice by slice onto a mesh, are in
`rlhf_jax.models.hf_tensors`; writing an HF directory (`export_checkpoint`, `save`) is
in `rlhf_jax.models.hf_export`.

A reward model (`scalar` head) maps to `...ForSequenceClassification`: `score.weight`
is our scalar kernel; HF's score has no bias, so ours (which holds the RM's
normalisation, `rm.py`) is written as `config.json["rlhf_jax_score_bias"]`. HF pools a
sequence-classification model at each row's last non-pad token (`pad_token_id`, 0
here), which is our last response token (EOS) when rows are right-padded with 0: the
reward is `score(h[last]) + rlhf_jax_score_bias`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from typing import Any

from rlhf_jax import models
from rlhf_jax.errors import UserInputError
from rlhf_jax.models.hf_config import (  # noqa: F401  (this module's API since before the split)
  ARCHITECTURES,
  MODEL_TYPES,
  SCORE_BIAS_KEY,
  SHAPE_FIELDS,
  head_of,
  hf_config,
  model_fields,
  read_config,
)
from rlhf_jax.models.hf_tensors import load_params

TOKENIZER = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"


# --- import: HF directory -> our export -------------------------------------------------------


def tokenizer_file(hf_dir: str) -> str:
  """The model's SentencePiece tokenizer.model (LLaMA 2, Mistral) if it has one, else its
  tokenizer.json (byte-level BPE: LLaMA 3, Qwen, SmolLM). A model that brings a chat
  template is read through its tokenizer.json, as transformers reads it (the template's
  `<s>` / `</s>` are then its special tokens)."""
  from rlhf_jax import chat_template

  json_first = chat_template.read_source(hf_dir)[0] is not None
  for name in (TOKENIZER_JSON, TOKENIZER) if json_first else (TOKENIZER, TOKENIZER_JSON):
    if os.path.exists(path := os.path.join(hf_dir, name)):
      return path
  raise UserInputError(f"{hf_dir}: no {TOKENIZER} or {TOKENIZER_JSON} (the model's tokenizer)")


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
  from rlhf_jax.models.transformer import TransformerConfig

  defaults = {  # (a model dict from before a field existed has the field's default)
    f.name: f.default
    for f in dataclasses.fields(TransformerConfig)
    if f.default is not dataclasses.MISSING
  }
  if model is None:  # f32, no dropout, no remat: TransformerConfig's defaults
    model = {**defaults, **fields, "size": "imported", "param_dtype": dtype}
  else:
    model = dict(model)
    diff = [
      f"{k}={fields[k]} (checkpoint) vs {model.get(k, defaults.get(k))} (config)"
      for k in SHAPE_FIELDS
      if model.get(k, defaults.get(k)) != fields[k]
    ]
    if diff:
      raise UserInputError(f"{where}: model mismatch: {'; '.join(diff)}")
  head = head_of(hf, where)
  heads = (head,)
  tok_src = tokenizer_file(src)
  tok = tokenizer_lib.load(tok_src)  # checks the reserved ids before anything is written
  if tok.vocab_size > fields["vocab_size"]:
    raise UserInputError(
      f"{tok_src}: {tok.vocab_size} ids > vocab_size={fields['vocab_size']} of {where} "
      "(the embedding has no row for the largest)"
    )
  bias = float(hf.get(SCORE_BIAS_KEY, 0.0))
  like = models.abstract_params(model, heads, mesh, rules)
  params = load_params(
    src, like, heads=heads, tie_embeddings=fields["tie_embeddings"], score_bias=bias
  )
  tok_dst = os.path.join(os.path.abspath(dst), os.path.basename(tok_src))

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
  """Copy `path` (a tokenizer.model or tokenizer.json) and the transformers files beside
  it; returns their names."""
  if path.endswith(".json"):
    from rlhf_jax import hf_tokenizer

    return hf_tokenizer.copy_files(path, directory)
  shutil.copyfile(path, os.path.join(directory, TOKENIZER))
  src = os.path.dirname(os.path.abspath(path))
  names = [n for n in HF_TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(directory, n))
  return [TOKENIZER, *names]
