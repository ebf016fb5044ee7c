"""The embedded default world: a seeded generator of checkable instructions and text.

A small made-up world stands in for the internet and for the people of the paper:

- a knowledge base (KB) of entities with generated names (`Zorbin`) and attributes
  (`colour`, `country`, `job`, `pet`), stated in the pretraining text;
- six instruction families whose answers can be checked: `arithmetic`, `sort`,
  `reverse`, `count`, `fact` (KB look-up) and the open-ended `open` ("write a short
  note about Zorbin", judged by a rubric);
- for every task the correct reply (`correct_response`) and typical bad replies
  (`rlhf_jax.data.responses`): wrong, evasive, untruthful, toxic, verbose;
- the records of every stage dataset (`rlhf_jax.data.records`): pretraining "web text"
  in which questions are mostly NOT followed by answers (the GPT-3 behaviour), labeler
  demonstrations, prompts for comparisons and PPO (disjoint from the demonstrations by
  user and by text) and held-out text and zero-shot tasks.

This module is the world itself: its vocabulary, config, knowledge base and tasks.
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
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax import tokenizer as tok
from rlhf_jax.errors import UserInputError

FAMILIES = ("arithmetic", "sort", "reverse", "count", "fact", "open")

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


def pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
  return seq[int(rng.integers(len(seq)))]


# --- knowledge base --------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def make_kb(seed: int, num_entities: int) -> dict[str, dict[str, str]]:
  """The knowledge base: `{name: {attribute: value}}`, a pure function of its args."""
  rng = rng_for(seed, "kb")
  taken = {c.lower() for c in ATTRIBUTES["country"]}
  kb = {}
  while len(kb) < num_entities:
    n = 2 if rng.random() < 0.7 or num_entities < 100 else 3
    name = "".join(pick(rng, _SYLLABLES) for _ in range(n)).capitalize()
    if name.lower() in taken:
      continue
    taken.add(name.lower())
    kb[name] = {a: pick(rng, vals) for a, vals in ATTRIBUTES.items()}
  return kb


def kb_of(task: Mapping[str, Any]) -> dict[str, dict[str, str]]:
  """The knowledge base a task refers to."""
  ref = task["kb"]
  return make_kb(int(ref["seed"]), int(ref["num_entities"]))


def fact_sentence(name: str, attr: str, value: str, style: int = 0) -> str:
  templates = FACT_TEMPLATES[attr]
  return templates[style % len(templates)].format(n=name, v=value)


def note(name: str, facts: Mapping[str, str], attrs: Sequence[str]) -> str:
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


def sample_items(world: World, rng: np.random.Generator, kind: str) -> list:
  c = world.cfg
  n = int(rng.integers(c["min_list_len"], c["max_list_len"] + 1))
  if kind == "numbers":
    pool = np.arange(c["max_list_number"] + 1)
    return [int(x) for x in rng.choice(pool, size=min(n, len(pool)), replace=False)]
  return [str(x) for x in rng.choice(WORDS, size=min(n, len(WORDS)), replace=False)]


def join_items(items: Sequence[Any]) -> str:
  return ", ".join(str(x) for x in items)


def arith_params(world: World, rng: np.random.Generator) -> dict[str, Any]:
  op = pick(rng, ("+", "-", "*"))
  hi = world.cfg["max_factor"] if op == "*" else world.cfg["max_operand"]
  a, b = (int(x) for x in rng.integers(0, hi + 1, size=2))
  if op == "-" and b > a:
    a, b = b, a  # keep results non-negative
  return {"a": a, "op": op, "b": b}


def single_turn(world: World, rng: np.random.Generator, family: str) -> tuple[dict, str]:
  """A single-turn task of `family`: (params, question text)."""
  if family == "arithmetic":
    p = arith_params(world, rng)
    return p, pick(rng, QUESTIONS[family]).format(**p)
  if family in ("sort", "reverse"):
    kind = "numbers" if rng.random() < 0.5 else "words"
    p = {"items": sample_items(world, rng, kind), "kind": kind}
    return p, pick(rng, QUESTIONS[family]).format(kind=kind, items=join_items(p["items"]))
  if family == "count":
    c = world.cfg
    n = int(rng.integers(c["min_list_len"], c["max_list_len"] + 2))
    vocab = [str(w) for w in rng.choice(WORDS, size=3, replace=False)]
    items = [pick(rng, vocab) for _ in range(n)]
    p = {"items": items, "target": pick(rng, vocab)}
    return p, pick(rng, QUESTIONS[family]).format(target=p["target"], items=join_items(items))
  if family == "fact":
    p = {"entity": pick(rng, world.names), "attribute": pick(rng, list(ATTRIBUTES))}
    return p, pick(rng, QUESTIONS[family]).format(attr=p["attribute"], name=p["entity"])
  if family == "open":
    name = pick(rng, world.names)
    order = [str(a) for a in rng.permutation(list(ATTRIBUTES))]
    p = {"entity": name, "attributes": order[:2]}
    return p, pick(rng, QUESTIONS[family]).format(name=name)
  raise ValueError(f"unknown family {family!r}")


def answer_of(world_or_kb: World | Mapping, family: str, p: Mapping[str, Any]) -> str:
  """The canonical short answer of a task (what the judge checks for)."""
  kb = world_or_kb.kb if isinstance(world_or_kb, World) else world_or_kb
  if family == "arithmetic":
    return str(OPS[p["op"]](p["a"], p["b"]))
  if family == "sort":
    return join_items(sorted(p["items"]))
  if family == "reverse":
    return join_items(p["items"][::-1])
  if family == "count":
    return str(sum(x == p["target"] for x in p["items"]))
  if family == "fact":
    return kb[p["entity"]][p["attribute"]]
  if family == "open":
    return note(p["entity"], kb[p["entity"]], p["attributes"])
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
  turns = sample_conversation(world, rng, family, multi_turn)
  return turns[-1][0], conversation_messages(turns)


def sample_conversation(
  world: World,
  rng: np.random.Generator,
  family: str | None = None,
  multi_turn: bool | None = None,
) -> list[tuple[dict[str, Any], str]]:
  """The user's side of a conversation: (task, user message) per turn, the last turn's
  task of `family` (the draws `sample_task` makes: it is this, answered correctly)."""
  family = family or pick_family(world, rng)
  if multi_turn is None:
    multi_turn = bool(rng.random() < world.cfg["multi_turn_rate"])
  if not multi_turn:
    params, text = single_turn(world, rng, family)
    return [(_task(world, family, params, False), text)]
  if family == "arithmetic":
    first_p, first_q = single_turn(world, rng, "arithmetic")
    prev = OPS[first_p["op"]](first_p["a"], first_p["b"])
    op = pick(rng, ("+", "-", "*"))
    hi = {"+": world.cfg["max_operand"], "-": prev, "*": 3}[op]
    params = {"a": prev, "op": op, "b": int(rng.integers(0 if op != "*" else 2, hi + 1))}
    follow = FOLLOW_UPS[op].format(b=params["b"])
    first = _task(world, "arithmetic", first_p, False)
  elif family == "fact":
    first_p, first_q = single_turn(world, rng, "fact")
    others = [a for a in ATTRIBUTES if a != first_p["attribute"]]
    params = {"entity": first_p["entity"], "attribute": pick(rng, others)}
    follow = FOLLOW_UPS["fact"].format(attr=params["attribute"])
    first = _task(world, "fact", first_p, False)
  else:  # an unrelated short exchange first (keeps prompts short)
    first_family = pick(rng, ("arithmetic", "fact"))
    first_p, first_q = single_turn(world, rng, first_family)
    first = _task(world, first_family, first_p, False)
    params, follow = single_turn(world, rng, family)
  return [(first, first_q), (_task(world, family, params, True), follow)]


def conversation_messages(
  turns: Sequence[tuple[Mapping[str, Any], str]], replies: Sequence[str] | None = None
) -> list[tok.Message]:
  """The chat up to the last user turn: each earlier turn answered by `replies[t]`
  (default: its correct reply, as the world's prompts have it)."""
  out: list[tok.Message] = []
  for t, (_, text) in enumerate(turns):
    if t:
      prev = turns[t - 1][0]
      reply = correct_response(prev) if replies is None else replies[t - 1]
      out.append(tok.Message(role="assistant", content=reply))
    out.append(tok.Message(role="user", content=text))
  return out


# --- correct replies -------------------------------------------------------------------


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
    forms = (f"The answer is {ans}.", ans, f"{p['target']} appears {times(ans)}.")
  elif f == "fact":
    a, n = p["attribute"], p["entity"]
    forms = (f"The {a} of {n} is {ARTICLE[a]}{ans}.", f"{n}'s {a} is {ans}.")
  elif f == "open":
    forms = (ans,)
  else:
    raise ValueError(f"unknown family {f!r}")
  return forms[style % len(forms)]


def times(n: int | str) -> str:
  return f"{n} time" if str(n) == "1" else f"{n} times"
