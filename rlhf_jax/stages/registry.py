"""Every stage of the recipe, registered once: the one place that knows the parts.

A stage is a module with `train_and_evaluate(config, workdir)` (or the function named
by `run`) that reads the outputs of the stages in `reads` from the work directory and
writes `DIR/<name>/`. Everything that lists stages is derived from this registry:

  cli.py        one subcommand per stage; `sample --policy` / `export-hf --policy`
  pipeline.py   the stages in registration order (each after what it reads), then eval
  sweep.py      the levels, each stage's fingerprint (its sections and its inputs'),
                the vmapped groups (`group`)
  config_lib    the stage sections validated, the `config.init` keys
  evaluate      the policies it scores (`exports="policy"`), the reference, wall times,
                the reward model's validation numbers
  report.py     the rows (titles), training curves, health alerts, score-vs-KL plots
  plan.py       each stage's memory model (`memory`)
  lora.py       the stages that train LoRA adapters (`lora`; `lora_stages`)

A new method is one module plus one `register(Stage(...))` below. Entries hold only
names and plain data, so reading the registry imports no JAX; a stage's module is
imported when it runs (`Stage.load`). The module may define optional hooks:

  is_complete(workdir) -> bool     default: `DIR/<name>/params.json` exists
  final_metrics(workdir) -> dict   default: the metrics recorded in its params.json
  summary(workdir) -> dict         its entry in `summary.json` (e.g. the RM's accuracy)
  validate(section, key) -> None   impossible values of its own section's fields, errors
                                   naming `config.<key>.<field>` (config_lib checks the
                                   fields every stage shares: sizes, lengths, optimiser)
  report_section(workdir) -> str   a section of its own in `report.md` (Markdown, once
                                   complete: the rounds' table and plot)
  sample_fn(workdir, model_cfg, mesh=None, rules=()) -> sampler
                                   an inference-time policy's own sampler (best-of-n),
                                   used by eval and `sample` in place of plain sampling
  policy_kl(workdir) -> float      its KL to the reference when known (analytic), which
                                   eval reports instead of estimating it

An `optional` stage (the rounds) runs in pipelines and sweeps only when the config has its
section (configs/rounds.py); its subcommand always exists.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

EVAL = "eval"  # the pipeline's last step: evaluation of every exported policy (not a stage)
LORA = "lora"  # the config section of LoRA adapters (rlhf_jax/lora.py)
EXPORTS = ("data", "policy", "reward_model")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage. Only `name`, `module` and `help` are required."""

  name: str  # subcommand, `DIR/<name>/`, its config section and metric prefix by default
  module: str  # import path of the module that runs it
  help: str  # one line for `rlhf-jax --help`
  run: str = "train_and_evaluate"  # the module's `fn(config, workdir) -> dict`
  section: str | None = None  # its own config section (None: `name`; "": none)
  sections: tuple[str, ...] = ()  # every section it reads itself (default: `section`)
  reads: tuple[str, ...] = ()  # the stages whose outputs it reads
  exports: str = "policy"  # data | policy (evaluation scores it) | reward_model
  policy: str = ""  # the name evaluation and `--policy` give its policy (default: `name`)
  title: str = ""  # its row in the report (default: `policy`)
  few_shot: bool = False  # a base LM: prompted with demonstrations, reply cut at the next turn
  reference: bool = False  # the policy every other is compared with (win rate, KL)
  primary: bool = False  # the recipe's result: what `sample` / `export-hf` show by default
  init_key: str = ""  # the `config.init` key of a Hugging Face checkpoint standing in for it
  init_reads: tuple[str, ...] = ()  # the `config.init` keys deciding its output (default: init_key)
  zero_ok: tuple[str, ...] = ()  # count fields where 0 means "derive it" (not an error)
  metric_prefix: str = ""  # its metrics are `<prefix>/<what>` (default: `name`)
  curves: tuple[str, ...] = ()  # metrics (after the prefix) the report plots, in order
  score_vs_kl: bool = False  # it logs kl / score / gold_score: plot them against each other
  alerts: tuple[tuple[str, str], ...] = ()  # (label, 0/1 metric after the prefix): health
  group: str = ""  # module training several runs as one vmapped program (sweep --vmap)
  memory: str = ""  # its step's memory model in plan.MEMORY_MODELS ("" = not planned)
  prints_result: bool = False  # its subcommand prints what `run` returns (JSON)
  optional: bool = False  # pipeline and sweep run it only when the config has its section
  # it trains LoRA adapters when `config.lora` turns them on for it (`lora_stages`); the
  # section is then one of its `sections`
  lora: bool = False

  def __post_init__(self):
    if self.exports not in EXPORTS:
      raise ValueError(f"stage {self.name}: exports must be one of {EXPORTS}")
    if self.name == EVAL:
      raise ValueError(f"{EVAL!r} is the pipeline's evaluation step, not a stage name")
    own = self.name if self.section is None else self.section
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("section", own)
    set_("sections", self.sections or ((own,) if own else ()))
    if self.lora and LORA not in self.sections:
      set_("sections", (*self.sections, LORA))
    set_("init_reads", self.init_reads or ((self.init_key,) if self.init_key else ()))
    set_("metric_prefix", self.metric_prefix or self.name)
    if self.exports == "policy":
      set_("policy", self.policy or self.name)
    set_("title", self.title or self.policy or self.name)

  def active(self, config) -> bool:
    """Whether pipelines and sweeps of `config` run it (an optional stage: when `config`
    has its section)."""
    return not self.optional or self.section in config

  def load(self) -> ModuleType:
    return importlib.import_module(self.module)

  def hook(self, name: str) -> Callable | None:
    """The module's optional function `name` (see the module docstring)."""
    return getattr(self.load(), name, None)

  def train_and_evaluate(self, config, workdir: str) -> Any:
    return getattr(self.load(), self.run)(config, workdir)

  def directory(self, workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), self.name)

  def is_complete(self, workdir: str) -> bool:
    hook = self.hook("is_complete")
    if hook is not None:
      return bool(hook(workdir))
    return os.path.exists(os.path.join(self.directory(workdir), "params.json"))

  def final_metrics(self, workdir: str) -> dict[str, Any]:
    """What the stage recorded when it finished ({} when it has not)."""
    hook = self.hook("final_metrics")
    if hook is not None:
      return hook(workdir) or {}
    path = os.path.join(self.directory(workdir), "params.json")
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f).get("metrics") or {}

  def metric(self, what: str) -> str:
    return f"{self.metric_prefix}/{what}"


_STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
  """Add a stage after the ones registered so far (which must include what it reads)."""
  if stage.name in _STAGES:
    raise ValueError(f"stage {stage.name!r} is registered already")
  missing = [r for r in stage.reads if r not in _STAGES]
  if missing:
    raise ValueError(f"stage {stage.name!r} reads unregistered stages {missing}")
  for flag in ("reference", "primary"):
    if getattr(stage, flag) and any(getattr(s, flag) for s in _STAGES.values()):
      raise ValueError(f"stage {stage.name!r}: there is a {flag} policy already")
  _STAGES[stage.name] = stage
  return stage


def unregister(name: str) -> None:
  """Remove a stage nothing registered after it reads (tests register toy stages)."""
  users = [s.name for s in _STAGES.values() if name in s.reads]
  if users:
    raise ValueError(f"stage {name!r} is read by {users}")
  del _STAGES[name]


def stages() -> tuple[Stage, ...]:
  """Every stage in pipeline order (registration order: each after what it reads)."""
  return tuple(_STAGES.values())


def names() -> tuple[str, ...]:
  return tuple(_STAGES)


def get(name: str) -> Stage:
  if name not in _STAGES:
    raise KeyError(f"no stage {name!r} (registered: {', '.join(_STAGES)})")
  return _STAGES[name]


def exporting(kind: str) -> tuple[Stage, ...]:
  """The stages that export `kind` (data | policy | reward_model), in pipeline order."""
  return tuple(s for s in _STAGES.values() if s.exports == kind)


def policies() -> dict[str, Stage]:
  """Policy name -> the stage exporting it, in pipeline order."""
  return {s.policy: s for s in exporting("policy")}


def title_of(policy: str) -> str:
  """A policy's title in tables and plots (its own name when it is not registered)."""
  stage = policies().get(policy)
  return stage.title if stage is not None else policy


def reference() -> Stage:
  """The stage whose policy every other policy is compared with."""
  return next(s for s in _STAGES.values() if s.reference)


def primary() -> Stage:
  """The stage whose policy is the recipe's result (the default `--policy`)."""
  return next(s for s in _STAGES.values() if s.primary)


def upstream(names_: Sequence[str]) -> tuple[str, ...]:
  """`names_` and every stage they read, directly or not, in pipeline order."""
  need: set[str] = set()
  todo = list(names_)
  while todo:
    name = todo.pop()
    if name not in need:
      need.add(name)
      todo += get(name).reads
  return tuple(n for n in _STAGES if n in need)


def direct_inputs(name: str) -> tuple[str, ...]:
  """The stages `name` reads less those another of them reads already (its inputs'
  fingerprints chain through these)."""
  reads = get(name).reads
  covered = {u for r in reads for u in upstream([r]) if u != r}
  return tuple(r for r in reads if r not in covered)


def init_keys() -> tuple[str, ...]:
  """Every `config.init` key that stands in for a stage's output."""
  return tuple(s.init_key for s in _STAGES.values() if s.init_key)


def with_init_key(key: str) -> Stage:
  return next(s for s in _STAGES.values() if s.init_key == key)


def lora_stages(section) -> tuple[str, ...]:
  """The stages that train LoRA adapters under `config.lora` (a section, a dict or None):
  none at rank 0, else those registered with `lora` that `section.stages` names ("" =
  all of them), in pipeline order."""
  if not section or not section.get("rank"):
    return ()
  named = {s.strip() for s in str(section.get("stages", "")).split(",") if s.strip()}
  return tuple(s.name for s in _STAGES.values() if s.lora and (not named or s.name in named))


def iter_sections(config) -> Iterator[tuple[Stage, Any]]:
  """(stage, its own config section) for every stage whose section `config` has."""
  for s in _STAGES.values():
    if s.section and s.section in config:
      yield s, config[s.section]


# --- the recipe ------------------------------------------------------------------------------

_RL_CURVES = (
  "score",
  "gold_score",
  "kl",
  "reward",
  "kl_coef",
  "policy_loss",
  "value_loss",
  "ptx_loss",
  "entropy",
  "response_len",
)

register(
  Stage(
    "data",
    "rlhf_jax.data.prepare",
    "prepare the default world's datasets and tokenizer",
    run="prepare",
    section="",
    sections=("world", "tokenizer"),
    exports="data",
    prints_result=True,
  )
)
register(
  Stage(
    "pretrain",
    "rlhf_jax.stages.pretrain",
    "run (or resume) the pretrain stage",
    reads=("data",),
    policy="pretrained",
    title="Pretrained (few-shot)",
    few_shot=True,
    init_key="hf_dir",
    init_reads=("hf_dir", "sft_hf_dir"),  # pretraining is skipped when SFT is given
    curves=("loss", "lr"),
    memory="lm",
  )
)
register(
  Stage(
    "sft",
    "rlhf_jax.stages.sft",
    "run (or resume) the sft stage",
    reads=("data", "pretrain"),
    title="SFT",
    reference=True,
    init_key="sft_hf_dir",
    curves=("loss", "val_loss", "gold_score", "lr"),
    memory="lm",
    lora=True,
  )
)
register(
  Stage(
    "comparisons",
    "rlhf_jax.stages.comparisons",
    "run (or resume) the comparisons stage",
    reads=("data", "sft"),
    exports="data",
    memory="sampler",
  )
)
register(
  Stage(
    "rm",
    "rlhf_jax.stages.rm",
    "run (or resume) the rm stage",
    reads=("data", "sft", "comparisons"),
    exports="reward_model",
    title="RM",
    init_key="rm_hf_dir",
    zero_ok=("num_steps",),  # 0: from num_epochs
    curves=("loss", "accuracy", "val_accuracy", "val_gold_accuracy", "reward_std"),
    memory="ranking",
    lora=True,
  )
)
register(
  Stage(
    "ppo",
    "rlhf_jax.stages.ppo.driver",
    "run (or resume) the ppo stage",
    reads=("data", "sft", "rm"),
    title="PPO",
    primary=True,
    curves=_RL_CURVES,
    score_vs_kl=True,
    alerts=(("KL", "alert_kl"), ("length", "alert_length")),
    group="rlhf_jax.stages.ppo.group",
    memory="actor_critic",
    lora=True,
  )
)
register(
  Stage(
    "ppo_ptx",
    "rlhf_jax.stages.ppo_ptx",
    "run (or resume) the ppo_ptx stage",
    reads=("data", "sft", "rm"),
    title="PPO-ptx",
    metric_prefix="ppo",  # the same metrics as PPO, one more term
    curves=_RL_CURVES,
    score_vs_kl=True,
    alerts=(("KL", "alert_kl"), ("length", "alert_length")),
    group="rlhf_jax.stages.ppo.group",
    memory="actor_critic",
    lora=True,
  )
)
register(
  Stage(
    "dpo",
    "rlhf_jax.stages.dpo",
    "run (or resume) the dpo stage (DPO or IPO on the comparisons; configs/dpo.py)",
    reads=("data", "sft", "comparisons"),
    title="DPO",
    curves=("loss", "accuracy", "logratio_best", "logratio_worst", "val_accuracy", "gold_score"),
    optional=True,
  )
)
_GROUP_RL_CURVES = (
  "score",
  "gold_score",
  "kl",
  "reward",
  "group_score_std",
  "policy_loss",
  "kl_loss",
  "entropy",
  "response_len",
)
register(
  Stage(
    "rloo",
    "rlhf_jax.stages.rloo",
    "run (or resume) the rloo stage (k samples per prompt, leave-one-out; configs/rloo.py)",
    reads=("data", "sft", "rm"),
    title="RLOO",
    curves=_GROUP_RL_CURVES,
    score_vs_kl=True,
    optional=True,
  )
)
register(
  Stage(
    "grpo",
    "rlhf_jax.stages.grpo",
    "run (or resume) the grpo stage (group-normalised advantages, KL loss; configs/rloo.py)",
    reads=("data", "sft", "rm"),
    title="GRPO",
    curves=_GROUP_RL_CURVES,
    score_vs_kl=True,
    optional=True,
  )
)
register(
  Stage(
    "best_of_n",
    "rlhf_jax.stages.best_of_n",
    "measure best-of-n of SFT by the RM (no training) and export it as a policy "
    "(configs/best_of_n.py)",
    reads=("data", "sft", "rm"),
    title="Best-of-n",
    curves=("rm_score", "gold_score", "kl"),  # against n (the step)
    optional=True,
  )
)
register(
  Stage(
    "expert_iteration",
    "rlhf_jax.stages.expert_iteration",
    "run (or resume) expert iteration: SFT on the policy's best-of-n replies, repeated "
    "(configs/best_of_n.py)",
    reads=("data", "sft", "rm"),
    title="Expert iteration",
    curves=("loss", "val_loss", "gold_score", "lr"),
    optional=True,
    lora=True,
  )
)
register(
  Stage(
    "rounds",
    "rlhf_jax.stages.rounds",
    "iterated rounds: comparisons on the policy's conversations -> RM -> PPO, again",
    sections=("rounds", "comparisons", "rm", "ppo", "ppo_ptx", LORA),  # (its stages' LoRA)
    reads=("data", "sft"),
    title="Rounds (last)",
    optional=True,
  )
)
