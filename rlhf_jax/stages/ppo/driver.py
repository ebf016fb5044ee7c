"""The PPO stage's driver: its data, loading SFT and the RM, the gold evaluation, and
`train_and_evaluate` (PPO with `stage="ppo"`, PPO-ptx with `stages/ppo_ptx.py`)."""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.data import judge, pipeline, user_data
from rlhf_jax.stages import common, pretrain, rm, sft
from rlhf_jax.stages.ppo import iteration, rollout, settings
from rlhf_jax.train import checkpoints, loop

STAGE = "ppo"


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  """Its fields inside `settings.RANGES` (the registry's config hook). How the batch
  splits is checked when it runs (`settings.validate`, with the mesh), so a sweep point
  that does not split fails alone."""
  settings.validate_ranges(c, key)


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
      out.update(
        {f"ptx_{k}": v for k, v in next(self.ptx).items() if f"ptx_{k}" in settings.PTX_NDIMS}
      )
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


def prompt_sources(config, workdir, c, files: dict | None = None):
  """(train, validation) prompt records: the user's file (10% held out) or the world's.
  `files` gets {path: what was read} of the user's file."""
  if c.prompt_file:
    loaded = user_data.load_prompts(c.prompt_file, skip_bad=c.skip_bad)
    if files is not None:
      files[c.prompt_file] = loaded.stats.counts()
    return user_data.hold_out(loaded, 10, "validation")
  return (
    common.world_source(config, workdir, "prompts", "train"),
    common.world_source(config, workdir, "prompts", "validation"),
  )


def run_iterations(
  setup: rollout.Setup,
  c,
  state,
  step_fn,
  it: Batches,
  ckpt,
  writer,
  evaluate,
  stage: str,
  guard=None,
):
  """`loop.run_loop` over the stage's iterations: metrics every `log_every`, the gold
  evaluation at iteration 0 and every `eval_every`, checkpoints every `save_every`."""
  with sharding.use(setup.mesh, setup.rules):
    return loop.run_loop(
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


def data(
  config, workdir: str, c, stage: str, tok, files: dict | None = None
) -> tuple[Batches, list[dict[str, Any]]]:
  """The run's batch iterator (prompts, + pretraining rows for PPO-ptx) and the fixed
  validation records its gold score is measured on. Their order follows config.seed.
  `files` gets {path: what was read} of the user's files."""
  train_src, val_src = prompt_sources(config, workdir, c, files)
  prompts = pipeline.prompt_batches(
    train_src,
    tok,
    batch_size=common.batch_rows(c.batch_size, f"{stage}.batch_size"),
    prompt_len=c.prompt_len,
    seed=config.seed + 4,
  )
  ptx = None
  if settings.ptx_rows(c):
    ptx_src, _ = pretrain.sources(config, workdir, files)
    ptx = iter(
      pipeline.pretrain_batches(
        ptx_src,
        tok,
        batch_size=common.batch_rows(settings.ptx_rows(c), f"{stage}.ptx_ratio"),
        seq_len=c.ptx_seq_len,
        seed=config.seed + 5,
      )
    )
  records = [val_src[i] for i in range(min(len(val_src), c.eval_prompts))]
  return Batches(iter(prompts), ptx), records


# --- loading the previous stages -----------------------------------------------------------


def load_models(config, workdir: str, setup: rollout.Setup, c) -> dict[str, Any]:
  """policy / ref (the SFT export, or `c.init_dir` / `c.ref_dir`'s), reward (the RM
  export), value (the RM, or the starting policy's trunk)."""
  policy = sft.load_policy(config, workdir, setup.mesh, setup.rules, c.init_dir)
  ref = policy
  if c.ref_dir != c.init_dir:
    ref = sft.load_policy(config, workdir, setup.mesh, setup.rules, c.ref_dir)
  reward, info = rm.load_reward_model(config, workdir, setup.mesh, setup.rules)
  if c.value_init == rm.STAGE:
    value = reward
  else:
    dtype = jnp.dtype(config.model.param_dtype)
    value = jax.jit(
      lambda p: rollout.value_from_policy(p, dtype), out_shardings=setup.shardings.value
    )(policy)
  return {"policy": policy, "ref": ref, "reward": reward, "value": value, "rm_info": info or {}}


# --- the driver ------------------------------------------------------------------------------


def save_adapters(setup, state, out_dir: str, config, workdir: str, c) -> dict:
  """With LoRA: the policy's adapters (their EMA when kept) alone to `out_dir/lora`, and
  params.json's `lora` entry (`common.write_adapters`); {} without."""
  if setup.adapters is None:
    return {}
  trained = rollout.trained_policy(state)
  base = c.init_dir  # the policy's base: the SFT export's, or init_dir's
  return common.write_adapters(out_dir, trained, setup.adapters, config, workdir, sft.STAGE, base)


def gold_eval(
  setup: rollout.Setup, params, tok, records, *, c, seed: int, prefix: str = settings.PREFIX
) -> dict[str, float]:
  """Mean gold-judge score (and response length) of the policy on fixed prompts, as
  `<prefix>/gold_score` (the RL stages without a value model use it too)."""
  records = [r for r in records if "task" in r]
  if not records:
    return {}
  texts = common.generate(
    setup.model_cfg,
    params,
    tok,
    [r["messages"] for r in records],
    jax.random.PRNGKey(seed),
    max_new_tokens=c.max_new_tokens,
    temperature=c.eval_temperature,
    batch_size=sharding.round_to_batch_shards(len(records), setup.mesh),
    max_prompt_len=c.prompt_len,
    mesh=setup.mesh,
  )
  scores = [judge.score(r["task"], t) for r, t in zip(records, texts, strict=True)]
  return {
    f"{prefix}/gold_score": float(np.mean(scores)),
    f"{prefix}/eval_response_words": float(np.mean([len(t.split()) for t in texts])),
  }


def gold_evals(setup: rollout.Setup, state, tok, records, *, c, seed: int) -> dict[str, float]:
  """`gold_eval` of what the run exports and, when that is the EMA, of the policy too
  (`<metric>_raw`: the EMA lags the policy that `score` and `kl` describe)."""
  out = gold_eval(setup, rollout.exported(state, setup.adapters), tok, records, c=c, seed=seed)
  if state.ema is not None:
    updated = float(jax.device_get(state.ema["weight"])) > 0  # (else: the policy itself)
    policy = rollout.exported(state, setup.adapters, state.policy)
    raw = gold_eval(setup, policy, tok, records, c=c, seed=seed) if updated else out
    out.update({f"{k}_raw": v for k, v in raw.items()})
  return out


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, stage: str = STAGE
) -> dict[str, Any]:
  """PPO from the SFT and RM exports (or resume) with the config section `stage` (also
  its directory and name: PPO-ptx's module passes its own); export the final policy.
  Returns the final metrics."""
  if (done := common.recorded_metrics(config, workdir, stage, f"configs/{stage}.py")) is not None:
    return done
  out_dir = common.stage_dir(workdir, stage)
  c = config[stage]
  start = time.time()
  tok = common.load_tokenizer(config, workdir)
  setup = rollout.make_setup(config, c, key=stage)
  files = {}
  it, eval_records = data(config, workdir, c, stage, tok, files)
  ckpt, writer, state, resumed = common.open_run(
    out_dir, c, setup.abstract, it, stage, unit="iteration"
  )
  rm_info = checkpoints.params_info(common.stage_dir(workdir, rm.STAGE)) or {}
  if not resumed:
    models = load_models(config, workdir, setup, c)
    rm_info = models.pop("rm_info")
    state = rollout.init_state(
      setup, c, **models, reward_bias=c.reward_bias, seed=config.seed + 6, guard=config.get("guard")
    )
  step_fn = iteration.jit_train_step(setup, c, config.get("guard"))

  def evaluate(state, step):
    return gold_evals(setup, state, tok, eval_records, c=c, seed=config.seed)

  print(
    f"{stage}: {c.num_iterations} iterations of {c.batch_size} episodes ({c.num_epochs} "
    f"epochs x {c.num_minibatches} minibatches, {settings.ptx_rows(c)} ptx rows)"
  )
  state = run_iterations(
    setup, c, state, step_fn, it, ckpt, writer, evaluate, stage, config.get("guard")
  )
  summary = common.finish(
    out_dir,
    rollout.exported(state, setup.adapters),
    config,
    start,
    ckpt,
    writer,
    stage=stage,
    heads=list(rollout.POLICY_HEADS),
    rm_reward_bias=rm_info.get("reward_bias"),
    data_files=files,
    **save_adapters(setup, state, out_dir, config, workdir, c),
  )
  print(
    f"{stage}: RM score {summary.get(f'{settings.PREFIX}/score', float('nan')):.3f}, "
    f"gold score {summary.get(f'{settings.PREFIX}/gold_score', float('nan')):.3f}"
  )
  return summary
