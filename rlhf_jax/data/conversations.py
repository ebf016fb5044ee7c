"""Comparison data as ChatGPT's was collected: from conversations with the policy.

"We randomly selected a model-written message, sampled several alternative completions,
and had AI trainers rank them" (OpenAI, 2022). Here a conversation is a world prompt's
user turns (`records.prompt_records(..., turns=True)`) answered by the policy itself:

1. `choose_turns`: for each conversation, one of the policy's messages (one per user
   turn), uniformly at random;
2. `contexts`: the conversation up to that turn's user message, every earlier assistant
   turn sampled from the policy (`reply_fn(prompts, turn)`, one batched call per turn), the task
   the chosen message answers (what the labelers and the gold judge check it against);
3. the comparisons stage samples K responses at each context (`comparisons.compare`):
   the first is the chosen model-written message, the other K - 1 its alternatives,
   all from the same policy at the same point, so K stays in [rank_k_min, rank_k_max].

Choosing the turn first and sampling only the earlier replies is the same distribution
as writing the whole conversation and choosing afterwards: later turns do not change the
chosen point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax import tokenizer as tok
from rlhf_jax.data import world as world_lib

ReplyFn = Callable[[list[list[tok.Message]], int], list[str]]  # (prompts, turn) -> replies


def turns_of(record: Mapping[str, Any]) -> list[tuple[dict, str]]:
  """(task, user message) per turn of a conversation record."""
  return [(t["task"], t["user"]) for t in record["turns"]]


def choose_turns(records: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> list[int]:
  """For each conversation, the index of the policy message to compare (uniform)."""
  return [int(rng.integers(len(r["turns"]))) for r in records]


def contexts(
  records: Sequence[Mapping[str, Any]], chosen: Sequence[int], reply_fn: ReplyFn
) -> list[dict[str, Any]]:
  """Prompt records at the chosen turns: `messages` (ending in that turn's user message,
  earlier replies the policy's own), its `task` and `family`, `turn` (0-based) and
  `num_turns`; the other keys of the record are kept (`turns` dropped)."""
  if len(records) != len(chosen):
    raise ValueError("records and chosen must have the same length")
  replies: list[list[str]] = [[] for _ in records]
  for depth in range(max(chosen, default=0)):
    need = [i for i, j in enumerate(chosen) if j > depth]
    prompts = [
      world_lib.conversation_messages(turns_of(records[i])[: depth + 1], replies[i]) for i in need
    ]
    texts = reply_fn(prompts, depth)
    if len(texts) != len(need):
      raise ValueError(f"reply_fn returned {len(texts)} replies for {len(need)} prompts")
    for i, text in zip(need, texts, strict=True):
      replies[i].append(text)
  out = []
  for r, j, said in zip(records, chosen, replies, strict=True):
    turns = turns_of(r)
    task = turns[j][0]
    out.append(
      {
        **{k: v for k, v in r.items() if k != "turns"},
        "messages": world_lib.conversation_messages(turns[: j + 1], said),
        "task": task,
        "family": task["family"],
        "turn": j,
        "num_turns": len(turns),
      }
    )
  return out
