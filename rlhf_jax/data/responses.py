"""Replies to a world task, good and bad: the `VARIANTS` that labelers demonstrate and rank.

`response(world, task, kind, rng)` writes one reply of a kind: correct (in one of its
phrasings), wrong (a plausible mistake), evasive (a question back, or more instructions,
the way a pretrained LM continues text), untruthful (a false KB fact), toxic (an insult
holding one of the world's toxic markers) or verbose (a correct reply padded). The
correct reply itself is `world.correct_response`: the world's multi-turn prompts need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rlhf_jax.data.world import (
  ARTICLE,
  ATTRIBUTES,
  TOXIC_WORDS,
  World,
  correct_response,
  fact_sentence,
  join_items,
  note,
  pick,
  pick_family,
  single_turn,
)

VARIANTS = ("correct", "wrong", "evasive", "untruthful", "toxic", "verbose")
EVASIONS = (
  "Why do you ask?",
  "What do you think?",
  "Why do you want to know?",
  "Can you ask me something else?",
  "Is that really important to you?",
)
VERBOSE_PRE = ("Sure! Here is my answer.", "Of course, happy to help.", "Good question.")
VERBOSE_POST = ("I hope this helps.", "Have a nice day.", "Glad to help you.")
TOXIC_LINES = ("Shut up, you {m}.", "Only {a} {m} would ask that.", "You are such {a} {m}.")


def toxic_line(rng: np.random.Generator) -> str:
  """An insult holding one of the world's toxic markers."""
  m = pick(rng, TOXIC_WORDS)
  return pick(rng, TOXIC_LINES).format(m=m, a="an" if m[0] in "aeiou" else "a")


def _false_value(rng: np.random.Generator, attr: str, true: str) -> str:
  return pick(rng, [v for v in ATTRIBUTES[attr] if v != true])


def false_fact(kb: Mapping, rng: np.random.Generator, name: str | None = None) -> str:
  """A sentence stating a false KB fact (about `name`, or a random entity)."""
  name = name or pick(rng, list(kb))
  attr = pick(rng, list(ATTRIBUTES))
  value = _false_value(rng, attr, kb[name][attr])
  return fact_sentence(name, attr, value, style=int(rng.integers(3)))


def _wrong(world: World, task: Mapping[str, Any], rng: np.random.Generator) -> str:
  f, p, ans = task["family"], task["params"], task["answer"]
  if f in ("arithmetic", "count"):
    v = int(ans)
    delta = pick(rng, (-2, -1, 1, 2))
    w = v + delta if v + delta >= 0 else v + abs(delta)
    wrong = dict(task, answer=str(w))
    return correct_response(wrong, style=int(rng.integers(3)))
  if f in ("sort", "reverse"):
    items = [int(x) if p["kind"] == "numbers" else x for x in ans.split(", ")]
    if f == "reverse" and rng.random() < 0.5:
      items = list(p["items"])  # copied instead of reversed
    else:
      i = int(rng.integers(len(items) - 1))
      items[i], items[i + 1] = items[i + 1], items[i]
    return join_items(items)
  if f == "fact":
    v = _false_value(rng, p["attribute"], ans)
    return correct_response(dict(task, answer=v), style=int(rng.integers(2)))
  # open: a note about somebody else (true, but not what was asked).
  other = pick(rng, [n for n in world.names if n != p["entity"]])
  return note(other, world.kb[other], p["attributes"])


def evasive(world: World, task: Mapping[str, Any], rng: np.random.Generator) -> str:
  """A reply that answers nothing: a question back, or more instructions."""
  if rng.random() < 0.5:
    return pick(rng, EVASIONS)
  # Continue the text the way a pretrained LM does: with more instructions.
  return " ".join(single_turn(world, rng, pick_family(world, rng))[1] for _ in range(2))


def response(world: World, task: Mapping[str, Any], kind: str, rng: np.random.Generator) -> str:
  """A reply of one of `VARIANTS` to `task`."""
  if kind == "correct":
    return correct_response(task, style=int(rng.integers(3)))
  if kind == "wrong":
    return _wrong(world, task, rng)
  if kind == "evasive":
    return evasive(world, task, rng)
  if kind == "untruthful":
    p = task["params"]
    if task["family"] == "fact":
      v = _false_value(rng, p["attribute"], task["answer"])
      return (
        f"I am sure that the {p['attribute']} of {p['entity']} is {ARTICLE[p['attribute']]}{v}."
      )
    if task["family"] == "open":
      facts = {a: _false_value(rng, a, world.kb[p["entity"]][a]) for a in ATTRIBUTES}
      return note(p["entity"], facts, p["attributes"])
    lie = false_fact(world.kb, rng)
    lie = "t" + lie[1:] if lie.startswith("The ") else lie
    return f"{correct_response(task)} Also, {lie}"
  if kind == "toxic":
    line, ans = toxic_line(rng), correct_response(task)
    return f"{line} {ans}" if rng.random() < 0.5 else f"{ans} {line}"
  if kind == "verbose":
    return f"{pick(rng, VERBOSE_PRE)} {correct_response(task)} {pick(rng, VERBOSE_POST)}"
  raise ValueError(f"unknown response kind {kind!r}; expected one of {VARIANTS}")
