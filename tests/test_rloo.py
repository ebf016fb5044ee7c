"""RLOO / GRPO: rewards and advantages of a hand-built group, the loss at the rollout's
policy, the frozen reference and reward model, the RM score rising, a step on 8 devices
equal to one, validation, which KL the loss terms' gradients follow, SIGKILL resume and
(slow) both stages beating SFT on the quick world.

As tests/test_ppo.py, the "SFT" policy is a random init that samples one token now and
then and the reward model is synthetic: its score grows with that token's share.
"""

import functools
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_ppo import prepare_workdir

from rlhf_jax import config_lib, pipeline, rl, sharding
from rlhf_jax.data import pipeline as data_pipeline
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import common, rloo, sft
from rlhf_jax.stages import rm as rm_stage
from rlhf_jax.train import checkpoints, metrics_io

CONFIG = "configs/rloo.py:runlocal"


def make_config(overrides=(), stage="rloo"):
  base = [
    ("model.n_layers", "1"),
    (f"{stage}.prompt_len", "32"),
    (f"{stage}.max_new_tokens", "12"),
    (f"{stage}.optim.lr", "1e-3"),
    (f"{stage}.optim.warmup_steps", "0"),
    (f"{stage}.kl_coef", "0.01"),
  ]
  return config_lib.get(CONFIG, [*base, *overrides])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo_root):
  os.chdir(repo_root)
  d = str(tmp_path_factory.mktemp("rloo") / "run")
  prepare_workdir(d, make_config())
  return d


def _state(config, workdir, stage="rloo", devices=None):
  c = config[stage]
  setup = rloo.make_setup(config, c, key=stage, devices=devices)
  policy = sft.load_policy(config, workdir, setup.mesh, setup.rules)
  reward, _ = rm_stage.load_reward_model(config, workdir, setup.mesh, setup.rules)
  return setup, rloo.init_state(setup, c, policy=policy, ref=policy, reward=reward, seed=0)


def _prompts(config, workdir, n):
  tok = common.load_tokenizer(config, workdir)
  src = common.world_source(config, workdir, "prompts", "train")
  it = data_pipeline.prompt_batches(src, tok, batch_size=n, prompt_len=32, seed=0)
  return {"prompt_tokens": next(iter(it))["prompt_tokens"]}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_rewards_and_advantages_of_a_hand_built_group():
  # 2 prompts x k = 2 responses of up to 3 tokens.
  mask = jnp.asarray([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
  logp = jnp.asarray([[-1.0, -2.0, 0], [-0.5, -0.5, -0.5], [-3.0, 0, 0], [-1.0, -1.0, 0]])
  ref = jnp.asarray([[-1.5, -1.0, 0], [-0.5, -1.0, -0.5], [-2.0, 0, 0], [-1.0, -2.0, 0]])
  score = jnp.asarray([1.0, 2.0, 0.5, -0.5])
  ro = rloo.GroupRollout(None, None, mask, logp, ref, score, jnp.ones(4, bool))
  c = ml_collections.ConfigDict(rloo.rloo_config())
  c.kl_coef = 0.5
  rewards, kl = rloo.sequence_rewards(ro, c)
  kl_sum = [0.5 - 1.0, 0.5, -1.0, 1.0]  # sum over tokens of logp - ref (k1)
  want = [s - 0.5 * k for s, k in zip([1.0, 2.0, 0.5, -0.5], kl_sum, strict=True)]
  np.testing.assert_allclose(rewards, want, rtol=1e-6)
  np.testing.assert_allclose(kl.sum(axis=1), kl_sum, rtol=1e-6)
  # leave-one-out with k = 2: each minus the other
  adv = rloo.group_advantages(rewards, 2, "leave_one_out")
  np.testing.assert_allclose(
    adv, [want[0] - want[1], want[1] - want[0], want[2] - want[3], want[3] - want[2]], rtol=1e-6
  )
  # GRPO: (r - mean) / (std + eps), the population std of 2 being half the gap
  adv = rloo.group_advantages(rewards, 2, "group_norm")
  np.testing.assert_allclose(adv, [-1, 1, 1, -1], atol=1e-3)
  c.kl_in = "loss"
  rewards, _ = rloo.sequence_rewards(ro, c)
  np.testing.assert_allclose(rewards, score)


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_loss_at_the_sampling_policy_is_minus_the_mean_advantage(workdir, stage):
  """At the policy that sampled (= the reference, at the start) every ratio is 1 and the
  KL term is 0: the loss is minus the token mean of the advantages."""
  config = make_config(stage=stage)
  c = config[stage]
  setup, state = _state(config, workdir, stage)
  batch = _prompts(config, workdir, c.batch_size)
  fwd = functools.partial(rloo.rollout, model_cfg=setup.model_cfg, c=c)
  ro = jax.jit(fwd)(state, jnp.asarray(batch["prompt_tokens"]), jax.random.PRNGKey(3))
  assert ro.response.shape[0] == c.batch_size * c.group_size
  # the group's rows share their prompt
  np.testing.assert_array_equal(ro.prompt_tokens[0], ro.prompt_tokens[c.group_size - 1])
  rewards, _ = rloo.sequence_rewards(ro, c)
  adv = rloo.group_advantages(rewards, c.group_size, c.advantage)
  mb = {
    "prompt_tokens": ro.prompt_tokens,
    "response": ro.response,
    "mask": ro.mask,
    "logprobs": ro.logprobs,
    "ref_logprobs": ro.ref_logprobs,
    "advantages": adv,
  }
  loss, stats = rloo.policy_loss_fn(state.policy, mb, model_cfg=setup.model_cfg, c=c)
  want = -rl.masked_mean(jnp.broadcast_to(adv[:, None], ro.mask.shape), ro.mask)
  assert float(loss) == pytest.approx(float(want), abs=2e-5)
  assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-5)
  if c.kl_in == "loss":
    assert float(stats["kl_loss"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_rm_score_rises_and_the_reference_and_reward_stay_frozen(workdir, stage):
  config = make_config([(f"{stage}.num_epochs", "2")], stage=stage)
  c = config[stage]
  setup, state = _state(config, workdir, stage)
  ref0, reward0 = _leaves(state.ref), _leaves(state.reward)
  policy0 = _leaves(state.policy)
  step = rloo.jit_train_step(setup, c, prefix=stage)
  scores = []
  with sharding.use(setup.mesh, setup.rules):
    for _ in range(10):
      state, metrics = step(
        state, sharding.put_batch(_prompts(config, workdir, c.batch_size), setup.mesh)
      )
      scores.append(float(metrics[f"{stage}/score"]))
  assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
  for x, y in zip(ref0 + reward0, _leaves(state.ref) + _leaves(state.reward), strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(policy0, _leaves(state.policy), strict=True))
  assert int(state.step) == 10


def _step_on(workdir, mesh, stage):
  axes = zip(sharding.MESH_AXES, mesh, strict=True)
  config = make_config([(f"mesh.{a}", str(n)) for a, n in axes], stage=stage)
  devices = jax.devices()[: int(np.prod(mesh))]
  setup, state = _state(config, workdir, stage, devices)
  batch = _prompts(config, workdir, config[stage].batch_size)
  step = rloo.jit_train_step(setup, config[stage], prefix=stage)
  with sharding.use(setup.mesh, setup.rules):
    state, metrics = step(state, sharding.put_batch(batch, setup.mesh))
    state, metrics = step(state, sharding.put_batch(batch, setup.mesh))
  return jax.device_get(metrics), _leaves(state.policy)


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_step_on_eight_devices_equals_one(workdir, stage):
  assert jax.device_count() == 8
  m1, p1 = _step_on(workdir, (1, 1, 1), stage)
  m8, p8 = _step_on(workdir, (2, 2, 2), stage)
  for k in ("score", "kl", "response_len", "policy_loss", "advantage_std"):
    assert m1[f"{stage}/{k}"] == pytest.approx(m8[f"{stage}/{k}"], rel=1e-3, abs=1e-4), k
  for x, y in zip(p1, p8, strict=True):
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
  "key, value, expect",
  [
    ("rloo.group_size", "1", "config.rloo.group_size: must be >= 2"),
    ("rloo.advantage", "mean", "config.rloo.advantage: must be one of"),
    (
      "grpo.kl_estimator",
      "k1",
      "config.grpo.kl_estimator: must be one of ('k2', 'k3') with kl_in='loss'",
    ),
    ("rloo.num_minibatches", "3", "config.rloo.num_minibatches: 3 minibatches do not divide"),
  ],
)
def test_validation(key, value, expect):
  stage = key.split(".")[0]
  with pytest.raises(UserInputError, match=expect.replace("(", r"\(").replace(")", r"\)")):
    # ranges are checked as the config is read, the rest by validate
    rloo.validate(make_config([(key, value)])[stage], stage)


RUN_ARGS = ("num_iterations=6", "save_every=3", "eval_every=0", "log_every=1")


def _run(workdir, stage, background=False):
  """The stage in a fresh process, on one CPU device."""
  code = (
    "import sys; from rlhf_jax import config_lib; from rlhf_jax.stages import rloo; "
    "ov = [a.split('=', 1) for a in sys.argv[4:]]; "
    "rloo.train_and_evaluate(config_lib.get(sys.argv[1], ov), sys.argv[2], sys.argv[3])"
  )
  base = [
    ("model.n_layers", "1"),
    (f"{stage}.prompt_len", "32"),
    (f"{stage}.max_new_tokens", "12"),
    (f"{stage}.kl_coef", "0.01"),
  ]
  args = [f"{k}={v}" for k, v in base] + [f"{stage}.{a}" for a in RUN_ARGS]
  cmd = [sys.executable, "-c", code, CONFIG, workdir, stage, *args]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  if background:
    return proc
  _, err = proc.communicate()
  assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_resume_after_sigkill_is_bitwise_identical_and_a_rerun_skips(workdir, tmp_path, stage):
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  shutil.copytree(workdir, straight)
  shutil.copytree(workdir, resumed)
  a, b = _run(straight, stage, background=True), _run(resumed, stage, background=True)
  deadline = time.time() + 300
  while not os.path.isdir(f"{resumed}/{stage}/checkpoints/3") and time.time() < deadline:
    assert b.poll() is None, b.stderr.read().decode()[-3000:]
    time.sleep(0.02)
  b.send_signal(signal.SIGKILL)
  b.wait()
  assert not os.path.exists(f"{resumed}/{stage}/params.json"), "killed too late"
  _, err = a.communicate()
  assert a.returncode == 0, err.decode()[-3000:]
  _run(resumed, stage)

  info = checkpoints.params_info(f"{straight}/{stage}")
  assert info["stage"] == stage and 0.0 <= info["metrics"][f"{stage}/gold_score"] <= 1.0
  pa = ocp.StandardCheckpointer().restore(f"{straight}/{stage}/params")
  pb = ocp.StandardCheckpointer().restore(f"{resumed}/{stage}/params")
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = metrics_io.read_metrics(f"{straight}/{stage}")
  assert len([r for r in rows if f"{stage}/score" in r]) == 6
  drop = lambda rows: [{k: v for k, v in r.items() if "per_s" not in k} for r in rows]
  assert drop(rows) == drop(metrics_io.read_metrics(f"{resumed}/{stage}"))
  # complete: skipped, its final metrics returned
  config = config_lib.get(
    CONFIG, [(f"{stage}.{a.split('=')[0]}", a.split("=")[1]) for a in RUN_ARGS]
  )
  assert rloo.train_and_evaluate(config, straight, stage) == info["metrics"]


@pytest.mark.slow
def test_rloo_and_grpo_beat_sft_on_the_quick_world(tmp_path, repo_root):
  """The quick preset's world: both methods' replies to the held-out prompts score higher
  with the gold judge than SFT's (direction, not a threshold)."""
  os.chdir(repo_root)
  config = config_lib.get("configs/rloo.py:quick")
  only = ("data", "pretrain", "sft", "comparisons", "rm", "rloo", "grpo", "eval")
  summary = pipeline.run(config, str(tmp_path), only=only)
  sft_ = summary["policies"]["sft"]
  for name in ("rloo", "grpo"):
    got = summary["policies"][name]
    assert got["gold_score"] > sft_["gold_score"], (name, got, sft_)
    assert got["winrate_vs_sft"] > 0.5, (name, got)


@pytest.mark.parametrize("estimator, which", [("k2", "reverse"), ("k3", "forward")])
def test_the_kl_loss_terms_expected_gradient(estimator, which):
  """As a loss on the policy's own samples, k2's expected gradient is the reverse
  KL(pi || ref)'s and k3's the forward KL(ref || pi)'s (exact sums over a categorical)."""
  ref = jax.nn.log_softmax(jnp.array([0.3, -1.0, 0.8, 0.1, -0.4]))
  theta = jnp.array([1.0, -0.5, 0.2, 0.7, -1.2])

  def expected_loss(t):  # E_{y ~ pi (held fixed)} [estimator(log pi(y), log ref(y))]
    logp = jax.nn.log_softmax(t)
    weights = jax.lax.stop_gradient(jnp.exp(logp))
    return jnp.sum(weights * rl.kl_estimate(logp, ref, estimator))

  def kl(t):
    logp = jax.nn.log_softmax(t)
    if which == "reverse":
      return jnp.sum(jnp.exp(logp) * (logp - ref))
    return jnp.sum(jnp.exp(ref) * (ref - logp))

  np.testing.assert_allclose(jax.grad(expected_loss)(theta), jax.grad(kl)(theta), atol=1e-6)
