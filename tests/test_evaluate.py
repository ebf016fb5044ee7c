"""Evaluation, report, sample and chat: the summary.json contract on tiny random-init
exports (a "PPO" equal to SFT wins exactly half and has KL 0), the statistics against
hand-computed values, the report and plots, and `sample` / `chat` smoke runs."""

import argparse
import io
import json
import math
import os

import jax
import numpy as np
import pytest

from rlhf_jax import chat, config_lib, evaluate, plots, report, sharding, tokenizer
from rlhf_jax.data import labelers, prepare
from rlhf_jax.data import records as records_lib
from rlhf_jax.data import world as world_lib
from rlhf_jax.errors import UserInputError
from rlhf_jax.evaluate import runner, stats
from rlhf_jax.models import TransformerConfig, init_params
from rlhf_jax.stages import common, registry
from rlhf_jax.train import checkpoints

CONTRACT = ("winrate_vs_sft", "winrate_vs_sft_ci95", "gold_score", "kl_to_sft", "heldout_lm_loss")


def make_config():
  config = config_lib.get("configs/default.py:runlocal", [("model.n_layers", "1")])
  with config.unlocked():
    if "eval" not in config:
      config.eval = evaluate.eval_config(runlocal=True)
  return config


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def fake_run(workdir: str, config) -> None:
  """A work directory as the pipeline leaves it, with random-init exports: pretrained,
  SFT, a "PPO" with SFT's parameters, PPO-ptx, an RM; metrics and wall seconds."""
  prepare.prepare(config, workdir)
  model_cfg, model = TransformerConfig.from_config(config.model), config.model.to_dict()
  for stage, seed in (("pretrain", 0), ("sft", 1), ("ppo", 1), ("ppo_ptx", 2)):
    params, _ = init_params(model_cfg, jax.random.PRNGKey(seed))
    metrics = {"wall_seconds": 4.0}
    checkpoints.export_params(f"{workdir}/{stage}", params, model, stage=stage, metrics=metrics)
  params, _ = init_params(model_cfg, jax.random.PRNGKey(3), heads=("scalar",))
  checkpoints.export_params(
    f"{workdir}/rm",
    params,
    model,
    stage="rm",
    reward_bias=-0.25,
    metrics={"rm/val_accuracy": 0.625, "wall_seconds": 2.0},
  )
  _write_jsonl(
    f"{workdir}/sft/metrics.jsonl",
    [{"step": s, "sft/loss": 3.0 / s, "sft/lr": 1e-3} for s in (1, 2, 3)]
    + [{"step": 3, "sft/val_loss": 1.5, "sft/gold_score": 0.4}],
  )
  _write_jsonl(f"{workdir}/rm/metrics.jsonl", [{"step": 2, "rm/loss": 0.6, "rm/accuracy": 0.7}])
  for stage in ("ppo", "ppo_ptx"):
    rows = [
      {"step": s, "ppo/score": 0.1 * s, "ppo/kl": 0.5 * s, "ppo/reward": 0.05 * s}
      for s in (2, 4, 6)
    ]
    rows += [{"step": 4, "ppo/gold_score": 0.3}, {"step": 6, "ppo/gold_score": 0.35}]
    _write_jsonl(f"{workdir}/{stage}/metrics.jsonl", rows)
  with open(f"{workdir}/wall_seconds.json", "w") as f:
    json.dump({"data": 1.0, "pretrain": 10.0, "total": 99.0}, f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval"))
  config = make_config()
  fake_run(workdir, config)
  summary = evaluate.run(config, workdir)
  return workdir, summary, config


def _finite(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_summary_has_every_contract_key_well_formed(run):
  workdir, returned, config = run
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)  # valid JSON: NaN would not parse back as a number here
  assert summary == returned
  assert set(summary["policies"]) == {p for p, s in registry.policies().items() if s.active(config)}
  for name, p in summary["policies"].items():
    for key in CONTRACT:
      assert key in p, (name, key)
    lo, hi = p["winrate_vs_sft_ci95"]
    assert 0.0 <= lo <= p["winrate_vs_sft"] <= hi <= 1.0, name
    lo, hi = p["labeler_winrate_vs_sft_ci95"]
    assert 0.0 <= lo <= p["labeler_winrate_vs_sft"] <= hi <= 1.0, name
    for key in (
      "winrate_vs_sft",
      "gold_score",
      "kl_to_sft",
      "heldout_lm_loss",
      "evasive_rate",
      "untruthful_rate",
      "toxic_rate",
      "zero_shot_mean",
    ):
      assert _finite(p[key]), (name, key, p[key])
    assert 0.0 <= p["gold_score"] <= 1.0
    assert set(p["gold_score_by_family"]) <= set(world_lib.FAMILIES)
    assert set(p["zero_shot"]) == set(records_lib.HELDOUT_TASKS)
    assert all(0.0 <= a <= 1.0 for a in p["zero_shot"].values())
    assert p["heldout_lm_loss"] > 0
  # A random-init model is about uniform over the vocabulary.
  assert summary["policies"]["sft"]["heldout_lm_loss"] == pytest.approx(
    math.log(config.model.vocab_size), rel=0.2
  )
  wall = summary["wall_seconds"]
  # Stage records, overridden by wall_seconds.json (whose own total is not used), + eval.
  assert wall["pretrain"] == 10.0 and wall["data"] == 1.0 and wall["sft"] == 4.0
  assert wall["rm"] == 2.0 and wall["eval"] > 0
  assert wall["total"] == pytest.approx(sum(v for k, v in wall.items() if k != "total"))
  assert summary["rm"]["val_accuracy"] == 0.625 and summary["rm"]["reward_bias"] == -0.25
  assert summary["num_prompts"] == config.eval.num_prompts


def test_policy_equal_to_sft_ties_and_has_zero_kl(run):
  _, summary, _ = run
  ppo, sft = summary["policies"]["ppo"], summary["policies"]["sft"]
  for p in (ppo, sft):
    assert p["winrate_vs_sft"] == 0.5 and p["winrate_vs_sft_ci95"] == [0.5, 0.5]
    assert p["labeler_winrate_vs_sft"] == 0.5
    assert abs(p["kl_to_sft"]) < 1e-6
  assert ppo["gold_score"] == sft["gold_score"]
  assert ppo["heldout_lm_loss"] == sft["heldout_lm_loss"]
  assert ppo["zero_shot"] == sft["zero_shot"]
  # Another model's samples are far from SFT's distribution.
  assert summary["policies"]["ppo_ptx"]["kl_to_sft"] > 1.0


def test_a_second_evaluation_reads_the_cache_and_a_new_export_misses_it(run, capsys):
  workdir, summary, config = run
  capsys.readouterr()
  again = evaluate.evaluate(config, workdir)
  out = capsys.readouterr().out
  for name in ("pretrained", "sft", "ppo", "ppo_ptx"):
    assert f"eval: {name} from " in out, name
  drop = lambda s: {k: v for k, v in s.items() if k != "wall_seconds"}
  assert drop(again) == drop(summary)
  # Re-exporting PPO (a retrained stage) invalidates its entry, and only its.
  info = checkpoints.params_info(f"{workdir}/ppo")
  with open(f"{workdir}/ppo/params.json", "w") as f:
    json.dump({**info, "metrics": {**info["metrics"], "wall_seconds": 5.0}}, f)
  evaluate.evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "eval: ppo in " in out and "eval: sft from " in out and "eval: ppo_ptx from " in out


def test_report_plots_and_generations(run):
  workdir, summary, config = run
  with open(os.path.join(workdir, "report.md")) as f:
    md = f.read()
  for heading in (
    "Win rate against SFT",
    "Gold score per instruction family",
    "Failure rates",
    "Alignment tax",
    "Reward model",
    "Wall time",
    "Example replies",
  ):
    assert f"## {heading}" in md
  for name in ("Pretrained (few-shot)", "SFT", "PPO", "PPO-ptx"):
    assert f"| {name} " in md
  for png in (
    "winrate.png",
    "gold_by_family.png",
    "ppo_score_vs_kl.png",
    "curves_sft.png",
    "curves_rm.png",
    "curves_ppo.png",
    "curves_ppo_ptx.png",
  ):
    path = os.path.join(workdir, "plots", png)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert f"(plots/{png})" in md
  assert not os.path.exists(os.path.join(workdir, "plots", "curves_pretrain.png"))  # no metrics
  gens = report.read_generations(workdir, summary)
  assert len(gens) == 4 * summary["num_prompts"]
  assert (
    {g["policy"] for g in gens}
    == set(summary["policies"])
    == {
      "pretrained",
      "sft",
      "ppo",
      "ppo_ptx",
    }
  )
  assert all("\nUser:" not in g["reply"] for g in gens if g["policy"] == "pretrained")


def test_missing_policies_are_skipped_and_sft_is_required(tmp_path):
  config = make_config()
  model_cfg = TransformerConfig.from_config(config.model)
  params, _ = init_params(model_cfg, jax.random.PRNGKey(0))
  checkpoints.export_params(str(tmp_path / "pretrain"), params, config.model.to_dict())
  with pytest.raises(UserInputError, match="no exported SFT policy"):
    evaluate.evaluate(config, str(tmp_path))
  with config.unlocked():
    config.eval.ci = "wilson"
  with pytest.raises(UserInputError, match="config.eval.ci: must be bootstrap"):
    evaluate.evaluate(config, str(tmp_path))
  checkpoints.export_params(str(tmp_path / "sft"), params, config.model.to_dict())
  assert evaluate.available_policies(str(tmp_path)) == ["pretrained", "sft"]


# --- statistics -----------------------------------------------------------------------------


def test_win_rate_and_normal_ci_by_hand():
  wins = stats.outcomes([0.9, 0.5, 0.2, 1.0], [0.4, 0.5, 0.3, 0.0])
  np.testing.assert_array_equal(wins, [1.0, 0.5, 0.0, 1.0])
  assert wins.mean() == 0.625
  # s^2 = (0.375^2 + 0.125^2 + 0.625^2 + 0.375^2) / 3 = 0.6875 / 3
  half = 1.959963984540054 * math.sqrt(0.6875 / 3) / 2
  lo, hi = stats.normal_ci(wins)
  assert lo == pytest.approx(0.625 - half) and hi == pytest.approx(0.625 + half)
  rng = np.random.default_rng(0)
  assert stats.ci95(wins, "normal", rng) == [pytest.approx(0.625 - half), 1.0]  # clipped
  assert stats.ci95([0.5] * 7, "bootstrap", rng) == [0.5, 0.5]
  with pytest.raises(UserInputError, match="config.eval.ci"):
    stats.ci95(wins, "wilson", rng)


def test_bootstrap_matches_a_plain_loop_and_the_normal_interval():
  x = np.random.default_rng(1).choice([0.0, 0.5, 1.0], size=400, p=[0.3, 0.2, 0.5])
  lo, hi = stats.bootstrap_ci(x, 500, np.random.default_rng(7))
  rng = np.random.default_rng(7)
  idx = rng.integers(0, len(x), size=(500, len(x)))
  means = sorted(float(np.mean([x[j] for j in row])) for row in idx)
  assert lo == pytest.approx(np.quantile(means, 0.025)) and hi == pytest.approx(
    np.quantile(means, 0.975)
  )
  n_lo, n_hi = stats.normal_ci(x)
  assert lo == pytest.approx(n_lo, abs=0.01) and hi == pytest.approx(n_hi, abs=0.01)


def test_labeler_outcomes_tie_on_identical_texts_and_prefer_the_right_answer():
  world = world_lib.make_world()
  task, _ = world_lib.sample_task(world, np.random.default_rng(0), family="arithmetic")
  right, wrong = world_lib.correct_response(task), "I do not know, what do you think?"
  rng = np.random.default_rng(0)
  same = stats.labeler_outcomes([task] * 50, [right] * 50, [right] * 50, rng)
  assert (same == 0.5).all()
  better = stats.labeler_outcomes([task] * 50, [right] * 50, [wrong] * 50, rng)
  assert better.mean() > 0.95
  assert len(labelers.pool()) == 12


def test_few_shot_prefix_and_reply_cut():
  demos = [
    {"family": "sort", "quality": "wrong", "messages": [_m("user", "a"), _m("assistant", "b")]},
    {"family": "sort", "quality": "correct", "messages": [_m("user", "c"), _m("assistant", "d")]},
    {"family": "sort", "quality": "correct", "messages": [_m("user", "e"), _m("assistant", "f")]},
    {"family": "fact", "quality": "correct", "messages": [_m("user", "g"), _m("assistant", "h")]},
  ]
  assert [m["content"] for m in runner.few_shot_prefix(demos, 2)] == ["c", "d", "g", "h"]
  # Too few good ones of distinct families: the rest in order.
  assert [m["content"] for m in runner.few_shot_prefix(demos, 3)] == list("cdghab")
  assert runner.few_shot_prefix(demos, 0) == []
  assert tokenizer.cut_reply(" 12.\nUser: What is 3 + 4?\nAssistant: 7") == "12."
  assert tokenizer.cut_reply("blue\nAssistant: red") == "blue"


def _m(role, content):
  return tokenizer.Message(role=role, content=content)


def test_packed_scoring_equals_scoring_each_sequence_alone(run):
  workdir, _, config = run
  tok = common.load_tokenizer(config, workdir)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  scorer = runner.Runner(common.model_config(config), mesh, 8)
  params, _ = init_params(TransformerConfig.from_config(config.model), jax.random.PRNGKey(5))
  docs = [{"text": "The colour of Zorbin is red. " * k} for k in (1, 3, 9)]
  seqs = runner.heldout_rows(tok, docs, 48)
  assert sum(len(ids) for ids, _ in seqs) == sum(len(tok.encode(d["text"])) + 2 for d in docs)
  with sharding.use(mesh, rules):
    together = scorer.score(params, seqs)
    alone = [scorer.score(params, [s])[0] for s in seqs]
  np.testing.assert_allclose(together, alone, rtol=1e-5)
  assert (together < 0).all()


def test_choice_rows_target_only_the_choice(run):
  workdir, _, config = run
  tok = common.load_tokenizer(config, workdir)
  rec = {"context": "The colour of Zorbin is", "choices": [" red", " a baker"], "label": 0}
  for (ids, target), choice in zip(runner.choice_rows(tok, rec), rec["choices"], strict=True):
    assert ids[0] == tok.bos_id and len(ids) == len(target)
    picked = [i for i, t in zip(ids, target, strict=True) if t]
    assert tok.decode(picked) == choice


def test_score_vs_kl_joins_gold_evaluations_to_the_last_kl():
  rows = [
    {"step": 2, "ppo/score": 0.2, "ppo/kl": 1.0},
    {"step": 4, "ppo/score": 0.4, "ppo/kl": 2.0},
    {"step": 4, "ppo/gold_score": 0.5},
    {"step": 5, "ppo/gold_score": 0.6},
  ]
  out = plots.score_vs_kl(rows, "ppo")
  assert out == {"score": [(1.0, 0.2), (2.0, 0.4)], "gold_score": [(2.0, 0.5), (2.0, 0.6)]}
  assert plots.score_vs_kl([], "ppo") == {"score": [], "gold_score": []}


def test_summary_json_is_finite():
  assert evaluate.finite_json({"a": float("nan"), "b": [np.float32(1.5), np.bool_(True)]}) == {
    "a": None,
    "b": [1.5, True],
  }


# --- sample and chat ---------------------------------------------------------------------------


def _args(command, workdir, *extra):
  parser = argparse.ArgumentParser()
  chat.add_arguments(parser.add_subparsers(dest="command"))
  return parser.parse_args([command, "--workdir", workdir, "--max-new-tokens", "8", *extra])


def test_sample_prints_replies_for_every_prompt(run):
  workdir = run[0]
  out = io.StringIO()
  args = _args(
    "sample",
    workdir,
    "--policy",
    "sft",
    "--prompt",
    "What is 2 + 2?",
    "--prompt",
    "Sort these numbers: 3, 1, 2.",
    "--num-samples",
    "2",
    "--temperature",
    "1",
  )
  assert chat.sample_main(args, stdout=out) == 0
  text = out.getvalue()
  assert "User: What is 2 + 2?" in text and "User: Sort these numbers: 3, 1, 2." in text
  assert text.count("Assistant: ") == 4


def test_chat_keeps_the_dialogue_over_two_turns(run, monkeypatch):
  workdir = run[0]
  seen = []
  real = chat.Policy.reply

  def spy(self, dialogues, rng, **kw):
    seen.append([dict(m) for m in dialogues[0]])
    return real(self, dialogues, rng, **kw)

  monkeypatch.setattr(chat.Policy, "reply", spy)
  out = io.StringIO()
  stdin = io.StringIO("What is 3 * 4?\n\nNow add 5 to that.\n/quit\nnever read\n")
  assert chat.chat_main(_args("chat", workdir, "--policy", "ppo"), stdin=stdin, stdout=out) == 0
  assert out.getvalue().count("Assistant: ") == 2
  assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
  assert seen[1][0]["content"] == "What is 3 * 4?" and seen[1][2]["content"] == "Now add 5 to that."


def test_sample_errors_name_the_problem(run, tmp_path):
  with pytest.raises(UserInputError, match="no exported parameters"):
    chat.sample_main(_args("sample", str(tmp_path), "--prompt", "hi"))
  with pytest.raises(UserInputError, match="--temperature"):
    chat.sample_main(_args("sample", run[0], "--prompt", "hi", "--temperature", "-1"))


def test_chat_module_is_light_and_knows_every_policy():
  assert set(chat.MAINS) == set(chat.COMMANDS)


def test_the_cache_key_covers_the_exports_a_policy_reads(tmp_path, repo_root):
  """Best-of-n's own export names the RM's directory, not its contents: a retrained RM
  must miss its cache (and leave SFT's, which does not read the RM, alone)."""
  config = config_lib.get(os.path.join(repo_root, "configs/best_of_n.py:runlocal"))
  for name in ("pretrain", "sft", "rm", "best_of_n"):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "params.json").write_text(json.dumps({"stage": name}))
  key = lambda name: evaluate._cache_path(config, str(tmp_path), name, config.eval)
  before = {name: key(name) for name in ("sft", "best_of_n")}
  (tmp_path / "rm" / "params.json").write_text(json.dumps({"stage": "rm", "retrained": 1}))
  assert key("best_of_n") != before["best_of_n"]
  assert key("sft") == before["sft"]
