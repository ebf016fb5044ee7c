"""Evaluation of every trained policy on held-out data: `DIR/summary.json`.

  rlhf-jax eval --config configs/default.py --workdir DIR

Policies: every registered stage that exports one (`stages/registry.py`), in pipeline
order: `pretrained` (`DIR/pretrain`, a base LM (`few_shot`), prompted FEW-SHOT: `few_shot`
labeler demonstrations of the `demonstrations` train split go before the prompt as
earlier chat turns, the paper's "GPT-3 prompted" baseline; its reply is cut at the first
"\\nUser:" or "\\nAssistant:" when it runs on into further turns), `sft` (the
reference), `ppo`, `ppo_ptx` and any method registered after them. A policy without an
export is skipped; the reference is required (everything is compared with it).

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

Also each stage's own summary (a module-level `summary(workdir)`: the RM's validation
accuracy from `DIR/rm/params.json`) and wall seconds per stage:
each stage's own `metrics.wall_seconds`, overridden by `DIR/wall_seconds.json`
(`{"<stage>": seconds}`, written by the pipeline) and by `wall_seconds=` when given,
plus `eval` (this evaluation); `total` is the sum of the stages.

Writes `DIR/summary.json` (contract keys in ../shared/ARCHITECTURE.md; every number
finite or null) and `DIR/eval/generations.jsonl` (every reply with its judge verdicts,
which `report.py` samples for examples). `stats.py` holds the statistics, `runner.py`
the sampling-and-scoring runner; `run` adds the report. A policy's replies and numbers are cached in
its stage directory (`DIR/<stage>/eval_cache/`), keyed by its export, SFT's (for the
KL), the world, the model and this section: re-evaluating, or evaluating a sweep whose
points share the SFT stage, does not redo them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from rlhf_jax import provenance, report, sharding, tokenizer
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.data import judge
from rlhf_jax.data import world as world_lib
from rlhf_jax.errors import UserInputError
from rlhf_jax.evaluate import runner as runner_lib
from rlhf_jax.evaluate import stats
from rlhf_jax.models import abstract_params
from rlhf_jax.stages import common, registry
from rlhf_jax.train import checkpoints

SUMMARY = "summary.json"
GENERATIONS = os.path.join("eval", "generations.jsonl")


def eval_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """The `config.eval` section."""
  c = ml_collections.ConfigDict()
  c.num_prompts = 0  # held-out prompts (prompts/validation) every policy answers; 0 = all
  # The first prompts of the split left out: a leaderboard selects its settings on them
  # and reports on the rest (experiments/leaderboard.py).
  c.skip_prompts = 0
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
  counts = (
    "num_prompts",
    "skip_prompts",
    "few_shot",
    "kl_prompts",
    "heldout_docs",
    "zero_shot_examples",
  )
  checks += tuple((k, ec[k] >= 0, "must be >= 0") for k in (*counts, "report_examples", "seed"))
  for key, ok, why in checks:
    if not ok:
      raise UserInputError(f"config.eval.{key}: {why}, got {ec[key]!r}")


# --- the evaluation --------------------------------------------------------------------------


def _take(source, n: int, skip: int = 0) -> list[dict[str, Any]]:
  """Records skip, skip + 1, ... of `source`: n of them, or to the end when n is 0."""
  stop = len(source) if not n else min(len(source), skip + n)
  return [source[i] for i in range(skip, stop)]


def _mean(x) -> float:
  return float(np.mean(x)) if len(x) else float("nan")


def judged(tasks: Sequence[Mapping[str, Any]], replies: Sequence[str]) -> dict[str, np.ndarray]:
  """Per reply: gold score and evasive / untruthful / toxic flags (f64[N] each)."""
  pairs = list(zip(tasks, replies, strict=True))
  return {
    "gold": np.array([judge.score(t, r) for t, r in pairs]),
    "evasive": np.array([judge.is_evasive(t, r) for t, r in pairs]),
    "untruthful": np.array([judge.is_untruthful(t, r) for t, r in pairs]),
    "toxic": np.array([judge.is_toxic(t, r) for t, r in pairs]),
  }


def available_policies(workdir: str) -> list[str]:
  """The registered policies whose stage exported its parameters, in pipeline order."""
  return [name for name, s in registry.policies().items() if s.is_complete(workdir)]


def collect_wall_seconds(workdir: str, given: Mapping[str, float] | None = None) -> dict:
  """Seconds per stage: each stage's own record, then `DIR/wall_seconds.json`, then
  `given` (later wins). No `total` (the caller adds it)."""
  out: dict[str, float] = {}
  for stage in registry.stages():
    seconds = stage.final_metrics(workdir).get("wall_seconds")
    if seconds is not None:
      out[stage.name] = float(seconds)
  path = os.path.join(workdir, workdir_lib.WALL_SECONDS)
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


def stage_summaries(workdir: str) -> dict[str, Any]:
  """Each stage's own entry of the summary (its module's `summary(workdir)`), by name."""
  out = {}
  for stage in registry.stages():
    hook = stage.hook("summary")
    if hook is not None:
      out[stage.name] = hook(workdir)
  return out


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


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, wall_seconds: Mapping[str, float] | None = None
) -> dict[str, Any]:
  """Evaluate every exported policy; write `DIR/summary.json` and the generations.

  Returns the summary (as written). `wall_seconds` adds or overrides stage times.
  """
  start = time.time()
  ec = config.eval if registry.EVAL in config else eval_config()
  validate(ec)
  policies = available_policies(workdir)
  reference = registry.reference()
  if reference.policy not in policies:
    raise UserInputError(
      f"{reference.directory(workdir)}: no exported {reference.title} policy; evaluation "
      f"compares every policy with it (run `rlhf-jax {reference.name}` first)"
    )
  tok = common.load_tokenizer(config, workdir)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  runner = runner_lib.Runner(
    common.model_config(config), mesh, sharding.round_to_batch_shards(ec.batch_size, mesh)
  )
  records = [
    r
    for r in _take(
      common.world_source(config, workdir, "prompts", "validation"), ec.num_prompts, ec.skip_prompts
    )
    if "task" in r
  ]
  if not records:
    raise UserInputError("config.eval.num_prompts: no held-out prompts to evaluate on")
  tasks = [r["task"] for r in records]
  demos = common.world_source(config, workdir, "demonstrations", "train")
  prefix = runner_lib.few_shot_prefix(demos, ec.few_shot)
  docs = _take(common.world_source(config, workdir, "heldout_text", "test"), ec.heldout_docs)
  zs_records = _zero_shot_records(config, workdir, ec.zero_shot_examples)
  data = {
    "lm_rows": runner_lib.heldout_rows(tok, docs, ec.heldout_seq_len),
    "zs_records": zs_records,
    "zs_rows": [row for r in zs_records for row in runner_lib.choice_rows(tok, r)],
    "kl_n": min(len(records), ec.kl_prompts or len(records)),
  }
  base = jax.random.fold_in(jax.random.PRNGKey(config.seed), ec.seed)

  def prompt_ids(name: str) -> list[list[int]]:
    pre = prefix if registry.policies()[name].few_shot else []
    return [
      tokenizer.truncate_prompt(tok.encode_prompt([*pre, *r["messages"]]), ec.max_prompt_len)
      for r in records
    ]

  ref_prompts = prompt_ids(reference.policy)
  like = abstract_params(config.model, ("lm",), mesh, rules)
  load = lambda name: checkpoints.load_params(
    registry.policies()[name].directory(workdir), like, config.model.to_dict()
  )
  results: dict[str, dict[str, Any]] = {}
  replies: dict[str, list[str]] = {}
  ref_params = None
  # An inference-time policy (best-of-n) brings its sampler (loaded here, outside the
  # mesh context, as parameters are) and its analytic KL.
  own = {name: registry.policies()[name].hook("sample_fn") for name in policies}
  samplers = {n: f(workdir, runner.model_cfg, mesh, rules) for n, f in own.items() if f}
  with sharding.use(mesh, rules):
    for name in [reference.policy] + [p for p in policies if p != reference.policy]:
      t0 = time.time()
      cache = _cache_path(config, workdir, name, ec)
      if os.path.exists(cache):
        with open(cache) as f:
          replies[name], results[name] = json.load(f)
        print(f"eval: {name} from {cache}")
        continue
      params = load(name)
      if name == reference.policy:
        ref_params = params
      elif ref_params is None:
        ref_params = load(reference.policy)
      own_kl = registry.policies()[name].hook("policy_kl")
      replies[name], results[name] = _run_policy(
        runner,
        tok,
        name,
        params,
        ref_params,
        prompt_ids(name),
        ref_prompts,
        base,
        ec,
        data,
        sample_fn=samplers.get(name),
        kl=own_kl(workdir) if own_kl else None,
      )
      workdir_lib.write_text(cache, json.dumps([replies[name], finite_json(results[name])]))
      print(f"eval: {name} in {time.time() - t0:.1f}s")

  families = [f for f in world_lib.FAMILIES if any(t["family"] == f for t in tasks)]
  families += sorted({t["family"] for t in tasks} - set(families))
  verdicts = {name: judged(tasks, replies[name]) for name in replies}
  out_policies = {}
  for i, name in enumerate(p for p in registry.policies() if p in results):
    seed = [config.seed, ec.seed, i]
    out_policies[name] = {
      "stage": registry.policies()[name].name,
      **_compare(tasks, replies, verdicts, name, families, seed, ec, config.world),
      "response_words": float(np.mean([len(r.split()) for r in replies[name]])),
      **results[name],
    }
  _write_generations(workdir, records, replies, verdicts)

  wall = collect_wall_seconds(workdir, wall_seconds)
  wall[registry.EVAL] = time.time() - start
  wall["total"] = sum(wall.values())
  summary = {
    "wall_seconds": wall,
    **stage_summaries(workdir),
    "policies": out_policies,
    "num_prompts": len(records),
    "prompts_per_family": {f: sum(t["family"] == f for t in tasks) for f in families},
    "zero_shot_examples": {
      n: sum(r["task_name"] == n for r in zs_records)
      for n in dict.fromkeys(r["task_name"] for r in zs_records)
    },
    "heldout_lm_tokens": int(sum(sum(t) for _, t in data["lm_rows"])),
    registry.EVAL: {
      **ec.to_dict(),
      "kl_temperature": runner_lib.KL_TEMPERATURE,
      "config_seed": int(config.seed),
    },
    "generations": GENERATIONS,
  }
  summary = finite_json(summary)
  text = json.dumps(summary, indent=1, allow_nan=False) + "\n"
  workdir_lib.write_text(os.path.join(workdir, SUMMARY), text)
  return summary


def _cache_path(config, workdir: str, name: str, ec) -> str:
  """Where policy `name`'s replies and numbers are cached: its stage directory, under a
  key of everything they depend on (its export, the reference's and those of the stages
  it reads: best-of-n's replies change with the RM's though its own export does not; the
  world, model, seed and evaluation settings)."""
  own = registry.policies()[name]
  exports = []
  inputs = (registry.get(n) for n in own.reads)
  for stage in dict.fromkeys((own, registry.reference(), *inputs)):
    path = os.path.join(stage.directory(workdir), "params.json")
    if stage in (own, registry.reference()) or os.path.exists(path):
      with open(path) as f:
        exports.append(f.read())
  what = {
    "policy": name,
    "exports": exports,
    "eval": ec.to_dict(),
    "seed": config.seed,
    **{k: config[k].to_dict() for k in ("world", "tokenizer", "model", "mesh")},
  }
  key = hashlib.blake2b(json.dumps(what, sort_keys=True, default=str).encode(), digest_size=8)
  return os.path.join(own.directory(workdir), "eval_cache", f"{key.hexdigest()}.json")


def _run_policy(
  runner, tok, name, params, ref_params, ids, ref_ids, base, ec, data, sample_fn=None, kl=None
):
  """One policy's replies to the prompts (ids) and its model-side numbers: KL to the
  reference (`kl` when known), held-out LM loss, zero-shot accuracies; `sample_fn`: the
  policy's own sampler (`sampling.sample_prompts`)."""
  toks, _ = runner.sample(
    params,
    ids,
    jax.random.fold_in(base, 0),
    temperature=ec.temperature,
    top_p=ec.top_p,
    max_new_tokens=ec.max_new_tokens,
    sample_fn=sample_fn,
  )
  texts = [tok.decode_response(row) for row in toks]
  if registry.policies()[name].few_shot:
    texts = [tokenizer.cut_reply(t) for t in texts]
  n = data["kl_n"]
  if kl is None and name != registry.reference().policy:
    rng = jax.random.fold_in(base, 1)
    kl = runner.kl(params, ref_params, ids[:n], ref_ids[:n], rng, ec.max_new_tokens)
  zero_shot = runner.zero_shot(params, data["zs_records"], data["zs_rows"])
  return texts, {
    "kl_to_sft": kl or 0.0,
    "heldout_lm_loss": runner.lm_loss(params, data["lm_rows"]),
    "zero_shot": zero_shot,
    "zero_shot_mean": _mean(list(zero_shot.values())),
  }


def _compare(tasks, replies, verdicts, name, families, seed, ec, world_config) -> dict:
  """Win rates against the reference (gold judge, labelers) with intervals, and the
  judge's numbers of one policy's replies."""
  ref_name = registry.reference().policy
  v, ref = verdicts[name], verdicts[ref_name]
  gold_wins = stats.outcomes(v["gold"], ref["gold"])
  lab_wins = stats.labeler_outcomes(
    tasks,
    replies[name],
    replies[ref_name],
    np.random.default_rng([*seed, 0]),
    world_config,
    v["gold"],
    ref["gold"],
  )
  ci = lambda x, k: stats.ci95(x, ec.ci, np.random.default_rng([*seed, k]), ec.bootstrap_samples)
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


def _write_generations(workdir, records, replies, verdicts) -> None:
  lines = []
  for name in (p for p in registry.policies() if p in replies):
    v = verdicts[name]
    for i, r in enumerate(records):
      row = {
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
      lines.append(json.dumps(row))
  workdir_lib.write_text(os.path.join(workdir, GENERATIONS), "\n".join(lines) + "\n")


def run(
  config: ml_collections.ConfigDict, workdir: str, wall_seconds: Mapping[str, float] | None = None
) -> dict[str, Any]:
  """`evaluate`, then `report.write_report`, then print the summary table (the
  `rlhf-jax eval` command and the last step of the pipeline)."""
  from rlhf_jax import distributed

  summary = evaluate(config, workdir, wall_seconds)
  examples = config.get(registry.EVAL, eval_config()).report_examples
  path = os.path.join(workdir, report.REPORT)
  distributed.first("report", lambda: report.write_report(workdir, summary, examples=examples))
  print(report.summary_table(summary))
  print(f"eval: wrote {os.path.join(workdir, SUMMARY)} and {path}")
  return summary


def main(args, config: ml_collections.ConfigDict) -> int:
  """`rlhf-jax eval --config ... --workdir DIR`: every stage's outputs must have been
  made with `config`'s settings (else the summary would name settings its policies were
  not trained with)."""
  provenance.check_all(config, args.workdir)
  run(config, args.workdir)
  return 0
