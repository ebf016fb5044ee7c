"""What each stage's outputs depend on, recorded beside them and checked on every run.

- `fingerprints(config)`: stage -> a hash of everything its outputs depend on (sweeps
  keep one directory per fingerprint, so points that agree share the stage).
- `dependencies(config)`: stage -> {config key: value} of the same settings, flat and
  transitive (its own sections, the common ones, the `config.init` checkpoints that
  stand in for it, and those of every stage it reads), less the keys that only change
  how a run is laid out or saved (`HOW`).
- `check(stage, config, workdir)`: a stage directory holding outputs (a checkpoint or
  the finished stage's) made with other settings is a one-line error naming the keys
  that differ, so a changed config never resumes or reuses another run's outputs;
  `record` writes the settings a stage runs with while it holds none (so a run that
  stopped on a bad input file, before any checkpoint, can be re-run with another).

Only keys present both in the record and in the config are compared: a key added by a
later version of the code does not invalidate older work directories, and directories
written before records existed are not checked.

`config.lora` counts for a stage as `lora_view` says: only while adapters train in it or
in a stage it reads (then with those stages named), so turning LoRA on for PPO alone
leaves SFT's fingerprint as it was, and with LoRA off every fingerprint is what it was
before LoRA existed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections

from rlhf_jax import distributed
from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import registry

RECORD = "provenance.json"
# Keys that change how a run is sharded or checkpointed, not what it computes; and the
# tokenizer's path (exports record the tokenizer's sha256, which `load_params` checks).
HOW_SECTIONS = ("mesh",)
HOW_KEYS = ("save_every", "keep_checkpoints")
HOW_PATHS = ("tokenizer.path",)
_SHOWN = 4  # differing keys named in the message


def _split(config: ml_collections.ConfigDict) -> tuple[dict, dict, dict]:
  """(sections, init checkpoints, common sections) of `config` as plain dicts."""
  d = config.to_dict()
  init = d.pop("init", None) or {}  # each checkpoint belongs to the stage it stands in for
  # The guard changes a stage's output only where a run without it would have failed.
  d.pop("guard", None)
  owned = {s for stage in registry.stages() for s in stage.sections} | {registry.EVAL}
  common = {k: v for k, v in d.items() if k not in owned}
  return d, init, common


def lora_view(stage: registry.Stage, d: dict) -> dict | None:
  """What of `config.lora` (in the config dict `d`) the outputs of a stage that reads the
  section depend on: its settings and the stages among it, those it reads and those whose
  sections it reads (the rounds run RM and PPO) that train adapters; None if none does."""
  lora = d.get(registry.LORA)
  covered = set(registry.upstream([stage.name]))
  covered |= {s.name for s in registry.stages() if s.section in stage.sections}
  trained = [s for s in registry.lora_stages(lora) if s in covered]
  if not trained:
    return None
  return {**{k: v for k, v in lora.items() if k != "stages"}, "stages": ",".join(trained)}


def _own_sections(stage: registry.Stage, d: dict) -> dict[str, Any]:
  """A stage's sections as its outputs see them (`config.lora` through `lora_view`; left
  out when that is None)."""
  out = {s: d.get(s) for s in stage.sections if s != registry.LORA}
  if registry.LORA in stage.sections and (view := lora_view(stage, d)) is not None:
    out[registry.LORA] = view
  return out


def fingerprints(config: ml_collections.ConfigDict) -> dict[str, str]:
  """stage -> a hash of everything the stage's output depends on: the common sections,
  its own, the `config.init` checkpoints that decide it, and the fingerprints of the
  stages it reads (through `registry.direct_inputs`: the others are in those)."""
  d, init, common = _split(config)
  out: dict[str, str] = {}
  for stage in registry.stages():
    inputs = [out[r] for r in registry.direct_inputs(stage.name)]
    parent = inputs[0] if len(inputs) == 1 else (inputs or None)
    what = {"common": common, "parent": parent, **_own_sections(stage, d)}
    given = {k: init[k] for k in stage.init_reads if init.get(k)}
    if given:  # (unset, the hash is what it was before config.init existed)
      what["init"] = given
    blob = json.dumps(what, sort_keys=True, default=str).encode()
    out[stage.name] = hashlib.blake2b(blob, digest_size=6).hexdigest()
  return out


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}


def _is_how(key: str) -> bool:
  parts = key.split(".")
  return parts[0] in HOW_SECTIONS or parts[-1] in HOW_KEYS or key in HOW_PATHS


def dependencies(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """stage -> {dotted config key: value} of every setting its outputs depend on (as
  JSON would store it)."""
  d, init, common = _split(config)
  out: dict[str, dict[str, Any]] = {}
  for stage in registry.stages():
    deps: dict[str, Any] = {}
    for name, tree in common.items():
      deps.update(_flat(tree, name))
    for r in registry.direct_inputs(stage.name):
      deps.update(out[r])
    for s, tree in _own_sections(stage, d).items():
      deps.update(_flat(tree, s))
    if registry.LORA in stage.sections and lora_view(stage, d) is None:
      deps[f"{registry.LORA}.rank"] = 0  # (no adapters: a run with them differs)
    deps.update({f"init.{k}": init[k] for k in stage.init_reads if init.get(k)})
    kept = {k: v for k, v in sorted(deps.items()) if not _is_how(k)}
    out[stage.name] = json.loads(json.dumps(kept, default=str))
  return out


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """`key: <recorded> there, <now> now` for every key both have with another value."""
  return [
    f"config.{k}: {recorded[k]!r} there, {now[k]!r} now"
    for k in sorted(recorded.keys() & now.keys())
    if recorded[k] != now[k]
  ]


def _path(stage: registry.Stage, workdir: str) -> str:
  return os.path.join(stage.directory(workdir), RECORD)


def has_outputs(stage: registry.Stage, workdir: str) -> bool:
  """Whether `stage` finished in `workdir` or holds a checkpoint to resume from."""
  ckpts = os.path.join(stage.directory(workdir), "checkpoints")
  return stage.is_complete(workdir) or (
    os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))
  )


def check(stage: registry.Stage, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raise a UserInputError naming the keys when `workdir`'s `stage` outputs were made
  with other settings than `config`'s."""
  path = _path(stage, workdir)
  if not os.path.exists(path) or not has_outputs(stage, workdir):
    return
  try:
    with open(path) as f:
      recorded = json.load(f)["depends_on"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    msg = f"{path}: unreadable ({type(e).__name__}); remove it to skip the check"
    raise UserInputError(msg) from None
  diff = differences(recorded, dependencies(config)[stage.name])
  if diff:
    more = f" and {len(diff) - _SHOWN} more" if len(diff) > _SHOWN else ""
    raise UserInputError(
      f"{stage.directory(workdir)}: made with other settings ({'; '.join(diff[:_SHOWN])}"
      f"{more}); re-run with the settings it was made with, or use a new --workdir"
    )


def record(stage: registry.Stage, config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Write the settings `stage` runs with, unless it holds outputs already (they keep
  their record, or have none when written by an older version); whether it wrote."""
  if has_outputs(stage, workdir):
    return False
  out = stage.directory(workdir)
  body = {
    "fingerprint": fingerprints(config)[stage.name],
    "depends_on": dependencies(config)[stage.name],
  }

  def write():
    os.makedirs(out, exist_ok=True)
    tmp = _path(stage, workdir) + ".tmp"
    with open(tmp, "w") as f:
      json.dump(body, f, indent=1, sort_keys=True)
    os.replace(tmp, _path(stage, workdir))

  distributed.first(f"provenance {stage.name}", write)
  return True


def forget(stage: registry.Stage, workdir: str) -> None:
  """Remove a record `record` wrote for a run that then stopped before writing any
  output (a bad input): the work directory is left as it was."""

  def remove():
    out = stage.directory(workdir)
    if os.path.exists(_path(stage, workdir)):
      os.remove(_path(stage, workdir))
    if os.path.isdir(out) and not os.listdir(out):
      os.rmdir(out)

  distributed.first(f"forget {stage.name}", remove)


def check_all(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`check` every registered stage (a pipeline or evaluation reads them all)."""
  for stage in registry.stages():
    check(stage, config, workdir)
