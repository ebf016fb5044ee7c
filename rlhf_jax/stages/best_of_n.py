"""Best-of-n (inference time): n replies of SFT to a prompt, the reward model picks one.

  rlhf-jax best_of_n --config configs/best_of_n.py --workdir DIR   # DIR has SFT and the RM
  rlhf-jax sample --workdir DIR --policy best_of_n --prompt "What is 7 + 5?"

A policy without training: `select` samples n replies of each prompt from one prefill
(`sampling.sample_tokens(..., group=n)`), scores each with the RM at its last token and
returns the highest-scoring one. Its KL to SFT is analytic, log n - (n - 1) / n
(Stiennon et al. 2020, for distinct samples), which `eval` reports instead of sampling
it. The stage itself measures Gao et al.'s (2022) best-of-n curve on the validation
prompts: `num_samples` replies per prompt, each scored by the RM and the gold judge, and
for every m in `curve` the expected RM and gold score of the RM's pick among m of them —
the unbiased estimator over all m-subsets (`expected_best`), not one draw.

The export (`DIR/best_of_n/params.json`, `params`) is SFT's parameters with `n` and the
RM's directory recorded, so `eval`'s held-out LM loss and zero-shot accuracy are SFT's
(the model is SFT's; only the choice among its samples changes) and `sample --policy
best_of_n` samples the same way eval does (`sample_fn`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import ranges, sampling, sharding, tokenizer
from rlhf_jax.data import judge
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import TransformerConfig, abstract_params
from rlhf_jax.stages import common, rm, sft
from rlhf_jax.stages.ppo import driver
from rlhf_jax.stages.ppo.rollout import VALUE_HEADS, forward
from rlhf_jax.train import checkpoints, metrics_io

STAGE = "best_of_n"
POLICY_HEADS = ("lm",)
RANGES = {
  "n": ">= 1",
  "num_samples": ">= 1",
  "batch_size": "> 0",
  "curve_prompts": ">= 0",
  "max_new_tokens": "> 0",
  "prompt_len": "> 0",
  "temperature": "> 0",
  "top_p": "(0, 1]",
  "seed": ">= 0",
}


def best_of_n_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.n = 16  # the exported policy's n
  c.num_samples = 64  # replies per validation prompt for the curve (>= every m in it)
  c.curve = (1, 2, 4, 8, 16, 32, 64)
  c.curve_prompts = 100  # validation prompts the curve averages over
  c.batch_size = 8  # prompts per sampler call; each sampled n (or num_samples) times
  c.prompt_len = 96
  c.max_new_tokens = 48
  c.temperature = 1.0  # of the SFT samples (what the RM was trained on)
  c.top_p = 1.0
  c.prompt_file = ""  # PPO's: the validation prompts come from it when given
  c.skip_bad = False
  c.seed = 0  # the curve's samples (0 = config.seed's); eval's best-of-n follows eval's
  if runlocal:
    c.n, c.num_samples, c.curve, c.curve_prompts = 4, 8, (1, 2, 4, 8), 16
    c.prompt_len, c.max_new_tokens = 48, 16
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  ranges.check(c, key, RANGES)
  curve = tuple(c.curve)
  if not curve or any(int(m) < 1 or int(m) > c.num_samples for m in curve):
    raise UserInputError(
      f"config.{key}.curve: every n must be in [1, num_samples={c.num_samples}], got {curve}"
    )
  if c.curve_prompts and c.n not in curve:  # the export's numbers are the curve's at n
    raise UserInputError(f"config.{key}.n: must be one of curve={curve}, got {c.n}")


def analytic_kl(n: int) -> float:
  """KL(best-of-n || SFT) for n distinct samples: log n - (n - 1) / n."""
  return math.log(n) - (n - 1) / n


def expected_best(rm_scores: np.ndarray, values: np.ndarray, m: int) -> np.ndarray:
  """E[value of the RM's pick among m of the N samples], over all C(N, m) subsets.

  rm_scores, values: f[P, N] per prompt; returns f[P]. Sorted by RM score, sample i
  (1-based) is the pick of exactly C(i - 1, m - 1) subsets (ties: a stable order).
  """
  order = np.argsort(rm_scores, axis=1, kind="stable")
  ranked = np.take_along_axis(np.asarray(values, np.float64), order, axis=1)
  n = ranked.shape[1]
  weights = np.array([math.comb(i - 1, m - 1) for i in range(1, n + 1)], np.float64)
  return ranked @ (weights / math.comb(n, m))


def group_scores(
  policy,
  reward,
  prompt_tokens: jax.Array,
  rng: jax.Array,
  temperature: jax.Array,
  top_p: jax.Array,
  *,
  model_cfg: TransformerConfig,
  n: int,
  max_new_tokens: int,
  use_top_p: bool,
) -> tuple[sampling.SampleOutput, jax.Array]:
  """n samples of each prompt int32[B, P] (a SampleOutput of B * n rows: sample j of
  prompt b is row b * n + j) and their RM scores f32[B, n], read at the last token."""
  out = sampling.sample_tokens(
    policy,
    prompt_tokens,
    rng,
    temperature,
    top_p,
    cfg=model_cfg,
    max_new_tokens=max_new_tokens,
    top_k=0,
    use_top_p=use_top_p,
    use_cache=True,
    stop_at_eos=True,
    group=n,
  )
  prompts = jnp.repeat(prompt_tokens, n, axis=0)
  score = forward(model_cfg, reward, prompts, out.tokens, out.mask, heads=VALUE_HEADS)
  return out, score["scalar_last"].reshape(prompt_tokens.shape[0], n)


def select(policy, reward, prompt_tokens, rng, temperature, top_p, *, n: int, **kw):
  """The RM's pick of n samples per prompt: a SampleOutput of B rows, and the scores
  f32[B, n] (`group_scores`' arguments)."""
  out, scores = group_scores(policy, reward, prompt_tokens, rng, temperature, top_p, n=n, **kw)
  b = prompt_tokens.shape[0]
  best = jnp.argmax(scores, axis=1)
  pick = lambda x: x.reshape(b, n, *x.shape[1:])[jnp.arange(b), best]
  return sampling.SampleOutput(*(pick(x) for x in out)), scores


_STATIC = ("model_cfg", "n", "max_new_tokens", "use_top_p")
jit_select = jax.jit(select, static_argnames=_STATIC)
jit_group_scores = jax.jit(group_scores, static_argnames=_STATIC)


def make_sample_fn(
  model_cfg: TransformerConfig, reward, n: int, own_temperature: float = 1.0
) -> Callable:
  """A `sampling.sample_prompts` sampler that returns best-of-n replies. Asked for greedy
  replies (temperature 0), which are one reply not n, it samples at `own_temperature`."""

  def sample_fn(params, batch, rng, *, max_new_tokens, temperature, top_p):
    temperature = temperature if float(temperature) > 0 else own_temperature
    out, _ = jit_select(
      params,
      reward,
      batch,
      rng,
      jnp.asarray(temperature, jnp.float32),
      jnp.asarray(top_p, jnp.float32),
      model_cfg=model_cfg,
      n=n,
      max_new_tokens=max_new_tokens,
      use_top_p=float(top_p) < 1.0,
    )
    return out

  return sample_fn


# --- what eval and `sample` ask of an exported policy (registry hooks) ---------------------


def _info(workdir: str) -> dict[str, Any]:
  info = checkpoints.params_info(common.stage_dir(workdir, STAGE))
  if info is None:
    raise UserInputError(f"{common.stage_dir(workdir, STAGE)}: not exported (run best_of_n)")
  return info


def policy_kl(workdir: str) -> float:
  """The exported policy's KL to SFT (analytic)."""
  return analytic_kl(int(_info(workdir)["best_of_n"]["n"]))


def sample_fn(workdir: str, model_cfg: TransformerConfig, mesh=None, rules=()) -> Callable:
  """The exported policy's sampler: its RM loaded (on `mesh`, else the first device)."""
  info = _info(workdir)
  rm_dir = common.resolve(common.stage_dir(workdir, STAGE), info["best_of_n"]["reward_model"])
  rm_info = checkpoints.params_info(rm_dir)
  if rm_info is None:
    raise UserInputError(f"{rm_dir}: no exported reward model (best_of_n needs it)")
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      abstract_params(rm_info["model"], rm.HEADS),
    )
  else:
    like = abstract_params(rm_info["model"], rm.HEADS, mesh, rules)
  reward = checkpoints.load_params(rm_dir, like, rm_info["model"])
  own = info["best_of_n"]
  return make_sample_fn(model_cfg, reward, int(own["n"]), float(own["temperature"]))


# --- the stage ------------------------------------------------------------------------------


def prompt_batches(ids: list[list[int]], rows: int, mesh):
  """(first index, prompts in it, int32[rows, P] on `mesh`) for every `rows` prompts, left
  padded to a multiple of 32 tokens, the last batch filled up with BOS-only prompts."""
  for start in range(0, len(ids), rows):
    chunk = ids[start : start + rows]
    n = len(chunk)
    chunk += [[tokenizer.BOS_ID]] * (rows - n)
    batch = tokenizer.pad_left(chunk, -(-max(map(len, chunk)) // 32) * 32)
    yield start, n, sharding.put_batch({"t": batch}, mesh)["t"]


def curve(
  model_cfg, policy, reward, tok, records, c, rng, mesh
) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
  """Best-of-m for every m in `c.curve` on `records`: rows {n, rm_score, gold_score, kl}
  and the raw f[P, num_samples] scores {"reward", "gold"}."""
  prompts = [r["messages"] for r in records]
  ids = [tokenizer.truncate_prompt(tok.encode_prompt(m), c.prompt_len) for m in prompts]
  rows = sharding.round_to_batch_shards(c.batch_size, mesh)
  k = c.num_samples
  rm_scores, texts = [], []
  for start, n, batch in prompt_batches(ids, rows, mesh):
    out, scores = jit_group_scores(
      policy,
      reward,
      batch,
      jax.random.fold_in(rng, start),
      jnp.asarray(c.temperature, jnp.float32),
      jnp.asarray(c.top_p, jnp.float32),
      model_cfg=model_cfg,
      n=k,
      max_new_tokens=c.max_new_tokens,
      use_top_p=c.top_p < 1.0,
    )
    rm_scores.append(sharding.to_host(scores)[:n])
    texts += [tok.decode_response(row) for row in sharding.to_host(out.tokens)[: n * k]]
  rm_all = np.concatenate(rm_scores).astype(np.float64)
  gold = np.array(
    [judge.score(records[i // k]["task"], t) for i, t in enumerate(texts)], np.float64
  ).reshape(len(records), k)
  out_rows = []
  for m in c.curve:
    out_rows.append(
      {
        "n": int(m),
        "rm_score": float(expected_best(rm_all, rm_all, m).mean()),
        "gold_score": float(expected_best(rm_all, gold, m).mean()),
        "kl": analytic_kl(int(m)),
      }
    )
  return out_rows, {"reward": rm_all, "gold": gold}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The curve on the validation prompts, then the export (SFT's parameters, `n`, the
  RM's directory). Returns the final metrics (those of the exported n)."""
  if (done := common.recorded_metrics(config, workdir, STAGE, "configs/best_of_n.py")) is not None:
    return done
  out_dir = common.stage_dir(workdir, STAGE)
  c = config[STAGE]
  validate(c)
  start = time.time()
  tok = common.load_tokenizer(config, workdir)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model_cfg = common.model_config(config, dropout=0.0)
  files: dict = {}
  _, val_src = driver.prompt_sources(config, workdir, c, files)
  records = [val_src[i] for i in range(min(len(val_src), c.curve_prompts))]
  records = [r for r in records if "task" in r]  # the gold judge needs the task
  policy = sft.load_policy(config, workdir, mesh, rules)
  reward, rm_info = rm.load_reward_model(config, workdir, mesh, rules)
  writer = metrics_io.MetricsWriter(out_dir)
  writer.truncate_after(-1)  # a killed run's rows: the curve is measured again, whole
  rows = []
  if records:
    with sharding.use(mesh, rules):
      rng = jax.random.PRNGKey(common.stage_seed(config.seed, c.seed) + 8)
      rows, _ = curve(model_cfg, policy, reward, tok, records, c, rng, mesh)
    for row in rows:
      writer.write(row["n"], {f"{STAGE}/{k}": v for k, v in row.items() if k != "n"})
      print(
        f"{STAGE}: n={row['n']:>3}  RM {row['rm_score']:+.3f}  gold {row['gold_score']:.3f}"
        f"  KL {row['kl']:.2f}"
      )
  writer.close()
  at_n = next((r for r in rows if r["n"] == c.n), {"kl": analytic_kl(c.n)})
  metrics = {f"{STAGE}/{k}": v for k, v in at_n.items() if k != "n"}
  metrics["wall_seconds"] = time.time() - start
  checkpoints.export_params(
    out_dir,
    policy,
    config.model.to_dict(),
    metrics=metrics,
    tokenizer=common.tokenizer_of(config, workdir),
    stage=STAGE,
    heads=list(POLICY_HEADS),
    best_of_n={
      "n": int(c.n),
      "temperature": float(c.temperature),
      "reward_model": os.path.relpath(common.stage_dir(workdir, rm.STAGE), out_dir),
    },
    curve=rows,
    rm_reward_bias=(rm_info or {}).get("reward_bias"),
    data_files=files,
  )
  return metrics
