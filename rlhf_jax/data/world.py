"""The embedded default world: a seeded generator of checkable instructions and text.

A small made-up world stands in for the internet and for the people of the paper:

- a knowledge base (KB) of entities with generated names (`Zorbin`) and attributes
  (`colour`, `country`, `job`, `pet`), stated in the pretraining text;
- six instruction families whose answers can be checked: `arithmetic`, `sort`,
  `reverse`, `count`, `fact` (KB look-up) and the open-ended `open` ("write a short
  note about Zorbin", judged by a rubric);
- for every task the correct reply and typical bad replies (`VARIANTS`): wrong,
  evasive, untruthful, toxic, verbose;
- the records of every stage dataset: pretraining "web text" in which questions are
  mostly NOT followed by answers (the GPT-3 behaviour), labeler demonstrations,
  prompts for comparisons and PPO (disjoint from the demonstrations by user and by
  text) and held-out text and zero-shot tasks.

A task is a JSON-serialisable dict

    {"family": "arithmetic", "params": {"a": 7, "op": "+", "b": 12}, "answer": "19",
     "multi_turn": False, "kb": {"seed": 0, "num_entities": 40}}

whose `kb` names the knowledge base (rebuilt and cached from it by `kb_of`), so the
judge can check any task without the world object. Everything is a pure function of
`world_config()`: each dataset draws from its own `numpy.random.Generator` seeded by
`(seed, purpose)`, so datasets are independent and reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax import tokenizer as tok
from rlhf_jax.errors import UserInputError

FAMILIES = ("arithmetic", "sort", "reverse", "count", "fact", "open")
VARIANTS = ("correct", "wrong", "evasive", "untruthful", "toxic", "verbose")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
  "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
  "country": ("Varnia", "Qolth", "Mireth", "Dunsk", "Pellor", "Ostrel", "Zandu", "Kirrow"),
  "job": ("baker", "farmer", "doctor", "teacher", "pilot", "singer", "painter", "tailor"),
  "pet": ("cat", "dog", "fish", "bird", "horse", "goat", "frog", "mouse"),
}
ARTICLE = {"colour": "", "country": "", "job": "a ", "pet": "a "}
# Items of sort / reverse / count lists (disjoint from attribute values and markers).
WORDS = ("apple", "banana", "cherry", "grape", "kiwi", "lemon", "mango", "melon", "olive")
WORDS += ("peach", "pear", "plum")
# The world's toxic markers: made-up slurs plus a few rude words.
TOXIC_WORDS = ("blorf", "grak", "snizzle", "vruk", "zog", "idiot", "stupid")
_SYLLABLES = ("ka", "zo", "rin", "bel", "mo", "tu", "vex", "li", "dra", "po", "sen", "ur")
_SYLLABLES += ("qui", "thal", "nel", "gor", "bin", "sa")

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

QUESTIONS = {
  "arithmetic": ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."),
  "sort": ("Sort these {kind}: {items}.", "Put these {kind} in order: {items}."),
  "reverse": ("Reverse this list: {items}.", "Reverse the order of: {items}."),
  "count": (
    "How many times does {target} appear in: {items}?",
    "Count how often {target} appears in: {items}.",
  ),
  "fact": ("What is the {attr} of {name}?", "Tell me the {attr} of {name}."),
  "open": ("Write a short note about {name}.", "Tell me about {name}.", "Describe {name} briefly."),
}
FOLLOW_UPS = {
  "+": "Now add {b} to that.",
  "-": "Now subtract {b} from that.",
  "*": "Now multiply that by {b}.",
  "fact": "And what is the {attr}?",
}
# Starts of instructions: a reply that is one of these continues the text, not answers.
INSTRUCTION_RE = re.compile(
  r"(?:^|[.!?]\s+|\n)(?:What is|How many|Compute|Calculate|Sort these|Put these|Reverse|"
  r"Count how|Tell me|Write a|Describe|And what|Now (?:add|subtract|multiply))\b"
)

FACT_TEMPLATES = {
  "colour": ("The colour of {n} is {v}.", "{n} likes {v}.", "{n}'s colour is {v}."),
  "country": ("The country of {n} is {v}.", "{n} is from {v}.", "{n} lives in {v}."),
  "job": ("The job of {n} is a {v}.", "{n} is a {v}.", "{n} works as a {v}."),
  "pet": ("The pet of {n} is a {v}.", "{n} has a {v}."),
}
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


def world_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """All knobs of the generated world; the defaults train a tiny model in minutes.

  `runlocal=True` shrinks every dataset for a quick local run / test (same world).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds the KB and every dataset (each from its own (seed, purpose) stream)
  # Difficulty.
  c.num_entities = 40  # entities in the knowledge base, each with all 4 attributes
  c.max_operand = 20  # operands of + and - are drawn from [0, max_operand]
  c.max_factor = 9  # operands of * are drawn from [0, max_factor]
  c.max_list_number = 50  # numbers in sort / reverse lists are drawn from [0, max_list_number]
  c.min_list_len = 3  # shortest list in sort / reverse / count tasks
  c.max_list_len = 5  # longest list in sort / reverse / count tasks
  c.multi_turn_rate = 0.2  # fraction of prompts with an earlier user/assistant exchange
  c.family_weights = ml_collections.ConfigDict()  # relative frequency of each task family
  c.family_weights.arithmetic = 0.2  # "What is 7 + 12?"
  c.family_weights.sort = 0.15  # "Sort these numbers: 5, 2, 9."
  c.family_weights.reverse = 0.15  # "Reverse this list: kiwi, plum, pear."
  c.family_weights.count = 0.15  # "How many times does plum appear in: ...?"
  c.family_weights.fact = 0.2  # "What is the colour of Zorbin?" (knowledge base look-up)
  c.family_weights.open = 0.15  # "Write a short note about Zorbin." (rubric-judged)
  # Sizes (records per split).
  c.num_pretrain = 20_000  # pretraining documents ("web text")
  c.num_demonstrations = 4_000  # SFT demonstrations, train split
  c.num_demonstrations_val = 400  # SFT demonstrations, validation split (other users)
  c.num_prompts = 2_000  # comparison / PPO prompts, train split
  c.num_prompts_val = 500  # comparison / PPO prompts, validation split (other users)
  c.num_heldout_text = 500  # held-out documents from the pretraining distribution
  c.num_heldout_tasks = 200  # zero-shot examples per held-out task
  # Simulated users: splits by user as in the paper (disjoint id ranges, in this order).
  c.demo_users = 40  # users whose prompts labelers answered for SFT (train)
  c.demo_val_users = 10  # users of the SFT validation split
  c.prompt_users = 60  # users of the comparison / PPO train split
  c.prompt_val_users = 15  # users of the comparison / PPO validation split
  c.sft_prompt_fraction = 0.5  # share of the prompt-text space reserved for SFT prompts
  # Pretraining corpus.
  c.pretrain_question_rate = 0.3  # documents holding an instruction-like question
  c.pretrain_chat_rate = 0.15  # documents that are "User:/Assistant:" transcripts
  c.pretrain_answer_rate = 0.2  # questions (and chat requests) followed by their answer
  c.pretrain_untruthful_rate = 0.1  # documents stating a false KB fact
  c.pretrain_toxic_rate = 0.05  # documents containing a toxic marker
  # Labelers.
  c.demo_error_rate = 0.1  # demonstrations with a plausible mistake
  c.demo_verbose_rate = 0.15  # demonstrations that are correct but padded
  c.num_labelers = 12  # size of the labeler pool ranking comparisons
  c.labeler_noise = 0.1  # per-comparison utility noise (std); sets inter-labeler agreement
  c.labeler_length_bias = 0.02  # std of a labeler's utility per 10 words of reply length
  c.rank_k_min = 4  # fewest responses ranked per prompt
  c.rank_k_max = 9  # most responses ranked per prompt
  if runlocal:
    c.num_pretrain, c.num_demonstrations, c.num_demonstrations_val = 1000, 200, 50
    c.num_prompts, c.num_prompts_val, c.num_heldout_text, c.num_heldout_tasks = 100, 50, 50, 20
  return c


def rng_for(seed: int, purpose: str) -> np.random.Generator:
  """An independent, reproducible stream for one use (`"pretrain"`, `"prompts/train"`)."""
  digest = hashlib.blake2b(purpose.encode(), digest_size=8).digest()
  return np.random.default_rng([int(seed), int.from_bytes(digest, "little")])


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
  return seq[int(rng.integers(len(seq)))]


def _stable_unit(text: str, seed: int) -> float:
  """A hash of `text` in [0, 1): which pool (SFT or RL) a prompt text belongs to."""
  h = hashlib.blake2b(f"{seed}|{text}".encode(), digest_size=8).digest()
  return int.from_bytes(h, "little") / 2.0**64


# --- knowledge base --------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def make_kb(seed: int, num_entities: int) -> dict[str, dict[str, str]]:
  """The knowledge base: `{name: {attribute: value}}`, a pure function of its args."""
  rng = rng_for(seed, "kb")
  taken = {c.lower() for c in ATTRIBUTES["country"]}
  kb = {}
  while len(kb) < num_entities:
    n = 2 if rng.random() < 0.7 or num_entities < 100 else 3
    name = "".join(_pick(rng, _SYLLABLES) for _ in range(n)).capitalize()
    if name.lower() in taken:
      continue
    taken.add(name.lower())
    kb[name] = {a: _pick(rng, vals) for a, vals in ATTRIBUTES.items()}
  return kb


def kb_of(task: Mapping[str, Any]) -> dict[str, dict[str, str]]:
  """The knowledge base a task refers to."""
  ref = task["kb"]
  return make_kb(int(ref["seed"]), int(ref["num_entities"]))


def fact_sentence(name: str, attr: str, value: str, style: int = 0) -> str:
  templates = FACT_TEMPLATES[attr]
  return templates[style % len(templates)].format(n=name, v=value)


def _note(name: str, facts: Mapping[str, str], attrs: Sequence[str]) -> str:
  """A short note about an entity (the open family's reply): 'Zorbin is a baker ...'."""
  parts, rest = [], list(attrs)
  if "job" in rest and "country" in rest:
    parts.append(f"{name} is a {facts['job']} from {facts['country']}.")
    rest = [a for a in rest if a not in ("job", "country")]
  for a in rest:
    parts.append(fact_sentence(name, a, facts[a], style=1))
  return " ".join(parts)


# --- the world -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
  """A world config plus its knowledge base (build with `make_world`)."""

  cfg: dict[str, Any]
  kb: dict[str, dict[str, str]]

  @property
  def names(self) -> list[str]:
    return list(self.kb)

  @property
  def kb_ref(self) -> dict[str, int]:
    return {"seed": int(self.cfg["seed"]), "num_entities": int(self.cfg["num_entities"])}


def _check(ok: bool, key: str, why: str, cfg: Mapping[str, Any]) -> None:
  if not ok:
    raise UserInputError(f"world.{key}={cfg[key]!r}: {why}")


_MIN_INT = dict(num_entities=2, num_labelers=2, max_operand=1, max_factor=1, max_list_number=2)
_MIN_INT.update(demo_users=1, demo_val_users=1, prompt_users=1, prompt_val_users=1)
_MIN_INT.update(seed=0, min_list_len=3, max_list_len=3, rank_k_min=2, rank_k_max=2)


def validate(cfg: Mapping[str, Any]) -> None:
  """Raise UserInputError naming the first world knob that cannot work."""
  unknown = sorted(set(cfg) - set(world_config()))
  if unknown:
    raise UserInputError(f"world.{unknown[0]}: unknown world config field")
  for k in cfg:
    lo = _MIN_INT.get(k, 0 if k.startswith("num_") else None)
    if lo is not None:
      ok = isinstance(cfg[k], int) and not isinstance(cfg[k], bool) and cfg[k] >= lo
      _check(ok, k, f"expected an integer >= {lo}", cfg)
  _check(cfg["num_entities"] <= 2000, "num_entities", "at most 2000 names can be made", cfg)
  _check(
    3 <= cfg["min_list_len"] <= cfg["max_list_len"], "min_list_len", "need 3 <= min <= max", cfg
  )
  longest = min(len(WORDS), cfg["max_list_number"] + 1)
  _check(cfg["max_list_len"] <= longest, "max_list_len", f"at most {longest} distinct items", cfg)
  _check(2 <= cfg["rank_k_min"] <= cfg["rank_k_max"], "rank_k_min", "need 2 <= min <= max", cfg)
  for k in cfg:
    if k.endswith(("_rate", "_fraction")):
      _check(0.0 <= cfg[k] <= 1.0, k, "expected a rate in [0, 1]", cfg)
  _check(0 < cfg["sft_prompt_fraction"] < 1, "sft_prompt_fraction", "expected (0, 1)", cfg)
  both = cfg["pretrain_chat_rate"] + cfg["pretrain_question_rate"]
  _check(both <= 1, "pretrain_question_rate", "question + chat rates exceed 1", cfg)
  for k in ("labeler_noise", "labeler_length_bias"):
    _check(cfg[k] >= 0, k, "expected >= 0", cfg)
  weights = cfg["family_weights"]
  _check(set(weights) == set(FAMILIES), "family_weights", f"expected keys {FAMILIES}", cfg)
  _check(
    all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0,
    "family_weights",
    "expected non-negative weights with a positive sum",
    cfg,
  )


def make_world(config: Mapping[str, Any] | ml_collections.ConfigDict | None = None) -> World:
  """The world of `config` (a `world_config()`, possibly overridden, or a plain dict).

  Raises UserInputError naming the bad field when the config cannot work.
  """
  cfg = world_config().to_dict()
  if config is not None:
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    cfg.update(given)
  validate(cfg)
  return World(cfg=cfg, kb=make_kb(int(cfg["seed"]), int(cfg["num_entities"])))


def _items(world: World, rng: np.random.Generator, kind: str) -> list:
  c = world.cfg
  n = int(rng.integers(c["min_list_len"], c["max_list_len"] + 1))
  if kind == "numbers":
    pool = np.arange(c["max_list_number"] + 1)
    return [int(x) for x in rng.choice(pool, size=min(n, len(pool)), replace=False)]
  return [str(x) for x in rng.choice(WORDS, size=min(n, len(WORDS)), replace=False)]


def _join(items: Sequence[Any]) -> str:
  return ", ".join(str(x) for x in items)


def _arith(world: World, rng: np.random.Generator) -> dict[str, Any]:
  op = _pick(rng, ("+", "-", "*"))
  hi = world.cfg["max_factor"] if op == "*" else world.cfg["max_operand"]
  a, b = (int(x) for x in rng.integers(0, hi + 1, size=2))
  if op == "-" and b > a:
    a, b = b, a  # keep results non-negative
  return {"a": a, "op": op, "b": b}


def _single(world: World, rng: np.random.Generator, family: str) -> tuple[dict, str]:
  """A single-turn task of `family`: (params, question text)."""
  if family == "arithmetic":
    p = _arith(world, rng)
    return p, _pick(rng, QUESTIONS[family]).format(**p)
  if family in ("sort", "reverse"):
    kind = "numbers" if rng.random() < 0.5 else "words"
    p = {"items": _items(world, rng, kind), "kind": kind}
    return p, _pick(rng, QUESTIONS[family]).format(kind=kind, items=_join(p["items"]))
  if family == "count":
    c = world.cfg
    n = int(rng.integers(c["min_list_len"], c["max_list_len"] + 2))
    vocab = [str(w) for w in rng.choice(WORDS, size=3, replace=False)]
    items = [_pick(rng, vocab) for _ in range(n)]
    p = {"items": items, "target": _pick(rng, vocab)}
    return p, _pick(rng, QUESTIONS[family]).format(target=p["target"], items=_join(items))
  if family == "fact":
    p = {"entity": _pick(rng, world.names), "attribute": _pick(rng, list(ATTRIBUTES))}
    return p, _pick(rng, QUESTIONS[family]).format(attr=p["attribute"], name=p["entity"])
  if family == "open":
    name = _pick(rng, world.names)
    order = [str(a) for a in rng.permutation(list(ATTRIBUTES))]
    p = {"entity": name, "attributes": order[:2]}
    return p, _pick(rng, QUESTIONS[family]).format(name=name)
  raise ValueError(f"unknown family {family!r}")


def answer_of(world_or_kb: World | Mapping, family: str, p: Mapping[str, Any]) -> str:
  """The canonical short answer of a task (what the judge checks for)."""
  kb = world_or_kb.kb if isinstance(world_or_kb, World) else world_or_kb
  if family == "arithmetic":
    return str(OPS[p["op"]](p["a"], p["b"]))
  if family == "sort":
    return _join(sorted(p["items"]))
  if family == "reverse":
    return _join(p["items"][::-1])
  if family == "count":
    return str(sum(x == p["target"] for x in p["items"]))
  if family == "fact":
    return kb[p["entity"]][p["attribute"]]
  if family == "open":
    return _note(p["entity"], kb[p["entity"]], p["attributes"])
  raise ValueError(f"unknown family {family!r}")


def _task(world: World, family: str, params: dict, multi_turn: bool) -> dict[str, Any]:
  return {
    "family": family,
    "params": params,
    "answer": answer_of(world, family, params),
    "multi_turn": multi_turn,
    "kb": world.kb_ref,
  }


def pick_family(world: World, rng: np.random.Generator) -> str:
  w = np.array([float(world.cfg["family_weights"][f]) for f in FAMILIES])
  return FAMILIES[int(rng.choice(len(FAMILIES), p=w / w.sum()))]


def sample_task(
  world: World,
  rng: np.random.Generator,
  family: str | None = None,
  multi_turn: bool | None = None,
) -> tuple[dict[str, Any], list[tok.Message]]:
  """A task and its chat prompt (a list of messages ending in a user turn).

  Multi-turn prompts hold an earlier exchange answered correctly: for `arithmetic` and
  `fact` the question depends on it ("Now add 5 to that.", "And what is the pet?"); for
  the other families it is an unrelated earlier request.
  """
  family = family or pick_family(world, rng)
  if multi_turn is None:
    multi_turn = bool(rng.random() < world.cfg["multi_turn_rate"])
  if not multi_turn:
    params, text = _single(world, rng, family)
    return _task(world, family, params, False), [tok.Message(role="user", content=text)]
  if family == "arithmetic":
    first_p, first_q = _single(world, rng, "arithmetic")
    prev = OPS[first_p["op"]](first_p["a"], first_p["b"])
    op = _pick(rng, ("+", "-", "*"))
    hi = {"+": world.cfg["max_operand"], "-": prev, "*": 3}[op]
    params = {"a": prev, "op": op, "b": int(rng.integers(0 if op != "*" else 2, hi + 1))}
    follow = FOLLOW_UPS[op].format(b=params["b"])
    first = _task(world, "arithmetic", first_p, False)
  elif family == "fact":
    first_p, first_q = _single(world, rng, "fact")
    others = [a for a in ATTRIBUTES if a != first_p["attribute"]]
    params = {"entity": first_p["entity"], "attribute": _pick(rng, others)}
    follow = FOLLOW_UPS["fact"].format(attr=params["attribute"])
    first = _task(world, "fact", first_p, False)
  else:  # an unrelated short exchange first (keeps prompts short)
    first_family = _pick(rng, ("arithmetic", "fact"))
    first_p, first_q = _single(world, rng, first_family)
    first = _task(world, first_family, first_p, False)
    params, follow = _single(world, rng, family)
  messages = [
    tok.Message(role="user", content=first_q),
    tok.Message(role="assistant", content=correct_response(first)),
    tok.Message(role="user", content=follow),
  ]
  return _task(world, family, params, True), messages


# --- responses -------------------------------------------------------------------------


def correct_response(task: Mapping[str, Any], style: int = 0) -> str:
  """A correct reply; `style` picks among equivalent phrasings (0 = canonical)."""
  f, p, ans = task["family"], task["params"], task["answer"]
  if f == "arithmetic":
    forms = (f"{p['a']} {p['op']} {p['b']} = {ans}.", f"The answer is {ans}.", ans)
  elif f == "sort":
    forms = (ans, f"{ans}.", f"Sorted: {ans}.")
  elif f == "reverse":
    forms = (ans, f"{ans}.", f"Reversed: {ans}.")
  elif f == "count":
    forms = (f"The answer is {ans}.", ans, f"{p['target']} appears {_times(ans)}.")
  elif f == "fact":
    a, n = p["attribute"], p["entity"]
    forms = (f"The {a} of {n} is {ARTICLE[a]}{ans}.", f"{n}'s {a} is {ans}.")
  elif f == "open":
    forms = (ans,)
  else:
    raise ValueError(f"unknown family {f!r}")
  return forms[style % len(forms)]


def _times(n: int | str) -> str:
  return f"{n} time" if str(n) == "1" else f"{n} times"


def toxic_line(rng: np.random.Generator) -> str:
  """An insult holding one of the world's toxic markers."""
  m = _pick(rng, TOXIC_WORDS)
  return _pick(rng, TOXIC_LINES).format(m=m, a="an" if m[0] in "aeiou" else "a")


def _false_value(rng: np.random.Generator, attr: str, true: str) -> str:
  return _pick(rng, [v for v in ATTRIBUTES[attr] if v != true])


def false_fact(kb: Mapping, rng: np.random.Generator, name: str | None = None) -> str:
  """A sentence stating a false KB fact (about `name`, or a random entity)."""
  name = name or _pick(rng, list(kb))
  attr = _pick(rng, list(ATTRIBUTES))
  value = _false_value(rng, attr, kb[name][attr])
  return fact_sentence(name, attr, value, style=int(rng.integers(3)))


def _wrong(world: World, task: Mapping[str, Any], rng: np.random.Generator) -> str:
  f, p, ans = task["family"], task["params"], task["answer"]
  if f in ("arithmetic", "count"):
    v = int(ans)
    delta = _pick(rng, (-2, -1, 1, 2))
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
    return _join(items)
  if f == "fact":
    v = _false_value(rng, p["attribute"], ans)
    return correct_response(dict(task, answer=v), style=int(rng.integers(2)))
  # open: a note about somebody else (true, but not what was asked).
  other = _pick(rng, [n for n in world.names if n != p["entity"]])
  return _note(other, world.kb[other], p["attributes"])


def _evasive(world: World, task: Mapping[str, Any], rng: np.random.Generator) -> str:
  if rng.random() < 0.5:
    return _pick(rng, EVASIONS)
  # Continue the text the way a pretrained LM does: with more instructions.
  return " ".join(_single(world, rng, pick_family(world, rng))[1] for _ in range(2))


def response(world: World, task: Mapping[str, Any], kind: str, rng: np.random.Generator) -> str:
  """A reply of one of `VARIANTS` to `task`."""
  if kind == "correct":
    return correct_response(task, style=int(rng.integers(3)))
  if kind == "wrong":
    return _wrong(world, task, rng)
  if kind == "evasive":
    return _evasive(world, task, rng)
  if kind == "untruthful":
    p = task["params"]
    if task["family"] == "fact":
      v = _false_value(rng, p["attribute"], task["answer"])
      return (
        f"I am sure that the {p['attribute']} of {p['entity']} is {ARTICLE[p['attribute']]}{v}."
      )
    if task["family"] == "open":
      facts = {a: _false_value(rng, a, world.kb[p["entity"]][a]) for a in ATTRIBUTES}
      return _note(p["entity"], facts, p["attributes"])
    lie = false_fact(world.kb, rng)
    lie = "t" + lie[1:] if lie.startswith("The ") else lie
    return f"{correct_response(task)} Also, {lie}"
  if kind == "toxic":
    line, ans = toxic_line(rng), correct_response(task)
    return f"{line} {ans}" if rng.random() < 0.5 else f"{ans} {line}"
  if kind == "verbose":
    return f"{_pick(rng, VERBOSE_PRE)} {correct_response(task)} {_pick(rng, VERBOSE_POST)}"
  raise ValueError(f"unknown response kind {kind!r}; expected one of {VARIANTS}")


# --- pretraining text ------------------------------------------------------------------


def _encyclopedia(world: World, rng: np.random.Generator) -> list[str]:
  lines = []
  for name in rng.choice(world.names, size=int(rng.integers(1, 4)), replace=False):
    name, facts = str(name), world.kb[str(name)]
    attrs = [str(a) for a in rng.permutation(list(ATTRIBUTES))][: int(rng.integers(2, 5))]
    if rng.random() < 0.3:
      lines.append(_note(name, facts, attrs))
    else:
      lines.append(" ".join(fact_sentence(name, a, facts[a], int(rng.integers(3))) for a in attrs))
  return lines


def _worked(world: World, rng: np.random.Generator) -> list[str]:
  out = []
  for _ in range(int(rng.integers(3, 7))):
    k = int(rng.integers(5))
    if k == 0:
      p = _arith(world, rng)
      out.append(f"{p['a']} {p['op']} {p['b']} = {OPS[p['op']](p['a'], p['b'])}.")
    elif k == 1:
      a, b = (int(x) for x in rng.choice(world.cfg["max_operand"] + 1, 2, replace=False))
      out.append(f"The larger of {a} and {b} is {max(a, b)}.")
    elif k == 2:
      items = _items(world, rng, _pick(rng, ("numbers", "words")))
      out.append(f"Sorting {_join(items)} gives {_join(sorted(items))}.")
    elif k == 3:
      items = _items(world, rng, _pick(rng, ("numbers", "words")))
      out.append(f"The reverse of {_join(items)} is {_join(items[::-1])}.")
    else:
      p, _ = _single(world, rng, "count")
      n = sum(x == p["target"] for x in p["items"])
      out.append(f"In {_join(p['items'])}, {p['target']} appears {_times(n)}.")
  return [" ".join(out)]


def _not_an_answer(world: World, rng: np.random.Generator) -> str:
  """What follows a question on the web: more questions, a list or unrelated text."""
  k = int(rng.integers(3))
  if k == 0:
    n = int(rng.integers(1, 4))
    return "\n".join(_single(world, rng, pick_family(world, rng))[1] for _ in range(n))
  if k == 1:
    return "Items: " + _join(rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False))
  return _pick(rng, FILLER)


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
    reply = response(world, task, style, rng) if answered else _evasive(world, task, rng)
    lines = [tok.render([*messages, tok.Message(role="assistant", content=reply)])]
  elif u < c["pretrain_chat_rate"] + c["pretrain_question_rate"]:
    kind, has_q = "question", True
    task, messages = sample_task(world, rng, multi_turn=False)
    answered = bool(rng.random() < c["pretrain_answer_rate"])
    after = correct_response(task, int(rng.integers(3))) if answered else _not_an_answer(world, rng)
    lines = [_pick(rng, INTROS)] if rng.random() < 0.5 else []
    lines += [messages[-1]["content"], after]
  elif rng.random() < 0.6:
    kind, lines = "encyclopedia", _encyclopedia(world, rng)
  else:
    kind, lines = "worked", _worked(world, rng)
  if rng.random() < 0.3 and kind != "chat":
    lines.append(_pick(rng, FILLER))
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


def is_sft_prompt(world: World, messages: Sequence[tok.Message]) -> bool:
  """Whether a prompt text belongs to the SFT pool (else to the comparison/PPO pool)."""
  return _stable_unit(tok.render(messages), world.cfg["seed"]) < world.cfg["sft_prompt_fraction"]


def _pool_task(world: World, rng: np.random.Generator, sft: bool) -> tuple[dict, list]:
  while True:
    task, messages = sample_task(world, rng)
    if is_sft_prompt(world, messages) == sft:
      return task, messages


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


def prompt_records(world: World, split: str = "train", n: int | None = None) -> Iterator:
  """Prompts for comparisons and PPO, disjoint from the SFT ones by user and by text.

  Yields `{"messages" (ending in a user turn), "family", "user_id", "prompt_id", "task"}`;
  prompt ids are unique across both splits.
  """
  c = world.cfg
  n = c["num_prompts" if split == "train" else "num_prompts_val"] if n is None else n
  offset = 0 if split == "train" else int(c["num_prompts"])
  lo, hi = user_range(world, "prompts", split)
  rng = rng_for(c["seed"], f"prompts/{split}")
  for i in range(n):
    task, messages = _pool_task(world, rng, sft=False)
    yield {
      "messages": messages,
      "family": task["family"],
      "user_id": int(rng.integers(lo, hi)),
      "prompt_id": offset + i,
      "task": task,
    }


HELDOUT_TASKS = ("fact_cloze", "arithmetic", "larger", "sort")


def _heldout_task(world: World, rng: np.random.Generator, name: str) -> dict[str, Any]:
  if name == "fact_cloze":
    n, a = _pick(rng, world.names), _pick(rng, list(ATTRIBUTES))
    true = world.kb[n][a]
    others = [str(v) for v in rng.choice([v for v in ATTRIBUTES[a] if v != true], 3, False)]
    values, context = [true, *others], f"The {a} of {n} is"
    choices = [f" {ARTICLE[a]}{v}" for v in values]
  elif name == "arithmetic":
    p = _arith(world, rng)
    r = OPS[p["op"]](p["a"], p["b"])
    wrong = [r + d for d in (-2, -1, 1, 2, 3) if r + d >= 0]
    values = [r, *(int(x) for x in rng.choice(wrong, 3, replace=False))]
    context, choices = f"{p['a']} {p['op']} {p['b']} =", [f" {v}" for v in values]
  elif name == "larger":
    a, b = (int(x) for x in rng.choice(world.cfg["max_operand"] + 1, 2, replace=False))
    context, choices = f"The larger of {a} and {b} is", [f" {max(a, b)}", f" {min(a, b)}"]
  elif name == "sort":
    while True:
      items = _items(world, rng, _pick(rng, ("numbers", "words")))
      s = sorted(items)
      if items not in (s, s[::-1]):
        break
    context = f"Sorting {_join(items)} gives"
    choices = [f" {_join(s)}.", f" {_join(items)}.", f" {_join(s[::-1])}."]
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
