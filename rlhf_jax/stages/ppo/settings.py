"""PPO's config section (`config.ppo` / `config.ppo_ptx`), the paper's preset, the
numbers a run keeps in its state (`HPARAMS`) and the validation of a section."""

from __future__ import annotations

import ml_collections

from rlhf_jax import ranges, rl
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import lm, rm, sft
from rlhf_jax.train import optim

PREFIX = "ppo"  # metric names: ppo/<what> for PPO and PPO-ptx alike
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
  "value_init": rm.STAGE,
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
  c.value_init = rm.STAGE  # rm (the paper) | sft (SFT trunk + zero scalar head)
  # Exported policies (relative to the workdir; "" = SFT): the one the policy starts from
  # and the KL reference (an earlier round's PPO, stages/rounds.py).
  c.init_dir = ""
  c.ref_dir = ""
  c.optim = optim.optim_config(
    lr=1e-4, schedule="constant", warmup_steps=10, weight_decay=0.0, grad_clip=1.0
  )  # policy optimiser; optim.ema_decay > 0 keeps (and exports) an EMA of the policy
  c.value_optim = optim.optim_config(
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
  c.skip_bad = False  # skip (and count) malformed records of prompt_file instead of stopping
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
# vmapped program (stages/ppo/group.py). kl_coef is the controller's starting beta.
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


# Where the numbers of a PPO section must lie (rlhf_jax.ranges); `validate` checks them.
RANGES = {
  "batch_size": "> 0",
  "temperature": "> 0",  # the policy trained is softmax(logits / T): no greedy rollouts
  "eval_temperature": ">= 0",  # 0 = greedy
  "top_k": ">= 0",  # 0 = off
  "top_p": "(0, 1]",
  "kl_coef": ">= 0",  # beta
  "kl_target": "> 0",
  "kl_horizon": "> 0",  # the adaptive controller divides by it
  "score_scale": ">= 0",  # a negative scale would train against the reward model
  "score_clip": ">= 0",  # 0 = off
  "gamma": "(0, 1]",
  "lam": "[0, 1]",
  "clip": "> 0",
  "value_clip": ">= 0",  # 0 = plain squared error
  "entropy_coef": ">= 0",  # a bonus; 0 = off
  "ptx_coef": ">= 0",  # gamma_ptx; 0 = plain PPO
  "ptx_ratio": ">= 0",
  "ptx_seq_len": "> 0",
  "eval_prompts": ">= 0",
  "seed": ">= 0",
}


def validate_ranges(c: ml_collections.ConfigDict, key: str) -> None:
  """The numbers of a PPO section inside `RANGES`; errors name `config.<key>.*`."""
  ranges.check(c, key, RANGES)


def validate(c: ml_collections.ConfigDict, key: str, n_batch_shards: int = 1) -> None:
  """Well-typed but impossible settings of a PPO section; errors name `config.<key>.*`."""

  def check(ok, field, msg):
    if not ok:
      raise UserInputError(f"config.{key}.{field}: {msg}")

  validate_ranges(c, key)
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
  inits = (rm.STAGE, sft.STAGE)  # the stage whose export the value model starts from
  check(c.value_init in inits, "value_init", f"must be {'|'.join(inits)}, got {c.value_init!r}")
  for opt in ("optim", "value_optim"):  # a PPO update is one minibatch already
    check(
      c[opt].grad_accum == 1,
      f"{opt}.grad_accum",
      "PPO splits its batch with num_minibatches; leave grad_accum at 1",
    )
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


def num_updates(c: ml_collections.ConfigDict) -> int:
  """Optimiser steps of a whole run (each of policy and value)."""
  return c.num_iterations * c.num_epochs * c.num_minibatches


def batch_ndims(c: ml_collections.ConfigDict) -> dict[str, int]:
  """The batch fields of an iteration and their ranks (prompts, + pretraining rows)."""
  return {**PROMPT_NDIMS, **(PTX_NDIMS if ptx_rows(c) else {})}


def alert_levels(guard: ml_collections.ConfigDict | None) -> tuple[float, float]:
  """`train_step`'s `alerts` from `config.guard` (off without one)."""
  return (0.0, 0.0) if guard is None else (float(guard.kl_ceiling), float(guard.length_ratio))
