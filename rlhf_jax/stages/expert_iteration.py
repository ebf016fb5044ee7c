"""Expert iteration (rejection-sampling fine-tuning): SFT on the policy's own best-of-n
replies, for a few iterations (AlpacaFarm's "expert iteration"; Anthony et al. 2017).

  rlhf-jax expert_iteration --config configs/best_of_n.py --workdir DIR   # DIR: SFT, RM
  rlhf-jax pipeline         --config configs/best_of_n.py --workdir DIR   # with best-of-n

Iteration i (0-based) starts from SFT (i = 0) or iteration i - 1's export:
  1. best-of-n: n replies of that policy to each of `prompts_per_iteration` training
     prompts (fresh prompts each iteration), sampled from one prefill, the RM's pick kept
     (`best_of_n.select`); written to `DIR/expert_iteration/iter_<i>/demonstrations.jsonl`;
  2. supervised fine-tuning on those dialogues (`sft.fine_tune`: SFT's pure train step,
     loss on the reply only, packed rows), validated on the world's demonstrations.
Each iteration's directory holds its checkpoints and export; a killed run regenerates
nothing it wrote and resumes the fine-tuning from its checkpoint. The last iteration's
parameters are the stage's export (the policy `expert_iteration`), its metrics every
iteration's under `iter<i>/`, and `DIR/expert_iteration/metrics.jsonl` strings the
iterations' curves end to end.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import ranges, sharding, tokenizer
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.stages import best_of_n, common, rm, sft
from rlhf_jax.stages.ppo import driver
from rlhf_jax.train import checkpoints, metrics_io

STAGE = "expert_iteration"
RANGES = {
  "iterations": "[1, 10]",
  "n": ">= 1",
  "prompts_per_iteration": "> 0",
  "sample_batch": "> 0",
  "prompt_len": "> 0",
  "max_new_tokens": "> 0",
  "temperature": "> 0",
  "top_p": "(0, 1]",
  "seed": ">= 0",
}


def expert_iteration_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """SFT's fields (`sft.sft_config`: batch, epochs, optimiser, validation) and the
  best-of-n sampling of each iteration's data."""
  c = sft.sft_config(runlocal)
  del c["data_file"]  # the data is the policy's own
  c.iterations = 2
  c.n = 16
  c.prompts_per_iteration = 512
  c.sample_batch = 8  # prompts per sampler call, each sampled n times
  c.prompt_len = 96
  c.max_new_tokens = 48
  c.temperature = 1.0
  c.top_p = 1.0
  c.prompt_file = ""  # PPO's: the prompts come from it when given
  c.num_epochs = 2
  c.pretrain_mix = 0.0
  c.optim.lr = 3e-4  # below SFT's: the policy is fine-tuned already
  c.optim.warmup_steps = 2
  c.eval_temperature = 1.0  # the gold score of sampled replies, as eval judges them
  c.seed = 0  # the best-of-n sampling of the data (0 = config.seed's, `common.stage_seed`)
  if runlocal:
    c.iterations, c.n, c.prompts_per_iteration = 2, 4, 16
    c.prompt_len, c.max_new_tokens = 48, 16
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  ranges.check(c, key, RANGES)
  sft.validate(c, key)


def iteration_dir(workdir: str, i: int) -> str:
  return os.path.join(common.stage_dir(workdir, STAGE), f"iter_{i}")


def best_replies(model_cfg, policy, reward, tok, prompts, c, rng, mesh) -> list[str]:
  """The RM's pick of n sampled replies to each prompt (message lists), as text."""
  ids = [tokenizer.truncate_prompt(tok.encode_prompt(m), c.prompt_len) for m in prompts]
  rows = sharding.round_to_batch_shards(c.sample_batch, mesh)
  out = []
  for start, n, batch in best_of_n.prompt_batches(ids, rows, mesh):
    picked, _ = best_of_n.jit_select(
      policy,
      reward,
      batch,
      jax.random.fold_in(rng, start),
      jnp.asarray(c.temperature, jnp.float32),
      jnp.asarray(c.top_p, jnp.float32),
      model_cfg=model_cfg,
      n=c.n,
      max_new_tokens=c.max_new_tokens,
      use_top_p=c.top_p < 1.0,
    )
    out += [tok.decode_response(row).strip() for row in sharding.to_host(picked.tokens)[:n]]
  return out


def _demonstrations(config, workdir: str, c, i: int, train_src, tok, files) -> list[dict]:
  """Iteration i's best-of-n dialogues: read back when written, else sampled and written."""
  path = os.path.join(iteration_dir(workdir, i), "demonstrations.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      return [json.loads(line) for line in f]
  first = i * c.prompts_per_iteration
  prompts = [
    train_src[j % len(train_src)]["messages"] for j in range(first, first + c.prompts_per_iteration)
  ]
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  start_from = os.path.relpath(iteration_dir(workdir, i - 1), workdir) if i else ""
  policy = sft.load_policy(config, workdir, mesh, rules, directory=start_from)
  reward, _ = rm.load_reward_model(config, workdir, mesh, rules)
  with sharding.use(mesh, rules):
    replies = best_replies(
      common.model_config(config, dropout=0.0),
      policy,
      reward,
      tok,
      prompts,
      c,
      jax.random.fold_in(jax.random.PRNGKey(common.stage_seed(config.seed, c.seed) + 9), i),
      mesh,
    )
  records = [
    {"messages": [*m, {"role": tokenizer.ASSISTANT, "content": r}]}
    for m, r in zip(prompts, replies, strict=True)
    if r  # an empty reply teaches nothing but EOS
  ]
  text = "".join(json.dumps(r) + "\n" for r in records)
  workdir_lib.write_text(path, text)
  return records


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Every iteration (skipping those exported, resuming the one in progress); export the
  last iteration's policy. Returns the final metrics."""
  if (done := common.recorded_metrics(config, workdir, STAGE, "configs/best_of_n.py")) is not None:
    return done
  out_dir = common.stage_dir(workdir, STAGE)
  c = config[STAGE]
  validate(c)
  start = time.time()
  tok = common.load_tokenizer(config, workdir)
  files: dict = {}
  train_src, _ = driver.prompt_sources(config, workdir, c, files)
  _, val_src = sft.sources(config, workdir, files)
  metrics: dict[str, Any] = {}
  for i in range(c.iterations):
    it_dir = iteration_dir(workdir, i)
    info = checkpoints.params_info(it_dir)
    if info is None:
      records = _demonstrations(config, workdir, c, i, train_src, tok, files)
      print(f"{STAGE}: iteration {i}: {len(records)} best-of-{c.n} replies")
      src = iteration_dir(workdir, i - 1) if i else common.stage_dir(workdir, sft.STAGE)

      def init(like, src=src):
        tok_path = common.tokenizer_of(config, workdir)
        return checkpoints.load_params(src, like, config.model.to_dict(), tokenizer=tok_path)

      sft.fine_tune(
        config,
        workdir,
        c,
        records,
        val_src,
        init,
        out_dir=it_dir,
        stage=STAGE,
        files={},
        start=time.time(),
        base_stage=sft.STAGE,
        base_dir=src if i else "",  # (LoRA: the adapters' base)
      )
      info = checkpoints.params_info(it_dir)
    metrics.update({f"iter{i}/{k}": v for k, v in info["metrics"].items()})
  last = info["metrics"]
  metrics.update({k: v for k, v in last.items() if k != "wall_seconds"})
  metrics["wall_seconds"] = time.time() - start
  # The iterations' curves end to end, for the report.
  writer = metrics_io.MetricsWriter(out_dir)
  writer.truncate_after(-1)
  offset = 0
  for i in range(c.iterations):
    rows = metrics_io.read_metrics(iteration_dir(workdir, i))
    for row in rows:
      writer.write(offset + row["step"], {k: v for k, v in row.items() if k != "step"})
    offset += max((r["step"] for r in rows), default=0)
  writer.close()
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  last_dir = os.path.relpath(iteration_dir(workdir, c.iterations - 1), workdir)
  params = sft.load_policy(config, workdir, mesh, rules, directory=last_dir)
  checkpoints.export_params(
    out_dir,
    params,
    config.model.to_dict(),
    metrics=metrics,
    tokenizer=common.tokenizer_of(config, workdir),
    stage=STAGE,
    iterations=int(c.iterations),
    n=int(c.n),
    data_files=files,
  )
  return metrics
