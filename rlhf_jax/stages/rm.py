"""Stage 3b: the reward model — a scalar head on the SFT transformer, trained on rankings.

  rlhf-jax rm --config configs/default.py --workdir DIR

Initialised from the SFT policy (`DIR/sft`): the LM head is dropped and a zero scalar
head added, so every reward starts at 0 (or, `init_dir`, from another exported RM: an
earlier round's, `stages/rounds.py`). The reward of a response is the scalar head
at its last token (the EOS that ends the assistant turn). Each batch element holds one
comparison — all K responses of a prompt, packed after one copy of the prompt
(`packed_len`; 0 = one padded sequence per response) — and the loss covers all C(K, 2)
pairs of it (`losses.pairwise_loss`), so a prompt's pairs are never split across
batches or epochs.

After training, a bias is added so that the mean reward over the labelers'
demonstrations (SFT's train data: `config.sft.data_file` or the world's) is 0. It is
folded into the scalar head's bias and also recorded as `reward_bias` in
`DIR/rm/params.json`: the exported parameters give normalised rewards as they are.

Validation reports pairwise accuracy against the labelers' rankings
(`rm/val_accuracy`, over pairs of distinct responses: a policy's samples repeat, and a
labeler orders identical ones by chance) and against the gold judge's order of the
same responses (`rm/val_gold_accuracy`; pairs the judge scores equal are left out).
A reward tie counts one half. Input: the
comparisons written by `rlhf_jax.stages.comparisons` (`DIR/comparisons/*.jsonl`).
Writes `DIR/rm/{checkpoints,metrics.jsonl,tb,params,params.json}` (with LoRA, adapters and
the head train over the frozen trunk: `params` merged, `lora/` them alone); resumes from
the latest checkpoint; skipped once exported.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import lora, losses, ranges, sharding
from rlhf_jax.data import ranking
from rlhf_jax.models import TransformerConfig, abstract_params, apply
from rlhf_jax.stages import common, comparisons, sft
from rlhf_jax.train import checkpoints, loop, optim, train_state

STAGE = "rm"
HEADS = ("scalar",)
# Ranking batch fields the steps read, with their ranks ([B, K, T] and [B, K]); packed:
# [B, L] token fields.
BATCH_NDIMS = {"tokens": 3, "segment_ids": 3, "positions": 3, "last_index": 2, "rank": 2}
PACKED_BATCH_NDIMS = {**BATCH_NDIMS, "tokens": 2, "segment_ids": 2, "positions": 2}
# A ranking compares two or more; packed_len 0 = the padded layout.
RANGES = {"max_responses": ">= 2", "bias_demos": ">= 0", "packed_len": ">= 0"}


def batch_ndims(c: ml_collections.ConfigDict) -> dict[str, int]:
  """The batch fields and ranks of `config.rm`'s layout."""
  return PACKED_BATCH_NDIMS if c.packed_len else BATCH_NDIMS


def rm_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Comparisons per step; each element holds all K responses of a prompt. On the default
  # world (2,000 comparisons sampled from the tiny SFT policy, lr 1e-3, batch 16) the
  # validation accuracy against the labelers / the gold judge was 0.672 / 0.789 after 2
  # epochs at seq_len 64 and 0.676 / 0.799 after 3 (1.5x the time; PPO's win rate against
  # SFT did not move: 0.712 vs 0.713); 1 epoch at seq_len 96: 0.641 / 0.744, and PPO's
  # win rate fell to 0.652. The gold judge itself agrees with the labelers on ~0.77.
  c.batch_size = 16
  c.num_epochs = 2  # passes over the train comparisons (the paper: 1)
  c.num_steps = 0  # optimiser steps; 0 = num_epochs over the data
  c.max_comparisons = 0  # train on the first N train comparisons; 0 = all (data scaling)
  c.extra_comparisons = ""  # comparisons dirs (comma-separated) trained on too (rounds)
  c.init_dir = ""  # an exported RM to start from ("" = the SFT trunk, zero scalar head)
  c.seed = 0  # the order of the comparisons (0 = config.seed's, `common.stage_seed`)
  # Prompt + response tokens (a long prompt is cut from the left): 96% of the default
  # world's sequences fit in 64, and the step costs 2/3 of seq_len 96's. The padded
  # layout's, and the rows of the demonstrations the reward bias is measured on.
  c.seq_len = 64
  # Tokens of a packed comparison (its prompt once, then its K responses); 0 = the padded
  # layout, K sequences of seq_len. The default world's 1,983 train comparisons hold 92
  # tokens on average packed (p99 208, max 245): 224 fits all but 3 uncut (their prompts
  # cut from the left; none skipped) in 39% of the padded layout's 9 x 64 token slots,
  # and its step takes ~1.8x less time (experiments/bench_stages.py); 256: ~1.5x.
  c.packed_len = 224
  c.max_responses = 9  # K_max (= world.rank_k_max); comparisons with more are skipped
  c.dropout = 0.0  # residual / attention dropout while training
  c.optim = optim.optim_config(lr=1e-3, warmup_steps=20, end_lr_frac=0.1, weight_decay=0.1)
  c.eval_batch_size = 32  # comparisons per evaluation batch
  c.bias_demos = 0  # train demonstrations averaged for the reward bias; 0 = all
  c.log_every = 10
  c.eval_every = 0  # validation accuracy every N steps; 0 = at the end only
  c.save_every = 100  # checkpoint every N steps (and at the end)
  c.keep_checkpoints = 2
  if runlocal:
    c.batch_size, c.num_epochs, c.seq_len, c.eval_batch_size = 8, 1, 64, 8
    c.log_every, c.save_every, c.bias_demos = 2, 10, 16
    c.optim.warmup_steps = 2
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  """Its own fields inside `RANGES` (the registry's config hook; config_lib: the rest)."""
  ranges.check(c, key, RANGES)


# --- pure functions ------------------------------------------------------------------------


def rewards(
  model_cfg: TransformerConfig, params, batch: dict[str, jax.Array], rng: jax.Array | None = None
) -> jax.Array:
  """f32[B, K]: the scalar head at each response's last token (its EOS).

  batch: tokens / segment_ids / positions int32[B, K, T], last_index int32[B, K]. The
  K responses are one [B * K, T] forward pass; padded responses (segment ids 0) give
  finite values that the losses mask out. `rng` turns dropout on (if configured).
  Packed (`ranking` with `packed_len`): token fields int32[B, L], one forward pass with
  the shared-prefix mask, last_index into L.
  """
  train = rng is not None and max(model_cfg.dropout, model_cfg.lora_dropout) > 0
  if batch["tokens"].ndim == 2:
    out, _ = apply(
      model_cfg,
      params,
      batch["tokens"],
      batch["positions"],
      batch["segment_ids"],
      deterministic=not train,
      rngs={"dropout": rng} if train else None,
      heads=HEADS,
      shared_prefix=True,
    )
    return jnp.take_along_axis(out["scalar"], batch["last_index"], axis=1)
  b, k, t = batch["tokens"].shape
  flat = lambda x: x.reshape(b * k, t)
  out, _ = apply(
    model_cfg,
    params,
    flat(batch["tokens"]),
    flat(batch["positions"]),
    flat(batch["segment_ids"]),
    deterministic=not train,
    rngs={"dropout": rng} if train else None,
    heads=HEADS,
  )
  return losses.gather_last(out["scalar"].reshape(b, k, t), batch["last_index"])


def train_step(
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  *,
  model_cfg: TransformerConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  ema_decay: float = 0.0,
  grad_accum: int = 1,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimiser step on the pairwise ranking loss of a batch of comparisons (over
  `grad_accum` microbatches of whole comparisons taken one at a time)."""

  def sum_loss(params, mb, rng):  # (with LoRA: `params` are the adapters and the head)
    r = rewards(model_cfg, train_state.model_params(state, params), mb, rng)
    return losses.pairwise_loss_sum(r, mb["rank"]), r

  loss, _, r, grads = train_state.accumulated_grads(
    sum_loss, state.params, batch, train_state.step_rng(state), grad_accum
  )
  new_state = state.apply_gradients(grads, tx, ema_decay, loss=loss)
  correct, pairs = losses.pairwise_correct(r, losses.ranking_pairs(batch["rank"]))
  valid = batch["rank"] >= 0
  n = jnp.maximum(valid.sum(), 1)
  mean = jnp.sum(jnp.where(valid, r, 0.0)) / n
  metrics = {
    f"{STAGE}/loss": loss,
    f"{STAGE}/accuracy": correct / jnp.maximum(pairs, 1.0),
    f"{STAGE}/pairs": pairs,
    f"{STAGE}/reward_mean": mean,
    f"{STAGE}/reward_std": jnp.sqrt(jnp.sum(jnp.where(valid, (r - mean) ** 2, 0.0)) / n),
    f"{STAGE}/grad_norm": train_state.global_norm(grads),
    f"{STAGE}/lr": schedule(state.step) * state.guard.lr_scale,
  }
  return new_state, optim.guarded_metrics(metrics, new_state.guard)


def eval_step(params, batch: dict[str, jax.Array], *, model_cfg: TransformerConfig) -> jax.Array:
  """f32[B, K] rewards of a batch (no dropout); metrics are computed over a whole set."""
  return rewards(model_cfg, params, batch)


def reward_params_from_policy(policy_params, dtype=jnp.float32):
  """RM parameters from an LM policy's: `lm_head` dropped, a zero `scalar_head` added."""
  params = {k: v for k, v in policy_params.items() if k != "lm_head"}
  d_model = policy_params["embed"]["embedding"].shape[-1]
  params["scalar_head"] = {
    "kernel": jnp.zeros((d_model, 1), dtype),
    "bias": jnp.zeros((1,), dtype),
  }
  return params


def add_bias(params, bias: float):
  """Params whose rewards are all shifted by `bias` (folded into the scalar head)."""
  head = params["scalar_head"]
  return {**params, "scalar_head": {**head, "bias": head["bias"] + bias}}


# --- evaluation over whole sets ---------------------------------------------------------------


def score(
  eval_fn: Callable, params, batches: Iterator[dict[str, np.ndarray]], put: Callable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rewards f32[N, K], ranks int32[N, K] and source indices int32[N] of every element."""
  out_r, out_rank, out_index = [], [], []
  for batch in batches:
    r = sharding.to_host(eval_fn(params, put(batch)))
    real = batch["index"] >= 0
    out_r.append(r[real])
    out_rank.append(batch["rank"][real])
    out_index.append(batch["index"][real])
  return np.concatenate(out_r), np.concatenate(out_rank), np.concatenate(out_index)


def ranking_metrics(
  r: np.ndarray,
  rank: np.ndarray,
  gold: np.ndarray | None = None,
  known: np.ndarray | None = None,
  same: np.ndarray | None = None,
  prefix: str = STAGE,
) -> dict[str, float]:
  """Validation loss and pairwise accuracies of rewards r f32[N, K].

  `val_accuracy`: against the ranking `rank` int32[N, K], over pairs of distinct
  responses (`same` bool[N, K, K] marks identical texts: a labeler orders those by
  chance); `val_gold_accuracy`: against the gold scores `gold` f32[N, K] where `known`,
  gold ties left out. Reward ties count one half. Keys `<prefix>/val_*` (DPO's implicit
  rewards: `dpo`).
  """
  r, rank = jnp.asarray(r), jnp.asarray(rank)
  pairs = losses.ranking_pairs(rank)
  if same is not None:
    pairs &= ~jnp.asarray(same)
  correct, total = losses.pairwise_correct(r, pairs)
  out = {
    f"{prefix}/val_loss": float(losses.pairwise_loss(r, rank)),
    f"{prefix}/val_accuracy": float(correct / jnp.maximum(total, 1.0)),
    f"{prefix}/val_pairs": float(total),
  }
  if gold is not None:
    g_pairs = losses.preference_pairs(jnp.asarray(gold), jnp.asarray(known) & (rank >= 0))
    g_correct, g_total = losses.pairwise_correct(r, g_pairs)
    if g_total > 0:
      out[f"{prefix}/val_gold_accuracy"] = float(g_correct / g_total)
      out[f"{prefix}/val_gold_pairs"] = float(g_total)
  return out


def demonstration_records(config, workdir: str, limit: int = 0) -> list[dict[str, Any]]:
  """The demonstrations SFT learnt from (`config.sft.data_file` when set, else the
  world's train split), as one-response comparisons (prompt, demonstrated answer)."""
  source = sft.demonstrations(config, workdir)
  n = min(len(source), limit or len(source))
  out = []
  for i in range(n):
    messages = source[i]["messages"]
    out.append({"messages": messages[:-1], "responses": [messages[-1]["content"]], "ranking": [0]})
  return out


def mean_reward(
  eval_fn, params, records, tok, *, batch_size: int, seq_len: int, put, packed_len: int = 0
) -> float:
  """Mean reward of one-response records (e.g. `demonstration_records`)."""
  batches, _ = ranking.fixed_batches(
    records, tok, batch_size=batch_size, seq_len=seq_len, max_responses=1, packed_len=packed_len
  )
  r, _, _ = score(eval_fn, params, batches, put)
  return float(r[:, 0].mean())


# --- loading the exported reward model ---------------------------------------------------


def load_reward_model(
  config: ml_collections.ConfigDict, workdir: str, mesh, rules, directory: str = ""
):
  """The exported (bias-normalised) RM parameters on `mesh`, and its params.json: the
  run's (`DIR/rm`) or `directory`'s (relative to `workdir`)."""
  common.ensure_imported(config, workdir, STAGE, head="scalar")
  like = abstract_params(config.model, HEADS, mesh, rules)
  out_dir = common.resolve(workdir, directory) if directory else common.stage_dir(workdir, STAGE)
  params = checkpoints.load_params(
    out_dir, like, config.model.to_dict(), tokenizer=common.tokenizer_of(config, workdir)
  )
  return params, checkpoints.params_info(out_dir)


def summary(workdir: str) -> dict[str, Any]:
  """The reward model's entry in `summary.json`: its validation accuracies and reward bias
  from `DIR/rm/params.json` (null where absent)."""
  info = checkpoints.params_info(common.stage_dir(workdir, STAGE)) or {}
  m = info.get("metrics") or {}
  return {
    "val_accuracy": m.get(f"{STAGE}/val_accuracy"),
    "val_gold_accuracy": m.get(f"{STAGE}/val_gold_accuracy"),
    "reward_bias": info.get("reward_bias"),
  }


def accuracy(config, workdir: str, records: list[dict], directory: str = "") -> dict[str, Any]:
  """`ranking_metrics` (`rm/val_accuracy`: labelers, `rm/val_gold_accuracy`: the gold
  judge) of the RM `load_reward_model` loads on the comparisons `records`."""
  c = config.rm
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  params, _ = load_reward_model(config, workdir, mesh, rules, directory)
  tok = common.load_tokenizer(config, workdir)
  eval_fn = jax.jit(functools.partial(eval_step, model_cfg=common.model_config(config)))
  put = lambda b: sharding.put_batch({k: b[k] for k in batch_ndims(c)}, mesh)
  batches, _ = ranking.fixed_batches(
    records,
    tok,
    batch_size=c.eval_batch_size,
    seq_len=c.seq_len,
    max_responses=c.max_responses,
    packed_len=c.packed_len,
  )
  with sharding.use(mesh, rules):
    r, rank, index = score(eval_fn, params, batches, put)
  return ranking_metrics(r, rank, *ranking.pair_info(records, index, c.max_responses))


def evaluate_imported(config: ml_collections.ConfigDict, workdir: str, info: dict) -> dict:
  """An imported RM's accuracy on the run's validation comparisons (when there are any),
  recorded in its params.json like a trained one's; returns the metrics."""
  if not comparisons.is_complete(workdir):
    print(f"{STAGE}: no comparisons in {workdir}: imported RM not evaluated")
    return info.get("metrics", {})
  metrics = accuracy(config, workdir, comparisons.load(workdir, "validation"))
  checkpoints.write_params_info(common.stage_dir(workdir, STAGE), {**info, "metrics": metrics})
  fmt = lambda k: "n/a" if metrics.get(k) is None else f"{metrics[k]:.3f}"
  print(
    f"{STAGE}: imported RM's val accuracy {fmt(f'{STAGE}/val_accuracy')} (labelers), "
    f"{fmt(f'{STAGE}/val_gold_accuracy')} (gold judge)"
  )
  return metrics


# --- the driver ------------------------------------------------------------------------------


def _batch_shardings(mesh, ndims: dict[str, int]) -> dict[str, jax.sharding.NamedSharding]:
  return {k: sharding.batch_sharding(mesh, n) for k, n in ndims.items()}


def create_state(config: ml_collections.ConfigDict, num_steps: int) -> common.Setup:
  """A fresh RM state on the config's mesh (random trunk, zero scalar head; with LoRA,
  adapters and the head trained over the trunk)."""
  c = config.rm
  adapters = dict(adapters=lora.settings(config, STAGE), trained_fully=("scalar_head",))
  return common.create_state(
    config, c.optim, num_steps, heads=HEADS, seed_offset=3, dropout=c.dropout, **adapters
  )


def init_params(setup: common.Setup, config: ml_collections.ConfigDict, workdir: str):
  """Start `setup` from the SFT policy (its trunk, no LM head, a zero scalar head), or
  from the RM exported in `config.rm.init_dir`."""
  if config.rm.init_dir:
    params, _ = load_reward_model(config, workdir, setup.mesh, setup.rules, config.rm.init_dir)
    return common.replace_params(setup, params)
  policy = sft.load_policy(config, workdir, setup.mesh, setup.rules)
  dtype = jnp.dtype(config.model.param_dtype)
  params = jax.jit(
    lambda p: reward_params_from_policy(p, dtype), out_shardings=common.model_shardings(setup)
  )(policy)
  return common.replace_params(setup, params)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train the reward model (or resume), normalise and export it. Returns final metrics."""
  out_dir = common.stage_dir(workdir, STAGE)
  if common.is_complete(workdir, STAGE):
    print(f"{STAGE}: complete, skipping ({out_dir})")
    return checkpoints.params_info(out_dir).get("metrics", {})
  if (info := common.imported(config, workdir, STAGE, head="scalar")) is not None:
    return evaluate_imported(config, workdir, info)
  c = config.rm
  start = time.time()
  tok = common.load_tokenizer(config, workdir)
  train_records = comparisons.load(workdir, "train", also=c.extra_comparisons)
  if c.max_comparisons:
    train_records = train_records[: c.max_comparisons]
  val_records = comparisons.load(workdir, "validation")
  kw = dict(seq_len=c.seq_len, max_responses=c.max_responses, packed_len=c.packed_len)
  ndims = batch_ndims(c)
  data = ranking.ranking_batches(
    train_records,
    tok,
    batch_size=common.batch_rows(c.batch_size, "rm.batch_size", config.mesh),
    seed=common.stage_seed(config.seed, c.seed),
    **kw,
  )
  usable = data.stats["records"] - sum(v for k, v in data.stats.items() if k.startswith("skip"))
  num_steps = c.num_steps or max(1, c.num_epochs * usable // c.batch_size)

  setup = create_state(config, num_steps)
  it = iter(data)
  ckpt, writer, setup.state, resumed = common.open_run(out_dir, c, setup.state, it, STAGE)
  if not resumed:
    setup = init_params(setup, config, workdir)

  step_fn = common.jit_step(
    train_step,
    setup,
    ndims,
    model_cfg=setup.model_cfg,
    tx=setup.tx,
    schedule=optim.lr_schedule(c.optim, num_steps),
    ema_decay=c.optim.ema_decay,
    grad_accum=common.grad_accum(c, "rm"),
  )
  eval_cfg = common.model_config(config)  # no dropout at evaluation

  def jit_eval(nd):
    return jax.jit(
      functools.partial(eval_step, model_cfg=eval_cfg),
      in_shardings=(common.model_shardings(setup), _batch_shardings(setup.mesh, nd)),
      out_shardings=sharding.batch_sharding(setup.mesh, 2),
    )

  eval_fn = jit_eval(ndims)
  put = lambda b: sharding.put_batch({k: b[k] for k in ndims}, setup.mesh)
  eval_kw = dict(batch_size=c.eval_batch_size, **kw)
  info_cache: dict[str, Any] = {}
  final = lambda state: common.final_params(state, common.model_shardings(setup))

  def evaluate(state, step):
    batches, _ = ranking.fixed_batches(val_records, tok, **eval_kw)
    r, rank, index = score(eval_fn, final(state), batches, put)
    if "info" not in info_cache:  # the same elements, in the same order, every time
      info_cache["info"] = ranking.pair_info(val_records, index, c.max_responses)
    return ranking_metrics(r, rank, *info_cache["info"])

  print(f"{STAGE}: {usable} usable comparisons, {num_steps} steps of {c.batch_size}")
  with sharding.use(setup.mesh, setup.rules):
    state = loop.run_loop(
      state=setup.state,
      step_fn=step_fn,
      batches=it,
      data_iter=it,
      put=put,
      num_steps=num_steps,
      checkpointer=ckpt,
      writer=writer,
      log_every=c.log_every,
      eval_every=c.eval_every or num_steps,
      eval_fn=evaluate,
      desc=STAGE,
      guard=config.get("guard"),
    )
    params = final(state)
    demos = demonstration_records(config, workdir, c.bias_demos)
    # One response each: a padded row of seq_len is the packed row without its waste.
    demo_kw = dict(batch_size=c.eval_batch_size, seq_len=c.seq_len, put=put)
    demo_fn = jit_eval(BATCH_NDIMS) if c.packed_len else eval_fn
    before = mean_reward(demo_fn, params, demos, tok, **demo_kw)
    params = add_bias(params, -before)
    after = mean_reward(demo_fn, params, demos, tok, **demo_kw)
  bias_metrics = {
    f"{STAGE}/reward_bias": -before,
    f"{STAGE}/demo_reward_mean": after,
    f"{STAGE}/bias_demos": len(demos),
  }
  writer.write(num_steps, bias_metrics)
  meta = common.save_adapters(out_dir, state, config, workdir, sft.STAGE, c.init_dir)  # LoRA
  summary = common.finish(
    out_dir,
    params,
    config,
    start,
    ckpt,
    writer,
    stage=STAGE,
    heads=list(HEADS),
    reward_bias=-before,
    **meta,
  )
  acc = summary.get(f"{STAGE}/val_accuracy", float("nan"))
  gold = summary.get(f"{STAGE}/val_gold_accuracy", float("nan"))
  print(f"{STAGE}: val accuracy {acc:.3f} (labelers), {gold:.3f} (gold judge)")
  return summary
