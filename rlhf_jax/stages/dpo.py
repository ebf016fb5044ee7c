"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023)
on the comparisons, with SFT as the reference.

  rlhf-jax dpo      --config configs/dpo.py --workdir DIR   # data .. comparisons, then DPO
  rlhf-jax pipeline --config configs/dpo.py --workdir DIR   # the recipe with DPO beside PPO

Each batch element is one comparison: its prompt once and its K ranked responses (the
RM's packed layout, `data/ranking.py`), so every ordered pair (winner, loser) of a
K-wise ranking is in the loss together, as the RM's are. With the log-ratio
h_k = log pi(y_k | x) - log pi_SFT(y_k | x) of each response (summed over its tokens):

  DPO  loss_b = mean over pairs (w, l) of  -log sigmoid(beta (h_w - h_l))
  IPO  loss_b = mean over pairs (w, l) of  (h_w - h_l - 1 / (2 beta))^2

and the loss is the mean over comparisons (each weighted equally whatever its K, as
InstructGPT weights its RM's pairs). For K = 2 both are the papers' losses; DPO's is
`losses.pairwise_loss` on the implicit rewards beta h. The reference's log-probs are
computed once, before training, from the exported SFT policy (`reference_logps`): the
reference is frozen, so they are what a reference model in the train state would give
at every step, at the cost of one forward pass. Validation: the loss and the implicit
reward's pairwise accuracy against the labelers and the gold judge on the validation
comparisons, and the gold score of sampled replies, as SFT reports it.

Writes `DIR/dpo/{checkpoints,metrics.jsonl,tb,params,params.json}` (the policy `dpo`,
scored by `eval`, served by `sample --policy dpo`); resumes from the latest checkpoint.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import losses, ranges, rl, sharding
from rlhf_jax.data import ranking
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import TransformerConfig, apply
from rlhf_jax.stages import common, comparisons, rm, sft
from rlhf_jax.train import loop, optim, train_state

STAGE = "dpo"
LOSSES = ("dpo", "ipo")
# The packed ranking layout's fields the step reads, and the reference's log-probs.
BATCH_NDIMS = {
  "tokens": 2,
  "segment_ids": 2,
  "positions": 2,
  "prompt_len": 2,
  "rank": 2,
  "ref_logp": 2,
}
RANGES = {
  "beta": "> 0",
  "max_responses": ">= 2",
  "packed_len": ">= 2",
  "gold_eval_prompts": ">= 0",
}


def dpo_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.loss = "dpo"  # dpo | ipo
  c.beta = 0.1  # DPO: the implicit reward's scale; IPO: the margin is 1 / (2 beta)
  c.batch_size = 16  # comparisons per step (each all K responses of a prompt)
  c.num_epochs = 2  # passes over the train comparisons
  c.packed_len = 224  # tokens of a comparison's row (rm.packed_len's default)
  c.max_responses = 9  # K_max; comparisons with more are skipped
  c.dropout = 0.0  # off: the policy's and the reference's log-probs should be comparable
  c.seed = 0  # the order of the comparisons (0 = config.seed's, `common.stage_seed`)
  c.optim = optim.optim_config(lr=1e-4, warmup_steps=10, end_lr_frac=0.1)
  c.eval_batch_size = 32  # comparisons per evaluation / reference batch
  c.log_every = 10
  c.eval_every = 0  # 0 = evaluate at the end only
  c.gold_eval_prompts = 128  # validation prompts sampled for the gold score
  c.eval_temperature = 1.0  # the policy's own distribution (what eval scores)
  c.max_new_tokens = 48
  c.save_every = 100
  c.keep_checkpoints = 2
  if runlocal:
    c.batch_size, c.num_epochs, c.eval_batch_size = 8, 3, 8
    c.log_every, c.save_every, c.gold_eval_prompts, c.max_new_tokens = 2, 10, 8, 16
    c.optim.warmup_steps, c.optim.lr = 2, 1e-3  # (1e-4 barely moves 12 steps)
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  """Its fields inside `RANGES` and a known loss."""
  ranges.check(c, key, RANGES)
  if c.loss not in LOSSES:
    raise UserInputError(f"config.{key}.loss: must be one of {LOSSES}, got {c.loss!r}")


# --- pure functions ------------------------------------------------------------------------


def response_logps(
  model_cfg: TransformerConfig, params, batch: dict[str, jax.Array], rng: jax.Array | None = None
) -> jax.Array:
  """f32[B, K]: log pi(response k | prompt), summed over its tokens (its EOS included).

  batch (packed ranking rows): tokens / segment_ids / positions int32[B, L] — the prompt
  (segment 1), then response k (segment 2 + k) — and prompt_len int32[B, K]. A
  response's first token is predicted at the prompt's last position (every response
  follows the prompt), the others at the token before them in the same response.
  Padded responses give 0.
  """
  train = rng is not None and model_cfg.dropout > 0
  tokens, seg = batch["tokens"], batch["segment_ids"]
  out, _ = apply(
    model_cfg,
    params,
    tokens,
    batch["positions"],
    seg,
    deterministic=not train,
    rngs={"dropout": rng} if train else None,
    shared_prefix=True,
  )
  b, length = tokens.shape
  k = batch["prompt_len"].shape[1]
  idx = jnp.arange(length)[None, :]
  prev_seg = jnp.concatenate([jnp.zeros((b, 1), seg.dtype), seg[:, :-1]], axis=1)
  prompt_last = jnp.maximum(batch["prompt_len"][:, :1] - 1, 0)  # [B, 1] (every k the same)
  source = jnp.where(prev_seg == seg, idx - 1, prompt_last)  # [B, L]
  logits = jnp.take_along_axis(out["lm"], source[..., None], axis=1)
  logp = rl.token_logprobs(logits, tokens)  # [B, L]
  which = seg[..., None] == 2 + jnp.arange(k)[None, None, :]  # [B, L, K]
  return jnp.sum(jnp.where(which, logp[..., None], 0.0), axis=1)


def preference_loss_sum(
  logratio: jax.Array, rank: jax.Array, beta: float, kind: str = "dpo"
) -> tuple[jax.Array, jax.Array]:
  """(sum over comparisons of their mean pair loss, comparisons with a pair), f32[].

  logratio: f32[B, K] = log pi(y_k) - log pi_ref(y_k); rank: int32[B, K] (0 = best,
  -1 = padded). `kind` dpo: -log sigmoid(beta (h_w - h_l)); ipo: (h_w - h_l - 1/(2 beta))^2.
  """
  if kind == "dpo":
    return losses.pairwise_loss_sum(beta * logratio, rank)
  pairs = losses.ranking_pairs(rank)
  margin = logratio[:, :, None] - logratio[:, None, :]  # [B, K, K]: h_i - h_j
  sq = jnp.where(pairs, (margin - 1.0 / (2.0 * beta)) ** 2, 0.0).sum(axis=(1, 2))
  n_pairs = pairs.sum(axis=(1, 2))
  has = n_pairs > 0
  per_element = jnp.where(has, sq / jnp.maximum(n_pairs, 1), 0.0)
  return per_element.sum(), has.sum().astype(jnp.float32)


def train_step(
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  *,
  model_cfg: TransformerConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  beta: float,
  kind: str = "dpo",
  ema_decay: float = 0.0,
  grad_accum: int = 1,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimiser step on the DPO / IPO loss of a batch of comparisons (over
  `grad_accum` microbatches of whole comparisons)."""

  def sum_loss(params, mb, rng):
    h = response_logps(model_cfg, params, mb, rng) - mb["ref_logp"]
    return preference_loss_sum(h, mb["rank"], beta, kind), h

  loss, _, h, grads = train_state.accumulated_grads(
    sum_loss, state.params, batch, train_state.step_rng(state), grad_accum
  )
  new_state = state.apply_gradients(grads, tx, ema_decay, loss=loss)
  pairs = losses.ranking_pairs(batch["rank"])
  correct, n_pairs = losses.pairwise_correct(h, pairs)
  valid = batch["rank"] >= 0
  best, worst = batch["rank"] == 0, valid & (batch["rank"] == batch["rank"].max(-1, keepdims=True))
  mean_at = lambda m: jnp.sum(jnp.where(m, h, 0.0)) / jnp.maximum(m.sum(), 1)
  metrics = {
    f"{STAGE}/loss": loss,
    f"{STAGE}/accuracy": correct / jnp.maximum(n_pairs, 1.0),
    f"{STAGE}/logratio": mean_at(valid),
    f"{STAGE}/logratio_best": mean_at(best),
    f"{STAGE}/logratio_worst": mean_at(worst),
    f"{STAGE}/grad_norm": train_state.global_norm(grads),
    f"{STAGE}/lr": schedule(state.step) * state.guard.lr_scale,
  }
  return new_state, optim.guarded_metrics(metrics, new_state.guard)


# --- the stage ----------------------------------------------------------------------------------


def _jit_logps(setup: common.Setup, model_cfg: TransformerConfig):
  nd = {k: v for k, v in BATCH_NDIMS.items() if k != "ref_logp"}
  return jax.jit(
    functools.partial(response_logps, model_cfg),
    in_shardings=(
      setup.shardings.params,
      {k: sharding.batch_sharding(setup.mesh, n) for k, n in nd.items()},
    ),
    out_shardings=sharding.batch_sharding(setup.mesh, 2),
  ), nd


def reference_logps(logps_fn, params, records, tok, c, put) -> np.ndarray:
  """f32[N, K_max]: the reference's log-prob of every response of every record (0 for
  records the layout skips and padded responses), by record index."""
  out = np.zeros((len(records), c.max_responses), np.float32)
  batches, _ = ranking.fixed_batches(
    records,
    tok,
    batch_size=c.eval_batch_size,
    seq_len=c.packed_len,
    max_responses=c.max_responses,
    packed_len=c.packed_len,
  )
  for batch in batches:
    logp = sharding.to_host(logps_fn(params, put(batch)))
    real = batch["index"] >= 0
    out[batch["index"][real]] = logp[real]
  return out


def _with_ref(batch: dict[str, np.ndarray], table: np.ndarray) -> dict[str, np.ndarray]:
  return {**batch, "ref_logp": table[np.maximum(batch["index"], 0)]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train the policy from SFT on the comparisons (or resume); export it."""
  if (done := common.recorded_metrics(config, workdir, STAGE, "configs/dpo.py")) is not None:
    return done
  out_dir = common.stage_dir(workdir, STAGE)
  c = config.dpo
  validate(c)
  start = time.time()
  tok = common.load_tokenizer(config, workdir)
  train_records = comparisons.load(workdir, "train")
  val_records = comparisons.load(workdir, "validation")
  kw = dict(seq_len=c.packed_len, max_responses=c.max_responses, packed_len=c.packed_len)
  data = ranking.ranking_batches(
    train_records,
    tok,
    batch_size=common.batch_rows(c.batch_size, "dpo.batch_size", config.mesh),
    seed=common.stage_seed(config.seed, c.seed),
    **kw,
  )
  usable = data.stats["records"] - sum(v for k, v in data.stats.items() if k.startswith("skip"))
  num_steps = max(1, c.num_epochs * usable // c.batch_size)

  setup = common.create_state(config, c.optim, num_steps, seed_offset=5, dropout=c.dropout)
  it = iter(data)
  ckpt, writer, setup.state, resumed = common.open_run(out_dir, c, setup.state, it, STAGE)
  eval_cfg = common.model_config(config)  # no dropout
  logps_fn, nd = _jit_logps(setup, eval_cfg)
  put_plain = lambda b: sharding.put_batch({k: b[k] for k in nd}, setup.mesh)
  reference = sft.load_policy(config, workdir, setup.mesh, setup.rules)
  with sharding.use(setup.mesh, setup.rules):
    ref_train = reference_logps(logps_fn, reference, train_records, tok, c, put_plain)
    ref_val = reference_logps(logps_fn, reference, val_records, tok, c, put_plain)
  if not resumed:
    setup = common.replace_params(setup, reference)
  del reference

  step_fn = common.jit_step(
    train_step,
    setup,
    BATCH_NDIMS,
    model_cfg=setup.model_cfg,
    tx=setup.tx,
    schedule=optim.lr_schedule(c.optim, num_steps),
    beta=float(c.beta),
    kind=c.loss,
    ema_decay=c.optim.ema_decay,
    grad_accum=common.grad_accum(c, STAGE),
  )
  put = lambda b: sharding.put_batch(
    {k: v for k, v in _with_ref(b, ref_train).items() if k in BATCH_NDIMS}, setup.mesh
  )
  gold_records = [r for r in common.world_source(config, workdir, "demonstrations", "validation")][
    : c.gold_eval_prompts
  ]
  info_cache: dict[str, Any] = {}

  def evaluate(state, step):
    params = common.final_params(state)
    batches, _ = ranking.fixed_batches(val_records, tok, batch_size=c.eval_batch_size, **kw)
    h, rank, index = rm.score(logps_fn, params, batches, put_plain)
    h = h - ref_val[index]
    if "info" not in info_cache:
      info_cache["info"] = ranking.pair_info(val_records, index, c.max_responses)
    out = rm.ranking_metrics(h, rank, *info_cache["info"], prefix=STAGE)
    total, count = preference_loss_sum(jnp.asarray(h), jnp.asarray(rank), float(c.beta), c.loss)
    out[f"{STAGE}/val_loss"] = float(total / max(float(count), 1.0))
    out.update(
      sft.gold_eval(
        setup,
        params,
        tok,
        gold_records,
        max_new_tokens=c.max_new_tokens,
        temperature=c.eval_temperature,
        seed=config.seed,
        prefix=STAGE,
      )
    )
    return out

  print(f"{STAGE}: {usable} usable comparisons, {num_steps} steps of {c.batch_size} ({c.loss})")
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
      eval_at_start=True,  # step 0: SFT itself (the curves' baseline)
      desc=STAGE,
      guard=config.get("guard"),
    )
  return common.finish(
    out_dir, common.final_params(state), config, start, ckpt, writer, stage=STAGE
  )
