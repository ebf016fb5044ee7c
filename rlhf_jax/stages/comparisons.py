"""Stage 3a: comparison data — sample K responses per prompt, have labelers rank them.

  rlhf-jax comparisons --config configs/default.py --workdir DIR

For every prompt of the default world's `prompts` dataset (train and validation
splits, at most `num_prompts` / `num_prompts_val` of each) it draws K uniformly in
[world.rank_k_min, world.rank_k_max], samples K responses from the SFT policy
(`DIR/sft`) with the KV-cache sampler — all (prompt, sample) rows of a split batched
together, `batch_size` rows per sampler call — and has a simulated labeler of the
pool rank them (`labelers.rank`). Writes

  DIR/comparisons/train.jsonl, validation.jsonl   one comparison per line:
      {"messages", "responses", "ranking" (best first), "labeler_id", "family", "task"}
  DIR/comparisons/DONE                             manifest (counts, config), written last

in the user rankings format, so `user_data.load_rankings` reads them (it keeps the
extra keys; the reward model needs `task` for its gold-judge accuracy). A run with a
DONE file is skipped; one made with another config is an error, never overwritten.
The output is a pure function of the config and seed.

Responses that decode to empty (or whitespace-only) text, and repeats of an earlier
response's text, are dropped from their comparison before ranking (counted as
`empty_responses` and `duplicate_responses`; a comparison left with fewer than 2
responses is dropped, `dropped_comparisons`): the rankings format has neither.

Your own data. Set `config.comparisons.user_train` (and optionally `user_validation`)
to a rankings JSONL (`{"prompt" | "messages", "responses", "ranking"}`) or, with
`user_format=hh`, to Anthropic HH `{"chosen", "rejected"}` pairs: the stage then
samples nothing and writes the user's comparisons (validated by `user_data`) in the
same layout; without `user_validation`, a seeded `user_val_fraction` of them is held
out. Their records carry no `task`, so the reward model reports no gold accuracy.
A malformed record stops the stage with its `file:line`; with `skip_bad` it is skipped
and counted (`comparisons/<split>_skipped_bad`).

Another policy, ChatGPT-style. `policy_dir` (relative to the work directory) samples an
exported policy instead of SFT (an earlier round's, `stages/rounds.py`); with
`conversations` the comparisons come from conversations with it
(`data/conversations.py`): one of its messages is chosen at random, its earlier replies
are its own, and the chosen message and K - 1 alternatives sampled there are ranked
(records gain `turn` and `num_turns`). `prompt_offset` skips that many train prompts
(rounds spend disjoint prompts).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from rlhf_jax import distributed, ranges, sharding
from rlhf_jax.data import conversations, labelers, user_data
from rlhf_jax.data import records as records_lib
from rlhf_jax.data import world as world_lib
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import common, sft

STAGE = "comparisons"
SPLITS = ("train", "validation")
MANIFEST = "DONE"
RANGES = {
  **dict.fromkeys(("num_prompts", "num_prompts_val", "prompt_offset"), ">= 0"),  # 0 = all
  "user_val_fraction": "(0, 1)",
}


def comparisons_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.temperature = 1.0  # sampling temperature of the SFT policy (1 = its own distribution)
  c.top_p = 1.0  # nucleus sampling; 1 = off
  c.max_new_tokens = 32  # response length limit (tokens)
  c.max_prompt_len = 64  # prompts keep their last tokens up to this length
  c.batch_size = 256  # sampler rows (prompt x sample) per call; multiple of mesh data*fsdp
  c.num_prompts = 0  # train prompts to compare; 0 = all
  c.num_prompts_val = 0  # validation prompts to compare; 0 = all
  c.prompt_offset = 0  # train prompts skipped first (each round compares new ones)
  c.policy_dir = ""  # an exported policy to sample ("" = SFT; relative to the workdir)
  c.conversations = False  # sample at a random turn of conversations with the policy
  c.user_train = ""  # a user's rankings / HH JSONL: replaces sampling and labelling
  c.user_validation = ""  # its validation file; "" = hold out user_val_fraction of user_train
  c.user_format = "rankings"  # rankings | hh (Anthropic {chosen, rejected} pairs)
  c.user_val_fraction = 0.05  # share of user_train held out when no user_validation
  c.skip_bad = False  # skip (and count) malformed records of the user files instead of stopping
  if runlocal:
    c.batch_size, c.max_new_tokens, c.num_prompts, c.num_prompts_val = 64, 16, 32, 16
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  """Its own fields inside `RANGES` (the registry's config hook; config_lib: the rest)."""
  ranges.check(c, key, RANGES)


def output_path(workdir: str, split: str) -> str:
  """`DIR/comparisons/<split>.jsonl`."""
  return os.path.join(common.stage_dir(workdir, STAGE), f"{split}.jsonl")


def is_complete(workdir: str) -> bool:
  """The stage is complete once its manifest (written last) exists."""
  return os.path.exists(os.path.join(common.stage_dir(workdir, STAGE), MANIFEST))


def final_metrics(workdir: str) -> dict[str, Any]:
  """The counts and timing the stage recorded in its manifest ({} before it is done)."""
  done = _read_manifest(common.stage_dir(workdir, STAGE))
  return (done or {}).get("summary", {})


def load(workdir: str, split: str, also: str = "") -> list[dict[str, Any]]:
  """The comparisons of a split, as `user_data.load_rankings` reads them; first those of
  the comparisons directories `also` names (comma-separated, relative to `workdir`)."""
  dirs = [common.resolve(workdir, d.strip()) for d in also.split(",") if d.strip()]
  out = []
  for d in [*dirs, common.stage_dir(workdir, STAGE)]:
    path = os.path.join(d, f"{split}.jsonl")
    if not os.path.exists(os.path.join(d, MANIFEST)):
      raise UserInputError(f"{path}: no comparisons (run `rlhf-jax comparisons` first)")
    out += user_data.load_rankings(path).records
  return out


# --- sampling and ranking -----------------------------------------------------------------


PURPOSES = ("k", "rank", "val", "second_opinion", "turn")


def _rng(seed: int, split: str, purpose: str) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split), PURPOSES.index(purpose)])


def compare(
  config: ml_collections.ConfigDict,
  records: list[dict[str, Any]],
  sample_fn,
  split: str,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Comparisons of `records` (prompt records with `messages` and `task`).

  `sample_fn(prompts, rng) -> texts` samples one response per prompt (a list of
  message lists). K_i is drawn per prompt, all K_i copies of each prompt go to
  `sample_fn` in one list, then a labeler ranks each prompt's responses.
  """
  k_rng, rank_rng = _rng(config.seed, split, "k"), _rng(config.seed, split, "rank")
  ks = [labelers.num_responses(k_rng, config.world) for _ in records]
  prompts = [r["messages"] for r, k in zip(records, ks, strict=True) for _ in range(k)]
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1000 + SPLITS.index(split))
  texts = sample_fn(prompts, key)
  stats = {"prompts": len(records), "responses": len(texts), "empty_responses": 0}
  stats["duplicate_responses"] = stats["dropped_comparisons"] = 0
  kept, responses, start = [], [], 0
  for r, k in zip(records, ks, strict=True):
    resp = [t for t in texts[start : start + k] if t.strip()]
    start += k
    stats["empty_responses"] += k - len(resp)
    # A text ranked against itself is no preference (the rankings format rejects it).
    first = {}  # stripped text -> its first response
    for t in resp:
      first.setdefault(t.strip(), t)
    stats["duplicate_responses"] += len(resp) - len(first)
    resp = list(first.values())
    if len(resp) < 2:
      stats["dropped_comparisons"] += 1
      continue
    kept.append(r)
    responses.append(resp)
  ranked = labelers.rank(
    [r["task"] for r in kept], [r["messages"] for r in kept], responses, rank_rng, config.world
  )
  for rec, r in zip(ranked, kept, strict=True):
    rec.update({k: r[k] for k in ("turn", "num_turns") if k in r})
  stats["labeler_agreement"] = labelers.second_opinion_agreement(
    ranked, _rng(config.seed, split, "second_opinion"), config.world
  )
  return ranked, stats


def prompts(config, workdir: str, split: str) -> list[dict[str, Any]]:
  """The split's prompt records to compare: at most `num_prompts` (`num_prompts_val`)
  from `prompt_offset` (train), with their conversation turns when `conversations`."""
  c = config.comparisons
  first = c.prompt_offset if split == "train" else 0
  source = common.world_source(config, workdir, "prompts", split)
  n = min(
    len(source) - first, (c.num_prompts if split == "train" else c.num_prompts_val) or len(source)
  )
  if n <= 0:
    raise UserInputError(
      f"config.comparisons.prompt_offset: {first} leaves none of the {len(source)} {split} prompts"
    )
  chosen = [source[i] for i in range(first, first + n)]
  if not c.conversations:
    return chosen
  world = world_lib.make_world(config.world)
  turns = {r["prompt_id"]: r["turns"] for r in records_lib.prompt_records(world, split, turns=True)}
  return [{**r, "turns": turns[r["prompt_id"]]} for r in chosen]


def sample_split(config, workdir, split, sample_fn, reply_fn=None) -> tuple[list[dict], dict]:
  """Comparisons of a split's prompts (`compare`); with `conversations`, at a random turn of
  conversations whose earlier replies `reply_fn(prompts, turn)` writes."""
  records = prompts(config, workdir, split)
  if config.comparisons.conversations:
    chosen = conversations.choose_turns(records, _rng(config.seed, split, "turn"))
    records = conversations.contexts(records, chosen, reply_fn)
  return compare(config, records, sample_fn, split)


def _user_splits(config) -> dict[str, tuple[list[dict], dict[str, int]]]:
  """The user's comparisons, validated, with empty responses dropped."""
  c = config.comparisons
  loaders = {"rankings": user_data.load_rankings, "hh": user_data.load_hh_pairs}
  if c.user_format not in loaders:
    raise UserInputError(
      f"config.comparisons.user_format: must be rankings|hh, got {c.user_format!r}"
    )
  train, train_stats = loaders[c.user_format](c.user_train, skip_bad=c.skip_bad)
  skipped = {"train": train_stats.skipped, "validation": 0}
  if c.user_validation:
    val, val_stats = loaders[c.user_format](c.user_validation, skip_bad=c.skip_bad)
    skipped["validation"] = val_stats.skipped
  else:
    if not 0 < c.user_val_fraction < 1:
      raise UserInputError(
        f"config.comparisons.user_val_fraction: must be in (0, 1), got {c.user_val_fraction}"
      )
    order = _rng(config.seed, "validation", "val").permutation(len(train))
    n_val = max(1, round(c.user_val_fraction * len(train)))
    if n_val >= len(train):
      raise UserInputError(f"{c.user_train}: {len(train)} comparisons are too few to hold out")
    val = [train[i] for i in sorted(order[:n_val])]
    train = [train[i] for i in sorted(order[n_val:])]
  splits = {"train": _drop_empty(train), "validation": _drop_empty(val)}
  for split, (_, stats) in splits.items():
    stats["skipped_bad"] = skipped[split]  # (of the split's file: 0 for a held-out share)
  return splits


def _drop_empty(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
  """Remove empty responses (HH has a few) and re-index the ranking."""
  out, stats = [], {"prompts": len(records), "responses": 0, "empty_responses": 0}
  stats["dropped_comparisons"] = 0
  for r in records:
    keep = [i for i, t in enumerate(r["responses"]) if t.strip()]
    stats["responses"] += len(r["responses"])
    stats["empty_responses"] += len(r["responses"]) - len(keep)
    if len(keep) < 2:
      stats["dropped_comparisons"] += 1
      continue
    if len(keep) < len(r["responses"]):
      new = {old: j for j, old in enumerate(keep)}
      r = {
        **r,
        "responses": [r["responses"][i] for i in keep],
        "ranking": [new[i] for i in r["ranking"] if i in new],
      }
    out.append(r)
  return out, stats


# --- files ------------------------------------------------------------------------------


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def _read_manifest(out_dir: str) -> dict[str, Any] | None:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def sample(config, workdir: str, splits: tuple[str, ...] = SPLITS) -> dict[str, tuple]:
  """{split: (comparisons, counts)} sampled from the policy (SFT or `policy_dir`'s) and
  ranked by the labelers."""
  c = config.comparisons
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  rows = sharding.round_to_batch_shards(c.batch_size, mesh)
  tok = common.load_tokenizer(config, workdir)
  model_cfg = common.model_config(config)
  params = sft.load_policy(config, workdir, mesh, rules, c.policy_dir)

  def sample_fn(prompts, rng):
    with sharding.use(mesh, rules):
      return common.generate(
        model_cfg,
        params,
        tok,
        prompts,
        rng,
        max_new_tokens=c.max_new_tokens,
        temperature=c.temperature,
        top_p=c.top_p,
        batch_size=rows,
        max_prompt_len=c.max_prompt_len,
        mesh=mesh,
      )

  out = {}
  for split in splits:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2000 + SPLITS.index(split))
    reply_fn = lambda prompts, turn, key=key: sample_fn(prompts, jax.random.fold_in(key, turn))
    out[split] = sample_split(config, workdir, split, sample_fn, reply_fn)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Write the comparisons datasets (skipped when done). Returns counts and timing."""
  out_dir = common.stage_dir(workdir, STAGE)
  done = _read_manifest(out_dir)  # (made with these settings: `provenance.check`)
  if done is not None:
    print(f"{STAGE}: complete, skipping ({out_dir})")
    return done["summary"]
  start = time.time()
  c = config.comparisons
  if c.user_train:
    splits = _user_splits(config)
  else:
    splits = sample(config, workdir)

  os.makedirs(out_dir, exist_ok=True)
  summary: dict[str, Any] = {}
  for split, (records, stats) in splits.items():
    summary[f"{STAGE}/{split}"] = len(records)
    ks = [len(r["responses"]) for r in records]
    summary[f"{STAGE}/{split}_mean_k"] = float(np.mean(ks)) if ks else 0.0
    summary.update({f"{STAGE}/{split}_{k}": v for k, v in stats.items()})
  summary["wall_seconds"] = time.time() - start
  responses = sum(s["responses"] for _, s in splits.values())
  summary[f"{STAGE}/responses_per_s"] = responses / max(summary["wall_seconds"], 1e-9)

  def write():  # (every process sampled the same comparisons; one writes them)
    for split, (records, _) in splits.items():
      _write_jsonl(output_path(workdir, split), records)
    tmp = os.path.join(out_dir, f"{MANIFEST}.tmp")
    with open(tmp, "w") as f:
      json.dump({"summary": summary}, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))

  distributed.first("comparisons", write)
  print(
    f"{STAGE}: {summary[f'{STAGE}/train']} train / {summary[f'{STAGE}/validation']} validation "
    f"comparisons in {summary['wall_seconds']:.1f}s -> {out_dir}"
  )
  return summary
