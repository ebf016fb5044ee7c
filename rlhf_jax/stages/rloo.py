"""RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024): k samples per prompt, the
other samples of the prompt as the baseline, no value model.

  rlhf-jax rloo --config configs/rloo.py --workdir DIR    # data .. RM, then RLOO
  rlhf-jax grpo --config configs/rloo.py --workdir DIR    # the same with GRPO's choices

One iteration is ONE jit-compiled `train_step(state, batch) -> (state, metrics)`:

  1. rollout     k responses to each of B prompts (`sampling.sample_tokens(group=k)`:
                 the prompt prefilled once, its KV cache serving its k continuations);
                 behaviour and reference log-probs and the RM score of each;
  2. rewards     the sequence's score, less beta x its summed per-token KL when the KL
                 is in the reward (`kl_in="reward"`, RLOO's choice);
  3. advantages  per prompt over its k rewards: leave-one-out (`rl.rloo_advantages`),
                 group-normalised (`rl.grpo_advantages`) or centred only (Dr. GRPO);
                 every token of a response gets its sequence's advantage;
  4. update      `num_epochs` x `num_minibatches` steps of the clipped policy loss (one
                 epoch of one minibatch is REINFORCE: the ratio is 1), + beta x the
                 per-token KL estimate to SFT when it is a loss term (`kl_in="loss"`,
                 GRPO's choice, with its k3 estimator; see LOSS_KL_ESTIMATORS).

The train state holds the policy (trained, with its optimiser state), the SFT reference
and the reward model (frozen) as separate pytrees. `stages/grpo.py` runs this module
with its own section and directory. Writes `DIR/<stage>/{checkpoints,metrics.jsonl,tb,
params,params.json}`; resumes exactly (state and prompt iterator checkpointed together).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import ranges, rl, sampling, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import Transformer, TransformerConfig
from rlhf_jax.stages import common, rm, sft
from rlhf_jax.stages.ppo import driver
from rlhf_jax.stages.ppo.rollout import POLICY_HEADS, VALUE_HEADS, forward
from rlhf_jax.train import checkpoints, optim

STAGE = "rloo"
ADVANTAGES = {  # name -> f32[B, k] scores -> f32[B, k] advantages
  "leave_one_out": rl.rloo_advantages,
  "group_norm": rl.grpo_advantages,
  "group_mean": functools.partial(rl.grpo_advantages, scale=False),
}
KL_IN = ("reward", "loss")
# As a loss on the policy's own samples (r = pi_ref / pi): k1's gradient is the score
# function alone (zero in expectation) and abs's is no KL's; k2's expected gradient,
# E[(log pi - log pi_ref) grad log pi], is that of KL(pi || pi_ref), and k3's,
# E[(1 - r) grad log pi], that of the forward KL(pi_ref || pi) — GRPO's choice.
LOSS_KL_ESTIMATORS = ("k2", "k3")
PROMPT_NDIMS = {"prompt_tokens": 2}
RANGES = {
  "batch_size": "> 0",
  "group_size": ">= 2",
  "num_iterations": "> 0",
  "prompt_len": "> 0",
  "max_new_tokens": "> 0",
  "temperature": "> 0",  # the policy trained is softmax(logits / T)
  "eval_temperature": ">= 0",
  "kl_coef": ">= 0",
  "score_scale": ">= 0",
  "score_clip": ">= 0",
  "clip": "> 0",
  "num_epochs": "> 0",
  "num_minibatches": "> 0",
  "eval_prompts": ">= 0",
  "seed": ">= 0",
}


def rloo_config(
  runlocal: bool = False, advantage: str = "leave_one_out", kl_in: str = "reward"
) -> ml_collections.ConfigDict:
  """The `config.rloo` section (RLOO's choices; `stages/grpo.py` sets GRPO's). Its
  defaults spend PPO's rollout budget: 16 prompts x 4 samples = PPO's 64 episodes."""
  c = ml_collections.ConfigDict()
  c.batch_size = 16  # prompts per iteration (global); each sampled group_size times
  c.group_size = 4  # k
  c.num_iterations = 40
  c.prompt_len = 64
  c.max_new_tokens = 32
  c.temperature = 1.0
  c.kl_coef = 0.1  # beta
  c.kl_in = kl_in  # reward (summed k1 in the sequence's reward) | loss (a loss term)
  c.kl_estimator = "k1" if kl_in == "reward" else "k3"  # rl.kl_estimate
  c.no_eos_penalty = 0.0
  c.score_scale = 1.0
  c.score_clip = 0.0
  c.reward_bias = 0.0  # added to every RM score
  c.advantage = advantage  # leave_one_out (RLOO) | group_norm (GRPO) | group_mean (Dr. GRPO)
  c.num_epochs = 2  # passes over each iteration's B x k responses (PPO's)
  c.num_minibatches = 4  # optimiser steps per epoch; B x k must divide into them
  c.clip = 0.2
  c.optim = optim.optim_config(
    lr=1e-4, schedule="constant", warmup_steps=10, weight_decay=0.0, grad_clip=1.0
  )
  c.seed = 0  # sampling and minibatch order (0 = config.seed's); prompts follow config.seed
  c.prompt_file = ""  # a user's prompts JSONL instead of the world's
  c.skip_bad = False
  c.log_every = 5
  c.eval_every = 20
  c.eval_prompts = 64
  c.eval_temperature = 1.0
  c.save_every = 20
  c.keep_checkpoints = 2
  if runlocal:
    c.batch_size, c.num_iterations, c.prompt_len, c.max_new_tokens = 8, 8, 48, 16
    c.num_minibatches, c.num_epochs = 2, 1
    c.log_every, c.eval_every, c.eval_prompts, c.save_every = 2, 4, 16, 4
    c.optim.warmup_steps = 2
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE, n_batch_shards: int = 1) -> None:
  """Its numbers inside `RANGES`, known choices, and a batch that splits."""
  ranges.check(c, key, RANGES)

  def check(ok, field, msg):
    if not ok:
      raise UserInputError(f"config.{key}.{field}: {msg}")

  check(
    c.advantage in ADVANTAGES,
    "advantage",
    f"must be one of {tuple(ADVANTAGES)}, got {c.advantage!r}",
  )
  check(c.kl_in in KL_IN, "kl_in", f"must be one of {KL_IN}, got {c.kl_in!r}")
  known = LOSS_KL_ESTIMATORS if c.kl_in == "loss" else rl.KL_ESTIMATORS
  check(
    c.kl_estimator in known,
    "kl_estimator",
    f"must be one of {known} with kl_in={c.kl_in!r}, got {c.kl_estimator!r}",
  )
  rows = c.batch_size * c.group_size
  check(
    rows % c.num_minibatches == 0,
    "num_minibatches",
    f"{c.num_minibatches} minibatches do not divide batch_size x group_size = {rows}",
  )
  check(
    c.batch_size % n_batch_shards == 0,
    "batch_size",
    f"{c.batch_size} prompts are not a multiple of mesh data x fsdp = {n_batch_shards}",
  )
  check(c.optim.grad_accum == 1, "optim.grad_accum", "split the batch with num_minibatches")


def num_updates(c: ml_collections.ConfigDict) -> int:
  return c.num_iterations * c.num_epochs * c.num_minibatches


# --- the train state ------------------------------------------------------------------------


@flax.struct.dataclass
class RLState:
  step: jax.Array  # int32[]: iterations done
  policy: Any  # trained (LM head)
  policy_opt: optax.OptState
  ref: Any  # frozen SFT reference (LM head)
  reward: Any  # frozen reward model (scalar head)
  reward_bias: jax.Array  # f32[]
  rng: jax.Array  # iteration keys are fold_in(rng, step)
  guard: optim.Guard


@dataclasses.dataclass
class Setup:
  mesh: jax.sharding.Mesh
  rules: tuple
  model_cfg: TransformerConfig
  tx: optax.GradientTransformation
  shardings: Any  # of RLState
  abstract: Any  # RLState of ShapeDtypeStructs on the mesh


def make_setup(config, c, key: str = STAGE, devices=None) -> Setup:
  """Mesh, optimiser and the RLState's layout (from logical axis names; no params)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.mesh)
  validate(c, key, mesh.shape["data"] * mesh.shape["fsdp"])
  model_cfg = common.model_config(config, dropout=0.0)
  tx = optim.make_optimizer(c.optim, num_updates(c))
  model = Transformer(model_cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)

  def init(rng):
    lm_params = model.init(rng, tokens, heads=POLICY_HEADS)["params"]
    scalar_params = model.init(rng, tokens, heads=VALUE_HEADS)["params"]
    return RLState(
      step=jnp.zeros((), jnp.int32),
      policy=lm_params,
      policy_opt=tx.init(lm_params),
      ref=lm_params,
      reward=scalar_params,
      reward_bias=jnp.zeros((), jnp.float32),
      rng=rng,
      guard=optim.Guard.create(),
    )

  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = nn.unbox(sharding.logical_shardings(boxed, mesh, rules))
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return Setup(mesh, rules, model_cfg, tx, shardings, abstract)


def init_state(setup: Setup, c, *, policy, ref, reward, reward_bias=0.0, seed=0, guard=None):
  """A fresh RLState on the mesh (the reference copied: it never shares the policy's
  buffers, which the step donates)."""

  def build(policy, ref, reward):
    return RLState(
      step=jnp.zeros((), jnp.int32),
      policy=policy,
      policy_opt=setup.tx.init(policy),
      ref=jax.tree.map(jnp.copy, ref),
      reward=jax.tree.map(jnp.copy, reward),
      reward_bias=jnp.asarray(reward_bias, jnp.float32),
      rng=jax.random.PRNGKey(common.stage_seed(seed, c.seed)),
      guard=optim.Guard.create(guard),
    )

  with nn.logical_axis_rules(setup.rules):
    return jax.jit(build, out_shardings=setup.shardings)(policy, ref, reward)


# --- rollout and step -------------------------------------------------------------------------


class GroupRollout(NamedTuple):
  """k responses to each of B prompts: B x k rows, prompt-major (row b k + j)."""

  prompt_tokens: jax.Array  # int32[B k, P] (each prompt repeated k times)
  response: jax.Array  # int32[B k, N]
  mask: jax.Array  # bool[B k, N]
  logprobs: jax.Array  # f32[B k, N] behaviour policy
  ref_logprobs: jax.Array  # f32[B k, N]
  score: jax.Array  # f32[B k] RM score + reward_bias
  ended: jax.Array  # bool[B k]


def rollout(state: RLState, prompt_tokens, rng, *, model_cfg, c) -> GroupRollout:
  """`c.group_size` samples of every prompt, prefilled once, and what the update needs."""
  k = c.group_size
  out = sampling.sample_tokens(
    state.policy,
    prompt_tokens,
    rng,
    jnp.asarray(c.temperature, jnp.float32),
    jnp.asarray(1.0, jnp.float32),
    cfg=model_cfg,
    max_new_tokens=c.max_new_tokens,
    top_k=0,
    use_top_p=False,
    use_cache=True,
    stop_at_eos=True,
    group=k,
  )
  prompts = jnp.repeat(prompt_tokens, k, axis=0)
  response, mask = out.tokens, out.mask
  fwd = functools.partial(forward, model_cfg, prompt_tokens=prompts, response=response, mask=mask)
  if c.temperature == 1.0 and model_cfg.compute_dtype == jnp.float32:
    logprobs = out.logprobs  # = the update's forward within ~1e-6 in f32 (as PPO's)
  else:
    logprobs = rl.token_logprobs(
      fwd(state.policy, heads=POLICY_HEADS)["lm"] / c.temperature, response
    )
  ref_logprobs = rl.token_logprobs(
    fwd(state.ref, heads=POLICY_HEADS)["lm"] / c.temperature, response
  )
  score = fwd(state.reward, heads=VALUE_HEADS)["scalar_last"] + state.reward_bias
  ended = jnp.any(mask & (response == model_cfg.eos_id), axis=1)
  zero = lambda x: jnp.where(mask, x, 0.0)
  return jax.lax.stop_gradient(
    GroupRollout(prompts, response, mask, zero(logprobs), zero(ref_logprobs), score, ended)
  )


def sequence_rewards(ro: GroupRollout, c) -> tuple[jax.Array, jax.Array]:
  """(f32[B k] the reward each response's advantage is computed from, f32[B k, N] the
  per-token KL estimate to the reference)."""
  kl = jnp.where(ro.mask, rl.kl_estimate(ro.logprobs, ro.ref_logprobs, c.kl_estimator), 0.0)
  score = rl.no_eos_penalty(ro.score, ro.ended, c.no_eos_penalty)
  score = rl.scale_and_clip(score, c.score_scale, c.score_clip)
  if c.kl_in == "reward":
    score = score - c.kl_coef * kl.sum(axis=1)
  return score, kl


def group_advantages(rewards: jax.Array, k: int, kind: str) -> jax.Array:
  """f32[B k]: each response's advantage among its prompt's k (rows prompt-major)."""
  return ADVANTAGES[kind](rewards.reshape(-1, k)).reshape(-1)


def policy_loss_fn(policy, mb, *, model_cfg, c):
  """Clipped policy loss (+ beta x the KL estimate when it is a loss term); stats."""
  logits = forward(
    model_cfg, policy, mb["prompt_tokens"], mb["response"], mb["mask"], heads=POLICY_HEADS
  )["lm"]
  logits = logits / c.temperature
  logp = rl.token_logprobs(logits, mb["response"])
  adv = jnp.where(mb["mask"], mb["advantages"][:, None], 0.0)
  loss, stats = rl.policy_loss(logp, mb["logprobs"], adv, mb["mask"], c.clip)
  stats = {**stats, "policy_loss": loss, "entropy": rl.masked_mean(rl.entropy(logits), mb["mask"])}
  if c.kl_in == "loss":
    kl = rl.masked_mean(rl.kl_estimate(logp, mb["ref_logprobs"], c.kl_estimator), mb["mask"])
    loss = loss + c.kl_coef * kl
    stats["kl_loss"] = kl
  return loss, jax.lax.stop_gradient(stats)


def train_step(
  state: RLState, batch: dict[str, jax.Array], *, model_cfg, c, prefix: str = STAGE
) -> tuple[RLState, dict[str, jax.Array]]:
  """One iteration: group rollout -> rewards -> group advantages -> epochs x minibatches.

  batch: prompt_tokens int32[B, P] (left-padded). Metrics are `<prefix>/<what>`; an
  iteration with a non-finite score, loss or gradient changes nothing but the step.
  """
  tx = optim.make_optimizer(c.optim, num_updates(c), c.optim.lr * state.guard.lr_scale)
  sample_rng, perm_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  ro = rollout(state, batch["prompt_tokens"], sample_rng, model_cfg=model_cfg, c=c)
  ro = ro._replace(score=optim.poison(ro.score, state.guard.injects(state.step)))
  rewards, kl = sequence_rewards(ro, c)
  advantages = group_advantages(rewards, c.group_size, c.advantage)
  data = {
    "prompt_tokens": ro.prompt_tokens,
    "response": ro.response,
    "mask": ro.mask,
    "logprobs": ro.logprobs,
    "ref_logprobs": ro.ref_logprobs,
    "advantages": advantages,
  }
  rows, nmb = ro.response.shape[0], c.num_minibatches
  grad_fn = jax.grad(functools.partial(policy_loss_fn, model_cfg=model_cfg, c=c), has_aux=True)

  def minibatch_step(carry, mb):
    policy, opt = carry
    grads, stats = grad_fn(policy, mb)
    updates, opt = tx.update(grads, opt, policy)
    return (optax.apply_updates(policy, updates), opt), {
      **stats,
      "grad_norm": optax.tree.norm(grads),
    }

  def epoch(carry, rng):
    perm = jax.random.permutation(rng, rows)
    mbs = jax.tree.map(lambda x: x[perm].reshape(nmb, rows // nmb, *x.shape[1:]), data)
    return jax.lax.scan(minibatch_step, carry, mbs)

  carry, stats = jax.lax.scan(
    epoch, (state.policy, state.policy_opt), jax.random.split(perm_rng, c.num_epochs)
  )
  kl_mean = kl.sum(axis=1).mean()
  ok = optim.all_finite(stats, ro.score, kl_mean)
  policy, policy_opt = optim.keep_if(ok, carry, (state.policy, state.policy_opt))
  new_state = state.replace(
    step=state.step + 1, policy=policy, policy_opt=policy_opt, guard=state.guard.after(ok)
  )
  groups = ro.score.reshape(-1, c.group_size)
  metrics = {k: v.mean() for k, v in stats.items()}
  metrics.update(
    score=ro.score.mean(),
    score_std=ro.score.std(),
    group_score_std=groups.std(axis=1).mean(),  # the signal within a prompt's samples
    reward=rewards.mean(),
    kl=kl_mean,
    advantage_std=advantages.std(),
    response_len=ro.mask.sum(axis=1).astype(jnp.float32).mean(),
    no_eos_frac=1.0 - ro.ended.mean(),
    lr=optim.lr_schedule(c.optim, num_updates(c))(state.step * c.num_epochs * nmb)
    * state.guard.lr_scale,
  )
  metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
  return new_state, optim.guarded_metrics(metrics, new_state.guard)


def jit_train_step(setup: Setup, c, prefix: str = STAGE):
  """`train_step` jitted once: state sharded and donated, prompts over (data, fsdp)."""
  in_batch = {k: sharding.batch_sharding(setup.mesh, n) for k, n in PROMPT_NDIMS.items()}
  return jax.jit(
    functools.partial(
      train_step, model_cfg=setup.model_cfg, c=ml_collections.FrozenConfigDict(c), prefix=prefix
    ),
    in_shardings=(setup.shardings, in_batch),
    out_shardings=(setup.shardings, sharding.replicated(setup.mesh)),
    donate_argnums=(0,),
  )


# --- the stage ---------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stage: str = STAGE):
  """RLOO (or, with `stage`, the section of that name: GRPO) from the SFT and RM exports,
  or resume; export the final policy. Returns the final metrics."""
  if (done := common.recorded_metrics(config, workdir, stage, "configs/rloo.py")) is not None:
    return done
  out_dir = common.stage_dir(workdir, stage)
  c = config[stage]
  start = time.time()
  tok = common.load_tokenizer(config, workdir)
  setup = make_setup(config, c, key=stage)
  files: dict = {}
  train_src, val_src = driver.prompt_sources(config, workdir, c, files)
  it = driver.Batches(  # prompt_tokens only, resumable
    iter(
      pipeline.prompt_batches(
        train_src,
        tok,
        batch_size=common.batch_rows(c.batch_size, f"{stage}.batch_size"),
        prompt_len=c.prompt_len,
        seed=config.seed + 4,  # PPO's prompt order
      )
    )
  )
  records = [val_src[i] for i in range(min(len(val_src), c.eval_prompts))]
  ckpt, writer, state, resumed = common.open_run(
    out_dir, c, setup.abstract, it, stage, unit="iteration"
  )
  rm_info = checkpoints.params_info(common.stage_dir(workdir, rm.STAGE)) or {}
  if not resumed:
    policy = sft.load_policy(config, workdir, setup.mesh, setup.rules)
    reward, _ = rm.load_reward_model(config, workdir, setup.mesh, setup.rules)
    state = init_state(
      setup,
      c,
      policy=policy,
      ref=policy,
      reward=reward,
      reward_bias=c.reward_bias,
      seed=config.seed + 6,
      guard=config.get("guard"),
    )
  step_fn = jit_train_step(setup, c, prefix=stage)

  def evaluate(state, step):
    return driver.gold_eval(setup, state.policy, tok, records, c=c, seed=config.seed, prefix=stage)

  print(
    f"{stage}: {c.num_iterations} iterations of {c.batch_size} prompts x {c.group_size} "
    f"samples ({c.advantage}, KL in the {c.kl_in})"
  )
  state = driver.run_iterations(
    setup, c, state, step_fn, it, ckpt, writer, evaluate, stage, config.get("guard")
  )
  return common.finish(
    out_dir,
    state.policy,
    config,
    start,
    ckpt,
    writer,
    stage=stage,
    heads=list(POLICY_HEADS),
    rm_reward_bias=rm_info.get("reward_bias"),
    data_files=files,
  )
