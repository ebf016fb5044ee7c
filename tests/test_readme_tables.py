"""README's result tables equal the rendering of the JSON the runs wrote
(experiments/readme_tables.py); the check notices a figure that differs; the Quick
start's aggregate over pipelines is the mean and t-interval computed by hand."""

import json
import math
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
import ablation_beta  # noqa: E402
import readme_tables as rt  # noqa: E402


def test_readme_tables_equal_their_json(repo_root, capsys):
  """The README-vs-JSON test: `python experiments/readme_tables.py --check` passes."""
  with open(os.path.join(repo_root, "README.md")) as f:
    readme = f.read()
  assert rt.main(["--check", "--root", str(repo_root)]) == 0, capsys.readouterr().err
  assert sorted(rt.render(readme, str(repo_root)).names) == sorted(rt.TABLES)  # each once


def test_the_experiments_md_is_their_json_rendered(repo_root):
  """README's paper tables are what each experiment wrote to its `.md`, from its JSON."""
  results = repo_root / "experiments" / "results"
  read = lambda name, ext: (results / f"{name}.{ext}").read_text()
  for name, policy, label in (
    ("ablation_beta", "ppo", "beta"),
    ("ablation_ptx", "ppo_ptx", "gamma_ptx"),
  ):
    data = json.loads(read(name, "json"))
    note = ablation_beta.sft_note(data)
    assert read(name, "md") == ablation_beta.table(data, policy, label) + "\n\n" + note + "\n"
  for name in ("figure1", "rm_scaling", "overoptimization"):
    assert read(name, "md") == rt.TABLES[name].render(json.loads(read(name, "json"))) + "\n"


@pytest.fixture
def copy(repo_root, tmp_path):
  """A copy of README and the JSON it is rendered from."""
  shutil.copy(os.path.join(repo_root, "README.md"), tmp_path / "README.md")
  results = tmp_path / "experiments" / "results"
  results.mkdir(parents=True)
  for f in os.listdir(os.path.join(repo_root, "experiments", "results")):
    if f.endswith(".json"):
      shutil.copy(os.path.join(repo_root, "experiments", "results", f), results / f)
  return tmp_path


def _edit(path, fn):
  data = json.loads(path.read_text())
  fn(data)
  path.write_text(json.dumps(data))


def test_a_changed_figure_fails_the_check(copy, capsys):
  check = ["--check", "--root", str(copy)]
  assert rt.main(check) == 0
  results = copy / "experiments" / "results"
  _edit(
    results / "ablation_beta.json",
    lambda d: d["entries"][2]["policies.ppo.kl_to_sft"].update(mean=9.9),
  )
  assert rt.main(check) == 1
  err = capsys.readouterr().err
  assert "differ from their JSON: ablation_beta\n" in err and "9.900" in err
  _edit(results / "bench_ppo.json", lambda d: d["phases"]["iteration"].update(episodes_per_s=31.0))
  assert rt.main(check) == 1
  assert "differ from their JSON: ablation_beta, bench_ppo\n" in capsys.readouterr().err

  assert rt.main(["--root", str(copy)]) == 0  # re-rendering makes them agree again
  assert rt.main(check) == 0
  assert (
    "| 0.01 | 3 | 0.676 ± 0.114 | 0.488 ± 0.148 | 9.900 ± 0.916 |"
    in (copy / "README.md").read_text()
  )


def test_a_pending_table_fails_once_its_json_exists(copy, capsys):
  check = ["--check", "--root", str(copy)]
  out = copy / "experiments" / "results" / "preemption_sigint.json"
  row = {c: 1 for c in rt.preemption.COLUMNS} | {"stage": "pipeline", "reference_s": 84.2}
  out.write_text(json.dumps({"rows": [row], "kills_per_stage": 1, "modes": ["sigint"], "seed": 0}))
  assert rt.main(check) == 1
  assert "preemption_sigint" in capsys.readouterr().err
  assert rt.main(["--root", str(copy)]) == 0
  readme = (copy / "README.md").read_text()
  assert (
    "<!-- table:preemption_sigint source=experiments/results/preemption_sigint.json -->\n" in readme
  )
  assert "$ python experiments/preemption.py --kills 1 --stages pipeline --modes sigint\n" in readme
  assert rt.main(check) == 0


def test_a_marker_must_name_its_json(copy):
  readme = copy / "README.md"
  readme.write_text(readme.read_text().replace("source=experiments/results/figure1", "source=x"))
  with pytest.raises(SystemExit, match="figure1 says source=x"):
    rt.main(["--check", "--root", str(copy)])


def _summary(seed, win, acc, total):
  policy = lambda w: {k: w for k, _, _ in rt.POLICY_METRICS}
  return {
    "policies": {"sft": policy(0.5), "ppo": policy(win)},
    "rm": {"val_accuracy": acc, "val_gold_accuracy": acc + 0.1},
    "wall_seconds": {"ppo": total / 2, "total": total},
    "num_prompts": 500,
    "eval": {"config_seed": seed},
  }


def test_collect_is_the_mean_and_t_interval_over_pipelines(tmp_path):
  wins, accs, totals = [0.70, 0.66, 0.71], [0.63, 0.64, 0.65], [600.0, 700.0, 800.0]
  dirs = []
  for seed, (w, a, t) in enumerate(zip(wins, accs, totals, strict=True)):
    dirs.append(tmp_path / f"seed{seed}")
    dirs[-1].mkdir()
    (dirs[-1] / "summary.json").write_text(json.dumps(_summary(seed, w, a, t)))
  q = rt.collect([str(d) for d in dirs])
  # By hand: mean 0.69, deviations .01, -.03, .02, sample variance 14e-4 / 2 = 7e-4;
  # t(0.975, 2 df) = 4.3027; half-width 4.3027 * sqrt(7e-4 / 3) = 0.06572.
  ppo = q["policies"]["ppo"]["winrate_vs_sft"]
  assert ppo["values"] == wins
  assert ppo["mean"] == pytest.approx(0.69)
  assert ppo["ci95_half"] == pytest.approx(0.06572, abs=1e-5)
  assert ppo["ci95"] == pytest.approx([0.69 - 0.06572, 0.69 + 0.06572], abs=1e-5)
  # accuracies: mean 0.64, sd 0.01, half 4.3027 * 0.01 / sqrt(3) = 0.02484.
  assert q["reward_models"]["rm"]["val_accuracy"]["ci95_half"] == pytest.approx(0.02484, abs=1e-5)
  assert q["reward_models"]["rm"]["val_gold_accuracy"]["mean"] == pytest.approx(0.74)
  # wall: mean 700, sd 100, half 4.3027 * 100 / sqrt(3) = 248.4.
  assert q["wall_seconds"]["total"]["ci95_half"] == pytest.approx(248.4, abs=0.1)
  assert q["policies"]["sft"]["winrate_vs_sft"]["ci95_half"] == 0.0
  assert [r["seed"] for r in q["runs"]] == [0, 1, 2]

  text = rt.quickstart_table(json.loads(json.dumps(q)))  # (as read back from the file)
  assert "over 3 pipelines (`--config.seed` 0, 1, 2)" in text
  assert "| PPO | 0.690 ± 0.066 | 0.690 ± 0.066 |" in text
  assert "per seed (0, 1, 2): PPO 0.700 / 0.660 / 0.710." in text
  assert "validation accuracy 0.640 ± 0.025 (gold order: 0.740 ± 0.025)" in text
  assert "Wall time per pipeline 700 ± 248 s (means: ppo 350)." in text

  one = rt.collect([str(dirs[0])])["policies"]["ppo"]["winrate_vs_sft"]
  assert one["ci95_half"] is None and one["ci95"] is None and one["mean"] == 0.70
  assert not math.isnan(one["mean"])
