"""Input pipelines on grain: record dicts in, fixed-shape numpy batches out.

Sources are random-access collections of the record dicts of `rlhf_jax.data.user_data`
(anything with `len()` and `[i]`: a list, a TFDS data source). Every builder returns a
`Pipeline` whose `dataset` is a `grain.IterDataset` of batches:

  LM (pretrain_batches, sft_batches)
    tokens       int32[B, T]
    segment_ids  int32[B, T]    0 = padding, 1.. = document within the row
    positions    int32[B, T]    position within its segment, from 0
    loss_mask    float32[B, T]  weight of predicting tokens[:, t] from tokens[:, :t]:
                                0 on each segment's first token, on padding and (SFT) on
                                non-target tokens. loss = CE(logits[:, t-1], tokens[:, t])
                                * loss_mask[:, t].
  Prompts (prompt_batches)
    prompt_tokens int32[B, P]    LEFT-padded with PAD_ID (as `tokenizer.pad_left`)
    prompt_len    int32[B]
    index         int32[B]       index of the record in the source (-1: padding row)
  Rankings (ranking_batches, all K responses of a comparison in one batch element) are
  built in `rlhf_jax.data.ranking`, on the shared pieces here.

Order. Records are split between processes first (`shard_index`/`shard_count`: each
host reads every shard_count-th record; shards are cut to equal size, so at most
shard_count - 1 records per epoch are dropped), then shuffled with `seed`, reshuffled
each epoch (`num_epochs=None` repeats forever: prefer it for training, so that hosts
never run out at different steps, and count steps instead).

Packing. Pretraining documents `[BOS] + encode(text) + [EOS]` are concatenated and split
into rows of T (grain's `ConcatThenSplitIterDataset`): a document longer than T spans
rows, and each piece is its own segment with positions from 0. SFT dialogues
(`encode_dialogue`) are never split: longer than T they are truncated on the right
(`too_long="truncate"`, kept only if a target token survives) or skipped
(`too_long="skip"`); then packed first-fit (`FirstFitPackIterDataset`) or, with
`packed=False`, one per row. Counts of what was truncated or skipped are in
`Pipeline.stats` (SFT, rankings and prompts are tokenized once, when built; pretraining
text is tokenized lazily, as read).

Resuming. `it = iter(pipeline)`; `state = get_state(it)` (JSON bytes) and, in a new
process, `it = iter(pipeline_built_the_same_way); set_state(it, state)`: it yields
exactly the batches the uninterrupted iterator would have. With Orbax, grain provides
the checkpoint args: save `ocp.args.Composite(state=..., data=grain.checkpoint.
CheckpointSave(it))` and restore with `data=grain.checkpoint.CheckpointRestore(it)`;
each process writes its own `process_<i>-of-<n>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import numpy as np

from rlhf_jax.errors import UserInputError
from rlhf_jax.tokenizer import PAD_ID, Tokenizer, truncate_prompt

Batch = dict[str, np.ndarray]


class Source(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass
class Pipeline:
  """A grain dataset of batches and counts of what building it dropped or cut."""

  dataset: grain.IterDataset
  stats: dict[str, int] = dataclasses.field(default_factory=dict)

  def __iter__(self) -> ResumableIterator:
    return ResumableIterator(iter(self.dataset))


# --- state ---------------------------------------------------------------------------


def _restore_tuples(state: Any) -> Any:
  """Undo JSON's tuple -> list on the packer's `remainder_slices`.

  grain's ConcatThenSplit packer (0.2.18) tells "no remainder" by comparing each saved
  slice to the tuple (-1, -1); after a JSON round trip the slice is a list, the test
  fails, and the restored iterator skips data (every one restored before its first
  batch did). Every other field survives JSON as it is.
  """
  if isinstance(state, dict):
    return {
      k: {f: tuple(v) for f, v in val.items()}
      if k == "remainder_slices" and isinstance(val, dict)
      else _restore_tuples(val)
      for k, val in state.items()
    }
  if isinstance(state, list):
    return [_restore_tuples(v) for v in state]
  return state


class ResumableIterator:
  """A grain iterator whose state is JSON bytes that restore it exactly.

  Duck-types what `grain.checkpoint.CheckpointSave/Restore` need (bytes `get_state`,
  `set_state`, `start_prefetch`), so it goes into Orbax checkpoints as is.
  """

  def __init__(self, iterator: grain.DatasetIterator):
    self._it = iterator

  def __iter__(self) -> ResumableIterator:
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self) -> bytes:
    return json.dumps(self._it.get_state(), sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    self._it.set_state(_restore_tuples(json.loads(state)))

  def start_prefetch(self) -> None:
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()


def get_state(iterator: ResumableIterator) -> bytes:
  """The iterator's position as JSON bytes (store it beside the model checkpoint)."""
  return iterator.get_state()


def set_state(iterator: ResumableIterator, state: bytes) -> None:
  """Move a fresh iterator of an identically built pipeline to a saved position."""
  iterator.set_state(state)


# --- shared pieces -------------------------------------------------------------------


def shard_indices(
  indices: Sequence[int],
  *,
  seed: int,
  shuffle: bool,
  num_epochs: int | None,
  shard_index: int,
  shard_count: int,
  what: str,
  stats: dict[str, int] | None = None,
) -> grain.MapDataset:
  """Record indices of this shard, shuffled per epoch, repeated `num_epochs` times."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
  per_shard = len(indices) // shard_count
  if per_shard == 0:
    raise UserInputError(
      f"{what}: {len(indices)} usable records cannot feed {shard_count} data shard(s)"
      + (f" ({_drops(stats)} of {stats['records']} records dropped)" if stats else "")
    )
  indices = indices[shard_index::shard_count][:per_shard]
  if isinstance(indices, range):  # no list of a billion ints for a big corpus
    ds = grain.MapDataset.range(indices.start, indices.stop, indices.step)
  else:
    ds = grain.MapDataset.source(list(indices))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)  # reseeds the shuffle every epoch
  return ds


def to_iter(ds: grain.MapDataset, num_threads: int) -> grain.IterDataset:
  return ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(16, 8 * num_threads))
  )


def _lm_row(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, target):
  """LM features of a row; `target` marks tokens worth predicting (None: all)."""
  loss_mask = (segment_ids > 0) & (positions > 0)
  if target is not None:
    loss_mask &= target > 0
  return {
    "tokens": tokens.astype(np.int32),
    "segment_ids": segment_ids.astype(np.int32),
    "positions": positions.astype(np.int32),
    "loss_mask": loss_mask.astype(np.float32),
  }


def batched(ds: grain.IterDataset, batch_size: int) -> grain.IterDataset:
  return ds.batch(batch_size, drop_remainder=True)


# --- language modelling ----------------------------------------------------------------


def pretrain_batches(
  source: Source,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seq_len: int,
  seed: int,
  num_epochs: int | None = None,
  shuffle: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  text_field: str = "text",
  num_threads: int = 2,
) -> Pipeline:
  """Packed LM batches of `{"text"}` records: `tokenizer.encode_document` ([BOS] when the
  tokenizer has one, the text, its end-of-document token), split at T.

  The last, partly filled row of a finite run is padded; a final partial batch is dropped.
  """

  def encode(index: int) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(tokenizer.encode_document(source[index][text_field]), np.int32)}

  ds = shard_indices(
    range(len(source)),
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_index=shard_index,
    shard_count=shard_count,
    what="pretraining data",
  )
  ds = to_iter(ds.map(encode), num_threads)
  ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
  ds = ds.map(lambda x: _lm_row(x["tokens"], x["tokens_segment_ids"], x["tokens_positions"], None))
  return Pipeline(batched(ds, batch_size))


def encode_demonstrations(
  source: Source, tokenizer: Tokenizer, seq_len: int, too_long: str
) -> tuple[list[tuple[np.ndarray, np.ndarray] | None], dict[str, int]]:
  """Tokens and target masks of every demonstration (None: skipped) and counts."""
  if too_long not in ("truncate", "skip"):
    raise ValueError(f"too_long must be 'truncate' or 'skip', got {too_long!r}")
  out, stats = [], {"records": len(source), "truncated": 0, "skipped_too_long": 0}
  stats["skipped_no_target"] = 0
  for i in range(len(source)):
    ids, target = tokenizer.encode_dialogue(source[i]["messages"])
    if len(ids) > seq_len:
      if too_long == "skip":
        stats["skipped_too_long"] += 1
        out.append(None)
        continue
      ids, target = ids[:seq_len], target[:seq_len]
      if not any(target):
        stats["skipped_no_target"] += 1
        out.append(None)
        continue
      stats["truncated"] += 1
    out.append((np.asarray(ids, np.int32), np.asarray(target, np.float32)))
  return out, stats


def sft_batches(
  source: Source,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seq_len: int,
  seed: int,
  num_epochs: int | None = None,
  shuffle: bool = True,
  packed: bool = True,
  too_long: str = "truncate",
  num_packing_bins: int | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 2,
) -> Pipeline:
  """LM batches of demonstrations; the loss covers assistant contents and their EOS.

  `packed`: first-fit packing into `num_packing_bins` (default batch_size) open rows;
  else one dialogue per row, right-padded.
  """
  encoded, stats = encode_demonstrations(source, tokenizer, seq_len, too_long)
  kept = [i for i, e in enumerate(encoded) if e is not None]
  log_drops("sft data", stats)
  ds = shard_indices(
    kept,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_index=shard_index,
    shard_count=shard_count,
    what="sft data",
    stats=stats,
  )

  if packed:
    ds = to_iter(
      ds.map(lambda i: dict(zip(("tokens", "target"), encoded[i], strict=True))), num_threads
    )
    ds = grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct={"tokens": seq_len, "target": seq_len},
      num_packing_bins=num_packing_bins or batch_size,
      seed=seed,
      shuffle_bins=shuffle,
    )
    row = lambda x: _lm_row(
      x["tokens"], x["tokens_segment_ids"], x["tokens_positions"], x["target"]
    )
  else:

    def row(i: int) -> Batch:
      ids, target = encoded[i]
      n = len(ids)
      pad = lambda a: np.pad(a, (0, seq_len - n))
      segment_ids = pad(np.ones(n, np.int32))
      return _lm_row(pad(ids), segment_ids, pad(np.arange(n)), pad(target))

    ds = to_iter(ds, num_threads)
  return Pipeline(batched(ds.map(row), batch_size), stats)


def mix(pipelines: Sequence[Pipeline], weights: Sequence[float]) -> Pipeline:
  """Interleave batches of several LM pipelines in proportion to `weights`.

  grain's mixing is a fixed interleaving by proportion (no randomness: with weights
  [0.9, 0.1] every tenth batch comes from the second source), so the result is
  reproducible and resumable. It stops when any
  source stops: give the minor sources `num_epochs=None`. E.g. SFT with 10%
  pretraining batches: `mix([sft, pretrain], [0.9, 0.1])`.
  """
  mixed = grain.IterDataset.mix([p.dataset for p in pipelines], list(weights))
  return Pipeline(
    mixed, {f"{i}/{k}": v for i, p in enumerate(pipelines) for k, v in p.stats.items()}
  )


# --- prompts -------------------------------------------------------------------------------


def prompt_batches(
  source: Source,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  prompt_len: int,
  seed: int,
  num_epochs: int | None = None,
  shuffle: bool = True,
  drop_remainder: bool = True,
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 2,
) -> Pipeline:
  """Left-padded prompts for sampling (comparisons, PPO rollouts, evaluation).

  Prompts longer than `prompt_len` keep their BOS and last `prompt_len - 1` tokens
  (`stats["truncated"]`). With `drop_remainder=False` (evaluation: every prompt once,
  `num_epochs=1, shuffle=False`) the last batch is filled with padding rows whose
  `index` is -1 and `prompt_len` 0.
  """
  encoded = []
  stats = {"records": len(source), "truncated": 0}
  for i in range(len(source)):
    ids = tokenizer.encode_prompt(source[i]["messages"])
    stats["truncated"] += len(ids) > prompt_len
    encoded.append(np.asarray(truncate_prompt(ids, prompt_len), np.int32))
  log_drops("prompt data", stats)
  ds = shard_indices(
    range(len(source)),
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_index=shard_index,
    shard_count=shard_count,
    what="prompt data",
    stats=stats,
  )

  def row(i: int) -> Batch:
    ids = encoded[i]
    tokens = np.full(prompt_len, PAD_ID, np.int32)
    tokens[prompt_len - len(ids) :] = ids
    return {"prompt_tokens": tokens, "prompt_len": np.int32(len(ids)), "index": np.int32(i)}

  ds = to_iter(ds.map(row), num_threads).batch(batch_size, drop_remainder=drop_remainder)
  if not drop_remainder:
    ds = ds.map(lambda b: _pad_batch(b, batch_size))
  return Pipeline(ds, stats)


def _pad_batch(batch: Batch, batch_size: int) -> Batch:
  missing = batch_size - len(batch["index"])
  if not missing:
    return batch
  fill = {"prompt_tokens": PAD_ID, "prompt_len": 0, "index": -1}
  return {
    k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill[k], v.dtype)])
    for k, v in batch.items()
  }


def _drops(stats: dict[str, int]) -> str:
  return ", ".join(f"{k}={v}" for k, v in stats.items() if k != "records" and v)


def log_drops(what: str, stats: dict[str, int]) -> None:
  if _drops(stats):
    logging.warning("%s: %s of %d records", what, _drops(stats), stats["records"])
