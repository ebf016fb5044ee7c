"""Evaluation of every trained policy on held-out data: `DIR/summary.json`.

  rlhf-jax eval --config configs/default.py --workdir DIR

Policies: `pretrained` (`DIR/pretrain`, prompted FEW-SHOT: `few_shot` labeler
demonstrations of the `demonstrations` train split go before the prompt as earlier chat
turns, the paper's "GPT-3 prompted" baseline; its reply is cut at the first "\\nUser:" or
"\\nAssistant:" when it runs on into further turns), `sft`, `ppo` and `ppo_ptx`. A
policy without an export is skipped; SFT is required (everything is compared with it).

On `num_prompts` held-out prompts (`prompts/validation`: other users than the ones PPO
trained on) every policy replies at `temperature` (default 1: each policy's own
distribution, what PPO optimises and what the comparisons sampled; 0 = greedy), with one
fixed seed, and:

- **win rate vs SFT**, per prompt win 1 / tie 0.5 / loss 0 against SFT's reply to the
  same prompt: by the gold judge (higher `judge.score` wins), and by simulated labelers
  (a labeler drawn from the pool ranks the two replies with its own length bias and
  noise, `labelers.rank_one`; identical texts are a tie). 95% intervals over prompts:
  `ci="bootstrap"` (percentile bootstrap of the mean, `bootstrap_samples` resamples,
  seeded; the default) or `ci="normal"` (mean +- 1.96 s / sqrt(n)); either is widened
  to contain the estimate and clipped to [0, 1]. SFT against itself is 0.5 exactly.
- **gold score** (mean, 95% interval, per family) and the rates of **evasive,
  untruthful and toxic** replies (`judge.is_evasive` / `is_untruthful` / `is_toxic`).
- **KL to SFT**: mean over the prompts of sum_t log pi(y_t) - log pi_sft(y_t) on the
  policy's own samples drawn at temperature 1 (the policy's distribution; with greedy
  replies the estimate would be biased), every token up to and including EOS (or
  `max_new_tokens`). Both log-probs come from the same full forward pass, so a policy
  equal to SFT gives exactly 0. The pretrained policy is conditioned on its few-shot
  prompt, SFT on the plain prompt: the KL between the reply distributions compared.
- **alignment tax**: mean per-token loss on the held-out text (`heldout_text/test`,
  every token: a document longer than `heldout_seq_len` continues on the next row) and
  zero-shot accuracy on each `heldout_tasks` task (the choice whose tokens have the
  highest summed log-likelihood after the context wins).

Also the RM's validation accuracy (`DIR/rm/params.json`) and wall seconds per stage:
each stage's own `metrics.wall_seconds`, overridden by `DIR/wall_seconds.json`
(`{"<stage>": seconds}`, written by the pipeline) and by `wall_seconds=` when given,
plus `eval` (this evaluation); `total` is the sum of the stages.

Writes `DIR/summary.json` (contract keys in ../shared/ARCHITECTURE.md; every number
finite or null) and `DIR/eval/generations.jsonl` (every reply with its judge verdicts,
which `report.py` samples for examples). A policy's replies and numbers are cached in
its stage directory (`DIR/<stage>/eval_cache/`), keyed by its export, SFT's (for the
KL), the world, the model and this section: re-evaluating, or evaluating a sweep whose
points share the SFT stage, does not redo them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import distributed, sampling, sharding, tokenizer, train_lib
from rlhf_jax.data import judge, labelers
from rlhf_jax.data import world as world_lib
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import TransformerConfig
from rlhf_jax.stages import common, comparisons, lm

POLICIES = ("pretrained", "sft", "ppo", "ppo_ptx")
STAGE_OF = {"pretrained": "pretrain", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx"}
REFERENCE = "sft"
# Stages whose wall seconds the summary reports, in pipeline order.
WALL_STAGES = ("data", "pretrain", "sft", "comparisons", "rm", "ppo", "ppo_ptx")
KL_TEMPERATURE = 1.0
PACK_LEN = 128  # tokens per scoring row (short sequences are packed into one)
STOP_TURNS = ("\nUser:", "\nAssistant:")  # where a few-shot reply runs on into more turns
SUMMARY = "summary.json"
GENERATIONS = os.path.join("eval", "generations.jsonl")


def eval_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """The `config.eval` section."""
  c = ml_collections.ConfigDict()
  c.num_prompts = 0  # held-out prompts (prompts/validation) every policy answers; 0 = all
  # Sampling temperature of the judged replies: 1 judges each policy's own distribution
  # (what PPO optimises and what the comparisons sampled); 0 = greedy.
  c.temperature = 1.0
  c.top_p = 1.0  # nucleus sampling of the judged replies; 1 = off
  c.max_new_tokens = 48  # reply length limit (tokens), for judged and KL samples
  c.max_prompt_len = 384  # prompt tokens kept (BOS + the last ones); fits the few-shot prefix
  c.few_shot = 3  # demonstrations before each prompt of the pretrained model; 0 = zero-shot
  c.kl_prompts = 128  # prompts of the KL estimate (samples at temperature 1); 0 = num_prompts
  c.batch_size = 64  # sampler / scoring rows per call (rounded up to mesh data x fsdp)
  c.heldout_docs = 0  # held-out documents of the LM loss; 0 = all
  c.heldout_seq_len = 128  # tokens per scored row of held-out text
  c.zero_shot_examples = 0  # examples per zero-shot task; 0 = all
  c.ci = "bootstrap"  # 95% intervals: bootstrap (percentile, over prompts) | normal
  c.bootstrap_samples = 2000  # resamples of the bootstrap
  c.seed = 0  # added to config.seed: sampling, labeler draws and bootstrap
  c.report_examples = 2  # prompts per family whose replies report.md shows
  if runlocal:
    c.num_prompts, c.max_new_tokens, c.batch_size, c.bootstrap_samples = 16, 16, 32, 200
    c.few_shot, c.max_prompt_len, c.zero_shot_examples, c.heldout_docs = 2, 192, 8, 16
    c.heldout_seq_len = 64
  return c


def validate(ec: ml_collections.ConfigDict) -> None:
  """Raise UserInputError naming the first `config.eval` field that cannot work."""
  checks = (
    ("ci", ec.ci in ("bootstrap", "normal"), "must be bootstrap|normal"),
    ("temperature", ec.temperature >= 0, "must be >= 0"),
    ("top_p", 0 < ec.top_p <= 1, "must be in (0, 1]"),
    ("max_new_tokens", ec.max_new_tokens >= 1, "must be >= 1"),
    ("max_prompt_len", ec.max_prompt_len >= 8, "must be >= 8"),
    ("batch_size", ec.batch_size >= 1, "must be >= 1"),
    ("bootstrap_samples", ec.bootstrap_samples >= 1, "must be >= 1"),
    ("heldout_seq_len", ec.heldout_seq_len >= 2, "must be >= 2"),
  )
  counts = ("num_prompts", "few_shot", "kl_prompts", "heldout_docs", "zero_shot_examples")
  checks += tuple((k, ec[k] >= 0, "must be >= 0") for k in (*counts, "report_examples"))
  for key, ok, why in checks:
    if not ok:
      raise UserInputError(f"config.eval.{key}: {why}, got {ec[key]!r}")


# --- statistics ------------------------------------------------------------------------


def outcomes(scores: Sequence[float], ref_scores: Sequence[float]) -> np.ndarray:
  """f64[N] per prompt: 1 where `scores` beats `ref_scores`, 0.5 on a tie, 0 on a loss."""
  a, b = np.asarray(scores, np.float64), np.asarray(ref_scores, np.float64)
  return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def normal_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """Mean +- z * s / sqrt(n) (s: sample std, ddof 1); (mean, mean) for n < 2."""
  x = np.asarray(values, np.float64)
  m = float(x.mean())
  if len(x) < 2:
    return m, m
  z = {0.95: 1.959963984540054}.get(level) or _z(level)
  half = z * float(x.std(ddof=1)) / math.sqrt(len(x))
  return m - half, m + half


def _z(level: float) -> float:
  from statistics import NormalDist

  return NormalDist().inv_cdf(0.5 + level / 2)


def bootstrap_ci(
  values: Sequence[float], num_samples: int, rng: np.random.Generator, level: float = 0.95
) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean: resample the N values with replacement
  `num_samples` times, take the (1 - level)/2 and (1 + level)/2 quantiles of the means."""
  x = np.asarray(values, np.float64)
  idx = rng.integers(0, len(x), size=(num_samples, len(x)))
  means = x[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def ci95(
  values: Sequence[float],
  method: str,
  rng: np.random.Generator,
  num_samples: int = 2000,
  bounds: tuple[float, float] | None = (0.0, 1.0),
) -> list[float]:
  """[lo, hi], the 95% interval of the mean of `values` by `method`, widened to contain
  the mean and clipped to `bounds`."""
  if method == "bootstrap":
    lo, hi = bootstrap_ci(values, num_samples, rng)
  elif method == "normal":
    lo, hi = normal_ci(values)
  else:
    raise UserInputError(f"config.eval.ci: must be bootstrap|normal, got {method!r}")
  m = float(np.mean(values))
  lo, hi = min(lo, m), max(hi, m)
  if bounds is not None:
    lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
  return [lo, hi]


def labeler_outcomes(
  tasks: Sequence[Mapping[str, Any]],
  replies: Sequence[str],
  ref_replies: Sequence[str],
  rng: np.random.Generator,
  world_config=None,
  gold: Sequence[float] | None = None,
  ref_gold: Sequence[float] | None = None,
) -> np.ndarray:
  """f64[N]: 1 where a labeler drawn from the pool ranks the reply above the reference
  reply, 0 below; identical texts are a tie (0.5) without asking anyone."""
  pool = labelers.pool(world_config)
  out = np.empty(len(tasks))
  for i, (task, a, b) in enumerate(zip(tasks, replies, ref_replies, strict=True)):
    lab = pool[int(rng.integers(len(pool)))]
    if a == b:
      out[i] = 0.5
      continue
    g = None if gold is None else [gold[i], ref_gold[i]]
    out[i] = 1.0 if labelers.rank_one(lab, task, [a, b], rng, g)[0] == 0 else 0.0
  return out


# --- prompts ------------------------------------------------------------------------------


def few_shot_prefix(demonstrations, k: int) -> list[tokenizer.Message]:
  """k demonstration dialogues as chat turns: the first correct single-turn one of each
  family in turn (of any quality when too few), in the source's order."""
  if k <= 0:
    return []
  picked, families = [], set()
  for strict in (True, False):
    for i in range(len(demonstrations)):
      if len(picked) == k:
        break
      r = demonstrations[i]
      good = r.get("quality", "correct") == "correct" and len(r["messages"]) == 2
      if i in {j for j, _ in picked} or (strict and (not good or r.get("family") in families)):
        continue
      picked.append((i, r["messages"]))
      families.add(r.get("family"))
  return [tokenizer.Message(role=m["role"], content=m["content"]) for _, ms in picked for m in ms]


def cut_reply(text: str) -> str:
  """A reply up to the first turn that a pretrained LM runs on into."""
  for stop in STOP_TURNS:
    text = text.split(stop, 1)[0]
  return text.strip()


def _cut_prompt(ids: list[int], max_len: int) -> list[int]:
  return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - max_len + 1 :]


# --- model computations --------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def target_logprobs(params, batch: dict[str, jax.Array], *, model_cfg: TransformerConfig):
  """f32[B, T]: loss_mask[:, t] * log p(tokens[:, t] | the tokens before it in its segment).

  batch: tokens, segment_ids, positions int32[B, T] (several sequences may share a row,
  told apart by segment id), loss_mask f32[B, T] (weight of tokens[:, t] as a target; 0
  on each sequence's first token). Entry 0 is 0.
  """
  logits = lm.logits(model_cfg, params, batch)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  target = jnp.where(batch["loss_mask"][:, 1:] > 0, target * batch["loss_mask"][:, 1:], 0.0)
  return jnp.pad(target, ((0, 0), (1, 0)))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class _Runner:
  """A model config, mesh and row count shared by every computation of one evaluation."""

  def __init__(self, model_cfg: TransformerConfig, mesh, rows: int):
    self.model_cfg, self.mesh, self.rows = model_cfg, mesh, rows

  def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return sharding.put_batch(batch, self.mesh)

  def sample(
    self, params, prompts: Sequence[list[int]], rng, *, temperature, top_p, max_new_tokens
  ) -> tuple[np.ndarray, np.ndarray]:
    """Sampled reply ids int32[N, max_new_tokens] and their mask bool[N, ...] (EOS in)."""
    toks, masks = [], []
    for start in range(0, len(prompts), self.rows):
      chunk = list(prompts[start : start + self.rows])
      n = len(chunk)
      chunk += [[tokenizer.BOS_ID]] * (self.rows - n)
      length = _round_up(max(len(c) for c in chunk), 32)
      tokens = self.put({"t": tokenizer.pad_left(chunk, length)})["t"]
      out = sampling.sample(
        self.model_cfg,
        params,
        tokens,
        jax.random.fold_in(rng, start),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
      )
      toks.append(sharding.to_host(out.tokens)[:n])
      masks.append(sharding.to_host(out.mask)[:n])
    return np.concatenate(toks), np.concatenate(masks)

  def score(self, params, seqs: Sequence[tuple[list[int], list[float]]]) -> np.ndarray:
    """f64[N] summed target log-probs of (ids, target weights) sequences.

    Sequences are packed in order into rows of `max(PACK_LEN, longest)` tokens (rounded
    to 32; one length per call, so one compile), each its own segment: scored exactly as
    alone, with little padding.
    """
    length = _round_up(max(PACK_LEN, *(len(ids) for ids, _ in seqs)), 32)
    place, rows, used = [], 0, length  # (row, start, length) of every sequence
    for ids, _ in seqs:
      if used + len(ids) > length:
        rows, used = rows + 1, 0
      place.append((rows - 1, used, len(ids)))
      used += len(ids)
    out = np.zeros((rows, length))
    for first in range(0, rows, self.rows):
      batch = {k: np.zeros((self.rows, length), np.int32) for k in ("tokens", "segment_ids")}
      batch["positions"] = np.zeros((self.rows, length), np.int32)
      batch["loss_mask"] = np.zeros((self.rows, length), np.float32)
      for seg, ((ids, target), (row, start, n)) in enumerate(zip(seqs, place, strict=True)):
        if first <= row < first + self.rows:
          r, span = row - first, slice(start, start + n)
          batch["tokens"][r, span] = ids
          batch["segment_ids"][r, span] = seg + 1
          batch["positions"][r, span] = np.arange(n)
          batch["loss_mask"][r, span] = target
          batch["loss_mask"][r, start] = 0.0  # no context in its segment
      lp = target_logprobs(params, self.put(batch), model_cfg=self.model_cfg)
      lp = sharding.to_host(lp).astype(np.float64)
      out[first : first + self.rows] = lp[: min(self.rows, rows - first)]
    return np.array([out[row, start : start + n].sum() for row, start, n in place])


def heldout_rows(tok: tokenizer.Tokenizer, docs, seq_len: int):
  """Rows (ids, target weights) covering every token of `docs` as pretraining reads
  them (`[BOS] + text + [EOS]`), cut into pieces of `seq_len`; a piece's first token is
  not a target (it has no context in its row, as in packed pretraining)."""
  rows = []
  for doc in docs:
    ids = [tok.bos_id, *tok.encode(doc["text"]), tok.eos_id]
    for start in range(0, len(ids), seq_len):
      piece = ids[start : start + seq_len]
      if len(piece) > 1:
        rows.append((piece, [0.0] + [1.0] * (len(piece) - 1)))
  return rows


def choice_rows(tok: tokenizer.Tokenizer, record: Mapping[str, Any]):
  """One row per choice: `[BOS] + context + choice`, the choice's tokens the targets.

  The choice tokens are those of `encode(context + choice)` past `encode(context)` when
  that prefix is kept (as the text reads in pretraining), else `encode(choice)`.
  """
  ctx = tok.encode(record["context"])
  rows = []
  for choice in record["choices"]:
    full = tok.encode(record["context"] + choice)
    ids = full[len(ctx) :] if full[: len(ctx)] == ctx and len(full) > len(ctx) else None
    ids = ids or tok.encode(choice)
    rows.append(([tok.bos_id, *ctx, *ids], [0.0] * (1 + len(ctx)) + [1.0] * len(ids)))
  return rows


# --- the evaluation --------------------------------------------------------------------------


def _take(source, n: int) -> list[dict[str, Any]]:
  return [source[i] for i in range(min(len(source), n or len(source)))]


def _mean(x) -> float:
  return float(np.mean(x)) if len(x) else float("nan")


def judged(tasks: Sequence[Mapping[str, Any]], replies: Sequence[str]) -> dict[str, np.ndarray]:
  """Per reply: gold score and evasive / untruthful / toxic flags (f64[N] each)."""
  return {
    "gold": np.array([judge.score(t, r) for t, r in zip(tasks, replies, strict=True)]),
    "evasive": np.array([judge.is_evasive(t, r) for t, r in zip(tasks, replies, strict=True)]),
    "untruthful": np.array(
      [judge.is_untruthful(t, r) for t, r in zip(tasks, replies, strict=True)]
    ),
    "toxic": np.array([judge.is_toxic(t, r) for t, r in zip(tasks, replies, strict=True)]),
  }


def available_policies(workdir: str) -> list[str]:
  """The policies of `POLICIES` whose stage exported its parameters."""
  return [p for p in POLICIES if common.is_complete(workdir, STAGE_OF[p])]


def collect_wall_seconds(workdir: str, given: Mapping[str, float] | None = None) -> dict:
  """Seconds per stage: each stage's own record, then `DIR/wall_seconds.json`, then
  `given` (later wins). No `total` (the caller adds it)."""
  out: dict[str, float] = {}
  for stage in WALL_STAGES:
    info = train_lib.params_info(common.stage_dir(workdir, stage)) or {}
    seconds = (info.get("metrics") or {}).get("wall_seconds")
    done = os.path.join(common.stage_dir(workdir, stage), comparisons.MANIFEST)
    if seconds is None and stage == comparisons.STAGE and os.path.exists(done):
      with open(done) as f:
        seconds = json.load(f).get("summary", {}).get("wall_seconds")
    if seconds is not None:
      out[stage] = float(seconds)
  path = os.path.join(workdir, "wall_seconds.json")
  for extra in (_read_json(path) if os.path.exists(path) else {}, given or {}):
    out.update({k: float(v) for k, v in extra.items() if k != "total"})
  return out


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise UserInputError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(data, dict):
    raise UserInputError(f"{path}: expected a JSON object")
  return data


def rm_summary(workdir: str) -> dict[str, Any]:
  """The reward model's validation numbers from `DIR/rm/params.json` (null if absent)."""
  info = train_lib.params_info(common.stage_dir(workdir, "rm")) or {}
  m = info.get("metrics") or {}
  return {
    "val_accuracy": m.get("rm/val_accuracy"),
    "val_gold_accuracy": m.get("rm/val_gold_accuracy"),
    "reward_bias": info.get("reward_bias"),
  }


def finite_json(x):
  """`x` with numpy scalars made Python numbers and NaN / inf made None (valid JSON)."""
  if isinstance(x, Mapping):
    return {str(k): finite_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite_json(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)):
    return finite_json(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_text(path: str, text: str) -> None:
  """Write `path` atomically (process 0 of a multi-process run; the others wait)."""

  def write():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)

  distributed.first(f"write {os.path.basename(path)}", write)


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, wall_seconds: Mapping[str, float] | None = None
) -> dict[str, Any]:
  """Evaluate every exported policy; write `DIR/summary.json` and the generations.

  Returns the summary (as written). `wall_seconds` adds or overrides stage times.
  """
  start = time.time()
  ec = config.eval if "eval" in config else eval_config()
  validate(ec)
  policies = available_policies(workdir)
  if REFERENCE not in policies:
    raise UserInputError(
      f"{common.stage_dir(workdir, 'sft')}: no exported SFT policy; evaluation compares "
      "every policy with it (run `rlhf-jax sft` first)"
    )
  tok = common.load_tokenizer(config, workdir)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  runner = _Runner(
    common.model_config(config),
    mesh,
    _round_up(ec.batch_size, mesh.shape["data"] * mesh.shape["fsdp"]),
  )
  records = [
    r
    for r in _take(common.world_source(config, workdir, "prompts", "validation"), ec.num_prompts)
    if "task" in r
  ]
  if not records:
    raise UserInputError("config.eval.num_prompts: no held-out prompts to evaluate on")
  tasks = [r["task"] for r in records]
  kl_n = min(len(records), ec.kl_prompts or len(records))
  demos = common.world_source(config, workdir, "demonstrations", "train")
  prefix = few_shot_prefix(demos, ec.few_shot)
  docs = _take(common.world_source(config, workdir, "heldout_text", "test"), ec.heldout_docs)
  lm_rows = heldout_rows(tok, docs, ec.heldout_seq_len)
  zs_records = _zero_shot_records(config, workdir, ec.zero_shot_examples)
  zs_rows = [row for r in zs_records for row in choice_rows(tok, r)]
  base = jax.random.fold_in(jax.random.PRNGKey(config.seed), ec.seed)

  def prompt_ids(name: str) -> list[list[int]]:
    pre = prefix if name == "pretrained" else []
    return [
      _cut_prompt(tok.encode_prompt([*pre, *r["messages"]]), ec.max_prompt_len) for r in records
    ]

  sft_prompts = prompt_ids(REFERENCE)
  like = comparisons.params_like(config, mesh, rules)
  load = lambda name: train_lib.load_params(
    common.stage_dir(workdir, STAGE_OF[name]), like, config.model.to_dict()
  )
  results: dict[str, dict[str, Any]] = {}
  replies: dict[str, list[str]] = {}
  sft_params = None
  data = {"lm_rows": lm_rows, "zs_records": zs_records, "zs_rows": zs_rows, "kl_n": kl_n}
  with sharding.use(mesh, rules):
    for name in [REFERENCE] + [p for p in policies if p != REFERENCE]:
      t0 = time.time()
      cache = _cache_path(config, workdir, name, ec)
      if os.path.exists(cache):
        with open(cache) as f:
          replies[name], results[name] = json.load(f)
        print(f"eval: {name} from {cache}")
        continue
      params = load(name)
      if name == REFERENCE:
        sft_params = params
      elif sft_params is None:
        sft_params = load(REFERENCE)
      replies[name], results[name] = _run_policy(
        runner, tok, name, params, sft_params, prompt_ids(name), sft_prompts, base, ec, data
      )
      write_text(cache, json.dumps([replies[name], finite_json(results[name])]))
      print(f"eval: {name} in {time.time() - t0:.1f}s")

  families = [f for f in world_lib.FAMILIES if any(t["family"] == f for t in tasks)]
  families += sorted({t["family"] for t in tasks} - set(families))
  verdicts = {name: judged(tasks, replies[name]) for name in replies}
  out_policies = {}
  for i, name in enumerate(p for p in POLICIES if p in results):
    seed = [config.seed, ec.seed, i]
    out_policies[name] = {
      "stage": STAGE_OF[name],
      **_compare(tasks, replies, verdicts, name, families, seed, ec, config.world),
      "response_words": float(np.mean([len(r.split()) for r in replies[name]])),
      **results[name],
    }
  _write_generations(workdir, records, replies, verdicts)

  wall = collect_wall_seconds(workdir, wall_seconds)
  wall["eval"] = time.time() - start
  wall["total"] = sum(wall.values())
  summary = {
    "wall_seconds": wall,
    "rm": rm_summary(workdir),
    "policies": out_policies,
    "num_prompts": len(records),
    "prompts_per_family": {f: sum(t["family"] == f for t in tasks) for f in families},
    "zero_shot_examples": {
      n: sum(r["task_name"] == n for r in zs_records)
      for n in dict.fromkeys(r["task_name"] for r in zs_records)
    },
    "heldout_lm_tokens": int(sum(sum(t) for _, t in lm_rows)),
    "eval": {**ec.to_dict(), "kl_temperature": KL_TEMPERATURE, "config_seed": int(config.seed)},
    "generations": GENERATIONS,
  }
  summary = finite_json(summary)
  write_text(os.path.join(workdir, SUMMARY), json.dumps(summary, indent=1, allow_nan=False) + "\n")
  return summary


def _cache_path(config, workdir: str, name: str, ec) -> str:
  """Where policy `name`'s replies and numbers are cached: its stage directory, under a
  key of everything they depend on (its export and SFT's, the world, model, seed and
  evaluation settings)."""
  exports = []
  for stage in dict.fromkeys((STAGE_OF[name], STAGE_OF[REFERENCE])):
    with open(os.path.join(common.stage_dir(workdir, stage), "params.json")) as f:
      exports.append(f.read())
  what = {
    "policy": name,
    "exports": exports,
    "eval": ec.to_dict(),
    "seed": config.seed,
    **{k: config[k].to_dict() for k in ("world", "tokenizer", "model", "mesh")},
  }
  key = hashlib.blake2b(json.dumps(what, sort_keys=True, default=str).encode(), digest_size=8)
  return os.path.join(
    common.stage_dir(workdir, STAGE_OF[name]), "eval_cache", f"{key.hexdigest()}.json"
  )


def _run_policy(runner, tok, name, params, sft_params, ids, sft_ids, base, ec, data):
  """One policy's replies to the prompts (ids) and its model-side numbers: KL to SFT,
  held-out LM loss, zero-shot accuracies."""
  toks, _ = runner.sample(
    params,
    ids,
    jax.random.fold_in(base, 0),
    temperature=ec.temperature,
    top_p=ec.top_p,
    max_new_tokens=ec.max_new_tokens,
  )
  texts = [tok.decode_response(row) for row in toks]
  replies = [cut_reply(t) for t in texts] if name == "pretrained" else texts
  kl, n = 0.0, data["kl_n"]
  if name != REFERENCE:
    kl = _kl(runner, params, sft_params, ids[:n], sft_ids[:n], jax.random.fold_in(base, 1), ec)
  rows = data["lm_rows"]
  targets = sum(sum(t) for _, t in rows)
  lm_loss = float(-runner.score(params, rows).sum() / targets) if targets else float("nan")
  zero_shot = _zero_shot(runner, params, data["zs_records"], data["zs_rows"])
  return replies, {
    "kl_to_sft": kl,
    "heldout_lm_loss": lm_loss,
    "zero_shot": zero_shot,
    "zero_shot_mean": _mean(list(zero_shot.values())),
  }


def _compare(tasks, replies, verdicts, name, families, seed, ec, world_config) -> dict:
  """Win rates against SFT (gold judge, labelers) with intervals, and the judge's
  numbers of one policy's replies."""
  v, ref = verdicts[name], verdicts[REFERENCE]
  gold_wins = outcomes(v["gold"], ref["gold"])
  lab_wins = labeler_outcomes(
    tasks,
    replies[name],
    replies[REFERENCE],
    np.random.default_rng([*seed, 0]),
    world_config,
    v["gold"],
    ref["gold"],
  )
  ci = lambda x, k: ci95(x, ec.ci, np.random.default_rng([*seed, k]), ec.bootstrap_samples)
  by_family = {f: _mean(v["gold"][[t["family"] == f for t in tasks]]) for f in families}
  return {
    "winrate_vs_sft": float(gold_wins.mean()),
    "winrate_vs_sft_ci95": ci(gold_wins, 1),
    "labeler_winrate_vs_sft": float(lab_wins.mean()),
    "labeler_winrate_vs_sft_ci95": ci(lab_wins, 2),
    "gold_score": float(v["gold"].mean()),
    "gold_score_ci95": ci(v["gold"], 3),
    "gold_score_by_family": by_family,
    "evasive_rate": float(v["evasive"].mean()),
    "untruthful_rate": float(v["untruthful"].mean()),
    "toxic_rate": float(v["toxic"].mean()),
  }


def _zero_shot_records(config, workdir: str, n: int) -> list[dict[str, Any]]:
  """Up to `n` examples (0 = all) of every held-out task, in the source's order."""
  source = common.world_source(config, workdir, "heldout_tasks", "test")
  counts: dict[str, int] = {}
  out = []
  for i in range(len(source)):
    r = source[i]
    if n and counts.get(r["task_name"], 0) >= n:
      continue
    counts[r["task_name"]] = counts.get(r["task_name"], 0) + 1
    out.append(r)
  return out


def _zero_shot(runner: _Runner, params, records, rows) -> dict[str, float]:
  """Accuracy per task: the highest summed log-likelihood choice vs the label."""
  if not records:
    return {}
  lp = runner.score(params, rows)
  correct: dict[str, list[bool]] = {}
  at = 0
  for r in records:
    k = len(r["choices"])
    correct.setdefault(r["task_name"], []).append(int(np.argmax(lp[at : at + k])) == r["label"])
    at += k
  order = [t for t in world_lib.HELDOUT_TASKS if t in correct]
  order += sorted(set(correct) - set(order))
  return {name: float(np.mean(correct[name])) for name in order}


def _kl(runner: _Runner, params, sft_params, ids, sft_ids, rng, ec) -> float:
  """Mean over prompts of sum_t log pi(y_t) - log pi_sft(y_t), y ~ pi at temperature 1."""
  toks, masks = runner.sample(
    params, ids, rng, temperature=KL_TEMPERATURE, top_p=1.0, max_new_tokens=ec.max_new_tokens
  )
  resp = [row[m].tolist() for row, m in zip(toks, masks, strict=True)]
  seqs = lambda prompts: [
    (p + y, [0.0] * len(p) + [1.0] * len(y)) for p, y in zip(prompts, resp, strict=True)
  ]
  own = runner.score(params, seqs(ids))
  ref = runner.score(sft_params, seqs(sft_ids))
  return float(np.mean(own - ref))


def _write_generations(workdir, records, replies, verdicts) -> None:
  lines = []
  for name in (p for p in POLICIES if p in replies):
    v = verdicts[name]
    for i, r in enumerate(records):
      lines.append(
        json.dumps(
          {
            "policy": name,
            "index": i,
            "prompt_id": r.get("prompt_id", i),
            "family": r["family"],
            "messages": r["messages"],
            "reply": replies[name][i],
            "gold_score": float(v["gold"][i]),
            "evasive": bool(v["evasive"][i]),
            "untruthful": bool(v["untruthful"][i]),
            "toxic": bool(v["toxic"][i]),
          }
        )
      )
  write_text(os.path.join(workdir, GENERATIONS), "\n".join(lines) + "\n")


def read_generations(workdir: str) -> list[dict[str, Any]]:
  """The replies `evaluate` wrote (empty when there are none)."""
  path = os.path.join(workdir, GENERATIONS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run(
  config: ml_collections.ConfigDict, workdir: str, wall_seconds: Mapping[str, float] | None = None
) -> dict[str, Any]:
  """`evaluate`, then `report.write_report`, then print the summary table (the
  `rlhf-jax eval` command and the last step of the pipeline)."""
  from rlhf_jax import report

  summary = evaluate(config, workdir, wall_seconds)
  examples = config.get("eval", eval_config()).report_examples
  path = os.path.join(workdir, report.REPORT)
  distributed.first("report", lambda: report.write_report(workdir, summary, examples=examples))
  print(report.summary_table(summary))
  print(f"eval: wrote {os.path.join(workdir, SUMMARY)} and {path}")
  return summary


def main(args, config: ml_collections.ConfigDict) -> int:
  """`rlhf-jax eval --config ... --workdir DIR`."""
  run(config, args.workdir)
  return 0
