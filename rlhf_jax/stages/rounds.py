"""Iterated rounds, as ChatGPT was trained: comparisons on the current policy's
conversations -> retrain the reward model -> PPO again.

  rlhf-jax rounds   --config configs/rounds.py --workdir DIR   # data .. SFT, then rounds
  rlhf-jax pipeline --config configs/rounds.py --workdir DIR   # the recipe, rounds, eval

Round 0 is the recipe: comparisons sampled from SFT, the RM, PPO (`config.rounds.policy`:
ppo | ppo_ptx). Round r >= 1 collects its comparisons on round r-1's policy ChatGPT-style
(`data/conversations.py`: a conversation with it, one of its messages chosen at random,
that message and K - 1 alternatives sampled there ranked by the simulated labelers),
retrains the RM and trains the policy again. A round is the registered stages run by
`pipeline.run_stage` in the round's own work directory with the round's settings
(`round_config`), so each is fingerprinted, skipped when complete and resumed from its
checkpoint like any stage:

  DIR/rounds/round_<r>/{comparisons,rm,ppo}/   the round's stages
  DIR/rounds/round_<r>/{data,pretrain,sft}     links to the run's (shared by every round)
  DIR/rounds/round_<r>/probe/validation.jsonl  comparisons of round r's policy's samples
  DIR/rounds/round_<r>/summary.json, round.json   its evaluation and measurements
  DIR/rounds/rounds.json                       every round's measurements, in order
  DIR/rounds/params, params.json               the last round's policy (policy `rounds`)

The design choices the literature disagrees on are config (`rounds_config`): the label
budget (train prompts compared over all rounds, disjoint between rounds) and its split,
the RM's data (this round's comparisons | all so far) and start (SFT | the previous
RM), the policy's start (SFT | the previous policy) and its KL reference (SFT | the
previous policy). Every round runs the policy stage's full `num_iterations`; every
round's validation comparisons (outside the budget) are on the same validation prompts.

Measured per round (`measure`): gold and labeler win rate against SFT with 95% intervals,
gold score, KL to SFT and the held-out LM loss (`evaluate` on the round's directory); the
RM's pairwise accuracy on comparisons of the current policy's samples (the probe: what
it scores while PPO moves the policy away from its data) against that on round 0's
(SFT's samples) and on its own validation split, and round 0's RM's accuracy on the
same probe (did retraining on the policy's data help there?); over-optimisation during the round's
PPO (gold and RM score against sqrt(KL to the round's reference), peak and final gold);
the labelers' agreement on the round's comparisons.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from rlhf_jax import distributed, ranges, sharding
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import common, comparisons, registry, rm, sft
from rlhf_jax.train import checkpoints, metrics_io
from rlhf_jax.workdir import write_text

STAGE = "rounds"
ROUNDS_JSON = "rounds.json"
ROUND_JSON = "round.json"
# The stages every round reads from the run (data, pretrain, SFT: what this stage reads).
SHARED = registry.upstream([STAGE])[:-1]
FROM = (sft.STAGE, "previous")  # where a model starts (or the KL reference): SFT | previous
CHOICES = {
  "rm_data": ("round", "all"),
  "rm_init": FROM,
  "policy_init": FROM,
  "kl_ref": FROM,
  # the RL stages (they log the KL, RM and gold scores the rounds measure)
  "policy": tuple(s.name for s in registry.stages() if s.score_vs_kl),
}
RANGES = {"num_rounds": ">= 1", "label_budget": ">= 0"}


def rounds_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_rounds = 2  # round 0 (the recipe) and num_rounds - 1 more
  c.label_budget = 0  # train prompts compared over all rounds; 0 = all the world's
  c.budget_split = "equal"  # equal | weights per round, comma-separated ("2,1,1")
  c.rm_data = "all"  # round: this round's comparisons | all: every round's so far
  c.rm_init = sft.STAGE  # SFT's trunk, a zero head | previous: the previous round's RM
  c.policy_init = "previous"  # SFT | previous: the previous round's policy
  c.kl_ref = sft.STAGE  # the KL penalty's reference: SFT | previous (the previous policy)
  c.policy = registry.primary().name  # the RL stage trained every round (CHOICES)
  return c


def validate(c: ml_collections.ConfigDict, key: str = STAGE) -> None:
  """Its fields inside `RANGES` and `CHOICES`, and a split of one weight per round."""
  ranges.check(c, key, RANGES)
  for field, choices in CHOICES.items():
    if c[field] not in choices:
      raise UserInputError(f"config.{key}.{field}: must be one of {choices}, got {c[field]!r}")
  weights(c)


def weights(c: ml_collections.ConfigDict) -> list[float]:
  """The label budget's share per round (sums to 1)."""
  if c.budget_split == "equal":
    return [1.0 / c.num_rounds] * c.num_rounds
  try:
    w = [float(x) for x in str(c.budget_split).split(",")]
  except ValueError:
    w = []
  if len(w) != c.num_rounds or min(w) <= 0:
    raise UserInputError(
      f"config.rounds.budget_split: 'equal' or {c.num_rounds} positive weights "
      f"(one per round, comma-separated), got {c.budget_split!r}"
    )
  return [x / sum(w) for x in w]


def budget(c: ml_collections.ConfigDict, available: int) -> list[int]:
  """Train prompts compared in each round (largest remainders; every round >= 1)."""
  total = c.label_budget or available
  if not c.num_rounds <= total <= available:
    raise UserInputError(
      f"config.rounds.label_budget: {total} comparisons for {c.num_rounds} rounds; the "
      f"world has {available} train prompts (config.world.num_prompts)"
    )
  exact = np.asarray(weights(c)) * total
  out = np.maximum(np.floor(exact).astype(int), 1)
  for i in np.argsort(-(exact - np.floor(exact)), kind="stable")[: total - out.sum()]:
    out[i] += 1
  return [int(x) for x in out]


def round_name(r: int) -> str:
  return f"round_{r}"


def round_dir(workdir: str, r: int) -> str:
  return os.path.join(common.stage_dir(workdir, STAGE), round_name(r))


def round_config(
  config: ml_collections.ConfigDict, r: int, available: int
) -> ml_collections.ConfigDict:
  """Round r's settings: its share of the budget (prompts after the earlier rounds'),
  and from round 1 on, conversations with the previous policy and the choices of
  `config.rounds`. Paths are relative to the round's directory."""
  c = config.rounds
  shares = budget(c, available)
  out = config.copy_and_resolve_references()
  out.comparisons.num_prompts = shares[r]
  out.comparisons.prompt_offset = sum(shares[:r])
  if r == 0:
    return out
  prev = f"../{round_name(r - 1)}"
  out.comparisons.conversations = True
  out.comparisons.policy_dir = f"{prev}/{c.policy}"
  if c.rm_data == "all":
    out.rm.extra_comparisons = ",".join(f"../{round_name(q)}/{comparisons.STAGE}" for q in range(r))
  if c.rm_init == "previous":
    out.rm.init_dir = f"{prev}/{rm.STAGE}"
  if c.policy_init == "previous":
    out[c.policy].init_dir = f"{prev}/{c.policy}"
  if c.kl_ref == "previous":
    out[c.policy].ref_dir = f"{prev}/{c.policy}"
  return out


def _link_shared(workdir: str, rdir: str) -> None:
  """Point the round's `data`, `pretrain` and `sft` at the run's (again each time: the
  run's directory may have moved)."""

  def link():
    os.makedirs(rdir, exist_ok=True)
    for name in SHARED:
      target, path = os.path.realpath(os.path.join(workdir, name)), os.path.join(rdir, name)
      if os.path.islink(path) and os.readlink(path) == target:
        continue
      if os.path.islink(path):
        os.remove(path)
      if os.path.exists(target):
        os.symlink(target, path)

  distributed.first(f"links {rdir}", link)


# --- measurements -----------------------------------------------------------------------------


def overoptimisation(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
  """From a PPO run's metrics rows: the curve of (step, sqrt KL, RM score, gold score) at
  each gold evaluation, the peak and final gold score. An evaluation at step s is paired
  with the next logged rollout (its samples come from the policy evaluated), else the last."""
  logged = [r for r in rows if f"{prefix}/kl" in r]
  curve = []
  for row in rows:
    gold = row.get(f"{prefix}/gold_score")
    if gold is None:
      continue
    after = [r for r in logged if r["step"] > row["step"]] or logged[-1:]
    if not after:
      continue
    kl = max(float(after[0][f"{prefix}/kl"]), 0.0)
    curve.append(
      {
        "step": int(row["step"]),
        "sqrt_kl": float(np.sqrt(kl)),
        "score": float(after[0][f"{prefix}/score"]),
        "gold_score": float(gold),
      }
    )
  golds = [p["gold_score"] for p in curve]
  return {
    "curve": curve,
    "peak_gold": max(golds) if golds else None,
    "end_gold": golds[-1] if golds else None,
    "overoptimisation": (max(golds) - golds[-1]) if golds else None,
  }


def probe(config, workdir: str, r: int) -> list[dict[str, Any]]:
  """Validation comparisons of round r's policy's own samples (conversations with it, as
  round r + 1 collects them): `DIR/rounds/round_<r>/probe/validation.jsonl`, made once."""
  rdir = round_dir(workdir, r)
  path = os.path.join(rdir, "probe", "validation.jsonl")
  if not os.path.exists(path):
    cfg = config.copy_and_resolve_references()
    cfg.comparisons.conversations = True
    cfg.comparisons.policy_dir = config.rounds.policy
    records, _ = comparisons.sample(cfg, rdir, ("validation",))["validation"]
    lines = "".join(json.dumps(x) + "\n" for x in records)
    distributed.first(f"probe {r}", lambda: write_text(path, lines))
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def measure(config, workdir: str, r: int, cfg) -> dict[str, Any]:
  """Round r's numbers (cached in its `round.json`)."""
  from rlhf_jax import evaluate

  rdir = round_dir(workdir, r)
  path = os.path.join(rdir, ROUND_JSON)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  policy = config.rounds.policy
  summary = evaluate.evaluate(cfg, rdir)
  p = summary["policies"][policy]
  done = comparisons.final_metrics(rdir)
  rm_metrics = (checkpoints.params_info(common.stage_dir(rdir, rm.STAGE)) or {}).get("metrics", {})
  round0 = comparisons.load(round_dir(workdir, 0), "validation")
  acc = lambda records, directory="": rm.accuracy(cfg, rdir, records, directory)
  own_samples = probe(cfg, workdir, r)
  on_policy, on_round0 = acc(own_samples), acc(round0)
  # Round 0's RM on the same samples: what retraining on the policy's data changed there
  # (the probes of different rounds differ in difficulty, so rounds are not comparable).
  rm0 = common.stage_dir(round_dir(workdir, 0), rm.STAGE)
  on_policy_rm0 = on_policy if r == 0 else acc(own_samples, rm0)
  key, gold_key = f"{rm.STAGE}/val_accuracy", f"{rm.STAGE}/val_gold_accuracy"
  out = {
    "round": r,
    "labels": done.get(f"{comparisons.STAGE}/train"),  # (this round's new comparisons)
    "rm_train_comparisons": len(comparisons.load(rdir, "train", also=cfg.rm.extra_comparisons)),
    "labeler_agreement": done.get(f"{comparisons.STAGE}/train_labeler_agreement"),
    "rm_accuracy_own": rm_metrics.get(key),
    "rm_accuracy_policy": on_policy.get(key),
    "rm_accuracy_round0": on_round0.get(key),
    "rm_gold_accuracy_own": rm_metrics.get(gold_key),
    "rm_gold_accuracy_policy": on_policy.get(gold_key),
    "rm_gold_accuracy_round0": on_round0.get(gold_key),
    "rm0_accuracy_policy": on_policy_rm0.get(key),
    "rm0_gold_accuracy_policy": on_policy_rm0.get(gold_key),
    **{
      k: p.get(k)
      for k in (
        "winrate_vs_sft",
        "winrate_vs_sft_ci95",
        "labeler_winrate_vs_sft",
        "labeler_winrate_vs_sft_ci95",
        "gold_score",
        "gold_score_ci95",
        "kl_to_sft",
        "heldout_lm_loss",
      )
    },
    **overoptimisation(
      metrics_io.read_metrics(common.stage_dir(rdir, policy)), registry.get(policy).metric_prefix
    ),
  }
  out = evaluate.finite_json(out)
  distributed.first(f"round {r}", lambda: write_text(path, json.dumps(out, indent=1)))
  return out


# --- the stage ----------------------------------------------------------------------------------


def is_complete(workdir: str) -> bool:
  return os.path.exists(os.path.join(common.stage_dir(workdir, STAGE), "params.json"))


def load(workdir: str) -> list[dict[str, Any]]:
  """Every finished round's measurements ([] when none)."""
  path = os.path.join(common.stage_dir(workdir, STAGE), ROUNDS_JSON)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["rounds"]


def summary(workdir: str) -> list[dict[str, Any]] | None:
  """Its entry in `summary.json`: the rounds' measurements (null without rounds)."""
  return load(workdir) or None


def _fmt(x: Any) -> str:
  return "–" if x is None else f"{x:.3f}"


def plot_curves(rows: list[dict[str, Any]], out_path: str) -> bool:
  """Gold and RM score against sqrt(KL to the round's reference) during each round's
  PPO, one line per round."""
  if not any(r.get("curve") for r in rows):
    return False
  from rlhf_jax import plots

  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for r in rows:
    xs = [p["sqrt_kl"] for p in r["curve"]]
    for ax, key in zip(axes, ("gold_score", "score"), strict=True):
      ax.plot(xs, [p[key] for p in r["curve"]], marker="o", ms=3, label=f"round {r['round']}")
  for ax, title in zip(axes, ("gold score", "RM score (the round's RM)"), strict=True):
    ax.set_xlabel("sqrt(KL to the round's reference)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return True


def report_section(workdir: str) -> str | None:
  """`report.md`'s rounds section: a row per round, and the over-optimisation plot."""
  from rlhf_jax import plots, report

  rows = load(workdir)
  if not rows:
    return None
  ci = lambda r, k: report.with_ci(r.get(k), r.get(f"{k}_ci95"))
  table = report.markdown_table(
    ["round", "new labels", "RM trained on", "labeler agreement", "gold win rate vs SFT"]
    + ["KL to SFT", "RM acc. own val", "on its policy's", "round 0's RM there", "on round 0's"]
    + ["peak gold", "end gold"],
    [
      [
        str(r["round"]),
        str(r.get("labels")),
        str(r.get("rm_train_comparisons")),
        _fmt(r.get("labeler_agreement")),
        ci(r, "winrate_vs_sft"),
        _fmt(r.get("kl_to_sft")),
        _fmt(r.get("rm_accuracy_own")),
        _fmt(r.get("rm_accuracy_policy")),
        _fmt(r.get("rm0_accuracy_policy")),
        _fmt(r.get("rm_accuracy_round0")),
        _fmt(r.get("peak_gold")),
        _fmt(r.get("end_gold")),
      ]
      for r in rows
    ],
  )
  md = [
    "## Rounds",
    "",
    "Each round's policy against SFT, its RM's pairwise accuracy (labelers) on its own "
    "validation comparisons, on comparisons of the policy it trained (a probe sampled from "
    "conversations with it) — and round 0's RM's on the same probe — and on round 0's "
    "(SFT's samples), and the gold score during its PPO (peak, end). Details: "
    "`rounds/rounds.json`.",
    "",
    table,
  ]
  name = f"{plots.PLOTS}/rounds_gold_vs_kl.png"
  os.makedirs(os.path.join(workdir, plots.PLOTS), exist_ok=True)
  if plot_curves(rows, os.path.join(workdir, name)):
    md += ["", f"![rounds]({name})"]
  return "\n".join(md)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The run's data, pretraining and SFT (when not done), then every round; export the
  last round's policy. Returns the last round's measurements."""
  from rlhf_jax import pipeline

  if STAGE not in config:
    raise UserInputError(f"config.{STAGE}: missing section (use configs/rounds.py)")
  out_dir = common.stage_dir(workdir, STAGE)
  if is_complete(workdir):
    print(f"{STAGE}: complete, skipping ({out_dir})")
    return checkpoints.params_info(out_dir).get("metrics", {})
  c = config.rounds
  validate(c)
  available = config.world.num_prompts  # (the world's train prompts)
  budget(c, available)  # (before anything runs)
  for name in SHARED:
    pipeline.run_stage(registry.get(name), config, workdir)
  rows = []
  for r in range(c.num_rounds):
    rdir, cfg = round_dir(workdir, r), round_config(config, r, available)
    _link_shared(workdir, rdir)
    for name in (comparisons.STAGE, rm.STAGE, c.policy):
      print(f"{STAGE}: round {r}: {name}", flush=True)
      pipeline.run_stage(registry.get(name), cfg, rdir)
    rows.append(measure(config, workdir, r, cfg))
    w = rows[-1]
    print(
      f"{STAGE}: round {r}: gold win rate vs SFT {w['winrate_vs_sft']:.3f}, RM accuracy "
      f"{w['rm_accuracy_policy']:.3f} on its policy's samples, {w['rm_accuracy_round0']:.3f} "
      f"on round 0's",
      flush=True,
    )
  last = rdir
  body = json.dumps({"config": c.to_dict(), "rounds": rows}, indent=1)
  distributed.first(STAGE, lambda: write_text(os.path.join(out_dir, ROUNDS_JSON), body))
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  params = sft.load_policy(config, last, mesh, rules, c.policy)
  metrics = {f"{STAGE}/{k}": v for k, v in rows[-1].items() if isinstance(v, (int, float))}
  checkpoints.export_params(
    out_dir,
    params,
    config.model.to_dict(),
    metrics=metrics,
    tokenizer=common.tokenizer_of(config, workdir),
    rounds=len(rows),
  )
  return metrics
