"""Stage 2: supervised fine-tuning on labeler demonstrations.

  rlhf-jax sft --config configs/default.py --workdir DIR

Starts from the pretrained LM (`DIR/pretrain`), trains on demonstrations with the loss
on assistant tokens only (prompt and earlier user turns masked), for several epochs
with a cosine schedule and dropout, optionally mixing in pretraining batches (the paper
mixed 10%). The paper found that overfitting on validation loss still helped labeler
ratings, so besides the validation loss it reports a *sampled* gold-judge score on
validation prompts. Demonstrations come from the default world, or from
`config.sft.data_file` (JSONL `{prompt, response}` or `{messages}`). With LoRA
(`config.lora`) only adapters train over the frozen pretrained LM; the export is merged
(`DIR/sft/params`), the adapters alone are kept in `DIR/sft/lora`.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from rlhf_jax import lora, ranges, sharding
from rlhf_jax.data import judge, pipeline, user_data
from rlhf_jax.models import abstract_params
from rlhf_jax.stages import common, lm, pretrain
from rlhf_jax.train import checkpoints, loop, optim

STAGE = "sft"
RANGES = {
  "pretrain_mix": "[0, 1)",  # 1 would leave no demonstration in any batch
  "gold_eval_prompts": ">= 0",
}


def sft_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 32  # global batch, packed rows of seq_len tokens
  c.seq_len = 128
  c.num_epochs = 4  # passes over the demonstrations (the paper: 16)
  c.dropout = 0.1  # residual / attention dropout while fine-tuning (the paper: 0.2)
  c.pretrain_mix = 0.1  # share of batches drawn from the pretraining corpus (paper: 10%)
  c.optim = optim.optim_config(lr=1e-3, warmup_steps=20, end_lr_frac=0.0)
  c.data_file = ""  # a user's demonstrations JSONL instead of the generated ones
  c.skip_bad = False  # skip (and count) malformed records of data_file instead of stopping
  c.log_every = 20
  c.eval_every = 0  # 0 = evaluate at the end only
  c.gold_eval_prompts = 128  # validation prompts sampled for the gold-judge score
  c.eval_temperature = 0.0  # 0 = greedy responses for the gold score
  c.max_new_tokens = 48
  c.save_every = 100
  c.keep_checkpoints = 2
  if runlocal:
    c.batch_size, c.seq_len, c.num_epochs = 8, 96, 1
    c.log_every, c.save_every, c.gold_eval_prompts, c.max_new_tokens = 5, 10, 8, 16
    c.optim.warmup_steps = 2
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  """Its own fields inside `RANGES` (the registry's config hook; config_lib: the rest)."""
  ranges.check(c, key, RANGES)


def demonstrations(config, workdir):
  """Every demonstration SFT may learn from: the user's file (`config.sft.data_file`, all
  of it) or the world's train split."""
  sc = config.get(STAGE) or {}
  if sc.get("data_file"):
    return user_data.load_demonstrations(
      sc["data_file"], skip_bad=sc.get("skip_bad", False)
    ).records
  return common.world_source(config, workdir, "demonstrations", "train")


def sources(config, workdir, files: dict | None = None):
  """(train, validation) demonstration records: the user's file (10% held out) or the
  world's. `files` gets {path: what was read} of the user's file."""
  sc = config.sft
  if sc.data_file:
    loaded = user_data.load_demonstrations(sc.data_file, skip_bad=sc.skip_bad)
    if files is not None:
      files[sc.data_file] = loaded.stats.counts()
    return user_data.hold_out(loaded, 10, "validation")
  return (
    common.world_source(config, workdir, "demonstrations", "train"),
    common.world_source(config, workdir, "demonstrations", "validation"),
  )


def gold_eval(
  setup, params, tok, records, *, max_new_tokens, temperature, seed, prefix: str = STAGE
) -> dict:
  """Mean gold score (and per family) of responses sampled for validation prompts, as
  `<prefix>/gold_score[/family]`."""
  records = [r for r in records if "task" in r]
  if not records:
    return {}
  prompts = [r["messages"][:-1] for r in records]
  texts = common.generate(
    setup.model_cfg,
    params,
    tok,
    prompts,
    jax.random.PRNGKey(seed),
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    mesh=setup.mesh,
  )
  scores = np.asarray([judge.score(r["task"], t) for r, t in zip(records, texts, strict=True)])
  out = {f"{prefix}/gold_score": float(scores.mean())}
  for fam in sorted({r["family"] for r in records}):
    sel = [i for i, r in enumerate(records) if r["family"] == fam]
    out[f"{prefix}/gold_score/{fam}"] = float(scores[sel].mean())
  return out


def load_policy(config: ml_collections.ConfigDict, workdir: str, mesh, rules, directory: str = ""):
  """The SFT policy's exported parameters, placed on `mesh` (UserInputError if missing);
  imported first when `config.init` names it. `directory` (relative to `workdir`): another
  exported policy of the same model instead (an earlier round's PPO, `stages/rounds.py`)."""
  common.ensure_imported(config, workdir, STAGE)
  like = abstract_params(config.model, ("lm",), mesh, rules)
  return checkpoints.load_params(
    common.resolve(workdir, directory) if directory else common.stage_dir(workdir, STAGE),
    like,
    config.model.to_dict(),
    tokenizer=common.tokenizer_of(config, workdir),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tune from the pretrained LM (or resume); export the final params."""
  out_dir = common.stage_dir(workdir, STAGE)
  if common.is_complete(workdir, STAGE):
    print(f"{STAGE}: complete, skipping ({out_dir})")
    return checkpoints.params_info(out_dir).get("metrics", {})
  if (info := common.imported(config, workdir, STAGE)) is not None:
    return info.get("metrics", {})
  start = time.time()
  common.load_tokenizer(config, workdir)  # prepares the world first when it is not there
  files = {}
  train_src, val_src = sources(config, workdir, files)

  def init(like):
    common.ensure_imported(config, workdir, pretrain.STAGE)
    return checkpoints.load_params(
      common.stage_dir(workdir, pretrain.STAGE),
      like,
      config.model.to_dict(),
      tokenizer=common.tokenizer_of(config, workdir),
    )

  return fine_tune(
    config,
    workdir,
    config.sft,
    train_src,
    val_src,
    init,
    out_dir=out_dir,
    stage=STAGE,
    files=files,
    start=start,
    base_stage=pretrain.STAGE,
  )


def fine_tune(
  config: ml_collections.ConfigDict,
  workdir: str,
  sc: ml_collections.ConfigDict,
  train_src,
  val_src,
  init,
  *,
  out_dir: str,
  stage: str,
  files: dict,
  start: float,
  base_stage: str = STAGE,
  base_dir: str = "",
) -> dict:
  """SFT with section `sc` (sft_config's fields) on demonstration records `train_src`
  (validation loss and sampled gold score on `val_src`) from the params `init(like)`
  returns, or resume from `out_dir`'s checkpoints; export to `out_dir`, logging as
  `stage`. Expert iteration (`stages/expert_iteration.py`) runs it on best-of-n replies.
  With LoRA for `stage`, those params are the frozen base (`base_dir`, default
  `base_stage`'s export: recorded with the adapters)."""
  tok = common.load_tokenizer(config, workdir)
  batch = common.batch_rows(sc.batch_size, f"{stage}.batch_size", config.mesh)
  kw = dict(batch_size=batch, seq_len=sc.seq_len)
  epoch = lambda: pipeline.sft_batches(train_src, tok, seed=config.seed, num_epochs=1, **kw)
  steps_per_epoch = lm.batches_per_epoch(epoch)
  num_steps = max(1, round(sc.num_epochs * steps_per_epoch / (1.0 - sc.pretrain_mix)))
  data = pipeline.sft_batches(train_src, tok, seed=config.seed, **kw)
  if sc.pretrain_mix > 0:
    pretrain_src, _ = pretrain.sources(config, workdir, files)
    ptx = pipeline.pretrain_batches(pretrain_src, tok, seed=config.seed + 1, **kw)
    data = pipeline.mix([data, ptx], [1.0 - sc.pretrain_mix, sc.pretrain_mix])
  val_data = lambda: pipeline.sft_batches(
    val_src, tok, seed=0, num_epochs=1, shuffle=False, packed=False, **kw
  )

  adapters = lora.settings(config, stage)
  setup = common.create_state(config, sc.optim, num_steps, dropout=sc.dropout, adapters=adapters)
  it = iter(data)
  ckpt, writer, setup.state, resumed = common.open_run(out_dir, sc, setup.state, it, stage)
  if not resumed:
    setup = common.replace_params(setup, init(common.base_params(setup.state)))

  step_fn = common.jit_step(
    lm.train_step,
    setup,
    lm.LM_BATCH_NDIMS,
    model_cfg=setup.model_cfg,
    tx=setup.tx,
    schedule=optim.lr_schedule(sc.optim, num_steps),
    ema_decay=sc.optim.ema_decay,
    prefix=stage,
    grad_accum=common.grad_accum(sc, stage),
  )
  eval_cfg = common.model_config(config)  # no dropout at evaluation
  eval_fn = jax.jit(lambda p, b: lm.eval_step(p, b, model_cfg=eval_cfg))
  put = lambda b: sharding.put_batch(b, setup.mesh)
  val_records = [val_src[i] for i in range(min(len(val_src), sc.gold_eval_prompts))]

  def evaluate(state, step):
    params = common.final_params(state)
    out = {f"{stage}/val_loss": lm.evaluate_loss(eval_fn, params, val_data(), put)}
    out.update(
      gold_eval(
        setup,
        params,
        tok,
        val_records,
        max_new_tokens=sc.max_new_tokens,
        temperature=sc.eval_temperature,
        seed=config.seed,
        prefix=stage,
      )
    )
    return out

  print(f"{stage}: {steps_per_epoch} batches per epoch, {num_steps} steps")
  if adapters is not None:
    trained, total = lora.count(setup.state.params), lora.count(common.base_params(setup.state))
    print(f"{stage}: LoRA rank {adapters.rank}: {trained:,} trained parameters ({total:,} frozen)")
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
      log_every=sc.log_every,
      eval_every=sc.eval_every or num_steps,
      eval_fn=evaluate,
      desc=stage,
      tokens_per_batch=sc.batch_size * sc.seq_len,
      flops_per_step=lm.model_flops_per_step(setup.model_cfg, sc.batch_size, sc.seq_len),
      guard=config.get("guard"),
    )
  meta = common.save_adapters(out_dir, state, config, workdir, base_stage, base_dir)  # LoRA
  return common.finish(
    out_dir,
    common.final_params(state),
    config,
    start,
    ckpt,
    writer,
    workdir=workdir,
    stage=stage,
    data_files=files,
    **meta,
  )
