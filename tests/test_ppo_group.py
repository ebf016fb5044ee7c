"""Vmapped PPO groups: R runs in one program equal R separate runs, and resume exactly.

Same small setup as test_ppo.py (a random-init "SFT" policy, a synthetic reward model).
"""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_ppo import make_config, prepare_workdir

from rlhf_jax.errors import UserInputError
from rlhf_jax.stages.ppo import driver, group
from rlhf_jax.train import checkpoints, metrics_io

pytestmark = pytest.mark.slow  # whole PPO runs, grouped and alone

ITER = [
  ("ppo.num_iterations", "3"),
  ("ppo.log_every", "1"),
  ("ppo.eval_every", "0"),
  ("ppo.save_every", "2"),
]
# Three runs that differ in beta, learning rate, clip epsilon, GAE lambda and seed.
RUNS = [
  [("ppo.kl_coef", "0.01")],
  [("ppo.kl_coef", "0.2"), ("ppo.optim.lr", "3e-4"), ("ppo.clip", "0.1")],
  [("ppo.seed", "1"), ("ppo.lam", "0.9"), ("ppo.value_optim.lr", "1e-3")],
]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, repo_root):
  os.chdir(repo_root)
  d = str(tmp_path_factory.mktemp("group") / "up")
  prepare_workdir(d, make_config())
  return d


def _copies(upstream, root, n):
  out = []
  for i in range(n):
    d = f"{root}/run{i}"
    shutil.copytree(upstream, d)
    out.append(d)
  return out


def _params(workdir):
  return [
    np.asarray(x)
    for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(f"{workdir}/ppo/params"))
  ]


@pytest.fixture(scope="module")
def grouped(upstream, tmp_path_factory):
  """The three runs trained as one group: (configs, workdirs)."""
  configs = [make_config([*ITER, *r]) for r in RUNS]
  workdirs = _copies(upstream, tmp_path_factory.mktemp("grouped"), len(RUNS))
  group.train_group(list(zip(configs, workdirs, strict=True)))
  return configs, workdirs


def test_group_equals_separate_runs(upstream, grouped, tmp_path):
  configs, grouped = grouped
  alone = _copies(upstream, tmp_path / "alone", len(RUNS))
  for config, wd in zip(configs, alone, strict=True):
    driver.train_and_evaluate(config, wd)

  finals = [_params(wd) for wd in alone]
  for a, g in zip(alone, grouped, strict=True):
    for x, y in zip(_params(a), _params(g), strict=True):
      # Batched matmuls round differently; Adam turns a near-zero gradient's rounding into
      # up to a step of lr (1e-3) on a rare entry, so the bound on any one entry is loose
      # and the mean difference is held tight.
      np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)
      assert np.mean(np.abs(x - y)) < 1e-6
    ma, mg = metrics_io.read_metrics(f"{a}/ppo"), metrics_io.read_metrics(f"{g}/ppo")
    assert [r["step"] for r in ma] == [r["step"] for r in mg]
    for ra, rg in zip(ma, mg, strict=True):
      assert ra.keys() == rg.keys()
      for k in (
        "ppo/score",
        "ppo/kl",
        "ppo/kl_coef",
        "ppo/value_loss",
        "ppo/policy_lr",
        "ppo/gold_score",
      ):
        if k in ra:
          assert rg[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-5), (k, ra["step"])
  # The runs really differ (the group did not train one run three times).
  assert not np.allclose(finals[0][0], finals[1][0])
  assert not np.allclose(finals[0][0], finals[2][0])
  info = checkpoints.params_info(f"{grouped[1]}/ppo")
  assert info["group"]["runs"] == 3 and info["group"]["index"] == 1


def test_group_resumes_exactly_and_refuses_a_mixed_group(upstream, grouped, tmp_path, monkeypatch):
  configs, straight = grouped
  resumed = _copies(upstream, tmp_path / "b", len(RUNS))
  # A crash while fetching the third batch, after the checkpoint at iteration 2.
  calls, fetch = [], driver.Batches.__next__

  def crash(self):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("preempted")
    return fetch(self)

  monkeypatch.setattr(driver.Batches, "__next__", crash)
  with pytest.raises(RuntimeError, match="preempted"):
    group.train_group(list(zip(configs, resumed, strict=True)))
  monkeypatch.undo()
  assert not os.path.exists(f"{resumed[0]}/ppo/params.json")
  group.train_group(list(zip(configs, resumed, strict=True)))
  for a, b in zip(straight, resumed, strict=True):
    for x, y in zip(_params(a), _params(b), strict=True):
      np.testing.assert_array_equal(x, y)
    drop = lambda rows: [{k: v for k, v in r.items() if "per_s" not in k} for r in rows]
    assert drop(metrics_io.read_metrics(f"{a}/ppo")) == drop(metrics_io.read_metrics(f"{b}/ppo"))

  other = make_config([*ITER, ("ppo.batch_size", "8"), ("ppo.num_minibatches", "1")])
  mixed = _copies(upstream, tmp_path / "c", 2)
  with pytest.raises(UserInputError, match="differs from"):
    group.train_group([(configs[0], mixed[0]), (other, mixed[1])])
