"""The gold judge and the simulated labelers."""

import numpy as np
import pytest

from rlhf_jax.data import judge, labelers
from rlhf_jax.data import responses as responses_lib
from rlhf_jax.data import world as world_lib

BAD = ("wrong", "evasive", "untruthful", "toxic")


@pytest.fixture(scope="module")
def world():
  return world_lib.make_world()


def tasks_of(world, family, n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [world_lib.sample_task(world, rng, family, multi_turn=i % 3 == 0)[0] for i in range(n)]


@pytest.mark.parametrize("family", world_lib.FAMILIES)
def test_correct_beats_every_bad_variant(world, family):
  rng = np.random.default_rng(1)
  for task in tasks_of(world, family):
    for style in range(3):
      assert judge.score(task, world_lib.correct_response(task, style)) == pytest.approx(1.0)
    best = judge.score(task, world_lib.correct_response(task))
    for kind in (*BAD, "verbose"):
      reply = responses_lib.response(world, task, kind, rng)
      assert judge.score(task, reply) < best, (kind, task, reply)


@pytest.mark.parametrize("family", world_lib.FAMILIES)
def test_classifiers_flag_their_variant_only(world, family):
  rng = np.random.default_rng(2)
  for task in tasks_of(world, family, n=20):
    correct = world_lib.correct_response(task)
    for fn in (judge.is_evasive, judge.is_untruthful, judge.is_toxic):
      assert not fn(task, correct), (fn.__name__, correct)
    assert judge.is_evasive(task, responses_lib.response(world, task, "evasive", rng))
    assert judge.is_untruthful(task, responses_lib.response(world, task, "untruthful", rng))
    assert judge.is_toxic(task, responses_lib.response(world, task, "toxic", rng))
    verbose = responses_lib.response(world, task, "verbose", rng)
    assert judge.correctness(task, verbose) == 1.0
    assert judge.breakdown(task, verbose)["concise"] < 1.0


def test_correctness_is_tolerant_of_format(world):
  task = {"family": "arithmetic", "params": {"a": 7, "op": "+", "b": 5}, "answer": "12"}
  task |= {"multi_turn": False, "kb": world.kb_ref}
  for reply in ("12", "12.", "The answer is 12.", "7 + 5 = 12", "It is 12!"):
    assert judge.correctness(task, reply) == 1.0, reply
  for reply in ("", "The answer is eleven."):
    assert judge.correctness(task, reply) == 0.0, reply
  # Near misses get partial credit, less the further off they are.
  near, far = judge.correctness(task, "13"), judge.correctness(task, "The answer is 20.")
  assert 0.0 < far < near < judge.PARTIAL, (near, far)
  # Hedging with several candidate numbers earns nothing, even ending on the answer.
  for reply in ("12 or 13", "5, 5, 5, 50, 12", "13 12"):
    assert judge.correctness(task, reply) == 0.0, reply
  assert judge.correctness(task, "12, 12") == 1.0  # repeating the answer is no hedge
  name = world.names[0]
  colour = world.kb[name]["colour"]
  fact = {"family": "fact", "params": {"entity": name, "attribute": "colour"}, "answer": colour}
  fact |= {"multi_turn": False, "kb": world.kb_ref}
  for reply in (colour, f"{colour.capitalize()}.", f"{name} likes {colour}."):
    assert judge.correctness(fact, reply) == 1.0, reply
  other = next(v for v in world_lib.ATTRIBUTES["colour"] if v != colour)
  assert judge.correctness(fact, f"{colour} or {other}") == 0.0
  assert judge.is_untruthful(fact, f"The colour of {name} is {other}.")
  sort = {"family": "sort", "params": {"items": [5, 2, 9], "kind": "numbers"}, "answer": "2, 5, 9"}
  sort |= {"multi_turn": False, "kb": world.kb_ref}
  assert judge.correctness(sort, "Sorting 5, 2, 9 gives 2, 5, 9.") == 1.0
  assert judge.correctness(sort, "2, 9, 5") == pytest.approx(judge.PARTIAL / 3)  # 1 of 3 in place
  assert judge.correctness(sort, "5, 9, 2") == 0.0


def test_open_rubric(world):
  name = world.names[3]
  facts = world.kb[name]
  task = {"family": "open", "params": {"entity": name, "attributes": ["job", "pet"]}}
  task |= {"answer": "", "multi_turn": False, "kb": world.kb_ref}
  one = f"{name} is a {facts['job']}."
  two = f"{one} {name} has a {facts['pet']}."
  assert judge.correctness(task, one) == 0.5
  assert judge.correctness(task, two) == 1.0
  assert judge.correctness(task, f"{name} likes {facts['colour']}. {name} lives in X.") == 0.5
  assert judge.score(task, two) > judge.score(task, one)


def test_judge_is_deterministic(world):
  rng = np.random.default_rng(3)
  task, _ = world_lib.sample_task(world, rng)
  reply = responses_lib.response(world, task, "untruthful", rng)
  assert judge.breakdown(task, reply) == judge.breakdown(task, reply)


# --- labelers ----------------------------------------------------------------------------


def test_agreement_in_band_at_default():
  # Calibrated to 72.6% (the paper) on comparisons sampled from the SFT policy; the
  # synthetic calibration pools, whose replies differ more in quality, give ~0.80.
  assert 0.76 <= labelers.mean_agreement(num_comparisons=400) <= 0.84


def test_agreement_follows_noise():
  c = world_lib.world_config()
  c.labeler_noise = 0.8
  noisy = labelers.mean_agreement(c, num_comparisons=200)
  c.labeler_noise = 0.0
  clean = labelers.mean_agreement(c, num_comparisons=200)
  assert noisy < 0.65 < 0.9 < clean


def test_rank_records():
  c = world_lib.world_config()
  world = world_lib.make_world(c)
  rng = np.random.default_rng(0)
  tasks, prompts, responses = [], [], []
  for _ in range(30):
    task, messages = world_lib.sample_task(world, rng)
    k = labelers.num_responses(rng, c)
    assert c.rank_k_min <= k <= c.rank_k_max
    tasks.append(task)
    prompts.append(messages)
    responses.append(labelers.mixed_responses(world, task, k, rng))
  out = labelers.rank(tasks, prompts, responses, rng=7, config=c)
  assert out == labelers.rank(tasks, prompts, responses, rng=7, config=c)
  assert out != labelers.rank(tasks, prompts, responses, rng=8, config=c)
  ids = {lab.id for lab in labelers.pool(c)}
  for rec, task, resp in zip(out, tasks, responses, strict=True):
    assert sorted(rec["ranking"]) == list(range(len(resp)))
    assert rec["labeler_id"] in ids and rec["family"] == task["family"]
    assert rec["responses"] == resp and rec["task"] == task
  # Rankings follow the gold judge more often than not.
  firsts = [judge.score(r["task"], r["responses"][r["ranking"][0]]) for r in out]
  lasts = [judge.score(r["task"], r["responses"][r["ranking"][-1]]) for r in out]
  assert np.mean(firsts) > np.mean(lasts) + 0.1


def test_two_labelers_agreement():
  c = world_lib.world_config()
  world, pool = world_lib.make_world(c), labelers.pool(c)
  rng = np.random.default_rng(0)
  tasks = [world_lib.sample_task(world, rng)[0] for _ in range(100)]
  responses = [labelers.mixed_responses(world, t, 6, rng) for t in tasks]
  assert labelers.agreement(tasks, responses, pool[0], pool[0], rng) < 1.0  # noise
  assert 0.6 < labelers.agreement(tasks, responses, pool[0], pool[1], rng) < 0.85
  assert labelers.pair_agreement([0, 1, 2], [0, 1, 2]) == (3, 3)
  assert labelers.pair_agreement([0, 1, 2], [2, 1, 0]) == (0, 3)
