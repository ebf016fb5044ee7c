"""Hugging Face LLaMA-family checkpoints in and out of our parameter pytree.

  rlhf-jax import-hf --src HF_DIR --dst DIR          # -> DIR/params, params.json, tokenizer.model
  rlhf-jax export-hf --workdir RUN --policy ppo --dst OUT   # -> OUT in the HF layout
  --config.init.hf_dir=HF_DIR                          # start a run from it (configs/default.py)

What is read: `config.json` (LlamaForCausalLM / MistralForCausalLM, or
...ForSequenceClassification with one label as a reward model), the weights as
`model.safetensors` or shards named by `model.safetensors.index.json` (read with the
`safetensors` package, no PyTorch), and the SentencePiece `tokenizer.model`. Every
tensor is read one at a time and only in the slices that the local devices hold
(`jax.make_array_from_callback` over a memory-mapped file), so a model larger than one
host's memory loads straight onto a mesh.

The layouts differ only in transposes: HF keeps `nn.Linear` weights as `[out, in]`;
we keep `[in, out]` kernels with the heads axis split out (`q: [E, H, D]`,
`o: [H, D, E]`). HF LLaMA's q/k projections are already in the rotate-half RoPE
convention, which is ours, so no permutation is needed.

A reward model (`scalar` head) maps to `LlamaForSequenceClassification`: `score.weight`
is our scalar kernel; HF's score has no bias, so ours (which holds the RM's
normalisation, `rm.py`) is written as `config.json["rlhf_jax_score_bias"]`. HF pools a
sequence-classification model at each row's last non-pad token (`pad_token_id`, 0
here), which is our last response token (EOS) when rows are right-padded with 0: the
reward is `score(h[last]) + rlhf_jax_score_bias`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from rlhf_jax import models
from rlhf_jax.errors import UserInputError

# architecture -> our head
ARCHITECTURES = {
  "LlamaForCausalLM": "lm",
  "MistralForCausalLM": "lm",
  "LlamaForSequenceClassification": "scalar",
  "MistralForSequenceClassification": "scalar",
}
MODEL_TYPES = ("llama", "mistral")
SCORE_BIAS_KEY = "rlhf_jax_score_bias"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.model"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer some old checkpoints saved
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


# --- tensor names and layouts --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
  """Where one of our parameters lives in an HF checkpoint and how it is laid out.

  kind: "same" (identical), "t" (2-D transpose), "in_heads" (ours [E, H, D] = HF
  [H*D, E] transposed), "out_heads" (ours [H, D, E] = HF [E, H*D] transposed).
  """

  name: str
  kind: str

  def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
    if self.kind == "same":
      return ours
    if self.kind == "t":
      return ours[::-1]
    if self.kind == "in_heads":
      return (ours[1] * ours[2], ours[0])
    return (ours[2], ours[0] * ours[1])  # out_heads

  def read(self, get, ours: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Our slice `index` of this tensor; `get(hf_index)` reads a slice of the HF tensor."""
    index = tuple(index) + (slice(None),) * (len(ours) - len(index))
    if self.kind == "same":
      return get(index)
    if self.kind == "t":
      return get(index[::-1]).T
    if self.kind == "in_heads":  # [E, H, D] <- [H*D, E]
      e, h, d = index
      (h0, h1, _), hd = h.indices(ours[1]), ours[2]
      block = get((slice(h0 * hd, h1 * hd), e)).T
      return block.reshape(block.shape[0], h1 - h0, hd)[:, :, d]
    h, d, e = index  # out_heads: [H, D, E] <- [E, H*D]
    (h0, h1, _), hd = h.indices(ours[0]), ours[1]
    block = get((e, slice(h0 * hd, h1 * hd))).T
    return block.reshape(h1 - h0, hd, block.shape[1])[:, d, :]

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "same":
      return x
    if self.kind == "t":
      return x.T
    if self.kind == "in_heads":
      return x.reshape(x.shape[0], -1).T
    return x.reshape(-1, x.shape[-1]).T  # out_heads


def tensor_map(n_layers: int, heads: tuple[str, ...], tie_embeddings: bool) -> dict:
  """{our parameter path (tuple of keys): Tensor} in the HF checkpoint's order."""
  m: dict[tuple[str, ...], Tensor] = {
    ("embed", "embedding"): Tensor("model.embed_tokens.weight", "same")
  }
  for i in range(n_layers):
    p, ours = f"model.layers.{i}.", f"layer_{i}"
    m[(ours, "attn_norm", "scale")] = Tensor(p + "input_layernorm.weight", "same")
    for x in "qkv":
      m[(ours, "attn", x)] = Tensor(p + f"self_attn.{x}_proj.weight", "in_heads")
    m[(ours, "attn", "o")] = Tensor(p + "self_attn.o_proj.weight", "out_heads")
    m[(ours, "mlp_norm", "scale")] = Tensor(p + "post_attention_layernorm.weight", "same")
    for x in ("gate", "up", "down"):
      m[(ours, "mlp", x)] = Tensor(p + f"mlp.{x}_proj.weight", "t")
  m[("final_norm", "scale")] = Tensor("model.norm.weight", "same")
  if "lm" in heads and not tie_embeddings:
    m[("lm_head",)] = Tensor("lm_head.weight", "t")
  if "scalar" in heads:
    m[("scalar_head", "kernel")] = Tensor("score.weight", "t")
  return m


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, (*prefix, k)))
    return out
  return {prefix: tree}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


# --- reading safetensors -------------------------------------------------------------------


class Checkpoint(contextlib.ExitStack):
  """The safetensors weights of an HF directory (one file or an index of shards), opened
  memory-mapped; `read(name, index)` returns one slice of one tensor as numpy."""

  def __init__(self, hf_dir: str):
    super().__init__()
    from safetensors import safe_open

    self._open = safe_open
    index, single = os.path.join(hf_dir, INDEX), os.path.join(hf_dir, SINGLE)
    if os.path.exists(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserInputError(
          f"{index}: not a safetensors index ({type(e).__name__}: {e})"
        ) from None
      self.files = {n: os.path.join(hf_dir, f) for n, f in weight_map.items()}
    elif os.path.exists(single):
      self.files = None
      self._single = single
    else:
      bins = [f for f in os.listdir(hf_dir) if f.endswith(".bin")]
      hint = " (PyTorch .bin weights are not read: re-save with safe_serialization=True)"
      raise UserInputError(f"{hf_dir}: no {SINGLE} or {INDEX}" + (hint if bins else ""))
    self._handles: dict[str, Any] = {}
    if self.files is None:
      self.files = {n: single for n in self._handle(single).keys()}

  def _handle(self, path: str):
    if path not in self._handles:
      if not os.path.exists(path):
        raise UserInputError(f"{path}: shard named by {INDEX} not found")
      try:
        self._handles[path] = self.enter_context(self._open(path, framework="numpy"))
      except Exception as e:  # safetensors raises SafetensorError on a bad header
        raise UserInputError(f"{path}: not a safetensors file ({e})") from None
    return self._handles[path]

  def names(self) -> list[str]:
    return list(self.files)

  def _slice(self, name: str):
    if name not in self.files:
      raise UserInputError(f"tensor {name}: missing from the checkpoint")
    try:
      return self._handle(self.files[name]).get_slice(name)
    except UserInputError:
      raise
    except Exception as e:
      raise UserInputError(f"tensor {name}: unreadable ({e})") from None

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._slice(name).get_dtype()

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    try:
      return np.asarray(self._slice(name)[index])
    except UserInputError:
      raise
    except Exception as e:  # a truncated file fails here, on the first read of the tensor
      raise UserInputError(f"tensor {name}: unreadable ({type(e).__name__}: {e})") from None


def load_params(
  hf_dir: str, like, *, heads: tuple[str, ...], tie_embeddings: bool, score_bias: float = 0.0
):
  """Our parameters from an HF directory, laid out like `like` (a pytree of
  ShapeDtypeStructs, with `.sharding` for a mesh; none: the first device).

  Each tensor is checked (present, shape, dtype) before it is read, and read only in
  the slices the local devices hold. Raises UserInputError naming the tensor.
  """
  import jax

  flat_like = _flatten(like)
  n_layers = sum(1 for k in flat_like if k[0].startswith("layer_") and k[1:] == ("attn", "q"))
  tmap = tensor_map(n_layers, heads, tie_embeddings)
  expected = set(flat_like) - {("scalar_head", "bias")}
  if set(tmap) != expected:  # our model and our map disagree: a bug, not bad input
    raise AssertionError(f"tensor map mismatch: {sorted(set(tmap) ^ expected)}")
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = {}
  with Checkpoint(hf_dir) as ckpt:
    used = {t.name for t in tmap.values()}
    ignorable = {"lm_head.weight"} if tie_embeddings else set()
    extra = [
      n
      for n in ckpt.names()
      if n not in used and n not in ignorable and not n.endswith(_IGNORED_SUFFIXES)
    ]
    if extra:
      raise UserInputError(
        f"tensor {extra[0]}: unexpected for this architecture ({len(extra)} unexpected in all)"
      )
    for path, t in tmap.items():
      sds = flat_like[path]
      have, want = ckpt.shape(t.name), t.hf_shape(tuple(sds.shape))
      if have != want:
        raise UserInputError(
          f"tensor {t.name}: shape {list(have)} in the checkpoint, {list(want)} from config.json"
        )
      if ckpt.dtype(t.name) not in _DTYPES:
        raise UserInputError(
          f"tensor {t.name}: dtype {ckpt.dtype(t.name)}: expected one of {', '.join(_DTYPES)}"
        )

      def fetch(index, t=t, sds=sds):
        get = lambda i: ckpt.read(t.name, i)
        return t.read(get, tuple(sds.shape), index).astype(sds.dtype)

      out[path] = jax.make_array_from_callback(
        tuple(sds.shape), getattr(sds, "sharding", None) or default, fetch
      )
  if ("scalar_head", "bias") in flat_like:
    sds = flat_like[("scalar_head", "bias")]
    sh = getattr(sds, "sharding", None) or default
    out[("scalar_head", "bias")] = jax.device_put(np.full(sds.shape, score_bias, sds.dtype), sh)
  return _unflatten(out)


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
  from rlhf_jax import train_lib

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
    _copy_tokenizer(tok_src, dst)

  from rlhf_jax import distributed

  distributed.first(f"import {dst}", copy)
  info = {
    "heads": list(heads),
    "imported_from": os.path.abspath(src),
    "tokenizer": tok_dst,
    **({"reward_bias": bias} if head == "scalar" else {}),
    **meta,
  }
  train_lib.export_params(dst, params, model, **info)
  return train_lib.params_info(dst)


# --- export: our params -> HF directory ------------------------------------------------------


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
  flat = _flatten(params)
  if score_bias is None and head == "scalar":
    score_bias = float(_host(flat[("scalar_head", "bias")]).reshape(()))
  tmap = tensor_map(int(model["n_layers"]), (head,), bool(model.get("tie_embeddings")))
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
  cfg = hf_config(model, head, dtype=dtype, score_bias=score_bias or 0.0)
  files = [*names, "config.json", "generation_config.json"]
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(cfg, f, indent=1)
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f, indent=1)
  if tokenizer_path:
    files += _save_tokenizer(tokenizer_path, tmp)
  if os.path.exists(dst):
    os.rmdir(dst)  # empty (checked above)
  os.replace(tmp, dst)
  return files + ([INDEX] if n > 1 else [])


# transformers' tokenizer files that travel with a tokenizer.model they sit beside
HF_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
)


def _copy_tokenizer(path: str, directory: str) -> list[str]:
  """Copy `path` (a tokenizer.model) and the transformers files beside it; returns names."""
  shutil.copyfile(path, os.path.join(directory, TOKENIZER))
  src = os.path.dirname(os.path.abspath(path))
  names = [n for n in HF_TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(directory, n))
  return [TOKENIZER, *names]


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

  copied = _copy_tokenizer(path, directory)
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
  from rlhf_jax import train_lib

  info = train_lib.params_info(stage_dir)
  if info is None:
    raise UserInputError(f"{stage_dir}: no exported parameters (train that stage first)")
  model = info["model"]
  heads = tuple(info.get("heads") or ("lm",))
  if "lm" in heads and "scalar" in heads:
    heads = ("lm",)
  like = models.abstract_params(model, heads)
  params = train_lib.load_params(stage_dir, like, model)
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


def iter_tensors(hf_dir: str) -> Iterator[tuple[str, np.ndarray]]:
  """Every tensor of an HF directory, whole (for tests and checks)."""
  with Checkpoint(hf_dir) as ckpt:
    for name in ckpt.names():
      yield name, ckpt._handle(ckpt.files[name]).get_tensor(name)
