"""Iterated rounds (stages/rounds.py, data/conversations.py): the chosen model-written
message and its alternatives on hand-built conversations, each round's settings, the
over-optimisation curve; a runlocal 2-round run end to end (every round's files, a re-run
skips everything, the on-policy RM accuracy measured on the round's policy's samples) and
SIGKILLs during round 1's RM and PPO resuming to the uninterrupted run's results, bitwise."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import config_lib, pipeline, provenance
from rlhf_jax.data import conversations, records
from rlhf_jax.data import world as world_lib
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import comparisons, registry, rm, rounds

CONFIG = "configs/rounds.py:runlocal"


def _turn(world, rng, family):
  (task, text) = world_lib.sample_conversation(world, rng, family, multi_turn=False)[0]
  return {"task": task, "user": text}


@pytest.fixture(scope="module")
def world():
  return world_lib.make_world(world_lib.world_config(runlocal=True))


def test_sample_task_is_the_conversation_answered_correctly(world):
  for seed in range(20):
    task, messages = world_lib.sample_task(world, np.random.default_rng(seed))
    turns = world_lib.sample_conversation(world, np.random.default_rng(seed))
    assert task == turns[-1][0]
    assert messages == world_lib.conversation_messages(turns)
  turns = world_lib.sample_conversation(world, np.random.default_rng(0), "fact", multi_turn=True)
  said = world_lib.conversation_messages(turns, ["Not sure."])
  assert [m["role"] for m in said] == ["user", "assistant", "user"]
  assert said[1]["content"] == "Not sure." and said[2]["content"] == turns[1][1]


def test_prompt_records_with_turns_are_the_same_prompts(world):
  plain = list(records.prompt_records(world, "train", 30))
  with_turns = list(records.prompt_records(world, "train", 30, turns=True))
  for a, b in zip(plain, with_turns, strict=True):
    assert {k: v for k, v in b.items() if k != "turns"} == a
    turns = conversations.turns_of(b)
    assert world_lib.conversation_messages(turns) == a["messages"]
    assert turns[-1][0] == a["task"]
  assert any(len(r["turns"]) == 2 for r in with_turns)


def test_the_chosen_message_and_its_alternatives_on_a_hand_built_conversation(world):
  rng = np.random.default_rng(3)
  two = {"prompt_id": 7, "turns": [_turn(world, rng, "arithmetic"), _turn(world, rng, "fact")]}
  one = {"prompt_id": 8, "turns": [_turn(world, rng, "sort")]}
  calls = []

  def reply_fn(prompts, turn):
    calls.append((turn, prompts))
    return [f"policy reply {i}" for i in range(len(prompts))]

  out = conversations.contexts([two, one, two], [1, 0, 0], reply_fn)
  # One batched call for the only depth needed: the first record's first turn.
  assert calls == [(0, [[{"role": "user", "content": two["turns"][0]["user"]}]])]
  u = lambda t: {"role": "user", "content": t["user"]}
  assert out[0]["messages"] == [
    u(two["turns"][0]),
    {"role": "assistant", "content": "policy reply 0"},
    u(two["turns"][1]),
  ]
  assert out[0]["task"] == two["turns"][1]["task"] and out[0]["family"] == "fact"
  assert (out[0]["turn"], out[0]["num_turns"], out[0]["prompt_id"]) == (1, 2, 7)
  assert out[1]["messages"] == [u(one["turns"][0])] and out[1]["task"] == one["turns"][0]["task"]
  assert out[2]["messages"] == [u(two["turns"][0])] and out[2]["task"]["family"] == "arithmetic"
  assert all("turns" not in r for r in out)

  # The comparisons stage samples K at each context: the first is the chosen message.
  config = config_lib.get(CONFIG)
  seen = []

  def sample_fn(prompts, key):
    seen.extend(prompts)
    return [f"answer {i} to {len(p)} messages" for i, p in enumerate(prompts)]

  ranked, stats = comparisons.compare(config, out, sample_fn, "train")
  start = 0
  for rec, ctx in zip(ranked, out, strict=True):
    k = len(rec["responses"])
    assert config.world.rank_k_min <= k <= config.world.rank_k_max
    assert seen[start : start + k] == [ctx["messages"]] * k
    assert rec["responses"][0] == f"answer {start} to {len(ctx['messages'])} messages"
    assert rec["messages"] == ctx["messages"] and rec["task"] == ctx["task"]
    assert rec["turn"] == ctx["turn"] and sorted(rec["ranking"]) == list(range(k))
    start += k
  assert stats["responses"] == start


def test_turns_are_chosen_uniformly():
  recs = [{"turns": [0, 1]} for _ in range(4000)]
  chosen = np.asarray(conversations.choose_turns(recs, np.random.default_rng(0)))
  assert set(chosen.tolist()) == {0, 1} and abs(chosen.mean() - 0.5) < 0.03
  assert conversations.choose_turns([{"turns": [0]}] * 5, np.random.default_rng(0)) == [0] * 5


def _config(**rounds_fields):
  config = config_lib.get(CONFIG)
  with config.unlocked():
    for k, v in rounds_fields.items():
      config.rounds[k] = v
  return config


def test_budget_split():
  c = _config(num_rounds=4, label_budget=2000).rounds
  assert rounds.budget(c, 2000) == [500] * 4
  c = _config(num_rounds=3, label_budget=1000, budget_split="2,1,1").rounds
  assert rounds.budget(c, 2000) == [500, 250, 250]
  c = _config(num_rounds=3, label_budget=100).rounds
  assert rounds.budget(c, 2000) == [34, 33, 33]
  assert rounds.budget(_config(num_rounds=2, label_budget=0).rounds, 101) == [51, 50]
  with pytest.raises(UserInputError, match="config.rounds.label_budget"):
    rounds.budget(_config(label_budget=3000).rounds, 2000)
  with pytest.raises(UserInputError, match="config.rounds.budget_split"):
    rounds.budget(_config(num_rounds=2, budget_split="1,2,3").rounds, 2000)
  with pytest.raises(UserInputError, match="config.rounds.rm_data"):
    rounds.validate(_config(rm_data="some").rounds)


def test_round_config_follows_the_design_choices():
  config = _config(num_rounds=3, label_budget=90)
  r0, r1, r2 = (rounds.round_config(config, r, 100) for r in range(3))
  assert (r0.comparisons.num_prompts, r0.comparisons.prompt_offset) == (30, 0)
  assert (r2.comparisons.num_prompts, r2.comparisons.prompt_offset) == (30, 60)
  assert not r0.comparisons.conversations and r0.comparisons.policy_dir == ""
  assert r0.rm.extra_comparisons == r0.rm.init_dir == r0.ppo.init_dir == ""
  # The defaults: conversations with the previous policy, the RM on every round's data
  # from SFT, the policy from the previous one, KL to SFT.
  assert r2.comparisons.conversations and r2.comparisons.policy_dir == "../round_1/ppo"
  assert r2.rm.extra_comparisons == "../round_0/comparisons,../round_1/comparisons"
  assert r2.rm.init_dir == "" and r2.ppo.ref_dir == ""
  assert r1.ppo.init_dir == "../round_0/ppo"
  flipped = _config(
    num_rounds=2, rm_data="round", rm_init="previous", policy_init="sft", kl_ref="previous"
  )
  f1 = rounds.round_config(flipped, 1, 100)
  assert f1.rm.extra_comparisons == "" and f1.rm.init_dir == "../round_0/rm"
  assert f1.ppo.init_dir == "" and f1.ppo.ref_dir == "../round_0/ppo"
  ptx = rounds.round_config(_config(policy="ppo_ptx"), 1, 100)
  assert ptx.comparisons.policy_dir == "../round_0/ppo_ptx" and ptx.ppo_ptx.init_dir
  assert config.comparisons.num_prompts != 30  # (the run's own config is not changed)


def test_overoptimisation_pairs_each_evaluation_with_the_next_rollout():
  rows = [
    {"step": 0, "ppo/gold_score": 0.2},
    {"step": 1, "ppo/kl": 0.0, "ppo/score": 0.1},
    {"step": 2, "ppo/kl": 4.0, "ppo/score": 0.5},
    {"step": 2, "ppo/gold_score": 0.4},
    {"step": 3, "ppo/kl": 9.0, "ppo/score": 0.9},
    {"step": 4, "ppo/kl": 16.0, "ppo/score": 1.2},
    {"step": 4, "ppo/gold_score": 0.3},
  ]
  out = rounds.overoptimisation(rows, "ppo")
  assert [(p["step"], p["sqrt_kl"], p["score"], p["gold_score"]) for p in out["curve"]] == [
    (0, 0.0, 0.1, 0.2),
    (2, 3.0, 0.9, 0.4),
    (4, 4.0, 1.2, 0.3),
  ]
  assert out["peak_gold"] == 0.4 and out["end_gold"] == 0.3
  assert out["overoptimisation"] == pytest.approx(0.1)
  assert rounds.overoptimisation([], "ppo")["peak_gold"] is None


def test_rounds_is_optional():
  stage = registry.get("rounds")
  assert not stage.active(config_lib.get("configs/default.py:runlocal"))
  assert stage.active(config_lib.get(CONFIG))
  assert "rounds" not in [n for n, _ in pipeline.steps() if pipeline._active(n, _config_default())]


def _config_default():
  return config_lib.get("configs/default.py:runlocal")


# --- end to end ----------------------------------------------------------------------------------

ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
OVERRIDES = ("--config.rm.save_every=4", "--config.ppo.save_every=2")


def _command(workdir):
  return [sys.executable, "-m", "rlhf_jax", "rounds", "--config", CONFIG, "--workdir", workdir]


def _run(workdir, repo_root):
  proc = subprocess.run(
    [*_command(workdir), *OVERRIDES], cwd=repo_root, env=ENV, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory, repo_root):
  """data, pretrain and SFT of the runlocal config (copied into each run)."""
  d = str(tmp_path_factory.mktemp("rounds") / "base")
  os.chdir(repo_root)
  config = config_lib.get(CONFIG)
  pipeline.run(config, d, only=("data", "pretrain", "sft"))
  return d


def _copy(base, dst):
  for name in rounds.SHARED:
    shutil.copytree(os.path.join(base, name), os.path.join(dst, name), symlinks=True)
  return dst


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory, repo_root):
  d = _copy(base, str(tmp_path_factory.mktemp("rounds") / "ref"))
  _run(d, repo_root)
  return d


def _params(path):
  tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _metrics(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if not k.endswith("per_s")} for r in rows]


@pytest.mark.slow
def test_two_rounds_end_to_end(reference, repo_root):
  d = reference
  rows = rounds.load(d)
  assert [r["round"] for r in rows] == [0, 1]
  for r in range(2):
    rdir = rounds.round_dir(d, r)
    for name in (
      "comparisons/DONE",
      "comparisons/train.jsonl",
      "rm/params.json",
      "ppo/params.json",
    ):
      assert os.path.exists(os.path.join(rdir, name)), name
    for name in ("rm", "ppo", "comparisons"):
      assert os.path.exists(os.path.join(rdir, name, provenance.RECORD)), name
    for name in ("probe/validation.jsonl", "summary.json", rounds.ROUND_JSON):
      assert os.path.exists(os.path.join(rdir, name)), name
  for name in ("params.json", rounds.ROUNDS_JSON):
    assert os.path.exists(os.path.join(d, "rounds", name))
  # Round 1 compared conversations with round 0's policy, on other prompts.
  r0 = comparisons.load(rounds.round_dir(d, 0), "train")
  r1 = comparisons.load(rounds.round_dir(d, 1), "train")
  assert all("turn" in x for x in r1) and not any("turn" in x for x in r0)
  config = config_lib.get(CONFIG)
  n = config.world.num_prompts
  ids = [
    [p["prompt_id"] for p in comparisons.prompts(rounds.round_config(config, r, n), d, "train")]
    for r in range(2)
  ]
  assert len(ids[0]) == len(ids[1]) == n // 2 and not set(ids[0]) & set(ids[1])
  cfg1 = rounds.round_config(config, 1, n)
  for p in comparisons.prompts(cfg1, d, "train"):  # the same prompts, with their turns
    assert world_lib.conversation_messages(conversations.turns_of(p)) == p["messages"]
  assert rows[1]["rm_train_comparisons"] == len(r0) + len(r1)  # rm_data=all
  for row in rows:
    assert 0.0 <= row["winrate_vs_sft"] <= 1.0 and row["curve"]
    assert row["labeler_agreement"] is not None
  # Round 1's PPO starts from round 0's policy (its first gold evaluation is round 0's
  # last) with SFT as the KL reference (its first rollout's KL is not 0; round 0's is,
  # up to rounding).
  ppo0, ppo1 = (_metrics(os.path.join(rounds.round_dir(d, r), "ppo")) for r in range(2))
  gold = lambda rows: [x["ppo/gold_score"] for x in rows if "ppo/gold_score" in x]
  first_kl = lambda rows: next(x["ppo/kl"] for x in rows if "ppo/kl" in x)
  assert gold(ppo1)[0] == gold(ppo0)[-1]
  assert abs(first_kl(ppo0)) < 1e-4 < first_kl(ppo1)
  # The summary hook and a re-run that skips everything.
  assert rounds.summary(d) == rows
  stamp = os.path.getmtime(os.path.join(d, "rounds", "params.json"))
  out = _run(d, repo_root)
  assert "rounds: complete, skipping" in out and "round 0" not in out
  assert os.path.getmtime(os.path.join(d, "rounds", "params.json")) == stamp
  # Evaluation scores the last round's policy; the report gains a rounds section.
  proc = subprocess.run(
    [sys.executable, "-m", "rlhf_jax", "eval", "--config", CONFIG, "--workdir", d, *OVERRIDES],
    cwd=repo_root,
    env=ENV,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(d, "summary.json")) as f:
    summary = json.load(f)
  assert set(summary["policies"]) == {"pretrained", "sft", "rounds"}
  assert summary["rounds"] == json.loads(json.dumps(rows))
  with open(os.path.join(d, "report.md")) as f:
    text = f.read()
  assert "## Rounds" in text and "plots/rounds_gold_vs_kl.png" in text
  assert os.path.exists(os.path.join(d, "plots", "rounds_gold_vs_kl.png"))


@pytest.mark.slow
def test_on_policy_accuracy_is_measured_on_the_rounds_policy_samples(reference):
  """Round 0's probe holds comparisons of round 0's PPO policy's samples (the same
  conversations round 1 collects for validation), not SFT's; the accuracy recorded is the
  RM's on those."""
  d = reference
  config = config_lib.get(CONFIG)
  r0dir = rounds.round_dir(d, 0)
  probe = rounds.probe(config, d, 0)
  own = comparisons.load(r0dir, "validation")  # SFT's samples
  assert probe == comparisons.load(rounds.round_dir(d, 1), "validation")
  assert [p["responses"] for p in probe] != [o["responses"] for o in own]
  cfg = rounds.round_config(
    config, 0, len(list(records.prompt_records(world_lib.make_world(config.world), "train")))
  )
  row = rounds.load(d)[0]
  acc = rm.accuracy(cfg, r0dir, probe)
  assert row["rm_accuracy_policy"] == pytest.approx(acc["rm/val_accuracy"], abs=1e-7)
  assert row["rm_accuracy_round0"] == pytest.approx(
    rm.accuracy(cfg, r0dir, own)["rm/val_accuracy"], abs=1e-7
  )
  assert row["rm0_accuracy_policy"] == row["rm_accuracy_policy"]  # (round 0's RM is its own)
  # Round 1: its RM and round 0's on round 1's probe (the same comparisons for both).
  row1, r1dir = rounds.load(d)[1], rounds.round_dir(d, 1)
  probe1 = rounds.probe(config, d, 1)
  mine = rm.accuracy(cfg, r1dir, probe1)["rm/val_accuracy"]
  rm0 = rm.accuracy(cfg, r1dir, probe1, os.path.join(r0dir, "rm"))["rm/val_accuracy"]
  assert row1["rm_accuracy_policy"] == pytest.approx(mine, abs=1e-7)
  assert row1["rm0_accuracy_policy"] == pytest.approx(rm0, abs=1e-7)
  assert row["labeler_agreement"] == pytest.approx(
    comparisons.final_metrics(r0dir)["comparisons/train_labeler_agreement"]
  )


@pytest.mark.slow
def test_rm_starts_from_the_previous_rm_when_asked(reference):
  config = _config(rm_init="previous")
  cfg = rounds.round_config(config, 1, config.world.num_prompts)
  assert cfg.rm.init_dir == "../round_0/rm"
  setup = rm.create_state(cfg, 4)
  setup = rm.init_params(setup, cfg, rounds.round_dir(reference, 1))
  import jax

  start = [np.asarray(x) for x in jax.tree.leaves(setup.state.params)]
  previous = _params(os.path.join(rounds.round_dir(reference, 0), "rm", "params"))
  assert all(np.array_equal(a, b) for a, b in zip(start, previous, strict=True))


def _wait_for_checkpoint(proc, stage_dir, timeout=600):
  """Until `stage_dir` holds a saved checkpoint (and is not complete); whether it did."""
  ckpts = os.path.join(stage_dir, "checkpoints")
  end = time.time() + timeout
  while time.time() < end and proc.poll() is None:
    if os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):
      return not os.path.exists(os.path.join(stage_dir, "params.json"))
    time.sleep(0.005)
  return False


@pytest.mark.slow
def test_sigkill_in_round_1_rm_and_ppo_resumes_bitwise(base, reference, tmp_path, repo_root):
  d = _copy(base, str(tmp_path / "killed"))
  r1 = rounds.round_dir(d, 1)
  for stage in ("rm", "ppo"):
    log = open(tmp_path / f"{stage}.log", "w")
    proc = subprocess.Popen(
      [*_command(d), *OVERRIDES], cwd=repo_root, env=ENV, stdout=log, stderr=subprocess.STDOUT
    )
    mid = _wait_for_checkpoint(proc, os.path.join(r1, stage))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mid, f"round 1's {stage} was not caught between checkpoint and export"
    assert not os.path.exists(os.path.join(r1, stage, "params.json"))
  out = _run(d, repo_root)
  assert "resuming from iteration" in out
  ref1 = rounds.round_dir(reference, 1)
  for stage in ("rm", "ppo"):
    a, b = _params(os.path.join(r1, stage, "params")), _params(os.path.join(ref1, stage, "params"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), stage
    assert _metrics(os.path.join(r1, stage)) == _metrics(os.path.join(ref1, stage)), stage
  a, b = (
    _params(os.path.join(d, "rounds", "params")),
    _params(os.path.join(reference, "rounds", "params")),
  )
  assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  assert rounds.load(d) == rounds.load(reference)


def test_sweeps_run_rounds_only_when_the_config_has_them():
  from rlhf_jax import sweep

  with_rounds = sweep.load("configs/sweeps/rounds.py:runlocal")
  assert with_rounds.stages == ("data", "pretrain", "sft", "rounds", "eval")
  assert len(with_rounds.points) == 9
  assert len({p.fingerprints["rounds"] for p in with_rounds.points}) == 9
  assert len({p.fingerprints["sft"] for p in with_rounds.points}) == 3  # (one per seed)
  plain = sweep.load("configs/sweeps/beta.py:runlocal")
  assert "rounds" not in plain.stages
