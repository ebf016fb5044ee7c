"""Best-of-n: the subset estimator against enumeration, the analytic KL by hand, the pick
against separately scored samples, 8 devices equal to one, the stage end to end (its
curve, export, skip, `sample` and `eval` through its sampler), and (slow) beating SFT on
the quick world.

As tests/test_ppo.py, "SFT" is a random init that samples one token now and then and the
RM is synthetic: its score grows with that token's share.
"""

import itertools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ppo import TOKEN, prepare_workdir

from rlhf_jax import chat, config_lib, pipeline, sampling, sharding, tokenizer
from rlhf_jax.errors import UserInputError
from rlhf_jax.evaluate import runner as runner_lib
from rlhf_jax.stages import best_of_n, common, rm, sft
from rlhf_jax.stages.ppo.rollout import VALUE_HEADS, forward
from rlhf_jax.train import checkpoints, metrics_io

CONFIG = "configs/best_of_n.py:runlocal"


def make_config(overrides=()):
  base = [("model.n_layers", "1"), ("best_of_n.prompt_len", "32")]
  return config_lib.get(CONFIG, [*base, *overrides])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo_root):
  os.chdir(repo_root)
  d = str(tmp_path_factory.mktemp("bon") / "run")
  prepare_workdir(d, make_config())
  return d


def test_expected_best_equals_the_mean_over_every_subset():
  rng = np.random.default_rng(0)
  rm_scores, values = rng.normal(size=(3, 6)), rng.uniform(size=(3, 6))
  for m in range(1, 7):
    want = [
      np.mean([v[max(s, key=lambda i, r=r: r[i])] for s in itertools.combinations(range(6), m)])
      for r, v in zip(rm_scores, values, strict=True)
    ]
    np.testing.assert_allclose(best_of_n.expected_best(rm_scores, values, m), want, rtol=1e-12)
  # m = 1 is the plain mean; m = N the RM's favourite
  np.testing.assert_allclose(best_of_n.expected_best(rm_scores, values, 1), values.mean(1))
  top = values[np.arange(3), rm_scores.argmax(1)]
  np.testing.assert_allclose(best_of_n.expected_best(rm_scores, values, 6), top)


def test_analytic_kl_by_hand():
  assert best_of_n.analytic_kl(1) == 0.0
  assert best_of_n.analytic_kl(2) == pytest.approx(math.log(2) - 0.5)
  assert best_of_n.analytic_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)


def _models(config, workdir, mesh=None):
  mesh = mesh or sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.mesh)
  policy = sft.load_policy(config, workdir, mesh, rules)
  reward, _ = rm.load_reward_model(config, workdir, mesh, rules)
  return mesh, rules, policy, reward


def _prompts(config, workdir, n):
  tok = common.load_tokenizer(config, workdir)
  src = common.world_source(config, workdir, "prompts", "validation")
  ids = [tokenizer.truncate_prompt(tok.encode_prompt(src[i]["messages"]), 32) for i in range(n)]
  return sampling.pad_left(ids, 32)


def _select(config, workdir, mesh, n=4):
  mesh, rules, policy, reward = _models(config, workdir, mesh)
  prompts = _prompts(config, workdir, 8)
  with sharding.use(mesh, rules):
    out, scores = best_of_n.jit_select(
      policy,
      reward,
      sharding.put_batch({"t": prompts}, mesh)["t"],
      jax.random.PRNGKey(3),
      jnp.float32(1.0),
      jnp.float32(1.0),
      model_cfg=common.model_config(config, dropout=0.0),
      n=n,
      max_new_tokens=12,
      use_top_p=False,
    )
  return prompts, jax.device_get(out), jax.device_get(scores), (mesh, policy, reward)


def test_the_pick_is_the_rm_favourite_of_the_group_samples(workdir):
  config = make_config()
  prompts, out, scores, (mesh, policy, reward) = _select(config, workdir, None)
  model_cfg = common.model_config(config, dropout=0.0)
  group = sampling.sample(
    model_cfg, policy, prompts, jax.random.PRNGKey(3), max_new_tokens=12, group=4
  )
  toks, mask = jax.device_get((group.tokens, group.mask))
  # each sample scored alone, row by row
  for j in range(toks.shape[0]):
    alone = forward(
      model_cfg, reward, prompts[j // 4][None], toks[j][None], mask[j][None], heads=VALUE_HEADS
    )["scalar_last"]
    assert float(alone[0]) == pytest.approx(float(scores[j // 4, j % 4]), abs=1e-4)
  best = scores.argmax(1)
  np.testing.assert_array_equal(out.tokens, toks.reshape(8, 4, -1)[np.arange(8), best])
  np.testing.assert_array_equal(out.mask, mask.reshape(8, 4, -1)[np.arange(8), best])
  assert len(set(scores.ravel().round(4))) > 8  # the samples differ, the pick matters
  share = lambda t, m: ((t == TOKEN) & m).sum(1)
  assert share(out.tokens, out.mask).mean() >= share(toks, mask).mean()


def test_select_on_eight_devices_equals_one(workdir):
  assert jax.device_count() == 8
  devices = jax.devices()
  one = sharding.make_mesh(make_config().mesh, devices[:1])
  axes = [("mesh.data", "2"), ("mesh.fsdp", "2"), ("mesh.tensor", "2")]
  eight = sharding.make_mesh(make_config(axes).mesh, devices)
  _, o1, s1, _ = _select(make_config(), workdir, one)
  _, o8, s8, _ = _select(make_config(axes), workdir, eight)
  np.testing.assert_array_equal(o1.tokens, o8.tokens)
  np.testing.assert_allclose(s1, s8, atol=1e-4)


def test_stage_curve_export_skip_sample_and_eval(workdir):
  config = make_config()
  metrics = best_of_n.train_and_evaluate(config, workdir)
  info = checkpoints.params_info(f"{workdir}/best_of_n")
  assert info["best_of_n"]["n"] == 4 and info["stage"] == "best_of_n"
  rows = info["curve"]
  assert [r["n"] for r in rows] == [1, 2, 4, 8]
  rm_scores = [r["rm_score"] for r in rows]
  assert all(b >= a - 1e-9 for a, b in zip(rm_scores, rm_scores[1:], strict=False)), rm_scores
  assert rm_scores[-1] > rm_scores[0]
  assert [r["kl"] for r in rows] == [best_of_n.analytic_kl(n) for n in (1, 2, 4, 8)]
  assert metrics["best_of_n/rm_score"] == rows[2]["rm_score"]
  assert len(metrics_io.read_metrics(f"{workdir}/best_of_n")) == 4
  # complete: skipped
  assert best_of_n.train_and_evaluate(config, workdir) == info["metrics"]

  # `sample --policy best_of_n`: SFT's parameters, best-of-4 replies (greedy asks fall
  # back to sampling at its temperature: one reply is not four)
  policy = chat.load_policy(workdir, "best_of_n")
  assert policy.sample_fn is not None
  dialogue = [[{"role": "user", "content": "What is 7 + 5?"}]] * 2
  replies = policy.reply(dialogue, jax.random.PRNGKey(0), max_new_tokens=8)
  assert len(replies) == 2 and all(isinstance(r, str) for r in replies)

  # eval's runner through the hook: the RM score of its replies beats SFT's
  mesh, rules, sft_params, reward = _models(config, workdir)
  model_cfg = common.model_config(config, dropout=0.0)
  runner = runner_lib.Runner(model_cfg, mesh, 8)
  tok = common.load_tokenizer(config, workdir)
  src = common.world_source(config, workdir, "prompts", "validation")
  ids = [tokenizer.truncate_prompt(tok.encode_prompt(src[i]["messages"]), 32) for i in range(16)]
  kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=12)
  own = best_of_n.sample_fn(workdir, model_cfg, mesh, rules)  # outside the mesh context
  with sharding.use(mesh, rules):
    b_toks, b_mask = runner.sample(sft_params, ids, jax.random.PRNGKey(1), sample_fn=own, **kw)
    s_toks, s_mask = runner.sample(sft_params, ids, jax.random.PRNGKey(1), **kw)
  share = lambda t, m: ((t == TOKEN) & m).sum()
  assert share(b_toks, b_mask) > share(s_toks, s_mask)
  assert best_of_n.policy_kl(workdir) == pytest.approx(best_of_n.analytic_kl(4))


@pytest.mark.parametrize(
  "key, value, expect",
  [
    ("best_of_n.n", "0", "config.best_of_n.n: must be >= 1"),
    ("best_of_n.n", "3", "config.best_of_n.n: must be one of curve=(1, 2, 4, 8), got 3"),
    ("best_of_n.curve", "(1, 16)", "config.best_of_n.curve: every n must be in [1, num_samples"),
  ],
)
def test_validation(key, value, expect):
  with pytest.raises(UserInputError, match=re.escape(expect)):
    best_of_n.validate(make_config([(key, value)]).best_of_n)


@pytest.mark.slow
def test_best_of_n_beats_sft_on_the_quick_world(tmp_path, repo_root):
  """The quick preset's world: best-of-16's replies to the held-out prompts score higher
  with the gold judge than SFT's, and the curve's gold score at n = 16 beats n = 1."""
  os.chdir(repo_root)
  config = config_lib.get("configs/best_of_n.py:quick")
  only = ("data", "pretrain", "sft", "comparisons", "rm", "best_of_n", "eval")
  summary = pipeline.run(config, str(tmp_path), only=only)
  got, sft_ = summary["policies"]["best_of_n"], summary["policies"]["sft"]
  assert got["gold_score"] > sft_["gold_score"], (got, sft_)
  assert got["winrate_vs_sft"] > 0.5, got
  assert got["kl_to_sft"] == pytest.approx(best_of_n.analytic_kl(16))
  curve = {r["n"]: r for r in checkpoints.params_info(f"{tmp_path}/best_of_n")["curve"]}
  assert curve[16]["gold_score"] > curve[1]["gold_score"], curve
