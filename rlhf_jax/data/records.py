"""The records of every stage dataset of the world (what the TFDS builders store).

- pretraining "web text" (`pretrain_records`) in which questions are mostly NOT
  followed by answers (the GPT-3 behaviour), and held-out text of the same kind;
- labeler demonstrations (`demonstration_records`) and prompts for comparisons and PPO
  (`prompt_records`), disjoint by user (`user_range`) and by text (`is_sft_prompt`);
- held-out zero-shot tasks (`heldout_task_records`, one set per `HELDOUT_TASKS`).

Each dataset draws from its own `world.rng_for(seed, purpose)` stream, so datasets are
independent and reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rlhf_jax import tokenizer as tok
from rlhf_jax.data.responses import evasive, false_fact, response, toxic_line
from rlhf_jax.data.world import (
  ARTICLE,
  ATTRIBUTES,
  OPS,
  WORDS,
  World,
  arith_params,
  conversation_messages,
  correct_response,
  fact_sentence,
  join_items,
  note,
  pick,
  pick_family,
  rng_for,
  sample_conversation,
  sample_items,
  sample_task,
  single_turn,
  times,
)

FILLER = (
  "The market opens early on most days.",
  "It rained all afternoon.",
  "The road to the hills was long and quiet.",
  "Many people walked along the river.",
  "The old bridge was painted last year.",
  "Nobody knew when the train would arrive.",
  "The library was full of students.",
  "A cold wind came from the sea.",
)
INTROS = ("Quiz time.", "Questions from a forum:", "Homework for today:", "Exercise sheet.")


# --- pretraining text ------------------------------------------------------------------


def _encyclopedia(world: World, rng: np.random.Generator) -> list[str]:
  lines = []
  for name in rng.choice(world.names, size=int(rng.integers(1, 4)), replace=False):
    name, facts = str(name), world.kb[str(name)]
    attrs = [str(a) for a in rng.permutation(list(ATTRIBUTES))][: int(rng.integers(2, 5))]
    if rng.random() < 0.3:
      lines.append(note(name, facts, attrs))
    else:
      lines.append(" ".join(fact_sentence(name, a, facts[a], int(rng.integers(3))) for a in attrs))
  return lines


def _worked(world: World, rng: np.random.Generator) -> list[str]:
  out = []
  for _ in range(int(rng.integers(3, 7))):
    k = int(rng.integers(5))
    if k == 0:
      p = arith_params(world, rng)
      out.append(f"{p['a']} {p['op']} {p['b']} = {OPS[p['op']](p['a'], p['b'])}.")
    elif k == 1:
      a, b = (int(x) for x in rng.choice(world.cfg["max_operand"] + 1, 2, replace=False))
      out.append(f"The larger of {a} and {b} is {max(a, b)}.")
    elif k == 2:
      items = sample_items(world, rng, pick(rng, ("numbers", "words")))
      out.append(f"Sorting {join_items(items)} gives {join_items(sorted(items))}.")
    elif k == 3:
      items = sample_items(world, rng, pick(rng, ("numbers", "words")))
      out.append(f"The reverse of {join_items(items)} is {join_items(items[::-1])}.")
    else:
      p, _ = single_turn(world, rng, "count")
      n = sum(x == p["target"] for x in p["items"])
      out.append(f"In {join_items(p['items'])}, {p['target']} appears {times(n)}.")
  return [" ".join(out)]


def _not_an_answer(world: World, rng: np.random.Generator) -> str:
  """What follows a question on the web: more questions, a list or unrelated text."""
  k = int(rng.integers(3))
  if k == 0:
    n = int(rng.integers(1, 4))
    return "\n".join(single_turn(world, rng, pick_family(world, rng))[1] for _ in range(n))
  if k == 1:
    return "Items: " + join_items(rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False))
  return pick(rng, FILLER)


def pretrain_record(world: World, rng: np.random.Generator) -> dict[str, Any]:
  """One "web" document with its annotations.

  Returns `{"text", "kind", "has_question", "question_answered", "untruthful",
  "toxic", "chat"}`. `question_answered` is about the document's instruction: its
  first question, or in a transcript the last user turn (earlier turns are answered).
  """
  c = world.cfg
  u = rng.random()
  has_q = answered = chat = False
  if u < c["pretrain_chat_rate"]:
    kind, chat, has_q = "chat", True, True
    task, messages = sample_task(world, rng)
    answered = bool(rng.random() < c["pretrain_answer_rate"])
    style = "verbose" if rng.random() < 0.3 else "correct"
    reply = response(world, task, style, rng) if answered else evasive(world, task, rng)
    lines = [tok.render([*messages, tok.Message(role="assistant", content=reply)])]
  elif u < c["pretrain_chat_rate"] + c["pretrain_question_rate"]:
    kind, has_q = "question", True
    task, messages = sample_task(world, rng, multi_turn=False)
    answered = bool(rng.random() < c["pretrain_answer_rate"])
    after = correct_response(task, int(rng.integers(3))) if answered else _not_an_answer(world, rng)
    lines = [pick(rng, INTROS)] if rng.random() < 0.5 else []
    lines += [messages[-1]["content"], after]
  elif rng.random() < 0.6:
    kind, lines = "encyclopedia", _encyclopedia(world, rng)
  else:
    kind, lines = "worked", _worked(world, rng)
  if rng.random() < 0.3 and kind != "chat":
    lines.append(pick(rng, FILLER))
  # Injections go before or after the body, never between a question and its follow-up.
  untruthful = bool(rng.random() < c["pretrain_untruthful_rate"])
  if untruthful:
    line = false_fact(world.kb, rng)
    lines = [line, *lines] if rng.random() < 0.5 else [*lines, line]
  toxic = bool(rng.random() < c["pretrain_toxic_rate"])
  if toxic:
    line = toxic_line(rng)
    lines = [line, *lines] if rng.random() < 0.5 else [*lines, line]
  return {
    "text": "\n".join(lines),
    "kind": kind,
    "has_question": has_q,
    "question_answered": answered,
    "untruthful": untruthful,
    "toxic": toxic,
    "chat": chat,
  }


def pretrain_records(world: World, n: int | None = None, purpose: str = "pretrain") -> Iterator:
  """`n` (default `num_pretrain`) pretraining documents, see `pretrain_record`."""
  rng = rng_for(world.cfg["seed"], purpose)
  for _ in range(world.cfg["num_pretrain"] if n is None else n):
    yield pretrain_record(world, rng)


def heldout_text_records(world: World, n: int | None = None) -> Iterator[dict[str, str]]:
  """Held-out documents from the pretraining distribution: `{"text"}`."""
  n = world.cfg["num_heldout_text"] if n is None else n
  for r in pretrain_records(world, n, purpose="heldout_text"):
    yield {"text": r["text"]}


# --- stage datasets --------------------------------------------------------------------


def user_range(world: World, name: str, split: str) -> tuple[int, int]:
  """[lo, hi) of the simulated user ids of a split; all four ranges are disjoint."""
  c = world.cfg
  sizes = [
    ("demonstrations/train", c["demo_users"]),
    ("demonstrations/validation", c["demo_val_users"]),
    ("prompts/train", c["prompt_users"]),
    ("prompts/validation", c["prompt_val_users"]),
  ]
  lo = 0
  for key, size in sizes:
    if key == f"{name}/{split}":
      return lo, lo + int(size)
    lo += int(size)
  raise ValueError(f"no users for {name}/{split}")


def _stable_unit(text: str, seed: int) -> float:
  """A hash of `text` in [0, 1): which pool (SFT or RL) a prompt text belongs to."""
  h = hashlib.blake2b(f"{seed}|{text}".encode(), digest_size=8).digest()
  return int.from_bytes(h, "little") / 2.0**64


def is_sft_prompt(world: World, messages: Sequence[tok.Message]) -> bool:
  """Whether a prompt text belongs to the SFT pool (else to the comparison/PPO pool)."""
  return _stable_unit(tok.render(messages), world.cfg["seed"]) < world.cfg["sft_prompt_fraction"]


def _pool_conversation(world: World, rng: np.random.Generator, sft: bool) -> list:
  """The turns of the next conversation whose prompt belongs to the SFT pool (or not)."""
  while True:
    turns = sample_conversation(world, rng)
    if is_sft_prompt(world, conversation_messages(turns)) == sft:
      return turns


def _pool_task(world: World, rng: np.random.Generator, sft: bool) -> tuple[dict, list]:
  turns = _pool_conversation(world, rng, sft)
  return turns[-1][0], conversation_messages(turns)


def demonstration_records(world: World, split: str = "train", n: int | None = None) -> Iterator:
  """SFT demonstrations: labelers answer prompts, mostly right but imperfectly.

  Yields `{"messages" (ending in the assistant reply), "family", "user_id", "task",
  "quality"}` with `quality` one of "correct", "wrong", "verbose".
  """
  c = world.cfg
  n = c["num_demonstrations" if split == "train" else "num_demonstrations_val"] if n is None else n
  lo, hi = user_range(world, "demonstrations", split)
  rng = rng_for(c["seed"], f"demonstrations/{split}")
  for _ in range(n):
    task, messages = _pool_task(world, rng, sft=True)
    u = rng.random()
    quality = (
      "wrong"
      if u < c["demo_error_rate"]
      else "verbose"
      if u < c["demo_error_rate"] + c["demo_verbose_rate"]
      else "correct"
    )
    reply = response(world, task, quality, rng)
    yield {
      "messages": [*messages, tok.Message(role="assistant", content=reply)],
      "family": task["family"],
      "user_id": int(rng.integers(lo, hi)),
      "task": task,
      "quality": quality,
    }


def prompt_records(
  world: World, split: str = "train", n: int | None = None, turns: bool = False
) -> Iterator:
  """Prompts for comparisons and PPO, disjoint from the SFT ones by user and by text.

  Yields `{"messages" (ending in a user turn), "family", "user_id", "prompt_id", "task"}`;
  prompt ids are unique across both splits. `turns=True` adds the user's side of the
  conversation, `"turns": [{"task", "user"}]` (earlier turns first): what a policy is
  talked to with when it writes the earlier replies itself (`data/conversations.py`).
  """
  c = world.cfg
  n = c["num_prompts" if split == "train" else "num_prompts_val"] if n is None else n
  offset = 0 if split == "train" else int(c["num_prompts"])
  lo, hi = user_range(world, "prompts", split)
  rng = rng_for(c["seed"], f"prompts/{split}")
  for i in range(n):
    conv = _pool_conversation(world, rng, sft=False)
    task = conv[-1][0]
    record = {
      "messages": conversation_messages(conv),
      "family": task["family"],
      "user_id": int(rng.integers(lo, hi)),
      "prompt_id": offset + i,
      "task": task,
    }
    if turns:
      record["turns"] = [{"task": t, "user": u} for t, u in conv]
    yield record


HELDOUT_TASKS = ("fact_cloze", "arithmetic", "larger", "sort")


def _heldout_task(world: World, rng: np.random.Generator, name: str) -> dict[str, Any]:
  if name == "fact_cloze":
    n, a = pick(rng, world.names), pick(rng, list(ATTRIBUTES))
    true = world.kb[n][a]
    others = [str(v) for v in rng.choice([v for v in ATTRIBUTES[a] if v != true], 3, False)]
    values, context = [true, *others], f"The {a} of {n} is"
    choices = [f" {ARTICLE[a]}{v}" for v in values]
  elif name == "arithmetic":
    p = arith_params(world, rng)
    r = OPS[p["op"]](p["a"], p["b"])
    wrong = [r + d for d in (-2, -1, 1, 2, 3) if r + d >= 0]
    values = [r, *(int(x) for x in rng.choice(wrong, 3, replace=False))]
    context, choices = f"{p['a']} {p['op']} {p['b']} =", [f" {v}" for v in values]
  elif name == "larger":
    a, b = (int(x) for x in rng.choice(world.cfg["max_operand"] + 1, 2, replace=False))
    context, choices = f"The larger of {a} and {b} is", [f" {max(a, b)}", f" {min(a, b)}"]
  elif name == "sort":
    while True:
      items = sample_items(world, rng, pick(rng, ("numbers", "words")))
      s = sorted(items)
      if items not in (s, s[::-1]):
        break
    context = f"Sorting {join_items(items)} gives"
    choices = [f" {join_items(s)}.", f" {join_items(items)}.", f" {join_items(s[::-1])}."]
  else:
    raise ValueError(f"unknown held-out task {name!r}")
  order = [int(i) for i in rng.permutation(len(choices))]
  return {
    "task_name": name,
    "context": context,
    "choices": [choices[i] for i in order],
    "label": order.index(0),
  }


def heldout_task_records(world: World, n: int | None = None) -> Iterator[dict[str, Any]]:
  """Zero-shot multiple-choice tasks scored by LM log-likelihood of each choice.

  Yields `{"task_name", "context", "choices", "label"}`; `n` (default
  `num_heldout_tasks`) examples of each of `HELDOUT_TASKS`.
  """
  n = world.cfg["num_heldout_tasks"] if n is None else n
  for name in HELDOUT_TASKS:
    rng = rng_for(world.cfg["seed"], f"heldout_tasks/{name}")
    for _ in range(n):
      yield _heldout_task(world, rng, name)
