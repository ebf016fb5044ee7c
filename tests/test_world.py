"""The generated world: determinism, disjoint splits, and the promised corpus rates."""

import itertools
import re

import numpy as np
import pytest

from rlhf_jax import tokenizer as tok
from rlhf_jax.data import judge
from rlhf_jax.data import records as records_lib
from rlhf_jax.data import world as world_lib
from rlhf_jax.errors import UserInputError


def small(**overrides):
  c = world_lib.world_config()
  c.num_pretrain, c.num_demonstrations, c.num_demonstrations_val = 200, 200, 50
  c.num_prompts, c.num_prompts_val, c.num_heldout_text, c.num_heldout_tasks = 200, 50, 50, 20
  c.update(overrides)
  return world_lib.make_world(c)


def all_records(w):
  return {
    "pretrain": list(records_lib.pretrain_records(w)),
    "demos": list(records_lib.demonstration_records(w, "train")),
    "demos_val": list(records_lib.demonstration_records(w, "validation")),
    "prompts": list(records_lib.prompt_records(w, "train")),
    "prompts_val": list(records_lib.prompt_records(w, "validation")),
    "heldout_text": list(records_lib.heldout_text_records(w)),
    "heldout_tasks": list(records_lib.heldout_task_records(w)),
  }


def test_same_seed_same_data_other_seed_other_data():
  a, b, c = all_records(small()), all_records(small()), all_records(small(seed=1))
  assert a == b
  for name in a:
    assert a[name] != c[name], name
  assert world_lib.make_kb(0, 40) != world_lib.make_kb(1, 40)


def test_datasets_are_independent_streams():
  # Growing one dataset leaves the others unchanged.
  a, b = all_records(small()), all_records(small(num_pretrain=300))
  assert a["prompts"] == b["prompts"] and a["demos"] == b["demos"]
  assert b["pretrain"][:200] == a["pretrain"]


def test_sizes_follow_config():
  recs = all_records(small())
  assert [len(recs[k]) for k in recs] == [200, 200, 50, 200, 50, 50, 20 * 4]


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("min_list_len", 2, "world.min_list_len=2"),
    ("max_list_len", 20, "world.max_list_len=20"),
    ("pretrain_toxic_rate", 1.5, "world.pretrain_toxic_rate=1.5"),
    ("num_prompts", -1, "world.num_prompts=-1"),
    ("sft_prompt_fraction", 1.0, "world.sft_prompt_fraction"),
    ("colour_count", 3, "world.colour_count: unknown"),
  ],
)
def test_bad_config_names_the_field(key, value, match):
  cfg = world_lib.world_config().to_dict()
  cfg[key] = value
  with pytest.raises(UserInputError, match=match):
    world_lib.make_world(cfg)


def test_kb_shape():
  kb = world_lib.make_kb(0, 50)
  assert len(kb) == 50
  for name, facts in kb.items():
    assert re.fullmatch(r"[A-Z][a-z]+", name)
    assert set(facts) == set(world_lib.ATTRIBUTES)
    assert all(facts[a] in world_lib.ATTRIBUTES[a] for a in facts)


def test_sft_and_rl_prompts_are_disjoint():
  recs = all_records(small(num_demonstrations=1000, num_prompts=1000))
  text = lambda r, n: tok.render(r["messages"][:n])
  sft = {text(r, -1) for r in recs["demos"] + recs["demos_val"]}
  rl = {text(r, None) for r in recs["prompts"] + recs["prompts_val"]}
  assert sft and rl and not sft & rl
  users = {
    k: {r["user_id"] for r in recs[k]} for k in ("demos", "demos_val", "prompts", "prompts_val")
  }
  for x, y in itertools.combinations(users, 2):
    assert not users[x] & users[y], (x, y)
  ids = [r["prompt_id"] for r in recs["prompts"] + recs["prompts_val"]]
  assert len(set(ids)) == len(ids)


def test_records_have_the_promised_shape():
  recs = all_records(small())
  for r in recs["demos"]:
    assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
    tok.validate_messages(r["messages"])
    assert r["family"] == r["task"]["family"] in world_lib.FAMILIES
  for r in recs["prompts"]:
    assert r["messages"][-1]["role"] == "user"
  families = {r["family"] for r in recs["prompts"]}
  assert families == set(world_lib.FAMILIES)
  multi = [r for r in recs["prompts"] if r["task"]["multi_turn"]]
  assert 0.1 < len(multi) / len(recs["prompts"]) < 0.3
  assert all(len(r["messages"]) == 3 for r in multi)


def test_demonstrations_are_mostly_right_but_imperfect():
  w = small(num_demonstrations=1500)
  recs = list(records_lib.demonstration_records(w))
  correct = np.mean([judge.correctness(r["task"], r["messages"][-1]["content"]) for r in recs])
  verbose = np.mean([r["quality"] == "verbose" for r in recs])
  assert 0.86 < correct < 0.94  # demo_error_rate = 0.1
  assert 0.11 < verbose < 0.19  # demo_verbose_rate = 0.15


def test_follow_ups_depend_on_the_earlier_turn():
  w = small()
  rng = np.random.default_rng(0)
  for _ in range(20):
    task, messages = world_lib.sample_task(w, rng, "arithmetic", multi_turn=True)
    earlier = int(re.findall(r"\d+", messages[1]["content"])[-1])
    assert task["params"]["a"] == earlier
    assert messages[2]["content"].startswith("Now ")
    task, messages = world_lib.sample_task(w, rng, "fact", multi_turn=True)
    assert task["params"]["entity"] in messages[0]["content"]
    assert task["params"]["entity"] not in messages[2]["content"]


# --- the pretraining corpus, checked on its text ----------------------------------------

_INSTRUCTION = re.compile(
  r"^(What is|How many|Compute|Calculate|Sort these|Put these|Reverse|Count how|Tell me|"
  r"Write a|Describe)\b"
)
_ARITH = re.compile(r"^(?:What is|Compute|Calculate) (\d+) ([-+*]) (\d+)[?.]$")
_FACT = re.compile(r"^(?:What is|Tell me) the (colour|country|job|pet) of ([A-Z][a-z]+)[?.]$")


def _answer(question, kb):
  """The answer to an arithmetic or fact question, computed here; None for others."""
  if m := _ARITH.match(question):
    a, op, b = int(m[1]), m[2], int(m[3])
    return str({"+": a + b, "-": a - b, "*": a * b}[op])
  if m := _FACT.match(question):
    return kb[m[2]][m[1]]
  return None


def _answers(reply, answer):
  if "?" in reply or _INSTRUCTION.match(reply):
    return False
  if answer.isdigit():
    nums = re.findall(r"\d+", reply)
    return bool(nums) and nums[-1] == answer
  return re.search(rf"\b{answer}\b", reply) is not None


def measure_corpus(w, n):
  """Rates measured on the text alone: answered questions, toxic and untruthful docs."""
  docs = list(records_lib.pretrain_records(w, n))
  answered = []
  for d in docs:
    lines = d["text"].split("\n")
    user = [i for i, line in enumerate(lines) if line.startswith("User: ")]
    if user:  # a transcript: does the assistant answer the last request?
      i = user[-1]
      question, reply = lines[i][len("User: ") :], lines[i + 1]
      if not question.startswith("Now") and not question.startswith("And"):
        ans = _answer(question, w.kb)
        if ans is not None:
          answered.append(_answers(reply[len("Assistant: ") :], ans))
      continue
    qs = [i for i, line in enumerate(lines) if _INSTRUCTION.match(line)]
    if qs and (ans := _answer(lines[qs[0]], w.kb)) is not None:
      reply = lines[qs[0] + 1] if qs[0] + 1 < len(lines) else ""
      answered.append(_answers(reply, ans))
  toxic_re = re.compile(r"\b(" + "|".join(world_lib.TOXIC_WORDS) + r")\b", re.IGNORECASE)
  toxic = [toxic_re.search(d["text"]) is not None for d in docs]
  untruthful = [bool(judge.false_claims(d["text"], w.kb)) for d in docs]
  return docs, np.array(answered), np.array(toxic), np.array(untruthful)


def test_pretraining_corpus_rates_measured_on_text():
  w = small()
  docs, answered, toxic, untruthful = measure_corpus(w, 6000)
  assert len(answered) > 500
  assert abs(answered.mean() - 0.2) < 0.05  # most questions are NOT followed by answers
  assert abs(toxic.mean() - 0.05) < 0.015
  assert abs(untruthful.mean() - 0.1) < 0.02
  # The stored annotations agree with what the text shows.
  assert (toxic == np.array([d["toxic"] for d in docs])).all()
  assert (untruthful == np.array([d["untruthful"] for d in docs])).all()
  kinds = {d["kind"] for d in docs}
  assert kinds == {"encyclopedia", "worked", "question", "chat"}
  chat = [d for d in docs if d["text"].startswith("User: ") or "\nUser: " in d["text"]]
  assert 0.1 < len(chat) / len(docs) < 0.2


@pytest.mark.parametrize("rate", [0.6])
def test_corpus_rates_follow_config(rate):
  w = small(pretrain_answer_rate=rate, pretrain_toxic_rate=0.2, pretrain_untruthful_rate=0.0)
  _, answered, toxic, untruthful = measure_corpus(w, 3000)
  assert abs(answered.mean() - rate) < 0.07
  assert abs(toxic.mean() - 0.2) < 0.03
  assert not untruthful.any()


def test_corpus_states_the_knowledge_base():
  w = small()
  said = set()
  for d in records_lib.pretrain_records(w, 3000):
    if not d["untruthful"]:
      said.update(judge.claims(d["text"], w.kb))
  every = {(n, a, v) for n, facts in w.kb.items() for a, v in facts.items()}
  assert len(said & every) / len(every) > 0.95


def test_heldout_task_labels():
  w = small(num_heldout_tasks=50)
  recs = list(records_lib.heldout_task_records(w))
  assert {r["task_name"] for r in recs} == set(records_lib.HELDOUT_TASKS)
  for r in recs:
    right, ctx = r["choices"][r["label"]].strip().rstrip("."), r["context"]
    assert len(set(r["choices"])) == len(r["choices"]) >= 2
    if m := re.fullmatch(r"(\d+) ([-+*]) (\d+) =", ctx):
      a, op, b = int(m[1]), m[2], int(m[3])
      assert int(right) == {"+": a + b, "-": a - b, "*": a * b}[op]
    elif m := re.fullmatch(r"The larger of (\d+) and (\d+) is", ctx):
      assert int(right) == max(int(m[1]), int(m[2]))
    elif m := re.fullmatch(r"The (\w+) of (\w+) is", ctx):
      assert right.split()[-1] == w.kb[m[2]][m[1]]
    else:
      items = re.fullmatch(r"Sorting (.*) gives", ctx)[1].split(", ")
      key = int if items[0].isdigit() else str
      assert right.split(", ") == [str(x) for x in sorted(map(key, items))]
