"""experiments/bench_peers.py: without torch, the missing-peer message and exit status, the
workload handed to the peer and the summary arithmetic; with a peer environment (a Python
with torch and trl named by $RLHF_JAX_PEER_PYTHON; skipped when unset), the peer script on
a tiny workload and (slow tier) a tiny interleaved run. Nothing here is timed."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from rlhf_jax import config_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import bench_peers  # noqa: E402
import bench_ppo  # noqa: E402

PEER = os.environ.get(bench_peers.PEER_ENV)
needs_peer = pytest.mark.skipif(
  not PEER,
  reason=f"${bench_peers.PEER_ENV} unset (a Python with torch and trl; bench_peers.py says "
  "how to make one)",
)
TINY = [
  ("ppo.batch_size", "8"),
  ("ppo.prompt_len", "8"),
  ("ppo.max_new_tokens", "4"),
]


def tiny_config(repo_root):
  os.chdir(repo_root)
  return config_lib.get("configs/ppo.py:size=runlocal", bench_ppo.ISSUE_OVERRIDES + TINY)


def test_without_a_peer_it_says_how_to_make_one_and_exits_2(capsys, monkeypatch):
  monkeypatch.delenv(bench_peers.PEER_ENV, raising=False)
  cases = [[], ["--peer-python", os.path.join(os.sep, "nonexistent", "python")]]
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("trl") is None:
    cases.append(["--peer-python", sys.executable])  # this environment: no torch / trl
  for argv in cases:
    with pytest.raises(SystemExit) as e:
      bench_peers.main(argv)
    assert e.value.code == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and not out.out, (argv, out)
    for s in ("--peer-python", "torch==2.13.0", "trl==0.19.1", "pip install", "venv"):
      assert s in lines[0], (s, lines[0])


def test_the_peer_gets_our_model_shape_and_ppo_numbers(repo_root):
  config = tiny_config(repo_root)
  spec = bench_peers.peer_spec(config, config.ppo)
  m, model = spec["model"], config.model
  assert (m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]) == (
    model.d_model,
    model.mlp_dim,
    model.n_layers,
  )
  assert (m["num_attention_heads"], m["num_key_value_heads"]) == (model.n_heads, model.n_kv_heads)
  assert m["head_dim"] == model.d_model // model.n_heads and m["vocab_size"] == model.vocab_size
  assert m["rope_theta"] == model.rope_theta and m["rms_norm_eps"] == model.norm_eps
  assert m["tie_word_embeddings"] == model.tie_embeddings
  assert m["max_position_embeddings"] >= 12
  assert spec == {
    "model": m,
    "batch": 8,
    "prompt_len": 8,
    "response_length": 4,
    "temperature": 1.0,
    "num_ppo_epochs": 1,
    "num_mini_batches": 4,
    "kl_coef": 0.02,
    "seed": 0,
  }


def test_summary_medians_ranges_and_table():
  iters = [[2.0, 4.0], [1.0, 1.0], [3.0, 3.0]]  # block medians 3, 1, 3; all: median 2.5
  r = bench_peers.system_summary(iters, [0.5, 0.25, 1.0], episodes=10, new=100)
  assert r["iteration_s"] == 2.5 and r["episodes_per_s"] == 4.0
  assert (r["episodes_per_s_min"], r["episodes_per_s_max"]) == (10 / 3, 10.0)
  assert r["new_tokens_per_s"] == 200.0
  assert (r["new_tokens_per_s_min"], r["new_tokens_per_s_max"]) == (100.0, 400.0)
  out = {
    "workload": {
      "episodes": 10,
      "prompt_len": 3,
      "new_tokens_per_episode": 10,
      "params": 1234,
      "updates_per_iteration": 4,
    },
    "rounds": 3,
    "block": 2,
    "machine": {"cpus": 2},
    "loadavg_start": [0.5, 0.25, 0.0],
    "matmul_peak_gflop_per_s": {"jax": 100.0, "torch": 120.0},
    "systems": {"ours": r, "trl": {**r, "episodes_per_s": 2.0, "new_tokens_per_s": 400.0}},
    "ratio_ours_over_trl": {"episodes_per_s": 2.0, "new_tokens_per_s": 0.5},
  }
  table = bench_peers.report(out)
  assert "load average at start 0.50 0.25 0.00" in table and "jax 100.0" in table
  ours, trl, ratio = table.splitlines()[-3:]
  assert ours.split()[:5] == ["rlhf_jax", "(ours)", "2.500", "4.0", "(3.3-10.0)"]
  assert trl.split()[2:4] == ["2.500", "2.0"]
  assert ratio.split() == ["ours", "/", "TRL", "2.00x", "0.50x"]


@needs_peer
def test_the_peer_script_runs_trl_ppo_on_fixed_length_episodes(repo_root):
  config = tiny_config(repo_root)
  spec = bench_peers.peer_spec(config, config.ppo)
  proc = subprocess.run(
    [PEER, bench_peers.PEER_SCRIPT, "--rounds", "1", "--warmup", "0", "--spec", json.dumps(spec)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
  assert [e["event"] for e in events] == ["ready", "gen", "iter"]
  ready, gen, it = events
  assert ready["versions"]["trl"] and ready["params"] > 0
  assert gen["shape"] == [8, 8 + 4] and gen["new_tokens"] == 8 * 4  # no row ended early
  assert it["episodes"] == 8 and it["step"] == 1 and it["s"] > 0


@pytest.mark.slow
@needs_peer
def test_a_tiny_interleaved_run_writes_its_json(repo_root, tmp_path):
  path = tmp_path / "bench_peers.json"
  argv = [
    "experiments/bench_peers.py",
    "--peer-python",
    PEER,
    "--config",
    "configs/ppo.py:size=runlocal",
    *(f"--config.{k}={v}" for k, v in TINY),
    "--rounds",
    "7",
    "--warmup",
    "0",
    "--out",
    str(path),
  ]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, *argv], cwd=repo_root, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(path.read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == out
  assert out["workload"]["params"] == out["workload"]["peer_params"]
  for system in ("ours", "trl"):
    r = out["systems"][system]
    assert r["new_tokens"] == 8 * 4 and len(r["iteration_s_by_block"]) == 7
  assert set(out["versions"]) >= {"jax", "torch", "trl", "transformers"}
  assert out["ratio_ours_over_trl"]["episodes_per_s"] > 0
