"""PPO's train state and its rollout.

`PPOState` holds the four models as separate pytrees (policy and value trained, each
with its optimiser state; the SFT reference and the reward model frozen), the KL
controller's beta, an optional EMA of the policy, the run's `HPARAMS`, the guard and
the rng. `make_setup` lays it out on the mesh from logical axis names (no parameters
allocated), `init_state` fills it from the exported SFT and RM parameters.

With LoRA (`Setup.adapters`) the reference IS the policy's frozen base, held once:
`policy` holds only the adapters (`policy_params` = `ref` + them), and with `lora.value`
`value` holds the value model's adapters and head over a frozen trunk the state holds
already (`value_params`: the reward model's, or with `value_init="sft"` the reference's).

`rollout` samples one response per prompt and reads, in the same jitted call,
everything the update needs: behaviour and reference log-probs, values, the RM score.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import lora, rl, sampling, sharding
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import Transformer, TransformerConfig, apply
from rlhf_jax.stages import common, rm
from rlhf_jax.stages.ppo import settings
from rlhf_jax.train import optim

Params = Any
POLICY_HEADS = ("lm",)
VALUE_HEADS = ("scalar",)


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
  ema: dict | None  # {"sum": Params, "weight": f32[]}: `exported` (None: no EMA kept)
  rng: jax.Array  # uint32[2]; iteration keys are fold_in(rng, step)
  hparams: dict[str, jax.Array]  # f32[] each: the run's `settings.HPARAMS` (lr, clip, ...)
  guard: optim.Guard  # non-finite iterations (skipped), restores, learning-rate scale
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
  adapters: lora.Settings | None = None  # LoRA (`config.lora` for this stage), or None


def make_setup(
  config: ml_collections.ConfigDict, c: ml_collections.ConfigDict, devices=None, key: str = "ppo"
) -> Setup:
  """Mesh, optimisers and the PPOState's shardings (from logical axis names; no params).

  `c` is the stage's section (`config.ppo` or `config.ppo_ptx`, named `key` in errors).
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.mesh)
  settings.validate(c, key, mesh.shape["data"] * mesh.shape["fsdp"])
  adapters = lora.settings(config, key)
  if adapters is not None and c.ref_dir != c.init_dir:
    raise UserInputError(
      f"config.{key}.ref_dir: with LoRA the KL reference is the policy's frozen base; "
      f"it must equal {key}.init_dir ({c.init_dir!r})"
    )
  model_cfg = common.model_config(config, dropout=0.0)  # deterministic ratios
  policy_tx, value_tx = optimizers(c)
  model = Transformer(model_cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)

  def init(rng):  # boxed (logically partitioned) params, for shapes and shardings only
    lm_params = model.init(rng, tokens, heads=POLICY_HEADS)["params"]
    scalar_params = model.init(rng, tokens, heads=VALUE_HEADS)["params"]
    policy, value = trained_models(lm_params, scalar_params, adapters, rng)
    return PPOState(
      step=jnp.zeros((), jnp.int32),
      policy=policy,
      policy_opt=policy_tx.init(policy),
      value=value,
      value_opt=value_tx.init(value),
      ref=lm_params,
      reward=scalar_params,
      reward_bias=jnp.zeros((), jnp.float32),
      kl_coef=jnp.zeros((), jnp.float32),
      ema=ema_init(policy) if c.optim.ema_decay else None,
      rng=rng,
      hparams={k: jnp.zeros((), jnp.float32) for k in settings.HPARAMS},
      guard=optim.Guard.create(),
      response_len0=jnp.zeros((), jnp.float32),
    )

  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = nn.unbox(sharding.logical_shardings(boxed, mesh, rules))
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return Setup(mesh, rules, model_cfg, policy_tx, value_tx, shardings, abstract, adapters)


def trained_models(policy: Params, value: Params, adapters: lora.Settings | None, rng):
  """(policy, value) as a state trains them: the models themselves, or with LoRA fresh
  adapters on the policy (its base is the reference) and, with `lora.value`, on the value
  model with its head (trained fully) beside them."""
  if adapters is None:
    return policy, value
  key = jax.random.fold_in(rng, lora.RNG_SALT)
  policy = lora.trainable(policy, adapters, key)
  if adapters.value:
    value = lora.trainable(value, adapters, jax.random.fold_in(key, 1), keep=("scalar_head",))
  return policy, value


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
  policy and the reference never share buffers; with LoRA `policy` is `ref`, the base of
  fresh adapters). Its rng: `seed` + the stage seed's offset
  (`common.stage_seed(seed, c.seed)`)."""
  ema = c.optim.ema_decay > 0
  hp = settings.hparams(c)
  rng = jax.random.PRNGKey(common.stage_seed(seed, c.seed))

  def build(policy, value, ref, reward):
    policy, value = trained_models(policy, value, setup.adapters, rng)
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
      ema=ema_init(policy) if ema else None,
      rng=rng,
      hparams={k: jnp.asarray(v, jnp.float32) for k, v in hp.items()},
      guard=optim.Guard.create(guard),
      response_len0=jnp.zeros((), jnp.float32),
    )

  with nn.logical_axis_rules(setup.rules):
    return jax.jit(build, out_shardings=setup.shardings)(policy, value, ref, reward)


def value_from_policy(policy: Params, dtype=jnp.float32) -> Params:
  """Value-model params from an LM policy's: its trunk and a zero scalar head."""
  return rm.reward_params_from_policy(policy, dtype)


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


def policy_params(state: PPOState, adapters: lora.Settings | None, policy=None) -> Params:
  """The params the policy model reads for trained `policy` (default: the state's): it,
  or with LoRA its adapters laid over the frozen base, the reference (`lora.attach`)."""
  policy = state.policy if policy is None else policy
  return policy if adapters is None else lora.attach(state.ref, policy, adapters)


def value_params(state: PPOState, adapters: lora.Settings | None, c, value=None) -> Params:
  """The params the value model reads for trained `value` (default: the state's): it, or
  with `lora.value` its adapters and head over the frozen trunk it started from (the
  reward model's, or with `value_init="sft"` the reference's)."""
  value = state.value if value is None else value
  if adapters is None or not adapters.value:
    return value
  return lora.attach(state.reward if c.value_init == rm.STAGE else state.ref, value, adapters)


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
  p, n = prompt_tokens.shape[1], response.shape[1]
  # The heads on the response positions only (one more for "scalar_last"): the prompt
  # positions' logits were half of the LM head's matmul and vocabulary softmax.
  span = (p - 1, p + n if "scalar" in heads else p - 1 + n)
  out, _ = apply(model_cfg, params, tokens, pos, seg, heads=heads, span=span)
  res = {k: v[:, :n] for k, v in out.items()}
  if "scalar" in out:
    at = rl.last_token_index(mask)
    res["scalar_last"] = jnp.take_along_axis(out["scalar"][:, 1:], at[:, None], axis=1)[:, 0]
  return res


def rollout(
  state: PPOState,
  prompt_tokens: jax.Array,
  rng: jax.Array,
  *,
  model_cfg: TransformerConfig,
  c: ml_collections.ConfigDict,
  adapters: lora.Settings | None = None,
) -> Rollout:
  """Sample one response per prompt and score it: everything the update needs."""
  policy = policy_params(state, adapters)
  out = sampling.sample_tokens(
    policy,
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
  if c.temperature == 1.0 and model_cfg.compute_dtype == jnp.float32:
    # The sampler's: log_softmax of the policy's own logits, which in f32 agree with the
    # update's forward to ~1e-6 (tests/test_ppo.py), so the first ratio is 1.
    logprobs = out.logprobs
  else:
    # The trained policy is softmax(logits / T); and in bf16 the KV-cached sampler's
    # log-probs differ from the update's full forward by up to ~1e-2 (measured), so the
    # old log-probs come from the training forward.
    logprobs = rl.token_logprobs(fwd(policy, heads=POLICY_HEADS)["lm"] / c.temperature, response)
  ref_logits = fwd(state.ref, heads=POLICY_HEADS)["lm"] / c.temperature
  ref_logprobs = rl.token_logprobs(ref_logits, response)
  values = fwd(value_params(state, adapters, c), heads=VALUE_HEADS)["scalar"]
  score = fwd(state.reward, heads=VALUE_HEADS)["scalar_last"] + state.reward_bias
  ended = jnp.any(mask & (response == model_cfg.eos_id), axis=1)
  zero = lambda x: jnp.where(mask, x, 0.0)
  return jax.lax.stop_gradient(
    Rollout(
      prompt_tokens, response, mask, zero(logprobs), zero(ref_logprobs), zero(values), score, ended
    )
  )


def optimizers(c: ml_collections.ConfigDict, hp=None, lr_scale=1.0):
  """(policy, value) optimisers; with `hp`, at its (possibly traced) learning rates
  x `lr_scale` (the guard's)."""
  lr = (None, None) if hp is None else (hp["lr"] * lr_scale, hp["value_lr"] * lr_scale)
  updates = settings.num_updates(c)
  return (
    optim.make_optimizer(c.optim, updates, lr[0]),
    optim.make_optimizer(c.value_optim, updates, lr[1]),
  )


def ema_init(policy: Params) -> dict:
  """An empty bias-corrected EMA of `policy` (see `ema_update`)."""
  return {"sum": jax.tree.map(jnp.zeros_like, policy), "weight": jnp.zeros((), jnp.float32)}


def ema_update(ema: dict, policy: Params, decay: float) -> dict:
  """One update of the policy's EMA, bias-corrected as Adam's moments are.

  Started at zero, `sum` after t updates is (1-d) sum_k d^(t-k) policy_k and `weight`,
  the same average of ones, is 1 - d^t; their ratio (`ema_params`) weighs the updated
  policies only. An EMA started at the SFT policy would keep d^t of it: 0.28 after the
  paper preset's 160 updates at d = 0.992."""
  new = {"sum": policy, "weight": jnp.ones((), jnp.float32)}
  return optax.incremental_update(new, ema, step_size=1.0 - decay)


def ema_params(ema: dict, policy: Params) -> Params:
  """The bias-corrected EMA (`policy` itself before the first update)."""
  w = ema["weight"]
  return jax.tree.map(
    lambda s, p: jnp.where(w > 0, s / jnp.maximum(w, 1e-30), p).astype(p.dtype),
    ema["sum"],
    policy,
  )


def trained_policy(state: PPOState) -> Params:
  """The policy's EMA if kept, else the policy (with LoRA: their adapters)."""
  return state.policy if state.ema is None else ema_params(state.ema, state.policy)


def exported(state: PPOState, adapters: lora.Settings | None = None, policy=None) -> Params:
  """What a run exports (and the gold score measures): `trained_policy`, or with LoRA
  those adapters merged into the base (`lora.merge`); `policy`: other trained params."""
  policy = trained_policy(state) if policy is None else policy
  return policy if adapters is None else lora.merge(state.ref, policy, adapters)
