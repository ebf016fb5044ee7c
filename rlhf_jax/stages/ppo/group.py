"""Many PPO runs as one vmapped, jit-compiled program (as purejaxrl trains many agents).

Runs that differ only in the numbers of `settings.HPARAMS` (beta, gamma_ptx, the learning
rates, clip epsilon, GAE gamma and lambda, the entropy bonus, the KL target) and in
the section's `seed` compile to the same program: their `PPOState`s are stacked on a leading run
axis R and `jax.vmap(iteration.train_step)` advances all of them in one call, on one shared
stream of prompt (and pretraining) batches — the batches each run would see alone.

Each run writes what it would write alone — `DIR_r/<stage>/metrics.jsonl`, TensorBoard
events, the exported params — so evaluation, reports and re-runs cannot tell the
difference. The stacked state and the data iterator are checkpointed together in
`group_dir`, so an interrupted group resumes exactly. `rlhf-jax sweep` groups its PPO
points with `group_key`. The frozen reference and reward models are stacked too (R
copies): simple, and small next to the optimiser states at the sizes a CPU vmaps.

Mixing gamma_ptx = 0 with gamma_ptx > 0 in one group is exact too: every run then gets
the pretraining rows, and 0 x their loss adds exactly nothing to its gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import sharding
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import common, registry, rm
from rlhf_jax.stages.ppo import driver, iteration, rollout, settings
from rlhf_jax.train import checkpoints, metrics_io

# The fields of a PPO section that `HPARAMS` and `seed` read (they may differ in a group).
_RUN_FIELDS = ("kl_coef", "kl_target", "clip", "entropy_coef", "ptx_coef", "gamma", "lam", "seed")
_RUN_OPTIM_FIELDS = ("optim.lr", "value_optim.lr")


def group_key(config: ml_collections.ConfigDict, stage: str) -> str:
  """What runs of one group must share: the config, less evaluation, the sections of
  stages this one does not read, and the per-run fields of its own. Equal keys = one
  program."""
  d = config.to_dict()
  d.pop(registry.EVAL, None)
  needed = registry.upstream([stage])
  # (a stage outside them may read their sections too: the rounds read rm's and ppo's)
  keep = {section for name in needed for section in registry.get(name).sections}
  for s in registry.stages():
    if s.name not in needed:
      for section in set(s.sections) - keep:
        d.pop(section, None)
  section = d[stage]
  for k in _RUN_FIELDS:
    section.pop(k)
  for path in _RUN_OPTIM_FIELDS:
    head, leaf = path.split(".")
    section[head].pop(leaf)
  section["uses_ptx"] = settings.ptx_rows(config[stage]) > 0
  if section["uses_ptx"]:  # its rows per minibatch are then shared by the group
    section["ptx_rows"] = settings.ptx_rows(config[stage])
  return json.dumps(
    {"run": section, "rest": {k: v for k, v in d.items() if k != stage}}, sort_keys=True
  )


def program_section(sections: Sequence[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """The section the group's program is built from: the first run's, with the largest
  gamma_ptx (so the program has pretraining rows if any run uses them)."""
  c = sections[0].copy_and_resolve_references()
  with c.unlocked():
    c.ptx_coef = max(s.ptx_coef for s in sections)
  return c


def stacked(tree, runs: int):
  """Shardings (or ShapeDtypeStructs) of a run's state -> those of R stacked states."""

  def one(x):
    if isinstance(x, NamedSharding):
      return NamedSharding(x.mesh, PartitionSpec(None, *x.spec))
    s = NamedSharding(x.sharding.mesh, PartitionSpec(None, *x.sharding.spec))
    return jax.ShapeDtypeStruct((runs, *x.shape), x.dtype, sharding=s)

  return jax.tree.map(one, tree)


def run(states: Any, r: int) -> Any:
  """Run `r`'s slice of a stacked tree."""
  return jax.tree.map(lambda x: x[r], states)


@dataclasses.dataclass
class _SplitWriter:
  """Metrics of R runs (f32[R] each, or one value for all) to R runs' writers."""

  writers: list[metrics_io.MetricsWriter]

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    for r, w in enumerate(self.writers):
      w.write(step, {k: np.asarray(v)[r] if np.ndim(v) else v for k, v in metrics.items()})

  def truncate_after(self, step: int) -> None:
    for w in self.writers:
      w.truncate_after(step)


def jit_group_step(setup: rollout.Setup, c: ml_collections.ConfigDict, runs: int, guard=None):
  """`jax.vmap(iteration.train_step)` over R stacked states (the batch is shared), jitted once."""
  state_sh = stacked(setup.shardings, runs)
  in_batch = {k: sharding.batch_sharding(setup.mesh, n) for k, n in settings.batch_ndims(c).items()}
  step = functools.partial(
    iteration.train_step,
    model_cfg=setup.model_cfg,
    c=ml_collections.FrozenConfigDict(c),
    alerts=settings.alert_levels(guard),
    adapters=setup.adapters,
  )
  return jax.jit(
    jax.vmap(step, in_axes=(0, None)),
    in_shardings=(state_sh, in_batch),
    out_shardings=(state_sh, sharding.replicated(setup.mesh)),
    donate_argnums=(0,),
  )


def train_group(
  members: Sequence[tuple[ml_collections.ConfigDict, str]],
  stage: str = "ppo",
  group_dir: str | None = None,
) -> list[dict[str, Any]]:
  """Train PPO runs `(config, workdir)` as one vmapped program; each exports to
  `workdir/<stage>` as `driver.train_and_evaluate` would. Returns each run's summary.

  Every workdir must hold the same upstream stages (the SFT and RM exports of the first
  are loaded). `group_dir` (default: the first run's `<stage>/group`) keeps the stacked
  checkpoints. Runs already complete are skipped; the rest must share `group_key`.
  """
  done = {i for i, (_, wd) in enumerate(members) if common.is_complete(wd, stage)}
  todo = [m for i, m in enumerate(members) if i not in done]
  if todo:
    keys = [group_key(cfg, stage) for cfg, _ in todo]
    for (_, wd), k in zip(todo, keys, strict=True):
      if k != keys[0]:
        raise UserInputError(
          f"{wd}: its config differs from {todo[0][1]}'s in more than the numbers a vmapped "
          f"group may vary (config.{stage}: {', '.join(_RUN_FIELDS + _RUN_OPTIM_FIELDS)})"
        )
    _train(todo, stage, group_dir or f"{common.stage_dir(todo[0][1], stage)}/group")
  return [
    checkpoints.params_info(common.stage_dir(wd, stage)).get("metrics", {}) for _, wd in members
  ]


def _train(members, stage: str, group_dir: str) -> None:
  start = time.time()
  configs = [cfg for cfg, _ in members]
  workdirs = [wd for _, wd in members]
  config, workdir, runs = configs[0], workdirs[0], len(members)
  c = program_section([cfg[stage] for cfg in configs])
  tok = common.load_tokenizer(config, workdir)
  setup = rollout.make_setup(config, c, key=stage)
  files = {}
  it, eval_records = driver.data(config, workdir, c, stage, tok, files)
  out_dirs = [common.stage_dir(wd, stage) for wd in workdirs]
  writer = _SplitWriter([metrics_io.MetricsWriter(d) for d in out_dirs])
  ckpt = checkpoints.Checkpointer(
    f"{group_dir}/checkpoints", max_to_keep=c.keep_checkpoints, save_every=c.save_every
  )
  abstract = stacked(setup.abstract, runs)
  state, resumed = ckpt.restore_latest(abstract, it)
  writer.truncate_after(resumed or -1)  # (as common.open_run)
  rm_info = checkpoints.params_info(common.stage_dir(workdir, rm.STAGE)) or {}
  if resumed:
    print(f"{stage}: resuming a group of {runs} runs from iteration {resumed}")
  else:
    models = driver.load_models(config, workdir, setup, c)
    rm_info = models.pop("rm_info")
    states = [
      rollout.init_state(
        setup,
        cfg[stage],
        **models,
        reward_bias=c.reward_bias,
        seed=config.seed + 6,
        guard=config.get("guard"),
      )
      for cfg in configs
    ]
    state = jax.jit(
      lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
      out_shardings=stacked(setup.shardings, runs),
    )(*states)
    del states
  step_fn = jit_group_step(setup, c, runs, config.get("guard"))

  def evaluate(state, step):
    if step == 0:  # every run starts from the same SFT policy: one evaluation serves all
      return driver.gold_evals(setup, run(state, 0), tok, eval_records, c=c, seed=config.seed)
    rows = [
      driver.gold_evals(setup, run(state, r), tok, eval_records, c=c, seed=config.seed)
      for r in range(runs)
    ]
    return {k: np.array([row[k] for row in rows]) for k in rows[0]} if rows[0] else {}

  print(
    f"{stage}: a vmapped group of {runs} runs, {c.num_iterations} iterations of "
    f"{c.batch_size} episodes each ({c.num_epochs} epochs x {c.num_minibatches} "
    f"minibatches, {settings.ptx_rows(c)} ptx rows)"
  )
  state = driver.run_iterations(
    setup, c, state, step_fn, it, ckpt, writer, evaluate, stage, config.get("guard")
  )
  ckpt.close()
  for r, (cfg, out_dir) in enumerate(zip(configs, out_dirs, strict=True)):
    common.finish(
      out_dir,
      rollout.exported(run(state, r), setup.adapters),
      cfg,
      start,
      None,
      writer.writers[r],
      stage=stage,
      heads=list(rollout.POLICY_HEADS),
      rm_reward_bias=rm_info.get("reward_bias"),
      group={"dir": group_dir, "runs": runs, "index": r},
      data_files=files,
      **driver.save_adapters(setup, run(state, r), out_dir, cfg, workdirs[r], c),
    )
