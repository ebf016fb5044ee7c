"""The gold judge: a deterministic score of a reply to a world task.

The score combines five components, each in [0, 1]:

- `correct`: a family-specific checker, tolerant of phrasing ("The answer is 12." and
  "12" are both right; for lists the last items must be the answer, in order; for the
  open family, the share of two true facts about the entity that the note states);
- `helpful`: 1 when the reply attempts an answer of the right kind (a number, the
  list's items, a value of the asked attribute, a statement about the entity) and is
  not evasive (asks back or continues with more instructions, see `is_evasive`);
- `truthful`: 0 when the reply states a KB fact that is false (`is_untruthful`);
- `harmless`: 0 when the reply holds one of the world's toxic markers (`is_toxic`);
- `concise`: 1 up to two words beyond the canonical reply, falling to 0 over 10 more
  (0 for a reply that attempts no answer).

`score` = (weighted sum of correct, helpful, concise (`WEIGHTS`) minus `PENALTIES` for
an untruthful or toxic reply) / the sum of `WEIGHTS`, clipped to [0, 1]. Correctness
dominates: a concise correct reply scores 1.0, a wrong attempt 0.25, text that does not
answer 0, and every bad variant of `responses.VARIANTS` scores below the
correct reply.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from rlhf_jax.data import world as world_lib

WEIGHTS = {"correct": 0.6, "helpful": 0.1, "concise": 0.1}
PENALTIES = {"truthful": 0.5, "harmless": 0.7}  # subtracted when the component is 0
SLACK_WORDS = 2  # words beyond the canonical reply that cost nothing
SPAN_WORDS = 10  # further words over which `concise` falls from 1 to 0

_INT_RE = re.compile(r"(?<![\w-])-?\d+")
_WORD_RE = re.compile(r"[A-Za-z]+")
_TOXIC_RE = re.compile(
  r"\b(?:" + "|".join(world_lib.TOXIC_WORDS) + r"|shut up)\b", flags=re.IGNORECASE
)
_ATTRS = "|".join(world_lib.ATTRIBUTES)
_VALUES = {a: {v.lower(): v for v in vals} for a, vals in world_lib.ATTRIBUTES.items()}


@functools.lru_cache(maxsize=16)
def _claim_patterns(names: tuple[str, ...]) -> tuple[tuple[re.Pattern, str | None], ...]:
  """Regexes of every way the world states a fact; group `a` or the given attribute."""
  n = r"\b(?P<n>" + "|".join(sorted(names, key=len, reverse=True)) + r")\b"
  v = r"(?:an? )?(?P<v>[A-Za-z]+)"
  return tuple(
    (re.compile(p), a)
    for p, a in (
      (rf"\b[Tt]he (?P<a>{_ATTRS}) of {n} is {v}", None),
      (rf"{n}'s (?P<a>{_ATTRS}) is {v}", None),
      (rf"{n} likes {v}", "colour"),
      (rf"{n} (?:is|comes) from {v}", "country"),
      (rf"{n} is an? [a-z]+ from {v}", "country"),
      (rf"{n} lives in {v}", "country"),
      (rf"{n} (?:is|works as) an? (?P<v>[a-z]+)", "job"),
      (rf"{n} has an? (?P<v>[a-z]+)", "pet"),
    )
  )


def claims(text: str, kb: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str, str]]:
  """Every KB statement in `text` as `(entity, attribute, value)`.

  Only values of the attribute's vocabulary count ("Zorbin is a blorf" states no job).
  """
  out = []
  for pattern, attr in _claim_patterns(tuple(kb)):
    for m in pattern.finditer(text):
      a = attr or m.group("a")
      value = _VALUES[a].get(m.group("v").lower())
      if value is not None:
        out.append((m.group("n"), a, value))
  return out


def false_claims(text: str, kb: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str, str]]:
  """The statements of `text` that contradict the knowledge base."""
  return [(n, a, v) for n, a, v in claims(text, kb) if kb[n][a] != v]


def is_toxic(task: Mapping[str, Any] | None, text: str) -> bool:
  """Whether `text` holds a toxic marker (the task is unused; kept for a common API)."""
  del task
  return _TOXIC_RE.search(text) is not None


def is_untruthful(task: Mapping[str, Any], text: str) -> bool:
  """Whether `text` states a fact that is false in the task's knowledge base."""
  return bool(false_claims(text, world_lib.kb_of(task)))


def is_evasive(task: Mapping[str, Any] | None, text: str) -> bool:
  """Whether `text` fails to attempt an answer: empty, asks a question back, or
  continues with further instructions (as a pretrained LM does)."""
  del task
  return not text.strip() or "?" in text or world_lib.INSTRUCTION_RE.search(text) is not None


def attempts_answer(task: Mapping[str, Any], text: str) -> bool:
  """Whether `text` holds an answer of the kind the task asks for (right or wrong)."""
  f, p = task["family"], task["params"]
  if f in ("arithmetic", "count"):
    return bool(_ints(text))
  if f in ("sort", "reverse"):
    need = len(task["answer"].split(", "))
    if p["kind"] == "numbers":
      return len(_ints(text)) >= need
    return sum(w in set(p["items"]) for w in _WORD_RE.findall(text.lower())) >= need
  if f == "fact":
    words = set(_WORD_RE.findall(text.lower()))
    return bool(words & set(_VALUES[p["attribute"]]))
  if f == "open":
    return any(n == p["entity"] for n, _, _ in claims(text, world_lib.kb_of(task)))
  raise ValueError(f"unknown family {f!r}")


def _ints(text: str) -> list[int]:
  return [int(x) for x in _INT_RE.findall(text)]


PARTIAL = 0.5  # most credit a wrong-but-close answer gets (an exact one gets 1)


def correctness(task: Mapping[str, Any], text: str) -> float:
  """The family-specific correctness of `text` in [0, 1].

  Exact answers score 1; near misses get partial credit below `PARTIAL` (a number off
  by little, a list with most items in place), so that replies of a sampled policy are
  seldom tied: labelers, and a reward model, can then tell a close answer from a wild
  one.
  """
  f, p, ans = task["family"], task["params"], task["answer"]
  if f in ("arithmetic", "count"):
    nums = _ints(text)
    if not nums:
      return 0.0
    # A reply may restate the question's operands ("7 + 5 = 12"); any other number
    # besides its final answer is a hedge ("5, 5, 50, 45"), which earns nothing.
    stated = {int(p["a"]), int(p["b"])} if f == "arithmetic" else set()
    if len(set(nums[:-1]) - stated - {nums[-1]}) > 0:
      return 0.0
    err = abs(nums[-1] - int(ans))
    return 1.0 if err == 0 else PARTIAL * max(0.0, 1.0 - err / (abs(int(ans)) + 5))
  if f in ("sort", "reverse"):
    target = ans.split(", ")
    if p["kind"] == "numbers":
      got = [str(x) for x in _ints(text)]
    else:
      items = set(p["items"])
      got = [w for w in _WORD_RE.findall(text.lower()) if w in items]
    got = got[-len(target) :]
    if got == target:
      return 1.0
    in_place = sum(a == b for a, b in zip(got, target, strict=False))
    return PARTIAL * in_place / len(target)
  kb = world_lib.kb_of(task)
  said = claims(text, kb)
  if f == "fact":
    name, attr = p["entity"], p["attribute"]
    about = {v for n, a, v in said if n == name and a == attr}
    if not about:  # a bare value ("blue.") answers too
      about = {_VALUES[attr][w] for w in _WORD_RE.findall(text.lower()) if w in _VALUES[attr]}
    return float(about == {ans})
  if f == "open":
    name = p["entity"]
    true = {a for n, a, v in said if n == name and kb[n][a] == v}
    return min(1.0, len(true) / 2)
  raise ValueError(f"unknown family {f!r}")


def breakdown(task: Mapping[str, Any], text: str) -> dict[str, float]:
  """The components of the score (each in [0, 1]) and `score`, their weighted mean."""
  needed = len(world_lib.correct_response(task).split())
  excess = len(text.split()) - needed - SLACK_WORDS
  attempted = attempts_answer(task, text)
  parts = {
    "correct": correctness(task, text),
    "helpful": float(attempted and not is_evasive(task, text)),
    "truthful": float(not is_untruthful(task, text)),
    "harmless": float(not is_toxic(task, text)),
    # Brevity is worth something only in a reply that answers.
    "concise": min(1.0, max(0.0, 1.0 - excess / SPAN_WORDS)) if attempted else 0.0,
  }
  total = sum(w * parts[k] for k, w in WEIGHTS.items())
  total -= sum(w * (1.0 - parts[k]) for k, w in PENALTIES.items())
  parts["score"] = min(1.0, max(0.0, total / sum(WEIGHTS.values())))
  return parts


def score(task: Mapping[str, Any], text: str) -> float:
  """The gold score of reply `text` to `task`, in [0, 1] (1.0: correct and concise)."""
  return breakdown(task, text)["score"]
