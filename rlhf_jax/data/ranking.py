"""Reward-model input pipelines: all K responses of a comparison in one batch element.

Sources hold the ranking records of `rlhf_jax.data.user_data` (`{"messages", "responses",
"ranking"}`, ranking best-first). A batch of `ranking_batches`, K padded to K_max
(`max_responses`):

  tokens       int32[B, K, T]  prompt + response k, right-padded
  segment_ids  int32[B, K, T]  1 on real tokens, 0 on padding
  positions    int32[B, K, T]
  last_index   int32[B, K]     index of the response's EOS (read the reward there)
  prompt_len   int32[B, K]     tokens of (possibly truncated) prompt before response k
  rank         int32[B, K]     0 = best; -1 for padded responses
  response_mask bool[B, K]     real responses
  index        int32[B]        index of the comparison in the source

With `packed_len` > 0 a comparison is instead one row of `packed_len` tokens: its prompt
once, then its K responses, each attending to the prompt and to itself only (the
transformer's `shared_prefix` mask) at the positions it would have after the prompt
alone, so every reward equals the padded layout's (the default world's comparisons,
mean K 6, hold 92 tokens packed against 218 real ones of 576 padded slots, 9 x 64):

  tokens       int32[B, L]  prompt, response 0, ..., response K-1, padding
  segment_ids  int32[B, L]  1 on the prompt, 2 + k on response k, 0 on padding
  positions    int32[B, L]  0.. on the prompt; each response continues from the prompt
  last_index, prompt_len, rank, response_mask, index as above

Order, sharding and resuming are as for every pipeline of `rlhf_jax.data.pipeline`;
`fixed_batches` gives every comparison once, in order (evaluation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import judge
from rlhf_jax.data.pipeline import (
  Batch,
  Pipeline,
  Source,
  batched,
  log_drops,
  shard_indices,
  to_iter,
)
from rlhf_jax.tokenizer import PAD_ID, Tokenizer, truncate_prompt


def ranking_batches(
  source: Source,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seq_len: int,
  max_responses: int,
  seed: int,
  num_epochs: int | None = None,
  shuffle: bool = True,
  too_long: str = "truncate",
  shard_index: int = 0,
  shard_count: int = 1,
  num_threads: int = 2,
  packed_len: int = 0,
) -> Pipeline:
  """Reward-model batches: all K responses of a comparison in one batch element.

  Sequence k is `encode_prompt(messages) + encode_response(responses[k])`. A prompt too
  long for a response is cut from the left (its BOS kept; `too_long="skip"` skips the
  comparison instead). Skipped and counted: comparisons with a response that alone
  does not fit after BOS (`skipped_response_too_long`) and with more than
  `max_responses` responses (`skipped_too_many_responses`). With `packed_len` (the
  packed layout, `seq_len` unused) "fit" means the prompt and all K responses in one row.
  """
  if too_long not in ("truncate", "skip"):
    raise ValueError(f"too_long must be 'truncate' or 'skip', got {too_long!r}")
  stats = dict.fromkeys(
    ("truncated", "skipped_too_long", "skipped_response_too_long", "skipped_too_many_responses"),
    0,
  )
  stats["records"] = len(source)
  encoded: list[Batch | None] = []
  encode = _encode_packed if packed_len else _encode_ranking
  for i in range(len(source)):
    if len(source[i]["responses"]) > max_responses:
      stats["skipped_too_many_responses"] += 1
      encoded.append(None)
      continue
    encoded.append(
      encode(source[i], i, tokenizer, packed_len or seq_len, max_responses, too_long, stats)
    )
  kept = [i for i, e in enumerate(encoded) if e is not None]
  log_drops("ranking data", stats)
  ds = shard_indices(
    kept,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_index=shard_index,
    shard_count=shard_count,
    what="ranking data",
    stats=stats,
  )
  ds = to_iter(ds.map(lambda i: encoded[i]), num_threads)
  return Pipeline(batched(ds, batch_size), stats)


def fixed_batches(
  records: Sequence[dict[str, Any]],
  tok: Tokenizer,
  *,
  batch_size: int,
  seq_len: int,
  max_responses: int,
  packed_len: int = 0,
) -> tuple[Iterator[dict[str, np.ndarray]], dict[str, int]]:
  """Every usable comparison once, in order, in batches of `batch_size`.

  The last batch is filled with padding elements (`rank` -1 everywhere, `index` -1).
  Returns the batches and the encoding counts (`ranking_batches` stats).
  """
  p = ranking_batches(
    records,
    tok,
    batch_size=1,
    seq_len=seq_len,
    max_responses=max_responses,
    seed=0,
    num_epochs=1,
    shuffle=False,
    packed_len=packed_len,
  )

  def batches():
    rows = []
    for row in p:
      rows.append(row)
      if len(rows) == batch_size:
        yield _collate(rows, batch_size)
        rows = []
    if rows:
      yield _collate(rows, batch_size)

  return batches(), p.stats


def _collate(rows: list[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
  out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  missing = batch_size - len(rows)
  if missing:
    fill = {"rank": -1, "index": -1}
    out = {
      k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill.get(k, 0), v.dtype)])
      for k, v in out.items()
    }
  return out


def _empty_element(token_shape: tuple[int, ...], max_responses: int, index: int) -> Batch:
  """A batch element of padding: token fields of `token_shape`, no responses."""
  return {
    "tokens": np.full(token_shape, PAD_ID, np.int32),
    "segment_ids": np.zeros(token_shape, np.int32),
    "positions": np.zeros(token_shape, np.int32),
    "last_index": np.zeros(max_responses, np.int32),
    "prompt_len": np.zeros(max_responses, np.int32),
    "rank": np.full(max_responses, -1, np.int32),
    "response_mask": np.zeros(max_responses, bool),
    "index": np.int32(index),
  }


def _encode_ranking(
  record: dict,
  index: int,
  tokenizer: Tokenizer,
  seq_len: int,
  max_responses: int,
  too_long: str,
  stats,
) -> Batch | None:
  responses, ranking = record["responses"], record["ranking"]
  k = len(responses)
  prompt = tokenizer.encode_prompt(record["messages"])
  out = _empty_element((max_responses, seq_len), max_responses, index)
  truncated = False
  for j, text in enumerate(responses):
    response = tokenizer.encode_response(text)
    if len(response) > seq_len - 1:
      stats["skipped_response_too_long"] += 1
      return None
    p = truncate_prompt(prompt, seq_len - len(response))
    if len(p) < len(prompt):
      if too_long == "skip":
        stats["skipped_too_long"] += 1
        return None
      truncated = True
    ids = p + response
    n = len(ids)
    out["tokens"][j, :n] = ids
    out["segment_ids"][j, :n] = 1
    out["positions"][j, :n] = np.arange(n)
    out["last_index"][j] = n - 1
    out["prompt_len"][j] = len(p)
    out["response_mask"][j] = True
  out["rank"][np.asarray(ranking)] = np.arange(k)
  stats["truncated"] += truncated
  return out


def _encode_packed(
  record: dict,
  index: int,
  tokenizer: Tokenizer,
  packed_len: int,
  max_responses: int,
  too_long: str,
  stats,
) -> Batch | None:
  responses, ranking = record["responses"], record["ranking"]
  k = len(responses)
  encoded = [tokenizer.encode_response(text) for text in responses]
  room = packed_len - sum(len(r) for r in encoded)
  if room < 1:  # not even the prompt's BOS
    stats["skipped_response_too_long"] += 1
    return None
  full = tokenizer.encode_prompt(record["messages"])
  prompt = truncate_prompt(full, room)
  if len(prompt) < len(full):
    if too_long == "skip":
      stats["skipped_too_long"] += 1
      return None
    stats["truncated"] += 1
  p = len(prompt)
  out = _empty_element((packed_len,), max_responses, index)
  out["tokens"][:p] = prompt
  out["segment_ids"][:p] = 1
  out["positions"][:p] = np.arange(p)
  start = p
  for j, response in enumerate(encoded):
    n = len(response)
    out["tokens"][start : start + n] = response
    out["segment_ids"][start : start + n] = 2 + j
    out["positions"][start : start + n] = np.arange(p, p + n)
    out["last_index"][j] = start + n - 1
    out["prompt_len"][j] = p
    out["response_mask"][j] = True
    start += n
  out["rank"][np.asarray(ranking)] = np.arange(k)
  return out


def pair_info(records: Sequence[dict], index: np.ndarray, k_max: int):
  """For the elements `index` points at: gold-judge scores f32[N, K] of the responses,
  which are known bool[N, K] (records with a `task`), and which pairs of responses are
  the same text bool[N, K, K]."""
  n = len(index)
  scores, known = np.zeros((n, k_max), np.float32), np.zeros((n, k_max), bool)
  same = np.zeros((n, k_max, k_max), bool)
  for row, i in enumerate(index):
    rec = records[int(i)]
    texts = rec["responses"]
    k = len(texts)
    same[row, :k, :k] = [[a == b for b in texts] for a in texts]
    task = rec.get("task")
    if isinstance(task, dict) and "family" in task:
      scores[row, :k] = [judge.score(task, t) for t in texts]
      known[row, :k] = True
  return scores, known, same
