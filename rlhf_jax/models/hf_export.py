"""Our parameters written out as a Hugging Face checkpoint (`rlhf-jax export-hf`).

`export_checkpoint` writes an exported stage, `save` any parameters: safetensors shards
(one tensor gathered to the host at a time, laid out as `hf_tensors.tensor_map` says),
config.json (`hf_config.hf_config`: Llama, Qwen2 with q/k/v biases, Qwen3 with q/k
norms), generation_config.json and the tokenizer with
transformers' files. A stage trained with LoRA exports its merged parameters like any
other; `export_adapters` writes its adapters alone in PEFT's layout instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlhf_jax import models
from rlhf_jax.errors import UserInputError
from rlhf_jax.models.hf import copy_tokenizer
from rlhf_jax.models.hf_config import hf_config
from rlhf_jax.models.hf_tensors import INDEX, SINGLE, flatten, tensor_map


def _host(x) -> np.ndarray:
  import jax

  if not getattr(x, "is_fully_addressable", True):
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _np_dtype(dtype: str):
  import ml_dtypes

  return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]


def save(
  dst: str,
  params,
  model: Mapping[str, Any],
  *,
  heads: tuple[str, ...] = ("lm",),
  tokenizer_path: str | None = None,
  dtype: str = "float32",
  max_shard_bytes: int = 2 << 30,
  score_bias: float | None = None,
) -> list[str]:
  """Write `params` (our layout) to `dst` as an HF checkpoint; returns the files written.

  One tensor at a time is gathered to the host; shards of at most `max_shard_bytes`
  (plus an index when there is more than one). `dst` must not exist yet (nothing is
  overwritten); it is written under a temporary name and renamed when complete. The
  scalar head's bias (`score_bias`, default: read from the params) goes to config.json.
  """
  import jax
  from safetensors.numpy import save_file

  if os.path.exists(dst) and os.listdir(dst):
    raise UserInputError(f"{dst}: exists and is not empty (choose a new --dst)")
  head = "scalar" if "scalar" in heads else "lm"
  flat = flatten(params)
  if score_bias is None and head == "scalar":
    score_bias = float(_host(flat[("scalar_head", "bias")]).reshape(()))
  ids, generation = token_ids(tokenizer_path, model)
  hf_cfg = hf_config(model, head, dtype=dtype, score_bias=score_bias or 0.0, token_ids=ids)
  tmap = tensor_map(
    int(model["n_layers"]),
    (head,),
    bool(model.get("tie_embeddings")),
    qkv_bias=bool(model.get("qkv_bias")),
    qk_norm=bool(model.get("qk_norm")),
  )
  cast = _np_dtype(dtype)
  writer = jax.process_index() == 0
  tmp = f"{dst.rstrip(os.sep)}.tmp"
  if writer:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  shard: dict[str, np.ndarray] = {}
  written: list[str] = []  # temporary shard names, in order
  weight_map: dict[str, int] = {}  # tensor -> shard number

  def flush():
    if writer:
      name = f"shard-{len(written):05d}.safetensors"
      save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
    written.append(f"shard-{len(written):05d}.safetensors")
    shard.clear()

  for path, t in tmap.items():
    x = np.ascontiguousarray(t.to_hf(_host(flat[path])).astype(cast))
    if shard and sum(v.nbytes for v in shard.values()) + x.nbytes > max_shard_bytes:
      flush()
    shard[t.name] = x
    weight_map[t.name] = len(written)
  flush()
  if not writer:
    return []
  n = len(written)
  names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for old, new in zip(written, names, strict=True):
    os.replace(os.path.join(tmp, old), os.path.join(tmp, new))
  if n > 1:
    total = sum(os.path.getsize(os.path.join(tmp, f)) for f in names)
    index = {
      "metadata": {"total_size": total},
      "weight_map": {k: names[v] for k, v in weight_map.items()},
    }
    with open(os.path.join(tmp, INDEX), "w") as f:
      json.dump(index, f, indent=1)
  files = [*names, "config.json", "generation_config.json"]
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=1)
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    json.dump(generation, f, indent=1)
  if tokenizer_path:
    files += _save_tokenizer(tokenizer_path, tmp)
  if os.path.exists(dst):
    os.rmdir(dst)  # empty (checked above)
  os.replace(tmp, dst)
  return files + ([INDEX] if n > 1 else [])


def token_ids(tokenizer_path: str | None, model: Mapping[str, Any]) -> tuple[dict, dict]:
  """config.json's and generation_config.json's bos/eos/pad_token_id for the tokenizer the
  model was trained with: our SentencePiece ids, or a tokenizer.json's own: eos = the
  reply's end the model learned (`model.eos_id`; generation_config.json also lists the end
  of a document, as LLaMA 3's does), pad = its pad token (where HF pools a
  ...ForSequenceClassification: it must not end a reply), else the end of a document."""
  if not tokenizer_path or not tokenizer_path.endswith(".json"):
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return ids, ids
  from rlhf_jax import hf_tokenizer

  tok = hf_tokenizer.load(tokenizer_path)
  eos = int(model.get("eos_id", tok.eos_id))
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.document_end_id
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": pad}
  ends = sorted({eos, tok.document_end_id})
  return ids, {**ids, "eos_token_id": ends if len(ends) > 1 else eos}


def _dummy_prefix(path: str) -> bool:
  from sentencepiece import sentencepiece_model_pb2

  m = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    m.ParseFromString(f.read())
  return bool(m.normalizer_spec.add_dummy_prefix)


def _save_tokenizer(path: str, directory: str) -> list[str]:
  """tokenizer.model with transformers' files: those it came with (a model imported from
  the Hub keeps its own), else a tokenizer_config.json for LlamaTokenizer, with
  `add_prefix_space` as the model's dummy prefix (rlhf_jax's own tokenizers have none)."""
  import sentencepiece as spm

  copied = copy_tokenizer(path, directory)
  if "tokenizer_config.json" in copied:
    return copied
  sp = spm.SentencePieceProcessor(model_file=path)
  piece = lambda i: sp.id_to_piece(i) if i >= 0 else None
  cfg = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": piece(sp.bos_id()),
    "eos_token": piece(sp.eos_id()),
    "unk_token": piece(sp.unk_id()),
    "pad_token": piece(sp.pad_id()) if sp.pad_id() >= 0 else piece(0),
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
    "add_prefix_space": _dummy_prefix(path),
    "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f, indent=1)
  return [*copied, "tokenizer_config.json"]


def export_checkpoint(
  stage_dir: str,
  dst: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int = 2 << 30,
  tokenizer_path: str = "",
) -> list[str]:
  """An exported stage (`DIR/<stage>`: params + params.json) written to `dst` in the HF
  layout, with its tokenizer; returns the files written."""
  from rlhf_jax.train import checkpoints

  info = checkpoints.params_info(stage_dir)
  if info is None:
    raise UserInputError(f"{stage_dir}: no exported parameters (train that stage first)")
  model = info["model"]
  heads = tuple(info.get("heads") or ("lm",))
  if "lm" in heads and "scalar" in heads:
    heads = ("lm",)
  like = models.abstract_params(model, heads)
  params = checkpoints.load_params(stage_dir, like, model)
  tok = tokenizer_path or info.get("tokenizer") or ""
  if not tok or not os.path.exists(tok):
    raise UserInputError(f"{stage_dir}/params.json: no tokenizer recorded; pass --tokenizer")
  return save(
    dst,
    params,
    model,
    heads=heads,
    tokenizer_path=tok,
    dtype=dtype or model.get("param_dtype", "float32"),
    max_shard_bytes=max_shard_bytes,
  )


# --- LoRA adapters alone, in PEFT's layout ---------------------------------------------------

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def peft_tensors(trained, cast=np.float32) -> dict[str, np.ndarray]:
  """PEFT's tensors of a LoRA stage's trained tree ({"lora": adapters, + "scalar_head"}):
  `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` f[r, in] and
  `...lora_B.weight` f[out, r] in HF's [out, in] orientation (so that scale x B @ A is
  the HF weight's update), and a trained scalar head as `base_model.model.score.weight`
  f[1, E] (PEFT's `modules_to_save`)."""
  from rlhf_jax import lora

  out = {}
  for layer, modules in trained[lora.KEY].items():
    i = int(layer.removeprefix("layer_"))
    for targets in modules.values():
      for t, ab in targets.items():
        name = f"{PEFT_PREFIX}model.layers.{i}.{lora.TARGETS[t][2]}"
        a, b = _host(ab["a"]), _host(ab["b"])
        r = a.shape[-1]
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T.astype(cast))
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T.astype(cast))
  if "scalar_head" in trained:
    kernel = _host(trained["scalar_head"]["kernel"])
    out[f"{PEFT_PREFIX}score.weight"] = np.ascontiguousarray(kernel.T.astype(cast))
  return out


def export_adapters(
  stage_dir: str, dst: str, *, dtype: str | None = None, base_model: str = ""
) -> list[str]:
  """The adapters (and a trained head) of a stage trained with LoRA, alone, in PEFT's
  layout: `adapter_config.json` (r, lora_alpha, lora_dropout, target_modules, ...;
  `base_model_name_or_path`: `base_model`, else the Hugging Face checkpoint the base was
  imported from, if any) and `adapter_model.safetensors`. Returns the files written."""
  import orbax.checkpoint as ocp
  from safetensors.numpy import save_file

  from rlhf_jax import lora
  from rlhf_jax.train import checkpoints

  info = checkpoints.params_info(stage_dir)
  if info is None:
    raise UserInputError(f"{stage_dir}: no exported parameters (train that stage first)")
  meta = info.get(lora.KEY)
  if not meta or not os.path.isdir(os.path.join(stage_dir, lora.KEY)):
    raise UserInputError(f"{stage_dir}: trained without LoRA adapters (drop --lora-only)")
  if os.path.exists(dst) and os.listdir(dst):
    raise UserInputError(f"{dst}: exists and is not empty (choose a new --dst)")
  trained = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(stage_dir, lora.KEY)))
  cast = _np_dtype(dtype or info["model"].get("param_dtype", "float32"))
  tensors = peft_tensors(trained, cast)
  seq_cls = "scalar_head" in trained
  alpha = float(meta["alpha"])
  config = {
    "peft_type": "LORA",
    "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM",
    "base_model_name_or_path": base_model or meta.get("base_hf") or None,
    "r": int(meta["rank"]),
    "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
    "lora_dropout": float(meta["dropout"]),
    "target_modules": [lora.TARGETS[t][2].split(".")[-1] for t in meta["targets"]],
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": ["score"] if seq_cls else None,
    "inference_mode": True,
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
  }
  tmp = f"{dst.rstrip(os.sep)}.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(tensors, os.path.join(tmp, PEFT_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(tmp, PEFT_CONFIG), "w") as f:
    json.dump(config, f, indent=1)
  if os.path.exists(dst):
    os.rmdir(dst)  # empty (checked above)
  os.replace(tmp, dst)
  return [PEFT_CONFIG, PEFT_WEIGHTS]
