"""Configs: presets, typed overrides, and the promised one-line errors (exit 2)."""

import subprocess
import sys

import pytest

from rlhf_jax import cli, config_lib, ranges
from rlhf_jax.errors import UserInputError

DEFAULT = "configs/default.py"


@pytest.fixture(autouse=True)
def _in_repo(repo_root, monkeypatch):
  monkeypatch.chdir(repo_root)


def test_presets_and_overrides():
  c = config_lib.get(f"{DEFAULT}:size=s", [("model.dropout", "0.2"), ("seed", "7")])
  assert (c.model.d_model, c.model.n_layers, c.model.dropout, c.seed) == (256, 4, 0.2, 7)
  assert c.is_locked
  c = config_lib.get(f"{DEFAULT}:runlocal")
  assert c.model.size == "runlocal"
  c = config_lib.get(DEFAULT, [("model.tie_embeddings", "true"), ("sampling.top_p", "1")])
  assert c.model.tie_embeddings is True and c.sampling.top_p == 1.0


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["--config.model.nope=3"], "config.model.nope: unknown config key"),
    (["--config.modle.d_model=3"], "config.modle.d_model: unknown config key"),
    (["--config.model.d_model=abc"], "config.model.d_model: expected an int"),
    (["--config.model.d_model=1.5"], "config.model.d_model: expected an int"),
    (["--config.model.tie_embeddings=maybe"], "config.model.tie_embeddings: expected a bool"),
    (["--config.model.n_heads=3"], "config.model.n_heads: 3 heads do not divide d_model=128"),
    (["--config.model.n_kv_heads=3"], "config.model.n_kv_heads: 3 KV heads do not divide"),
    (["--config.model.d_model=0"], "config.model.d_model: must be > 0"),
    (["--config.model.dtype=float8"], "config.model.dtype: must be one of"),
    (["--config.sampling.top_p=0"], "config.sampling.top_p: must be in (0, 1]"),
    (["--config.tokenizer.vocab_size=512"], "config.tokenizer.vocab_size: 512 != model"),
    (["--config.model=3"], "config.model: is a section"),
  ],
)
def test_bad_overrides_are_one_line_errors(argv, expected, capsys):
  rc = cli.main(["config", "--config", DEFAULT, *argv])
  err = capsys.readouterr().err
  assert rc == 2
  assert err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize(
  "spec, expected",
  [
    (f"{DEFAULT}:size=xl", "config arg 'size': unknown 'xl'"),
    (f"{DEFAULT}:sise=s", "config arg 'sise': unknown"),
    (f"{DEFAULT}:runlocal=perhaps", "config arg 'runlocal': expected a bool"),
    ("configs/missing.py", "file not found: configs/missing.py"),
  ],
)
def test_bad_config_specs(spec, expected, capsys):
  assert cli.main(["config", "--config", spec]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and expected in err, err


@pytest.mark.slow
def test_cli_subprocess_exit_status_and_no_traceback(repo_root):
  proc = subprocess.run(
    [sys.executable, "-m", "rlhf_jax", "config", "--config", DEFAULT, "--config.model.n_heads=5"],
    capture_output=True,
    text=True,
    cwd=repo_root,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
    "rlhf-jax: error: config.model.n_heads: 5 heads do not divide d_model=128"
  )
  assert "Traceback" not in proc.stderr


def test_parse_overrides_space_form():
  overrides, rest = config_lib.parse_overrides(["x", "--config.a.b", "3", "--config.c=4"])
  assert overrides == [("a.b", "3"), ("c", "4")] and rest == ["x"]
  with pytest.raises(UserInputError):
    config_lib.parse_overrides(["--config.a"])


def test_range_rules_by_hand():
  assert ranges.contains("[0, 1]", 0) and ranges.contains("[0, 1]", 1)
  assert not ranges.contains("(0, 1]", 0) and ranges.contains("(0, 1]", 1)
  assert ranges.contains("[0, 1)", 0) and not ranges.contains("[0, 1)", 1)
  assert ranges.contains(">= -1", -1) and not ranges.contains("> 0", 0)
  assert not ranges.contains(">= 0", float("nan"))
  assert ranges.describe("> 0") == "must be > 0"
  assert ranges.describe("(0, 1]") == "must be in (0, 1]"


def test_every_stage_range_rule_names_a_field():
  """A rule for a field its section lacks is skipped, silently: a typo, a renamed field."""
  from rlhf_jax.stages import comparisons, pretrain, rm, sft
  from rlhf_jax.stages.ppo import settings

  config = config_lib.get(DEFAULT)
  tables = {
    "pretrain": pretrain.RANGES,
    "sft": sft.RANGES,
    "comparisons": comparisons.RANGES,
    "rm": rm.RANGES,
    "ppo": settings.RANGES,
    "ppo_ptx": settings.RANGES,
  }
  for section, rules in tables.items():
    assert set(rules) <= set(config[section]), (section, set(rules) - set(config[section]))
    for field, rule in rules.items():  # every default lies inside its rule
      assert ranges.contains(rule, config[section][field]), (section, field)
