"""Stage 4: PPO and PPO-ptx against the reward model.

  rlhf-jax ppo     --config configs/ppo.py --workdir DIR
  rlhf-jax ppo_ptx --config configs/ppo_ptx.py --workdir DIR

Starts from the SFT policy (`DIR/sft`) and the reward model (`DIR/rm`). One PPO
iteration is ONE jit-compiled `train_step(state, batch) -> (state, metrics)`:

  1. rollout     sample one response per prompt with the KV-cache sampler (temperature
                 1: the sampler's log-probs are the behaviour policy's, no second
                 forward); reference log-probs, values, and the RM score read at the
                 last response token (prompt + response, as the RM was trained);
  2. rewards     r_t = -beta * KL_t on every response token + the (penalised / scaled /
                 clipped) score on the last one (`rl.shaped_rewards`);
  3. advantages  GAE (gamma, lambda) as a reverse scan, whitened over the batch;
  4. update      `num_epochs` x `num_minibatches` of clipped policy loss (+ entropy bonus,
                 + gamma_ptx x the pretraining LM loss for PPO-ptx) and clipped value
                 loss, as nested `lax.scan`s; then the KL controller updates beta.

The train state holds policy, value, reference and reward parameters as separate
pytrees; only policy and value reach an optimiser (each its own), so the reference and
the reward model are bitwise unchanged. The value model starts from the reward model
(the paper) or from the SFT trunk with a zero scalar head (`value_init="sft"`).
Writes `DIR/<stage>/{checkpoints,metrics.jsonl,tb,params,params.json}` (the exported
params: the policy, or its EMA when `optim.ema_decay > 0`); resumes exactly (state,
prompt iterator and pretraining iterator are checkpointed together).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import rl, sampling, sharding, train_lib
from rlhf_jax.data import judge, pipeline, user_data
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import Transformer, TransformerConfig, apply
from rlhf_jax.stages import common, comparisons, lm, pretrain, rm
from rlhf_jax.tokenizer import EOS_ID

Params = Any
STAGES = ("ppo", "ppo_ptx")
POLICY_HEADS = ("lm",)
VALUE_HEADS = ("scalar",)
PREFIX = "ppo"  # metric names: ppo/<what> for both stages
PROMPT_NDIMS = {"prompt_tokens": 2}
PTX_NDIMS = {f"ptx_{k}": n for k, n in lm.LM_BATCH_NDIMS.items()}

# The paper's choices (Ouyang et al. 2022, appendix C.4), applied by `paper_preset`.
PAPER = {
  "kl_coef": 0.02,  # beta, fixed
  "kl_controller": "fixed",
  "ptx_coef": 27.8,  # gamma_ptx (PPO-ptx only)
  "ptx_ratio": 8.0,  # pretraining rows per RL episode (PPO-ptx only)
  "clip": 0.2,
  "num_epochs": 1,
  "gamma": 1.0,  # no discount
  "lam": 0.95,
  "value_init": "rm",
  "ema_decay": 0.992,  # EMA of the policy (optim.ema_decay)
}


def ppo_config(runlocal: bool = False, ptx: bool = False) -> ml_collections.ConfigDict:
  """The `config.ppo` (or, `ptx=True`, `config.ppo_ptx`) section: small-scale defaults."""
  c = ml_collections.ConfigDict()
  # Rollout.
  c.batch_size = 64  # episodes (prompts, one response each) per iteration; global
  c.num_iterations = 40  # PPO iterations (rollout + update)
  c.prompt_len = 64  # prompts are left-padded / left-truncated to this many tokens
  c.max_new_tokens = 32  # response length limit
  c.temperature = 1.0  # rollout temperature; the policy trained is softmax(logits / T)
  c.top_k = 0  # 0 = off (anything but 0 / top_p 1 makes the rollout off-policy)
  c.top_p = 1.0  # 1 = off
  # Reward.
  # beta: initial (adaptive) or constant (fixed) KL penalty coefficient. The paper's 0.02
  # (`paper` preset) over-optimises the default world's small RM: gold score fell from
  # 0.677 to 0.601 between iterations 20 and 40 at KL 6.5; 0.1 holds KL near 2.
  c.kl_coef = 0.1
  c.kl_controller = "fixed"  # fixed | adaptive (Ziegler et al. 2019)
  c.kl_target = 6.0  # adaptive: target KL per episode (nats)
  c.kl_horizon = 10_000.0  # adaptive: episodes over which beta moves by up to 20%
  c.kl_estimator = "k1"  # per-token KL in the reward: k1 | k2 | k3 | abs (rl.kl_estimate)
  c.no_eos_penalty = 0.0  # added to the score of a response that hits the limit w/o EOS
  c.score_scale = 1.0  # the RM score is multiplied by this ...
  c.score_clip = 0.0  # ... then clipped to [-score_clip, score_clip]; 0 = off
  c.reward_bias = 0.0  # added to every RM score (rm.py already folds its normalisation in)
  # Advantages.
  c.gamma = 1.0  # discount (the paper: none)
  c.lam = 0.95  # GAE lambda
  c.whiten_advantages = True  # advantages -> zero mean, unit variance over the batch
  # Update.
  c.num_epochs = 2  # passes over each rollout batch (the paper: 1)
  c.num_minibatches = 4  # optimiser steps per epoch; batch_size must divide into them
  c.clip = 0.2  # policy ratio clip epsilon
  c.value_clip = 0.2  # value clip around the rollout values; 0 = plain squared error
  c.entropy_coef = 0.0  # entropy bonus; 0 = off (entropy is still logged)
  c.value_init = "rm"  # rm (the paper) | sft (SFT trunk + zero scalar head)
  c.optim = train_lib.optim_config(
    lr=1e-4, schedule="constant", warmup_steps=10, weight_decay=0.0, grad_clip=1.0
  )  # policy optimiser; optim.ema_decay > 0 keeps (and exports) an EMA of the policy
  c.value_optim = train_lib.optim_config(
    lr=1e-4, schedule="constant", warmup_steps=10, weight_decay=0.0, grad_clip=1.0
  )  # value optimiser
  # PPO-ptx: gamma_ptx x the pretraining LM loss in every policy step.
  c.ptx_coef = 1.0 if ptx else 0.0  # gamma_ptx; 0 = plain PPO (the paper: 27.8)
  c.ptx_ratio = 1.0  # pretraining rows per RL episode (the paper: 8)
  c.ptx_seq_len = 64  # tokens per pretraining row
  # Data and bookkeeping.
  c.seed = 0  # this stage's own randomness (rollout sampling, minibatch order; 0 = that
  # of config.seed, `common.stage_seed`); the prompt and pretraining-row order follow
  # config.seed alone, so runs that differ only here share their data and one program
  c.prompt_file = ""  # a user's prompts JSONL ({"messages"} / {"prompt"}) instead of the world's
  c.log_every = 5
  c.eval_every = 20  # gold-judge score of a fixed validation batch every N iterations
  c.eval_prompts = 64  # validation prompts in that batch
  # Sampling temperature of the gold-scored replies: 1 scores the distribution PPO
  # optimises (as `config.eval` does); 0 = greedy.
  c.eval_temperature = 1.0
  c.save_every = 20
  c.keep_checkpoints = 2
  if runlocal:
    c.batch_size, c.num_iterations, c.prompt_len, c.max_new_tokens = 16, 8, 48, 16
    c.num_minibatches, c.num_epochs, c.ptx_seq_len = 2, 1, 32
    c.log_every, c.eval_every, c.eval_prompts, c.save_every = 2, 4, 16, 4
    c.optim.warmup_steps = c.value_optim.warmup_steps = 2
  return c


# The numeric settings a run keeps in its state (`PPOState.hparams`) rather than in the
# compiled program, so runs that differ only in these (and `seed`) can train as one
# vmapped program (stages/ppo_group.py). kl_coef is the controller's starting beta.
HPARAMS = {
  "kl_coef": lambda c: c.kl_coef,
  "kl_target": lambda c: c.kl_target,
  "clip": lambda c: c.clip,
  "entropy_coef": lambda c: c.entropy_coef,
  "ptx_coef": lambda c: c.ptx_coef,
  "gamma": lambda c: c.gamma,
  "lam": lambda c: c.lam,
  "lr": lambda c: c.optim.lr,
  "value_lr": lambda c: c.value_optim.lr,
}


def hparams(c: ml_collections.ConfigDict) -> dict[str, float]:
  """The `HPARAMS` values of a PPO section."""
  return {k: float(get(c)) for k, get in HPARAMS.items()}


def paper_preset(c: ml_collections.ConfigDict, ptx: bool = False) -> ml_collections.ConfigDict:
  """Set the paper's values (`PAPER`) in a `ppo_config` section (in place; returned)."""
  for k, v in PAPER.items():
    if k == "ema_decay":
      c.optim.ema_decay = v
    elif k.startswith("ptx_") and not ptx:
      continue
    else:
      c[k] = v
  return c


def validate(c: ml_collections.ConfigDict, key: str, n_batch_shards: int = 1) -> None:
  """Well-typed but impossible settings of a PPO section; errors name `config.<key>.*`."""

  def check(ok, field, msg):
    if not ok:
      raise UserInputError(f"config.{key}.{field}: {msg}")

  check(c.batch_size > 0, "batch_size", f"must be > 0, got {c.batch_size}")
  check(
    c.num_minibatches > 0 and c.batch_size % c.num_minibatches == 0,
    "num_minibatches",
    f"{c.num_minibatches} minibatches do not divide batch_size={c.batch_size}",
  )
  check(
    c.batch_size % n_batch_shards == 0,
    "batch_size",
    f"{c.batch_size} is not a multiple of mesh data x fsdp = {n_batch_shards}",
  )
  check(
    c.kl_controller in ("fixed", "adaptive"),
    "kl_controller",
    f"must be fixed|adaptive, got {c.kl_controller!r}",
  )
  check(
    c.kl_estimator in rl.KL_ESTIMATORS,
    "kl_estimator",
    f"must be one of {'|'.join(rl.KL_ESTIMATORS)}, got {c.kl_estimator!r}",
  )
  check(c.value_init in ("rm", "sft"), "value_init", f"must be rm|sft, got {c.value_init!r}")
  check(c.temperature > 0, "temperature", f"must be > 0 for PPO, got {c.temperature}")
  check(c.kl_target > 0, "kl_target", f"must be > 0, got {c.kl_target}")
  check(c.seed >= 0, "seed", f"must be >= 0, got {c.seed}")
  for opt in ("optim", "value_optim"):  # a PPO update is one minibatch already
    check(
      c[opt].grad_accum == 1,
      f"{opt}.grad_accum",
      "PPO splits its batch with num_minibatches; leave grad_accum at 1",
    )
  check(c.ptx_coef >= 0, "ptx_coef", f"must be >= 0, got {c.ptx_coef}")
  check(c.ptx_coef == 0 or c.ptx_ratio > 0, "ptx_ratio", f"must be > 0, got {c.ptx_ratio}")
  check(
    ptx_rows(c) % n_batch_shards == 0,
    "ptx_ratio",
    f"{ptx_rows(c)} pretraining rows per iteration are not a multiple of mesh data x fsdp "
    f"= {n_batch_shards}",
  )


def ptx_rows(c: ml_collections.ConfigDict) -> int:
  """Pretraining rows per iteration: round(ptx_ratio x minibatch) per minibatch (0 = none)."""
  if c.ptx_coef <= 0:
    return 0
  per_minibatch = max(1, round(c.ptx_ratio * c.batch_size / c.num_minibatches))
  return per_minibatch * c.num_minibatches


# --- the train state ------------------------------------------------------------------------


@flax.struct.dataclass
class PPOState:
  step: jax.Array  # int32[]: PPO iterations done
  policy: Params  # trained (LM head)
  policy_opt: optax.OptState  # optimiser state of `policy` only
  value: Params  # trained (scalar head)
  value_opt: optax.OptState  # optimiser state of `value` only
  ref: Params  # frozen SFT reference (LM head); never seen by an optimiser
  reward: Params  # frozen reward model (scalar head); never seen by an optimiser
  reward_bias: jax.Array  # f32[]: added to every RM score
  kl_coef: jax.Array  # f32[]: beta, the KL controller's state
  ema: Params | None  # EMA of the policy (None when optim.ema_decay == 0)
  rng: jax.Array  # uint32[2]; iteration keys are fold_in(rng, step)
  hparams: dict[str, jax.Array]  # f32[] each: the run's `HPARAMS` (lr, clip, gamma_ptx, ...)
  guard: train_lib.Guard  # non-finite iterations (skipped), restores, learning-rate scale
  response_len0: jax.Array  # f32[]: mean response length of iteration 1 (length alerts)


@dataclasses.dataclass
class Setup:
  """The mesh, model, optimisers and the state's layout of a PPO run."""

  mesh: jax.sharding.Mesh
  rules: tuple
  model_cfg: TransformerConfig
  policy_tx: optax.GradientTransformation  # at the config's learning rate (for `init`)
  value_tx: optax.GradientTransformation
  shardings: Any  # of PPOState
  abstract: Any  # PPOState of ShapeDtypeStructs laid out on the mesh


def make_setup(
  config: ml_collections.ConfigDict, c: ml_collections.ConfigDict, devices=None, key: str = "ppo"
) -> Setup:
  """Mesh, optimisers and the PPOState's shardings (from logical axis names; no params).

  `c` is the stage's section (`config.ppo` or `config.ppo_ptx`, named `key` in errors).
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.mesh)
  validate(c, key, mesh.shape["data"] * mesh.shape["fsdp"])
  model_cfg = common.model_config(config, dropout=0.0)  # deterministic ratios
  policy_tx, value_tx = optimizers(c)
  model = Transformer(model_cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)

  def init(rng):  # boxed (logically partitioned) params, for shapes and shardings only
    lm_params = model.init(rng, tokens, heads=POLICY_HEADS)["params"]
    scalar_params = model.init(rng, tokens, heads=VALUE_HEADS)["params"]
    return PPOState(
      step=jnp.zeros((), jnp.int32),
      policy=lm_params,
      policy_opt=policy_tx.init(lm_params),
      value=scalar_params,
      value_opt=value_tx.init(scalar_params),
      ref=lm_params,
      reward=scalar_params,
      reward_bias=jnp.zeros((), jnp.float32),
      kl_coef=jnp.zeros((), jnp.float32),
      ema=lm_params if c.optim.ema_decay else None,
      rng=rng,
      hparams={k: jnp.zeros((), jnp.float32) for k in HPARAMS},
      guard=train_lib.Guard.create(),
      response_len0=jnp.zeros((), jnp.float32),
    )

  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = nn.unbox(sharding.logical_shardings(boxed, mesh, rules))
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return Setup(mesh, rules, model_cfg, policy_tx, value_tx, shardings, abstract)


def init_state(
  setup: Setup,
  c: ml_collections.ConfigDict,
  *,
  policy: Params,
  value: Params,
  ref: Params,
  reward: Params,
  reward_bias: float = 0.0,
  seed: int = 0,
  guard: ml_collections.ConfigDict | None = None,
) -> PPOState:
  """A fresh PPOState on the mesh from the four models' parameters (copied, so the
  policy and the reference never share buffers). Its rng: `seed` + the stage seed's offset
  (`common.stage_seed(seed, c.seed)`)."""
  ema = c.optim.ema_decay > 0
  hp = hparams(c)

  def build(policy, value, ref, reward):
    return PPOState(
      step=jnp.zeros((), jnp.int32),
      policy=policy,
      policy_opt=setup.policy_tx.init(policy),
      value=value,
      value_opt=setup.value_tx.init(value),
      ref=jax.tree.map(jnp.copy, ref),
      reward=jax.tree.map(jnp.copy, reward),
      reward_bias=jnp.asarray(reward_bias, jnp.float32),
      kl_coef=jnp.asarray(hp["kl_coef"], jnp.float32),
      ema=jax.tree.map(jnp.copy, policy) if ema else None,
      rng=jax.random.PRNGKey(common.stage_seed(seed, c.seed)),
      hparams={k: jnp.asarray(v, jnp.float32) for k, v in hp.items()},
      guard=train_lib.Guard.create(guard),
      response_len0=jnp.zeros((), jnp.float32),
    )

  with nn.logical_axis_rules(setup.rules):
    return jax.jit(build, out_shardings=setup.shardings)(policy, value, ref, reward)


def value_from_policy(policy: Params, dtype=jnp.float32) -> Params:
  """Value-model params from an LM policy's: its trunk and a zero scalar head."""
  return rm.reward_params_from_policy(policy, dtype)


# --- rollout ------------------------------------------------------------------------------


class Rollout(NamedTuple):
  """One batch of episodes. B prompts (left-padded to P), N = max_new_tokens."""

  prompt_tokens: jax.Array  # int32[B, P]
  response: jax.Array  # int32[B, N], PAD after EOS
  mask: jax.Array  # bool[B, N], True on response tokens (EOS included)
  logprobs: jax.Array  # f32[B, N] behaviour (old) policy log-probs of the sampled tokens
  ref_logprobs: jax.Array  # f32[B, N] reference log-probs
  values: jax.Array  # f32[B, N] value of the state before each token
  score: jax.Array  # f32[B] RM score at the last response token (+ reward_bias)
  ended: jax.Array  # bool[B] the response ended with EOS


def sequence_layout(prompt_tokens: jax.Array, response: jax.Array, mask: jax.Array):
  """tokens, segment_ids, positions int32[B, P + N] of prompt + response.

  The prompt keeps its left padding (segment 0); response tokens continue its positions;
  padding after EOS is segment 0. The model sees what an unpadded sequence would give.
  """
  seg_p, pos_p, plen = sampling.prompt_layout(prompt_tokens)
  n = response.shape[1]
  tokens = jnp.concatenate([prompt_tokens, response], axis=1)
  seg = jnp.concatenate([seg_p, mask.astype(jnp.int32)], axis=1)
  pos = jnp.concatenate([pos_p, plen[:, None] + jnp.arange(n, dtype=jnp.int32)[None]], axis=1)
  return tokens, seg, pos


def forward(
  model_cfg: TransformerConfig, params, prompt_tokens, response, mask, heads
) -> dict[str, jax.Array]:
  """Model outputs at the N positions that predict the response tokens.

  Entry t is read at the token before response token t (the prompt's last token for
  t = 0): "lm" f32[B, N, V] (logits of token t), "scalar" f32[B, N] (value of the state
  before token t). Also "scalar_last" f32[B] when "scalar" is asked: the scalar head AT
  the last response token (where the reward model reads its score).
  """
  tokens, seg, pos = sequence_layout(prompt_tokens, response, mask)
  out, _ = apply(model_cfg, params, tokens, pos, seg, heads=heads)
  p, n = prompt_tokens.shape[1], response.shape[1]
  res = {k: v[:, p - 1 : p - 1 + n] for k, v in out.items()}
  if "scalar" in out:
    at = rl.last_token_index(mask)
    res["scalar_last"] = jnp.take_along_axis(out["scalar"][:, p:], at[:, None], axis=1)[:, 0]
  return res


def rollout(
  state: PPOState,
  prompt_tokens: jax.Array,
  rng: jax.Array,
  *,
  model_cfg: TransformerConfig,
  c: ml_collections.ConfigDict,
) -> Rollout:
  """Sample one response per prompt and score it: everything the update needs."""
  out = sampling._sample(
    state.policy,
    prompt_tokens,
    rng,
    jnp.asarray(c.temperature, jnp.float32),
    jnp.asarray(c.top_p, jnp.float32),
    cfg=model_cfg,
    max_new_tokens=c.max_new_tokens,
    top_k=c.top_k,
    use_top_p=c.top_p < 1.0,
    use_cache=True,
    stop_at_eos=True,
  )
  response, mask = out.tokens, out.mask
  fwd = functools.partial(
    forward, model_cfg, prompt_tokens=prompt_tokens, response=response, mask=mask
  )
  if c.temperature == 1.0:
    logprobs = out.logprobs  # the sampler's: log_softmax of the policy's own logits
  else:  # the trained policy is softmax(logits / T): its log-probs need a forward
    logprobs = rl.token_logprobs(
      fwd(state.policy, heads=POLICY_HEADS)["lm"] / c.temperature, response
    )
  ref_logits = fwd(state.ref, heads=POLICY_HEADS)["lm"] / c.temperature
  ref_logprobs = rl.token_logprobs(ref_logits, response)
  values = fwd(state.value, heads=VALUE_HEADS)["scalar"]
  score = fwd(state.reward, heads=VALUE_HEADS)["scalar_last"] + state.reward_bias
  ended = jnp.any(mask & (response == EOS_ID), axis=1)
  zero = lambda x: jnp.where(mask, x, 0.0)
  return jax.lax.stop_gradient(
    Rollout(
      prompt_tokens, response, mask, zero(logprobs), zero(ref_logprobs), zero(values), score, ended
    )
  )


# --- the PPO iteration ----------------------------------------------------------------------


def _policy_loss_fn(policy, mb, ptx, hp, *, model_cfg, c):
  """Clipped policy loss - entropy bonus + gamma_ptx x pretraining LM loss; and stats.
  `hp`: the run's `HPARAMS` (f32[] each)."""
  logits = (
    forward(model_cfg, policy, mb["prompt_tokens"], mb["response"], mb["mask"], heads=POLICY_HEADS)[
      "lm"
    ]
    / c.temperature
  )
  logp = rl.token_logprobs(logits, mb["response"])
  pg_loss, stats = rl.policy_loss(logp, mb["logprobs"], mb["advantages"], mb["mask"], hp["clip"])
  ent = rl.masked_mean(rl.entropy(logits), mb["mask"])
  loss = pg_loss - hp["entropy_coef"] * ent
  stats = {**stats, "policy_loss": pg_loss, "entropy": jax.lax.stop_gradient(ent)}
  if ptx is not None:
    # The pretraining term of PPO-ptx; with ptx_coef 0 its gradient is exactly zero.
    ptx_logits = lm.logits(model_cfg, policy, ptx)
    total, count = lm.lm_loss(ptx_logits, ptx["tokens"], ptx["loss_mask"])
    ptx_loss = total / jnp.maximum(count, 1.0)
    loss = loss + hp["ptx_coef"] * ptx_loss
    stats["ptx_loss"] = jax.lax.stop_gradient(ptx_loss)
  return loss, stats


def _value_loss_fn(value, mb, *, model_cfg, c):
  v = forward(model_cfg, value, mb["prompt_tokens"], mb["response"], mb["mask"], heads=VALUE_HEADS)[
    "scalar"
  ]
  loss, stats = rl.value_loss(v, mb["values"], mb["returns"], mb["mask"], c.value_clip)
  return loss, {"value_loss": loss, "value_clip_frac": stats["clip_frac"]}


def iteration(
  state: PPOState,
  batch: dict[str, jax.Array],
  *,
  model_cfg: TransformerConfig,
  c: ml_collections.ConfigDict,
  alerts: tuple[float, float] = (0.0, 0.0),
) -> tuple[PPOState, dict[str, jax.Array], Rollout]:
  """One PPO iteration: rollout -> rewards -> advantages -> epochs x minibatches.

  batch: prompt_tokens int32[B, P] (left-padded); for PPO-ptx also the pretraining rows
  ptx_{tokens, segment_ids, positions, loss_mask} [B_ptx, T], split evenly over the
  minibatches (the same rows in every epoch). Returns the new state, the metrics and
  the rollout (for inspection; `train_step` drops it). The numbers of `HPARAMS` come
  from `state.hparams`, everything else from `c`; `alerts`: `(kl_ceiling, length_ratio)`
  of `config.guard`. An iteration with a non-finite score, loss or gradient changes
  nothing but the step (and the guard's counts).
  """
  hp = state.hparams
  policy_tx, value_tx = optimizers(c, hp, state.guard.lr_scale)
  rng = jax.random.fold_in(state.rng, state.step)
  sample_rng, perm_rng = jax.random.split(rng)
  ro = rollout(state, batch["prompt_tokens"], sample_rng, model_cfg=model_cfg, c=c)
  ro = ro._replace(score=train_lib.poison(ro.score, state.guard.injects(state.step)))
  b, n = ro.response.shape
  mask = ro.mask

  # Rewards: the KL penalty on every token, the score on the last one.
  kl = rl.kl_estimate(ro.logprobs, ro.ref_logprobs, c.kl_estimator)  # [B, N]
  kl = jnp.where(mask, kl, 0.0)
  score = rl.no_eos_penalty(ro.score, ro.ended, c.no_eos_penalty)
  score = rl.scale_and_clip(score, c.score_scale, c.score_clip)
  rewards, kl_penalty = rl.shaped_rewards(score, kl, mask, state.kl_coef)

  # Advantages.
  advantages, returns = rl.gae(rewards, ro.values, mask, hp["gamma"], hp["lam"])
  if c.whiten_advantages:
    advantages = rl.whiten(advantages, mask)

  # Update: num_epochs x num_minibatches optimiser steps, as nested scans.
  data = {
    "prompt_tokens": ro.prompt_tokens,
    "response": ro.response,
    "mask": mask,
    "logprobs": ro.logprobs,
    "values": ro.values,
    "advantages": advantages,
    "returns": returns,
  }
  nmb = c.num_minibatches
  ptx = None
  if "ptx_tokens" in batch:
    ptx = {k[len("ptx_") :]: v for k, v in batch.items() if k.startswith("ptx_")}
    ptx = jax.tree.map(lambda x: x.reshape(nmb, x.shape[0] // nmb, *x.shape[1:]), ptx)
  ema_decay = c.optim.ema_decay
  policy_grad = jax.grad(functools.partial(_policy_loss_fn, model_cfg=model_cfg, c=c), has_aux=True)
  value_grad = jax.grad(functools.partial(_value_loss_fn, model_cfg=model_cfg, c=c), has_aux=True)

  def minibatch_step(carry, xs):
    policy, policy_opt, value, value_opt, ema = carry
    mb, ptx_mb = xs
    p_grads, p_stats = policy_grad(policy, mb, ptx_mb, hp)
    updates, policy_opt = policy_tx.update(p_grads, policy_opt, policy)
    policy = optax.apply_updates(policy, updates)
    if ema is not None:
      ema = optax.incremental_update(policy, ema, step_size=1.0 - ema_decay)
    v_grads, v_stats = value_grad(value, mb)
    updates, value_opt = value_tx.update(v_grads, value_opt, value)
    value = optax.apply_updates(value, updates)
    stats = {
      **p_stats,
      **v_stats,
      "policy_grad_norm": optax.tree.norm(p_grads),
      "value_grad_norm": optax.tree.norm(v_grads),
    }
    return (policy, policy_opt, value, value_opt, ema), stats

  def epoch(carry, epoch_rng):
    perm = jax.random.permutation(epoch_rng, b)
    mbs = jax.tree.map(lambda x: x[perm].reshape(nmb, b // nmb, *x.shape[1:]), data)
    return jax.lax.scan(minibatch_step, carry, (mbs, ptx))

  carry = (state.policy, state.policy_opt, state.value, state.value_opt, state.ema)
  carry, stats = jax.lax.scan(epoch, carry, jax.random.split(perm_rng, c.num_epochs))
  policy, policy_opt, value, value_opt, ema = carry

  # KL controller: the next beta from the KL measured in this rollout.
  kl_per_episode = kl.sum(axis=1)  # the KL in the reward, per episode
  kl_mean = kl_per_episode.mean()
  kl_coef = rl.kl_controller_update(
    state.kl_coef,
    kl_mean,
    b,
    kind=c.kl_controller,
    target=hp["kl_target"],
    horizon=c.kl_horizon,
  )
  lengths = mask.sum(axis=1).astype(jnp.float32)
  len0 = jnp.where(state.step == 0, lengths.mean(), state.response_len0)
  ok = train_lib.all_finite(stats, ro.score, kl_mean)
  trained = (policy, policy_opt, value, value_opt, ema, kl_coef)
  policy, policy_opt, value, value_opt, ema, kl_coef = train_lib.keep_if(
    ok,
    trained,
    (state.policy, state.policy_opt, state.value, state.value_opt, state.ema, state.kl_coef),
  )
  new_state = state.replace(
    step=state.step + 1,
    policy=policy,
    policy_opt=policy_opt,
    value=value,
    value_opt=value_opt,
    ema=ema,
    kl_coef=kl_coef,
    guard=state.guard.after(ok),
    response_len0=len0,
  )

  metrics = {k: v.mean() for k, v in stats.items()}  # over epochs x minibatches
  metrics.update(
    score=ro.score.mean(),  # the RM score (with reward_bias), before penalty / scaling
    score_std=ro.score.std(),
    reward=rewards.sum(axis=1).mean(),  # total shaped reward per episode
    kl=kl_mean,
    kl_penalty=kl_penalty.sum(axis=1).mean(),
    kl_coef=state.kl_coef,  # the beta used in this iteration's rewards
    explained_var=rl.explained_variance(ro.values, returns, mask),
    value_mean=rl.masked_mean(ro.values, mask),
    return_mean=rl.masked_mean(returns, mask),
    response_len=lengths.mean(),
    no_eos_frac=1.0 - ro.ended.mean(),
    policy_lr=policy_lr(c, hp["lr"], state.step) * state.guard.lr_scale,
  )
  kl_ceiling, length_ratio = alerts
  if kl_ceiling:
    metrics["alert_kl"] = (kl_mean > kl_ceiling).astype(jnp.float32)
  if length_ratio:
    out = (lengths.mean() * length_ratio < len0) | (lengths.mean() > len0 * length_ratio)
    metrics["alert_length"] = out.astype(jnp.float32)
  metrics = train_lib.guarded_metrics(
    {f"{PREFIX}/{k}": v for k, v in metrics.items()}, new_state.guard
  )
  return new_state, metrics, ro


def train_step(
  state: PPOState, batch: dict[str, jax.Array], **kwargs
) -> tuple[PPOState, dict[str, jax.Array]]:
  """`iteration` without the rollout: `(state, metrics)`, the stage's jitted step."""
  new_state, metrics, _ = iteration(state, batch, **kwargs)
  return new_state, metrics


def num_updates(c: ml_collections.ConfigDict) -> int:
  """Optimiser steps of a whole run (each of policy and value)."""
  return c.num_iterations * c.num_epochs * c.num_minibatches


def optimizers(c: ml_collections.ConfigDict, hp=None, lr_scale=1.0):
  """(policy, value) optimisers; with `hp`, at its (possibly traced) learning rates
  x `lr_scale` (the guard's)."""
  lr = (None, None) if hp is None else (hp["lr"] * lr_scale, hp["value_lr"] * lr_scale)
  return (
    train_lib.make_optimizer(c.optim, num_updates(c), lr[0]),
    train_lib.make_optimizer(c.value_optim, num_updates(c), lr[1]),
  )


def policy_lr(c: ml_collections.ConfigDict, peak: jax.Array, step: jax.Array) -> jax.Array:
  """The policy's learning rate at the first update of iteration `step`."""
  schedule = train_lib.lr_schedule(c.optim, num_updates(c), peak)
  return schedule(step * c.num_epochs * c.num_minibatches)


def batch_ndims(c: ml_collections.ConfigDict) -> dict[str, int]:
  return {**PROMPT_NDIMS, **(PTX_NDIMS if ptx_rows(c) else {})}


def alert_levels(guard: ml_collections.ConfigDict | None) -> tuple[float, float]:
  """`iteration`'s `alerts` from `config.guard` (off without one)."""
  return (0.0, 0.0) if guard is None else (float(guard.kl_ceiling), float(guard.length_ratio))


def jit_train_step(setup: Setup, c: ml_collections.ConfigDict, guard=None) -> Callable:
  """`train_step` jitted once: state sharded and donated, batch over (data, fsdp);
  `guard` (`config.guard`) sets the alerts."""
  in_batch = {k: sharding.batch_sharding(setup.mesh, n) for k, n in batch_ndims(c).items()}
  return jax.jit(
    functools.partial(
      train_step,
      model_cfg=setup.model_cfg,
      c=ml_collections.FrozenConfigDict(c),
      alerts=alert_levels(guard),
    ),
    in_shardings=(setup.shardings, in_batch),
    out_shardings=(setup.shardings, sharding.replicated(setup.mesh)),
    donate_argnums=(0,),
  )


# --- data --------------------------------------------------------------------------------


class Batches:
  """Prompt batches, zipped with pretraining batches for PPO-ptx: one resumable iterator.

  Yields {"prompt_tokens"} (+ {"ptx_tokens", ...}); its state (JSON bytes) holds both
  iterators' positions, so Orbax saves and restores them together.
  """

  def __init__(self, prompts: pipeline.ResumableIterator, ptx=None):
    self.prompts, self.ptx = prompts, ptx

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = {"prompt_tokens": next(self.prompts)["prompt_tokens"]}
    if self.ptx is not None:
      out.update({f"ptx_{k}": v for k, v in next(self.ptx).items() if f"ptx_{k}" in PTX_NDIMS})
    return out

  def get_state(self) -> bytes:
    state = {"prompts": self.prompts.get_state().decode()}
    if self.ptx is not None:
      state["ptx"] = self.ptx.get_state().decode()
    return json.dumps(state, sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state)
    self.prompts.set_state(state["prompts"].encode())
    if self.ptx is not None:
      self.ptx.set_state(state["ptx"].encode())

  def start_prefetch(self) -> None:
    for it in (self.prompts, self.ptx):
      if it is not None:
        it.start_prefetch()


def prompt_sources(config, workdir, c):
  """(train, validation) prompt records: the user's file (10% held out) or the world's."""
  if c.prompt_file:
    records = user_data.load_prompts(c.prompt_file).records
    n_val = max(1, len(records) // 10)
    return records[n_val:], records[:n_val]
  return (
    common.world_source(config, workdir, "prompts", "train"),
    common.world_source(config, workdir, "prompts", "validation"),
  )


def run_iterations(
  setup: Setup, c, state, step_fn, it: Batches, ckpt, writer, evaluate, stage: str, guard=None
):
  """`train_lib.run_loop` over the stage's iterations: metrics every `log_every`, the gold
  evaluation at iteration 0 and every `eval_every`, checkpoints every `save_every`."""
  with sharding.use(setup.mesh, setup.rules):
    return train_lib.run_loop(
      state=state,
      step_fn=step_fn,
      batches=it,
      data_iter=it,
      put=lambda b: sharding.put_batch(b, setup.mesh),
      num_steps=c.num_iterations,
      checkpointer=ckpt,
      writer=writer,
      log_every=c.log_every,
      eval_every=c.eval_every or c.num_iterations,
      eval_fn=evaluate,
      eval_at_start=True,
      desc=stage,
      guard=guard,
    )


def data(config, workdir: str, c, stage: str, tok) -> tuple[Batches, list[dict[str, Any]]]:
  """The run's batch iterator (prompts, + pretraining rows for PPO-ptx) and the fixed
  validation records its gold score is measured on. Their order follows config.seed."""
  train_src, val_src = prompt_sources(config, workdir, c)
  prompts = pipeline.prompt_batches(
    train_src,
    tok,
    batch_size=common.batch_rows(c.batch_size, f"{stage}.batch_size"),
    prompt_len=c.prompt_len,
    seed=config.seed + 4,
  )
  ptx = None
  if ptx_rows(c):
    ptx_src, _ = pretrain._sources(config, workdir)
    ptx = iter(
      pipeline.pretrain_batches(
        ptx_src,
        tok,
        batch_size=common.batch_rows(ptx_rows(c), f"{stage}.ptx_ratio"),
        seq_len=c.ptx_seq_len,
        seed=config.seed + 5,
      )
    )
  records = [val_src[i] for i in range(min(len(val_src), c.eval_prompts))]
  return Batches(iter(prompts), ptx), records


def exported(state: PPOState) -> Params:
  """What a run exports (and the gold score measures): the policy's EMA if kept, else it."""
  return state.ema if state.ema is not None else state.policy


# --- loading the previous stages -----------------------------------------------------------


def load_models(config, workdir: str, setup: Setup, c) -> dict[str, Any]:
  """policy / ref (the SFT export), reward (the RM export), value (RM or SFT trunk)."""
  sft = comparisons.load_sft(config, workdir, setup.mesh, setup.rules)
  reward, info = rm.load_reward_model(config, workdir, setup.mesh, setup.rules)
  if c.value_init == "rm":
    value = reward
  else:
    dtype = jnp.dtype(config.model.param_dtype)
    value = jax.jit(lambda p: value_from_policy(p, dtype), out_shardings=setup.shardings.value)(sft)
  return {"policy": sft, "ref": sft, "reward": reward, "value": value, "rm_info": info or {}}


# --- the driver ------------------------------------------------------------------------------


def gold_eval(setup: Setup, params, tok, records, *, c, seed: int) -> dict[str, float]:
  """Mean gold-judge score (and response length) of the policy on fixed prompts."""
  records = [r for r in records if "task" in r]
  if not records:
    return {}
  rows = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
  texts = common.generate(
    setup.model_cfg,
    params,
    tok,
    [r["messages"] for r in records],
    jax.random.PRNGKey(seed),
    max_new_tokens=c.max_new_tokens,
    temperature=c.eval_temperature,
    batch_size=-(-len(records) // rows) * rows,
    max_prompt_len=c.prompt_len,
    mesh=setup.mesh,
  )
  scores = [judge.score(r["task"], t) for r, t in zip(records, texts, strict=True)]
  return {
    f"{PREFIX}/gold_score": float(np.mean(scores)),
    f"{PREFIX}/eval_response_words": float(np.mean([len(t.split()) for t in texts])),
  }


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, stage: str = "ppo"
) -> dict[str, Any]:
  """PPO (`stage="ppo"`, section `config.ppo`) or PPO-ptx (`"ppo_ptx"`, `config.ppo_ptx`)
  from the SFT and RM exports (or resume); export the final policy. Returns metrics."""
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  if stage not in config:
    raise UserInputError(f"config.{stage}: missing section (use configs/{stage}.py)")
  out_dir = common.stage_dir(workdir, stage)
  if common.is_complete(workdir, stage):
    print(f"{stage}: complete, skipping ({out_dir})")
    return train_lib.params_info(out_dir).get("metrics", {})
  c = config[stage]
  start = time.time()
  tok = common.load_tokenizer(config, workdir)
  setup = make_setup(config, c, key=stage)
  it, eval_records = data(config, workdir, c, stage, tok)
  ckpt, writer, state, resumed = common.open_run(
    out_dir, c, setup.abstract, it, stage, unit="iteration"
  )
  rm_info = train_lib.params_info(common.stage_dir(workdir, rm.STAGE)) or {}
  if not resumed:
    models = load_models(config, workdir, setup, c)
    rm_info = models.pop("rm_info")
    state = init_state(
      setup, c, **models, reward_bias=c.reward_bias, seed=config.seed + 6, guard=config.get("guard")
    )
  step_fn = jit_train_step(setup, c, config.get("guard"))

  def evaluate(state, step):
    return gold_eval(setup, exported(state), tok, eval_records, c=c, seed=config.seed)

  print(
    f"{stage}: {c.num_iterations} iterations of {c.batch_size} episodes ({c.num_epochs} "
    f"epochs x {c.num_minibatches} minibatches, {ptx_rows(c)} ptx rows)"
  )
  state = run_iterations(
    setup, c, state, step_fn, it, ckpt, writer, evaluate, stage, config.get("guard")
  )
  summary = common.finish(
    out_dir,
    exported(state),
    config,
    start,
    ckpt,
    writer,
    stage=stage,
    heads=list(POLICY_HEADS),
    rm_reward_bias=rm_info.get("reward_bias"),
  )
  print(
    f"{stage}: RM score {summary.get(f'{PREFIX}/score', float('nan')):.3f}, "
    f"gold score {summary.get(f'{PREFIX}/gold_score', float('nan')):.3f}"
  )
  return summary
