"""The sampling-and-scoring runner of an evaluation, and the rows and prompts it reads.

`Runner` holds what every model computation of one evaluation shares (model config,
mesh, rows per call): replies sampled with the one batching loop
(`sampling.sample_prompts`), summed target log-probs of packed sequences (`score`), and
from those a policy's KL to the reference, held-out LM loss and zero-shot accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sampling, sharding, tokenizer
from rlhf_jax.data import records as records_lib
from rlhf_jax.models import TransformerConfig
from rlhf_jax.stages import lm

KL_TEMPERATURE = 1.0
PACK_LEN = 128  # tokens per scoring row (short sequences are packed into one)


def few_shot_prefix(demonstrations, k: int) -> list[tokenizer.Message]:
  """k demonstration dialogues as chat turns: the first correct single-turn one of each
  family in turn (of any quality when too few), in the source's order."""
  if k <= 0:
    return []
  picked, families = [], set()
  for strict in (True, False):
    for i in range(len(demonstrations)):
      if len(picked) == k:
        break
      r = demonstrations[i]
      good = r.get("quality", "correct") == "correct" and len(r["messages"]) == 2
      if i in {j for j, _ in picked} or (strict and (not good or r.get("family") in families)):
        continue
      picked.append((i, r["messages"]))
      families.add(r.get("family"))
  return [tokenizer.Message(role=m["role"], content=m["content"]) for _, ms in picked for m in ms]


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def target_logprobs(params, batch: dict[str, jax.Array], *, model_cfg: TransformerConfig):
  """f32[B, T]: loss_mask[:, t] * log p(tokens[:, t] | the tokens before it in its segment).

  batch: tokens, segment_ids, positions int32[B, T] (several sequences may share a row,
  told apart by segment id), loss_mask f32[B, T] (weight of tokens[:, t] as a target; 0
  on each sequence's first token). Entry 0 is 0.
  """
  logits = lm.logits(model_cfg, params, batch)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  target = jnp.where(batch["loss_mask"][:, 1:] > 0, target * batch["loss_mask"][:, 1:], 0.0)
  return jnp.pad(target, ((0, 0), (1, 0)))


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Runner:
  """A model config, mesh and row count shared by every computation of one evaluation."""

  def __init__(self, model_cfg: TransformerConfig, mesh, rows: int):
    self.model_cfg, self.mesh, self.rows = model_cfg, mesh, rows

  def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return sharding.put_batch(batch, self.mesh)

  def sample(
    self,
    params,
    prompts: Sequence[list[int]],
    rng,
    *,
    temperature,
    top_p,
    max_new_tokens,
    sample_fn=None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Sampled reply ids int32[N, max_new_tokens] and their mask bool[N, ...] (EOS in);
    `sample_fn`: a policy's own sampler (`sampling.sample_prompts`)."""
    return sampling.sample_prompts(
      self.model_cfg,
      params,
      prompts,
      rng,
      rows=self.rows,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      mesh=self.mesh,
      sample_fn=sample_fn,
    )

  def score(self, params, seqs: Sequence[tuple[list[int], list[float]]]) -> np.ndarray:
    """f64[N] summed target log-probs of (ids, target weights) sequences.

    Sequences are packed in order into rows of `max(PACK_LEN, longest)` tokens (rounded
    to 32; one length per call, so one compile), each its own segment: scored exactly as
    alone, with little padding.
    """
    length = round_up(max(PACK_LEN, *(len(ids) for ids, _ in seqs)), 32)
    place, rows, used = [], 0, length  # (row, start, length) of every sequence
    for ids, _ in seqs:
      if used + len(ids) > length:
        rows, used = rows + 1, 0
      place.append((rows - 1, used, len(ids)))
      used += len(ids)
    out = np.zeros((rows, length))
    for first in range(0, rows, self.rows):
      batch = {k: np.zeros((self.rows, length), np.int32) for k in ("tokens", "segment_ids")}
      batch["positions"] = np.zeros((self.rows, length), np.int32)
      batch["loss_mask"] = np.zeros((self.rows, length), np.float32)
      for seg, ((ids, target), (row, start, n)) in enumerate(zip(seqs, place, strict=True)):
        if first <= row < first + self.rows:
          r, span = row - first, slice(start, start + n)
          batch["tokens"][r, span] = ids
          batch["segment_ids"][r, span] = seg + 1
          batch["positions"][r, span] = np.arange(n)
          batch["loss_mask"][r, span] = target
          batch["loss_mask"][r, start] = 0.0  # no context in its segment
      lp = target_logprobs(params, self.put(batch), model_cfg=self.model_cfg)
      lp = sharding.to_host(lp).astype(np.float64)
      out[first : first + self.rows] = lp[: min(self.rows, rows - first)]
    return np.array([out[row, start : start + n].sum() for row, start, n in place])

  def kl(self, params, ref_params, ids, ref_ids, rng, max_new_tokens: int) -> float:
    """Mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t), y ~ pi at temperature 1
    (`ids`: the prompts as the policy sees them, `ref_ids` as the reference does)."""
    toks, masks = self.sample(
      params, ids, rng, temperature=KL_TEMPERATURE, top_p=1.0, max_new_tokens=max_new_tokens
    )
    resp = [row[m].tolist() for row, m in zip(toks, masks, strict=True)]
    seqs = lambda prompts: [
      (p + y, [0.0] * len(p) + [1.0] * len(y)) for p, y in zip(prompts, resp, strict=True)
    ]
    own = self.score(params, seqs(ids))
    ref = self.score(ref_params, seqs(ref_ids))
    return float(np.mean(own - ref))

  def lm_loss(self, params, rows) -> float:
    """Mean per-token loss of (ids, target weights) rows (`heldout_rows`); nan for none."""
    targets = sum(sum(t) for _, t in rows)
    return float(-self.score(params, rows).sum() / targets) if targets else float("nan")

  def zero_shot(self, params, records, rows) -> dict[str, float]:
    """Accuracy per task of `records` (their `choice_rows` in order): the choice with the
    highest summed log-likelihood against the label."""
    if not records:
      return {}
    lp = self.score(params, rows)
    correct: dict[str, list[bool]] = {}
    at = 0
    for r in records:
      k = len(r["choices"])
      correct.setdefault(r["task_name"], []).append(int(np.argmax(lp[at : at + k])) == r["label"])
      at += k
    order = [t for t in records_lib.HELDOUT_TASKS if t in correct]
    order += sorted(set(correct) - set(order))
    return {name: float(np.mean(correct[name])) for name in order}


def heldout_rows(tok: tokenizer.Tokenizer, docs, seq_len: int):
  """Rows (ids, target weights) covering every token of `docs` as pretraining reads
  them (`[BOS] + text + [EOS]`), cut into pieces of `seq_len`; a piece's first token is
  not a target (it has no context in its row, as in packed pretraining)."""
  rows = []
  for doc in docs:
    ids = tok.encode_document(doc["text"])
    for start in range(0, len(ids), seq_len):
      piece = ids[start : start + seq_len]
      if len(piece) > 1:
        rows.append((piece, [0.0] + [1.0] * (len(piece) - 1)))
  return rows


def choice_rows(tok: tokenizer.Tokenizer, record: Mapping[str, Any]):
  """One row per choice: `[BOS] + context + choice`, the choice's tokens the targets.

  The choice tokens are those of `encode(context + choice)` past `encode(context)` when
  that prefix is kept (as the text reads in pretraining), else `encode(choice)`.
  """
  ctx = tok.encode(record["context"])
  rows = []
  for choice in record["choices"]:
    full = tok.encode(record["context"] + choice)
    ids = full[len(ctx) :] if full[: len(ctx)] == ctx and len(full) > len(ctx) else None
    ids = ids or tok.encode(choice)
    rows.append(([*tok.bos, *ctx, *ids], [0.0] * (len(tok.bos) + len(ctx)) + [1.0] * len(ids)))
  return rows
