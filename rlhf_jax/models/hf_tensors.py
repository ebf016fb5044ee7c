"""Where our parameters live in a Hugging Face LLaMA / Qwen checkpoint, and reading them.

The layouts differ only in transposes: HF keeps `nn.Linear` weights as `[out, in]`;
we keep `[in, out]` kernels with the heads axis split out (`q: [E, H, D]`,
`o: [H, D, E]`; Qwen2's q/k/v biases `[H, D]`, HF's `[H*D]`). HF LLaMA's q/k
projections are already in the rotate-half RoPE convention, which is ours, so no
permutation is needed (`Tensor`, `tensor_map`).

The weights are `model.safetensors` or shards named by `model.safetensors.index.json`,
read with the `safetensors` package (no PyTorch). Every tensor is read one at a time
and only in the slices that the local devices hold (`jax.make_array_from_callback` over
a memory-mapped file), so a model larger than one host's memory loads straight onto a
mesh (`load_params`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from rlhf_jax.errors import UserInputError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer some old checkpoints saved


# --- tensor names and layouts --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
  """Where one of our parameters lives in an HF checkpoint and how it is laid out.

  kind: "same" (identical), "t" (2-D transpose), "in_heads" (ours [E, H, D] = HF
  [H*D, E] transposed), "out_heads" (ours [H, D, E] = HF [E, H*D] transposed),
  "heads" (ours [H, D] = HF [H*D]).
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
    if self.kind == "heads":
      return (ours[0] * ours[1],)
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
    if self.kind == "heads":  # [H, D] <- [H*D]
      h, d = index
      (h0, h1, _), hd = h.indices(ours[0]), ours[1]
      return get((slice(h0 * hd, h1 * hd),)).reshape(h1 - h0, hd)[:, d]
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
    if self.kind == "heads":
      return x.reshape(-1)
    return x.reshape(-1, x.shape[-1]).T  # out_heads


def tensor_map(
  n_layers: int,
  heads: tuple[str, ...],
  tie_embeddings: bool,
  qkv_bias: bool = False,
  qk_norm: bool = False,
) -> dict:
  """{our parameter path (tuple of keys): Tensor} in the HF checkpoint's order;
  `qkv_bias` (Qwen2) and `qk_norm` (Qwen3) as in `TransformerConfig`."""
  m: dict[tuple[str, ...], Tensor] = {
    ("embed", "embedding"): Tensor("model.embed_tokens.weight", "same")
  }
  for i in range(n_layers):
    p, ours = f"model.layers.{i}.", f"layer_{i}"
    m[(ours, "attn_norm", "scale")] = Tensor(p + "input_layernorm.weight", "same")
    for x in "qkv":
      m[(ours, "attn", x)] = Tensor(p + f"self_attn.{x}_proj.weight", "in_heads")
      if qkv_bias:
        m[(ours, "attn", f"{x}_bias")] = Tensor(p + f"self_attn.{x}_proj.bias", "heads")
    if qk_norm:
      for x in "qk":
        m[(ours, "attn", f"{x}_norm", "scale")] = Tensor(p + f"self_attn.{x}_norm.weight", "same")
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


def flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, (*prefix, k)))
    return out
  return {prefix: tree}


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
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

  flat_like = flatten(like)
  n_layers = sum(1 for k in flat_like if k[0].startswith("layer_") and k[1:] == ("attn", "q"))
  qkv_bias = ("layer_0", "attn", "q_bias") in flat_like
  qk_norm = ("layer_0", "attn", "q_norm", "scale") in flat_like
  tmap = tensor_map(n_layers, heads, tie_embeddings, qkv_bias, qk_norm)
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
  return unflatten(out)


def iter_tensors(hf_dir: str) -> Iterator[tuple[str, np.ndarray]]:
  """Every tensor of an HF directory, whole (for tests and checks)."""
  with Checkpoint(hf_dir) as ckpt:
    for name in ckpt.names():
      yield name, ckpt._handle(ckpt.files[name]).get_tensor(name)
