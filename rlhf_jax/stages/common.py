"""Plumbing every stage driver shares: work-directory layout, data and tokenizer,
sharded state creation (with LoRA: adapters over a frozen base) and the jitted step with
explicit shardings."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from rlhf_jax import lora, sharding, tokenizer
from rlhf_jax.data import builders, prepare
from rlhf_jax.models import Transformer, TransformerConfig
from rlhf_jax.train import checkpoints, metrics_io, optim, train_state


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.abspath(workdir), stage)


def resolve(workdir: str, path: str) -> str:
  """`path` as given (absolute) or relative to the work directory (an earlier round's
  stage, `stages/rounds.py`: `../round_0/ppo`)."""
  return os.path.normpath(os.path.join(os.path.abspath(workdir), path))


def is_complete(workdir: str, stage: str) -> bool:
  """A stage is complete once it exported its parameters (written last)."""
  return checkpoints.params_info(stage_dir(workdir, stage)) is not None


def recorded_metrics(config, workdir: str, stage: str, config_file: str) -> dict | None:
  """A stage's opening: its recorded metrics when it is complete (it says it skips),
  else None; UserInputError when the config lacks its section (`config_file` has it)."""
  from rlhf_jax.errors import UserInputError

  if stage not in config:
    raise UserInputError(f"config.{stage}: missing section (use {config_file})")
  if not is_complete(workdir, stage):
    return None
  print(f"{stage}: complete, skipping ({stage_dir(workdir, stage)})")
  return checkpoints.params_info(stage_dir(workdir, stage)).get("metrics", {})


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizer.Tokenizer:
  """The run's tokenizer; prepares the default world first if it is not there yet."""
  if not config.tokenizer.path and not os.path.exists(prepare.tokenizer_path(workdir)):
    prepare.prepare(config, workdir)
  return prepare.train_tokenizer(config, workdir)


def world_source(config: ml_collections.ConfigDict, workdir: str, name: str, split: str):
  """A random-access source of the default world's `name/split` records."""
  data = prepare.data_dir(workdir)
  builders.build(name, config.world, data)  # no-op when built
  return builders.load(data, name, split, config.world)


@dataclasses.dataclass
class Setup:
  """A stage's mesh, model, optimiser and (possibly resumed) sharded state."""

  mesh: Mesh
  rules: tuple
  model_cfg: TransformerConfig
  tx: Any
  state: train_state.TrainState
  shardings: Any  # of `state`


def model_config(config: ml_collections.ConfigDict, **overrides) -> TransformerConfig:
  return TransformerConfig.from_config(config.model, **overrides)


def create_state(
  config: ml_collections.ConfigDict,
  optim_cfg: ml_collections.ConfigDict,
  num_steps: int,
  *,
  heads: tuple[str, ...] = ("lm",),
  seed_offset: int = 0,
  devices=None,
  adapters: lora.Settings | None = None,
  trained_fully: tuple[str, ...] = (),
  **model_overrides,
) -> Setup:
  """Fresh train state created directly on the config's mesh (never whole on a host).

  `devices` (default: all) are the devices the mesh is laid over. With `adapters` (LoRA):
  an `AdaptedState` training fresh adapters and the params' entries `trained_fully` (a
  new head) over the rest, frozen (replaced by the real base in `replace_params`).
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.mesh)
  if adapters is not None:
    model_overrides = {**model_overrides, "lora_dropout": adapters.dropout}
  model_cfg = model_config(config, **model_overrides)
  tx = optim.make_optimizer(optim_cfg, num_steps)
  model = Transformer(model_cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)

  def init(rng):
    params = model.init(rng, tokens, heads=heads)["params"]
    kw = dict(ema_decay=optim_cfg.ema_decay, guard=config.get("guard"))
    if adapters is None:
      return train_state.TrainState.create(params, tx, rng, **kw)
    key = jax.random.fold_in(rng, lora.RNG_SALT)
    trained = lora.trainable(params, adapters, key, trained_fully)
    base = lora.frozen(params, trained_fully)
    return train_state.AdaptedState.create(trained, tx, rng, **kw, base=base, settings=adapters)

  rng = jax.random.PRNGKey(config.seed + seed_offset)
  state, shardings = sharding.init_sharded(init, mesh, rules, rng)
  return Setup(mesh, rules, model_cfg, tx, state, shardings)


def replace_params(setup: Setup, params) -> Setup:
  """Start from given params (e.g. the previous stage's) with a fresh optimiser state;
  with LoRA they become the frozen base (a head trained fully starts from theirs) under
  the fresh adapters."""
  keep_ema = setup.state.ema is not None

  def start(s, p):
    if isinstance(s, train_state.AdaptedState):
      trained = {**s.params, **{k: p[k] for k in s.params if k != lora.KEY}}
      base = {k: p[k] for k in s.base}
      return s.replace(
        base=base,
        params=trained,
        opt_state=setup.tx.init(trained),
        ema=trained if keep_ema else None,
      )
    return s.replace(params=p, opt_state=setup.tx.init(p), ema=p if keep_ema else None)

  with nn.logical_axis_rules(setup.rules):
    fresh = jax.jit(start, out_shardings=setup.shardings)(setup.state, params)
  setup.state = fresh
  return setup


def base_params(state: train_state.TrainState):
  """The params a stage's start is laid out like: its params, or with LoRA its base."""
  return state.base if isinstance(state, train_state.AdaptedState) else state.params


def model_shardings(setup: Setup):
  """The shardings of the whole model's params (with LoRA: its base and trained head)."""
  sh = setup.shardings
  if not isinstance(setup.state, train_state.AdaptedState):
    return sh.params
  return {**sh.base, **{k: v for k, v in sh.params.items() if k != lora.KEY}}


def jit_step(
  fn: Callable, setup: Setup, batch_ndims: dict[str, int], **static
) -> Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]:
  """`fn(state, batch, **static)` jitted once: state sharded and donated, batch over
  (data, fsdp), metrics replicated."""
  batch_shardings = {k: sharding.batch_sharding(setup.mesh, n) for k, n in batch_ndims.items()}
  return jax.jit(
    functools.partial(fn, **static),
    in_shardings=(setup.shardings, batch_shardings),
    out_shardings=(setup.shardings, sharding.replicated(setup.mesh)),
    donate_argnums=(0,),
  )


def grad_accum(stage_cfg: ml_collections.ConfigDict, key: str) -> int:
  """`<key>.optim.grad_accum`, checked to split the (global) batch evenly."""
  from rlhf_jax.errors import UserInputError

  n = int(stage_cfg.optim.get("grad_accum", 1))
  rows = batch_rows(stage_cfg.batch_size, f"{key}.batch_size")
  if n < 1 or rows % n:
    raise UserInputError(
      f"config.{key}.optim.grad_accum: {n} microbatches do not split {key}.batch_size={rows}"
    )
  return n


def final_params(state: train_state.TrainState, shardings=None):
  """What a stage exports: the EMA of the params when it is kept, else the params; with
  LoRA, merged into the frozen base (`lora.merge`), laid out as `shardings` (default:
  as XLA places them; `model_shardings` for the whole model's layout)."""
  params = state.ema if state.ema is not None else state.params
  if not isinstance(state, train_state.AdaptedState):
    return params
  merge = jax.jit(lora.merge, static_argnums=2, out_shardings=shardings)
  return merge(state.base, params, state.lora)


def save_adapters(
  out_dir: str, state, config, workdir: str, base_stage: str, base_dir: str = ""
) -> dict:
  """`write_adapters` of a LoRA stage's state (an `AdaptedState`: what it trained, the
  EMA when kept); {} for any other state."""
  if not isinstance(state, train_state.AdaptedState):
    return {}
  trained = state.ema if state.ema is not None else state.params
  return write_adapters(out_dir, trained, state.lora, config, workdir, base_stage, base_dir)


def write_adapters(
  out_dir: str, trained, s: lora.Settings, config, workdir: str, base_stage: str, base_dir=""
) -> dict:
  """What LoRA trained alone (adapters, + a head) to `<out_dir>/lora`, read by `export-hf
  --lora-only`; returns params.json's `lora` entry: the settings, the heads trained
  fully, the base's export (`base_dir`, relative to `workdir`, or `base_stage`'s) and
  the Hugging Face checkpoint it was imported from (`config.init`), if any."""
  from rlhf_jax.stages import registry

  checkpoints.save_tree(os.path.join(os.path.abspath(out_dir), lora.KEY), trained)
  key = registry.get(base_stage).init_key
  entry = {k: v for k, v in dataclasses.asdict(s).items() if k != "value"}
  entry["targets"] = list(s.targets)
  entry["heads"] = sorted(k for k in trained if k != lora.KEY)
  entry["base"] = resolve(workdir, base_dir) if base_dir else stage_dir(workdir, base_stage)
  entry["base_hf"] = config.get("init", {}).get(key, "") if key and not base_dir else ""
  return {lora.KEY: entry}


def stage_seed(config_seed: int, seed: int) -> int:
  """A stage's base seed from `config.seed` and the stage's own `seed` field: 0 keeps
  config.seed (so a stage's default streams do not move), any other value gives an
  independent stream. Sweeps vary a stage's own seed to repeat it on shared inputs."""
  if not seed:
    return int(config_seed)
  import numpy as np

  return int(np.random.SeedSequence([int(config_seed), int(seed)]).generate_state(1)[0] >> 1)


def batch_rows(
  global_batch: int,
  key: str,
  mesh_cfg: ml_collections.ConfigDict | None = None,
  devices: int | None = None,
) -> int:
  """The rows of a batch every process reads: the whole global batch.

  Every process iterates the same deterministic stream and places only its devices'
  rows (`sharding.put_batch`), so the batches, and a run's results, do not depend on
  the number of hosts (a run resumed on another topology reads the same data). The
  price is that each host tokenises the whole batch, which costs little next to a
  model step. The batch must split evenly over the processes.
  """
  n = jax.process_count()
  if global_batch % n:
    from rlhf_jax.errors import UserInputError

    raise UserInputError(f"config.{key}: {global_batch} is not divisible by {n} processes")
  if mesh_cfg is not None:  # the batch axis is split over the mesh's data x fsdp devices
    data, fsdp, _ = sharding.mesh_shape(mesh_cfg, devices or jax.device_count())
    if global_batch % (data * fsdp):
      from rlhf_jax.errors import UserInputError

      raise UserInputError(
        f"config.{key}: {global_batch} rows do not split over the mesh's {data} x {fsdp} "
        f"(data x fsdp) devices"
      )
  return global_batch


def generate(
  model_cfg: TransformerConfig,
  params,
  tok: tokenizer.Tokenizer,
  prompts: list[list[tokenizer.Message]],
  rng: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_p: float = 1.0,
  batch_size: int = 64,
  max_prompt_len: int = 256,
  mesh: Mesh | None = None,
  sample_fn=None,
) -> list[str]:
  """Sampled reply texts for chat prompts, `batch_size` per sampler call
  (`sampling.sample_prompts`, with its `sample_fn`); a prompt longer than
  `max_prompt_len` keeps its BOS and its last tokens."""
  from rlhf_jax import sampling

  encoded = [tokenizer.truncate_prompt(tok.encode_prompt(m), max_prompt_len) for m in prompts]
  ids, _ = sampling.sample_prompts(
    model_cfg,
    params,
    encoded,
    rng,
    rows=batch_size,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_p=top_p,
    mesh=mesh,
    sample_fn=sample_fn,
  )
  return [tok.decode_response(row) for row in ids]


def imported(config: ml_collections.ConfigDict, workdir: str, stage: str, head: str = "lm"):
  """When `config.init` names a Hugging Face checkpoint for `stage` (its registered
  `init_key`), import it onto the config's mesh as the stage's export and return its
  params.json; otherwise None. The checkpoint must end in `head` ("lm" or "scalar")."""
  from rlhf_jax.errors import UserInputError
  from rlhf_jax.models import hf
  from rlhf_jax.stages import registry

  key = registry.get(stage).init_key
  src = config.get("init", {}).get(key, "") if key else ""
  if not src:
    return None
  have = hf.head_of(hf.read_config(src), os.path.join(src, "config.json"))
  if have != head:
    want = "a ...ForCausalLM LM" if head == "lm" else "a ...ForSequenceClassification RM"
    raise UserInputError(f"config.init.{key}: {src} has a {have} head; {stage} needs {want}")
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  out = stage_dir(workdir, stage)
  info = hf.import_checkpoint(
    src, out, model=config.model.to_dict(), mesh=mesh, rules=rules, stage=stage
  )
  print(f"{stage}: imported {src} (config.init.{key})")
  return info


def ensure_imported(
  config: ml_collections.ConfigDict, workdir: str, stage: str, head: str = "lm"
) -> None:
  """Before loading `stage`'s export: import it if config.init names it and it is not there
  yet (so `rlhf-jax sft` alone starts from config.init.hf_dir)."""
  if not is_complete(workdir, stage):
    imported(config, workdir, stage, head)


def tokenizer_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The path of the run's SentencePiece model (recorded with every export)."""
  return config.tokenizer.get("path", "") or prepare.tokenizer_path(os.path.abspath(workdir))


def finish(
  out_dir: str,
  params,
  config: ml_collections.ConfigDict,
  start: float,
  checkpointer: checkpoints.Checkpointer | None,
  writer: metrics_io.MetricsWriter,
  workdir: str = "",
  **meta,
) -> dict:
  """End a stage: summarise its metrics (last value of each), export the params (with
  `meta` in params.json), close the checkpointer (unless None) and the writer; return the
  summary. `workdir`: the run's, when `out_dir` is not directly in it."""
  rows = metrics_io.read_metrics(out_dir)
  summary = {k: v for row in rows for k, v in row.items() if k != "step"}
  summary["wall_seconds"] = time.time() - start
  tok = tokenizer_of(config, workdir or os.path.dirname(os.path.abspath(out_dir)))
  checkpoints.export_params(
    out_dir, params, config.model.to_dict(), metrics=summary, tokenizer=tok, **meta
  )
  if checkpointer is not None:
    checkpointer.close()
  writer.close()
  return summary


def open_run(
  out_dir: str,
  stage_cfg: ml_collections.ConfigDict,
  state,
  data_iter,
  name: str,
  unit: str = "step",
):
  """Open a stage's checkpoints and metrics and resume from the latest checkpoint.

  Returns `(checkpointer, writer, state, resumed_step)`; `state` is returned unchanged
  and `resumed_step` is 0 when there is nothing to resume. Metrics logged after the
  restored step are dropped, so a resumed run logs exactly what a straight one would.
  """
  ckpt = checkpoints.Checkpointer(
    f"{out_dir}/checkpoints",
    max_to_keep=stage_cfg.keep_checkpoints,
    save_every=stage_cfg.save_every,
  )
  state, resumed = ckpt.restore_latest(state, data_iter)
  if resumed:
    print(f"{name}: resuming from {unit} {resumed}")
  writer = metrics_io.MetricsWriter(out_dir)
  # (-1 with nothing to resume: a run killed before its first checkpoint logged its
  # step-0 evaluation already, and will again)
  writer.truncate_after(resumed or -1)
  return ckpt, writer, state, resumed
