"""Checkpoints and exports.

- `Checkpointer`: an Orbax `CheckpointManager` saving the train state *and* the input
  iterator state together (keep N, every M steps, at the end), restoring the latest
  and falling back to the previous one when the latest is unreadable; a readable one
  holding another state (another config) is an error that moves nothing.
- `export_params` / `load_params`: a stage's final parameters with the model config
  they belong to; the next stage starts from them, and a mismatch (another model size)
  is a one-line error naming the path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from rlhf_jax import distributed
from rlhf_jax.errors import UserInputError

log = logging.getLogger(__name__)
Params = Any


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) to restore a tree exactly as laid out now."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


def layout(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """`a.b.c` -> (shape, dtype) of every array of `tree` (arrays, ShapeDtypeStructs or
  Orbax's array metadata)."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="."): (
      tuple(getattr(leaf, "shape", ())),
      str(getattr(leaf, "dtype", type(leaf).__name__)),
    )
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def layout_differences(saved: Mapping[str, Any], built: Mapping[str, Any]) -> list[str]:
  """What differs between a checkpoint's layout and the one a config builds."""

  def show(x):
    return f"{x[1]}{list(x[0])}"

  def order(keys):  # the parameters first: the optimiser's moments repeat them
    return sorted(keys, key=lambda k: (not k.startswith("params."), k))

  out = [f"{k}: not in the checkpoint" for k in order(built.keys() - saved.keys())]
  out += [f"{k}: only in the checkpoint" for k in order(saved.keys() - built.keys())]
  out += [
    f"{k}: {show(saved[k])} in the checkpoint, {show(built[k])} now"
    for k in order(saved.keys() & built.keys())
    if saved[k] != built[k]
  ]
  return out


class Checkpointer:
  """Train state + input-iterator state, saved together, restored together."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, save_every: int = 100):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self.mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
      ),
    )

  def due(self, step: int) -> bool:
    return step % self.save_every == 0 and step not in self.mngr.all_steps()

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    if not (force or self.due(step)):
      return False
    self._check_space(step, state)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
      self.mngr.wait_until_finished()
    except Exception as e:  # a full disk, a read-only or vanished directory, ...
      # Orbax writes into a temporary directory and renames it when complete, so the
      # checkpoints already there are untouched.
      text = str(e)
      reason = getattr(e, "strerror", None) or next(
        (
          m
          for m in ("No space left on device", "Read-only file system", "Permission denied")
          if m in text
        ),
        text.splitlines()[0][:200] if text else type(e).__name__,
      )
      raise UserInputError(
        f"{self.directory}: cannot write checkpoint {step} ({reason}); {self._kept(step)}"
      ) from None
    return True

  def _kept(self, step: int) -> str:
    before = [s for s in self.mngr.all_steps() if s != step]
    return f"step {max(before)} is intact" if before else "there is no earlier one"

  def _check_space(self, step: int, state) -> None:
    """Refuse before writing when the disk cannot hold this process's share of the state
    (an Orbax write that runs out of space fails too, but noisily, from its threads)."""
    need = sum(x.nbytes for x in jax.tree.leaves(state)) / jax.process_count()
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise UserInputError(
        f"{self.directory}: cannot write checkpoint {step} (No space left on device: it "
        f"needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free); "
        f"{self._kept(step)}"
      )

  def restore_latest(self, state, data_iter=None) -> tuple[Any, int]:
    """Restore the newest readable checkpoint into `state`'s structure and layout.

    Returns `(state, step)`; `(state, 0)` unchanged when there is none. A checkpoint
    that cannot be read is set aside (renamed) and the previous one is tried; one that
    reads but holds another state than `state` (other leaves, shapes or dtypes: another
    config) is a UserInputError naming the differences, and nothing is moved.
    """
    for step in sorted(self.mngr.all_steps(), reverse=True):
      try:
        saved = layout(self._metadata(step))
      except Exception as e:  # no readable metadata: a truncated / corrupted step
        self._set_aside(step, e)
        continue
      diff = layout_differences(saved, layout(state))
      if diff:
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise UserInputError(
          f"{self.directory}/{step}: the checkpoint holds another train state than this "
          f"config builds ({'; '.join(diff[:4])}{more}); re-run with the config that wrote "
          f"it, or use a new --workdir"
        )
      items = {"state": ocp.args.StandardRestore(_abstract(state))}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # its arrays or the iterator state do not read
        self._set_aside(step, e)
        continue
      return restored["state"], step
    return state, 0

  def _metadata(self, step: int):
    """The saved state's tree of array metadata (read without restoring any array)."""
    path = epath.Path(self.directory) / str(step) / "state"
    return ocp.StandardCheckpointHandler().metadata(path).tree

  def _set_aside(self, step: int, e: Exception) -> None:
    """Keep an unreadable step for inspection under another name, so it can be written
    again."""
    aside = f"{self.directory}/{step}.unreadable-{int(time.time())}"
    rename = functools.partial(os.rename, f"{self.directory}/{step}", aside)
    distributed.first(f"aside {step}", rename)
    self.mngr.reload()
    log.warning(
      "checkpoint %s/%d unreadable (%s: %s), moved to %s",
      self.directory,
      step,
      type(e).__name__,
      str(e)[:200],
      aside,
    )
    print(
      f"warning: checkpoint {self.directory}/{step} is unreadable "
      f"({type(e).__name__}); moved to {aside}, using the previous one"
    )

  def close(self) -> None:
    self.mngr.close()


def export_params(directory: str, params: Params, model_config: Mapping[str, Any], **meta) -> None:
  """Write a stage's final parameters (`<dir>/params`) and what model they belong to."""
  path = os.path.join(os.path.abspath(directory), "params")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()
  tok = meta.get("tokenizer")
  if tok and os.path.exists(tok):  # what the next stage checks its tokenizer against
    meta["tokenizer_sha256"] = tokenizer_sha256(tok)
  write_params_info(directory, {"model": dict(model_config), **meta})


def save_tree(path: str, tree) -> None:
  """A tree of arrays to the Orbax checkpoint `path` (replaced if there); read it back
  with `ocp.StandardCheckpointer().restore(path)`."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), tree, force=True)
  ckptr.wait_until_finished()


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def tokenizer_sha256(path: str) -> str:
  """A SentencePiece model's sha256, or a tokenizer.json's with the files that travel with
  it (its special tokens and chat template change the ids of a dialogue too)."""
  if not path.endswith(".json"):
    return file_sha256(path)
  from rlhf_jax import hf_tokenizer

  h = hashlib.sha256()
  for name in hf_tokenizer.FILES:
    if os.path.exists(p := os.path.join(os.path.dirname(os.path.abspath(path)), name)):
      h.update(f"{name}\0{file_sha256(p)}\0".encode())
  return h.hexdigest()


def write_params_info(directory: str, info: Mapping[str, Any]) -> None:
  """(Re)write `<dir>/params.json` atomically (process 0; the others wait for it, as a
  stage is complete once it exists)."""

  def write():
    tmp = os.path.join(directory, "params.json.tmp")
    with open(tmp, "w") as f:
      json.dump(dict(info), f, indent=1, default=str)
    os.replace(tmp, os.path.join(directory, "params.json"))

  distributed.first(f"params.json {directory}", write)


def params_info(directory: str) -> dict[str, Any] | None:
  path = os.path.join(directory, "params.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "head_dim")
# and what the parameters mean (Qwen's extra ones, the RoPE they were trained with): off
# (the defaults) in exports from before these fields
_ARCH_KEYS = {"qkv_bias": False, "qk_norm": False, "rope_type": "default"}


def load_params(
  directory: str, like: Params, model_config: Mapping[str, Any], tokenizer: str | None = None
) -> Params:
  """Parameters exported by a previous stage, laid out like `like`.

  A missing export, one for another model shape, or (given the `tokenizer` file this run
  uses) one trained with another tokenizer is a UserInputError naming the path and the
  mismatch.
  """
  info = params_info(directory)
  if info is None or not os.path.isdir(os.path.join(directory, "params")):
    raise UserInputError(f"{directory}: no exported parameters (run that stage first)")
  theirs = {**_ARCH_KEYS, **info["model"]}
  ours = {**_ARCH_KEYS, **model_config}
  diff = [
    f"{k}={theirs.get(k)} (checkpoint) vs {ours.get(k)} (config)"
    for k in (*_SHAPE_KEYS, *_ARCH_KEYS)
    if theirs.get(k) != ours.get(k)
  ]
  if diff:
    raise UserInputError(f"{directory}: model mismatch: {'; '.join(diff)}")
  recorded = info.get("tokenizer_sha256")
  if (
    tokenizer and recorded and os.path.exists(tokenizer) and tokenizer_sha256(tokenizer) != recorded
  ):
    raise UserInputError(
      f"{directory}: trained with the tokenizer {info.get('tokenizer')}, but this run's "
      f"tokenizer {tokenizer} is another one (sha256 differs); set config.tokenizer.path to "
      f"the checkpoint's"
    )
  try:
    return ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), "params"), _abstract(like)
    )
  except Exception as e:
    raise UserInputError(
      f"{directory}/params: cannot restore ({type(e).__name__}: {str(e)[:200]})"
    ) from None
