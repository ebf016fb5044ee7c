"""Stage 1: pretraining — next-token prediction on packed text.

  rlhf-jax pretrain --config configs/default.py --workdir DIR

Reads the default world's "web text" (or `config.pretrain.text_file`, a user's `.txt`
or JSONL), packs documents into rows of `seq_len` tokens, and trains the LM from
scratch. Writes `DIR/pretrain/{checkpoints,metrics.jsonl,tb,params,params.json}` and
resumes from the latest checkpoint when restarted.
"""

from __future__ import annotations

import time

import jax
import ml_collections

from rlhf_jax import ranges, sharding
from rlhf_jax.data import pipeline, user_data
from rlhf_jax.stages import common, lm
from rlhf_jax.train import checkpoints, loop, optim

STAGE = "pretrain"
RANGES = {"eval_batches": ">= 0"}  # 0 = the whole held-out set


def pretrain_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 32  # global batch, rows of seq_len tokens
  c.seq_len = 128
  c.num_steps = 300  # held-out loss gains < 0.03 nats beyond this on the default world
  c.optim = optim.optim_config(lr=3e-3, warmup_steps=50, weight_decay=0.1)
  c.text_file = ""  # a user's .txt / .jsonl(.gz) corpus instead of the generated one
  c.text_field = "text"  # JSONL field holding the text
  c.skip_bad = False  # skip (and count) malformed records of text_file instead of stopping
  c.log_every = 20
  c.eval_every = 150  # held-out LM loss every N steps (and at the end)
  c.eval_batches = 8  # held-out batches per evaluation (0 = the whole held-out set)
  c.save_every = 150  # checkpoint every N steps (and at the end)
  c.keep_checkpoints = 2
  if runlocal:
    c.batch_size, c.seq_len, c.num_steps = 8, 64, 30
    c.log_every, c.eval_every, c.save_every, c.eval_batches = 5, 15, 10, 2
    c.optim.warmup_steps = 5
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  """Its own fields inside `RANGES` (the registry's config hook; config_lib: the rest)."""
  ranges.check(c, key, RANGES)


def sources(config, workdir, files: dict | None = None):
  """(train, held-out) text records: the user's file (2% held out) or the world's.
  `files` gets {path: what was read} of the user's file."""
  pc = config.pretrain
  if pc.text_file:
    loaded = user_data.load_pretraining_text(
      pc.text_file, text_field=pc.text_field, skip_bad=pc.skip_bad
    )
    if files is not None:
      files[pc.text_file] = loaded.stats.counts()
    return user_data.hold_out(loaded, 50, "held-out evaluation")
  return (
    common.world_source(config, workdir, "pretrain", "train"),
    common.world_source(config, workdir, "heldout_text", "test"),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrain (or resume); export the final params. Returns the final metrics."""
  out_dir = common.stage_dir(workdir, STAGE)
  if common.is_complete(workdir, STAGE):
    print(f"{STAGE}: complete, skipping ({out_dir})")
    return checkpoints.params_info(out_dir).get("metrics", {})
  if (info := common.imported(config, workdir, STAGE)) is not None:
    return info.get("metrics", {})
  if config.get("init", {}).get("sft_hf_dir"):  # SFT is given: nothing starts from here
    print(f"{STAGE}: skipped (config.init.sft_hf_dir is the SFT policy; no pretrained LM)")
    return {}
  pc = config.pretrain
  start = time.time()
  tok = common.load_tokenizer(config, workdir)
  files = {}
  train_src, eval_src = sources(config, workdir, files)
  batch = common.batch_rows(pc.batch_size, "pretrain.batch_size", config.mesh)
  data = pipeline.pretrain_batches(
    train_src, tok, batch_size=batch, seq_len=pc.seq_len, seed=config.seed
  )
  eval_data = lambda: pipeline.pretrain_batches(
    eval_src,
    tok,
    batch_size=batch,
    seq_len=pc.seq_len,
    seed=0,
    num_epochs=1,
    shuffle=False,
  )

  setup = common.create_state(config, pc.optim, pc.num_steps)
  it = iter(data)
  ckpt, writer, setup.state, _ = common.open_run(out_dir, pc, setup.state, it, STAGE)

  step_fn = common.jit_step(
    lm.train_step,
    setup,
    lm.LM_BATCH_NDIMS,
    model_cfg=setup.model_cfg,
    tx=setup.tx,
    schedule=optim.lr_schedule(pc.optim, pc.num_steps),
    ema_decay=pc.optim.ema_decay,
    prefix=STAGE,
    grad_accum=common.grad_accum(pc, STAGE),
  )
  eval_fn = jax.jit(lambda p, b: lm.eval_step(p, b, model_cfg=setup.model_cfg))
  put = lambda b: sharding.put_batch(b, setup.mesh)

  def evaluate(state, step):
    batches = eval_data()
    if pc.eval_batches:
      batches = (b for b, _ in zip(batches, range(pc.eval_batches), strict=False))
    return {f"{STAGE}/heldout_loss": lm.evaluate_loss(eval_fn, state.params, batches, put)}

  with sharding.use(setup.mesh, setup.rules):
    state = loop.run_loop(
      state=setup.state,
      step_fn=step_fn,
      batches=it,
      data_iter=it,
      put=put,
      num_steps=pc.num_steps,
      checkpointer=ckpt,
      writer=writer,
      log_every=pc.log_every,
      eval_every=pc.eval_every,
      eval_fn=evaluate,
      desc=STAGE,
      tokens_per_batch=pc.batch_size * pc.seq_len,
      flops_per_step=lm.model_flops_per_step(setup.model_cfg, pc.batch_size, pc.seq_len),
      guard=config.get("guard"),
    )
  return common.finish(
    out_dir, common.final_params(state), config, start, ckpt, writer, stage=STAGE, data_files=files
  )
