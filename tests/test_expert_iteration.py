"""Expert iteration: two iterations end to end (each iteration's data sampled from the
previous iteration's policy, the RM's favourite token spreading, a re-run skipping),
SIGKILL during iteration 1's fine-tuning resuming bitwise (slow), and (slow) beating SFT
on the quick world.

As tests/test_ppo.py, "SFT" is a random init that samples one token now and then and the
RM is synthetic: its score grows with that token's share.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_ppo import TOKEN, prepare_workdir

from rlhf_jax import config_lib, pipeline, sharding
from rlhf_jax.stages import common, expert_iteration, rm, sft
from rlhf_jax.train import checkpoints, metrics_io

CONFIG = "configs/best_of_n.py:runlocal"
BASE = [
  ("model.n_layers", "1"),
  ("expert_iteration.prompt_len", "32"),
  ("expert_iteration.num_epochs", "4"),
  ("expert_iteration.optim.lr", "3e-3"),
  ("expert_iteration.save_every", "1"),
  ("expert_iteration.log_every", "1"),
]


def make_config(overrides=()):
  return config_lib.get(CONFIG, [*BASE, *overrides])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo_root):
  os.chdir(repo_root)
  d = str(tmp_path_factory.mktemp("ei") / "run")
  prepare_workdir(d, make_config())
  return d


def _token_share(config, workdir, directory, prompts):
  """Share of TOKEN among the sampled reply tokens of a policy (one sample per prompt)."""
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  policy = sft.load_policy(config, workdir, mesh, rules, directory=directory)
  tok = common.load_tokenizer(config, workdir)
  texts = common.generate(
    common.model_config(config, dropout=0.0),
    policy,
    tok,
    prompts,
    jax.random.PRNGKey(7),
    max_new_tokens=16,
    batch_size=16,
    max_prompt_len=32,
    mesh=mesh,
  )
  ids = [tok.encode(t) for t in texts]
  return np.mean([np.mean([i == TOKEN for i in x]) if x else 0.0 for x in ids])


def test_two_iterations_each_on_the_previous_policy_and_a_rerun_skips(workdir, tmp_path):
  wd = str(tmp_path / "ei")
  shutil.copytree(workdir, wd)
  config = make_config()
  metrics = expert_iteration.train_and_evaluate(config, wd)
  for i in (0, 1):
    it_dir = expert_iteration.iteration_dir(wd, i)
    assert checkpoints.params_info(it_dir)["stage"] == "expert_iteration"
    assert f"iter{i}/expert_iteration/loss" in metrics
  info = checkpoints.params_info(f"{wd}/expert_iteration")
  assert info["iterations"] == 2 and info["n"] == 4

  # Iteration 1's data is best-of-4 of iteration 0's policy: regenerate it from there.
  c = config.expert_iteration
  with open(f"{expert_iteration.iteration_dir(wd, 1)}/demonstrations.jsonl") as f:
    records = [json.loads(line) for line in f]
  prompts = [r["messages"][:-1] for r in records]
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  policy = sft.load_policy(config, wd, mesh, rules, directory="expert_iteration/iter_0")
  reward, _ = rm.load_reward_model(config, wd, mesh, rules)
  src = common.world_source(config, wd, "prompts", "train")
  all_prompts = [src[j]["messages"] for j in range(16, 32)]  # iteration 1's slice
  with sharding.use(mesh, rules):
    replies = expert_iteration.best_replies(
      common.model_config(config, dropout=0.0),
      policy,
      reward,
      common.load_tokenizer(config, wd),
      all_prompts,
      c,
      jax.random.fold_in(jax.random.PRNGKey(config.seed + 9), 1),
      mesh,
    )
  want = [(p, r) for p, r in zip(all_prompts, replies, strict=True) if r]
  assert [(p, r["messages"][-1]["content"]) for p, r in zip(prompts, records, strict=True)] == want

  # The RM's favourite token spreads: SFT < iteration 1 in the sampled replies.
  probe = [src[j]["messages"] for j in range(64, 80)]
  before = _token_share(config, wd, "", probe)
  after = _token_share(config, wd, "expert_iteration", probe)
  assert after > before + 0.05, (before, after)

  rows = metrics_io.read_metrics(f"{wd}/expert_iteration")
  per_iter = [len(metrics_io.read_metrics(expert_iteration.iteration_dir(wd, i))) for i in (0, 1)]
  assert len(rows) == sum(per_iter)
  assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
  # complete: skipped
  assert expert_iteration.train_and_evaluate(config, wd) == info["metrics"]


def _run(workdir, background=False):
  code = (
    "import sys; from rlhf_jax import config_lib; from rlhf_jax.stages import expert_iteration;"
    " ov = [a.split('=', 1) for a in sys.argv[3:]];"
    " expert_iteration.train_and_evaluate(config_lib.get(sys.argv[1], ov), sys.argv[2])"
  )
  cmd = [sys.executable, "-c", code, CONFIG, workdir, *[f"{k}={v}" for k, v in BASE]]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  if background:
    return proc
  _, err = proc.communicate()
  assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_sigkill_during_iteration_one_resumes_bitwise(workdir, tmp_path):
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  shutil.copytree(workdir, straight)
  shutil.copytree(workdir, resumed)
  a, b = _run(straight, background=True), _run(resumed, background=True)
  marker = f"{expert_iteration.iteration_dir(resumed, 1)}/checkpoints/2"
  deadline = time.time() + 600
  while not os.path.isdir(marker) and time.time() < deadline:
    assert b.poll() is None, b.stderr.read().decode()[-3000:]
    time.sleep(0.02)
  b.send_signal(signal.SIGKILL)
  b.wait()
  assert not os.path.exists(f"{resumed}/expert_iteration/params.json"), "killed too late"
  _, err = a.communicate()
  assert a.returncode == 0, err.decode()[-3000:]
  _run(resumed)
  pa = ocp.StandardCheckpointer().restore(f"{straight}/expert_iteration/params")
  pb = ocp.StandardCheckpointer().restore(f"{resumed}/expert_iteration/params")
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_expert_iteration_beats_sft_on_the_quick_world(tmp_path, repo_root):
  os.chdir(repo_root)
  config = config_lib.get("configs/best_of_n.py:quick")
  only = ("data", "pretrain", "sft", "comparisons", "rm", "expert_iteration", "eval")
  summary = pipeline.run(config, str(tmp_path), only=only)
  got, sft_ = summary["policies"]["expert_iteration"], summary["policies"]["sft"]
  assert got["gold_score"] > sft_["gold_score"], (got, sft_)
  assert got["winrate_vs_sft"] > 0.5, got
