"""Loading configs: `path[:arg]`, `--config.a.b=value` overrides, validation.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` (locked). The
CLI names it as `--config=configs/x.py:size=s,runlocal=True`; the part after `:` is
handed to `get_config` as a string, parsed there with `parse_arg`. Overrides are typed
by the field they replace (ml_collections' type-safe assignment), and every mistake is
a `UserInputError` that names the key: the CLI prints it on one line and exits 2.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from rlhf_jax import ranges
from rlhf_jax.errors import UserInputError

_DTYPES = ("float32", "bfloat16", "float16")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parse `"size=s,runlocal=True"` against typed defaults (big_vision's `parse_arg`).

  A bare word is a bool flag (`runlocal` == `runlocal=True`). Unknown keys and values
  of the wrong type are errors naming the key.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for part in arg.split(","):
    if not part.strip():
      continue
    key, _, raw = part.partition("=")
    key = key.strip()
    if key not in defaults:
      known = ", ".join(sorted(defaults))
      raise UserInputError(f"config arg '{key}': unknown (known: {known})")
    if not _:
      raw = "True"
    out[key] = _coerce(f"config arg '{key}'", defaults[key], raw.strip())
  return out


def _coerce(name: str, current: Any, raw: str) -> Any:
  """`raw` (a command-line string) as a value of `current`'s type."""
  if isinstance(current, bool):
    low = raw.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise UserInputError(f"{name}: expected a bool, got {raw!r}")
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  if value is None or current is None:
    return value
  if isinstance(current, int) and not (isinstance(value, int) and not isinstance(value, bool)):
    raise UserInputError(f"{name}: expected an int, got {raw!r}")
  if isinstance(current, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise UserInputError(f"{name}: expected a float, got {raw!r}")
    return float(value)
  if isinstance(current, (tuple, list)):
    if isinstance(value, (tuple, list)):
      return type(current)(value)
    raise UserInputError(f"{name}: expected a {type(current).__name__}, got {raw!r}")
  return value


def _find_root(path: str) -> str | None:
  """The directory holding the `configs` package that `path` belongs to."""
  d = os.path.dirname(os.path.abspath(path))
  while True:
    if os.path.basename(d) == "configs" and os.path.exists(os.path.join(d, "common.py")):
      return os.path.dirname(d)
    parent = os.path.dirname(d)
    if parent == d:
      return None
    d = parent


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Load `path[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise UserInputError(f"{path}: no get_config(arg) function")
  try:
    config = module.get_config(arg or None)
  except UserInputError:
    raise
  except Exception as e:  # the config file's own bug: name it, without a traceback
    raise UserInputError(
      f"{path}: get_config({arg or None!r}) failed ({type(e).__name__}: {e})"
    ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserInputError(f"{path}: get_config must return an ml_collections.ConfigDict")
  config.lock()
  return config


def load_module(path: str):
  """Import a config file (or a sweep file) as a module; errors name the file."""
  if not os.path.exists(path):
    raise UserInputError(f"--config: file not found: {path}")
  # Config files import the `configs` package: from the tree they sit in, else from the
  # working directory (a sweep file of one's own next to a checkout).
  for root in (os.getcwd(), _find_root(path)):
    if root and root not in sys.path:
      sys.path.insert(0, root)
  name = "_rlhf_config_" + os.path.splitext(os.path.basename(path))[0]
  # An explicit loader: importlib finds none for a name without `.py` (it returns None)
  loader = importlib.machinery.SourceFileLoader(name, path)
  module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except UserInputError:
    raise
  except OSError as e:  # a directory, a file one may not read
    raise UserInputError(f"--config: cannot read {path} ({e.strerror or e})") from None
  except Exception as e:
    raise UserInputError(f"{path}: cannot load config ({type(e).__name__}: {e})") from None
  return module


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys += _all_keys(v, prefix + k + ".")
  return keys


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Set `config.<key>` from the string `raw`, typed like the field it replaces."""
  parts = key.split(".")
  node = config
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      close = difflib.get_close_matches(key, _all_keys(config), n=1)
      hint = f" (did you mean config.{close[0]}?)" if close else ""
      raise UserInputError(f"config.{key}: unknown config key{hint}")
    if i < len(parts) - 1:
      node = node[p]
  leaf = parts[-1]
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserInputError(f"config.{key}: is a section, set one of its fields")
  value = _coerce(f"config.{key}", current, raw)
  try:
    with node.ignore_type() if current is None else contextlib.nullcontext():
      node[leaf] = value
  except TypeError as e:
    raise UserInputError(f"config.{key}: {e}") from None


def parse_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Split `--config.a.b=v` / `--config.a.b v` out of argv; return (overrides, rest)."""
  overrides, rest, i = [], [], 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config.") :]
      if "=" in body:
        k, v = body.split("=", 1)
      elif i + 1 < len(argv):
        k, v = body, argv[i + 1]
        i += 1
      else:
        raise UserInputError(f"config.{body}: missing value")
      overrides.append((k, v))
    else:
      rest.append(a)
    i += 1
  return overrides, rest


def get(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """Load a config file, apply overrides, validate; the config comes back locked."""
  config = load_config_file(spec)
  for k, v in overrides:
    apply_override(config, k, v)
  apply_init(config, {k for k, _ in overrides})
  apply_tokenizer(config, {k for k, _ in overrides})
  validate(config)
  return config


def init_keys() -> tuple[str, ...]:
  """The `config.init` keys: Hugging Face checkpoints standing in for a stage's output."""
  from rlhf_jax.stages import registry

  return registry.init_keys()


def apply_init(config: ml_collections.ConfigDict, overridden: set[str] = frozenset()) -> None:
  """With `config.init.*` naming Hugging Face checkpoints, take the model's shape and the
  tokenizer from them (rlhf_jax.models.hf); a shape also given as an override, or
  checkpoints that disagree, are errors naming the key."""
  init = config.get("init")
  dirs = [(k, init[k]) for k in init_keys() if init is not None and init.get(k)]
  if not dirs or "model" not in config:
    return
  from rlhf_jax import tokenizer as tokenizer_lib
  from rlhf_jax.models import hf

  fields, first = None, None
  for key, d in dirs:
    where = os.path.join(d, "config.json")
    f = hf.model_fields(hf.read_config(d), where)
    if fields is not None and f != fields:
      diff = [f"{k}={f[k]} vs {fields[k]}" for k in f if f[k] != fields[k]]
      raise UserInputError(
        f"config.init.{key}: {where} disagrees with config.init.{first}: {'; '.join(diff)}"
      )
    fields, first = f, first or key
  with config.unlocked():
    for k, v in fields.items():
      if f"model.{k}" in overridden and config.model[k] != v:
        raise UserInputError(
          f"config.model.{k}: {config.model[k]} given, but config.init."
          f"{first}'s config.json has {v}"
        )
      config.model[k] = v
    config.model.size = "imported"
    if "tokenizer" in config:
      if not config.tokenizer.path:
        config.tokenizer.path = hf.tokenizer_file(dict(dirs)[first])
      config.tokenizer.vocab_size = tokenizer_lib.load(config.tokenizer.path).vocab_size


def apply_tokenizer(config: ml_collections.ConfigDict, overridden: set[str] = frozenset()) -> None:
  """A given tokenizer (config.tokenizer.path) sets the token a reply ends with
  (`config.model.eos_id`): a chat template's end of turn, else its EOS."""
  if "model" not in config or "tokenizer" not in config or not config.tokenizer.get("path"):
    return
  from rlhf_jax import tokenizer as tokenizer_lib

  eos = tokenizer_lib.load(config.tokenizer.path).eos_id
  if "model.eos_id" in overridden and config.model.eos_id != eos:
    raise UserInputError(
      f"config.model.eos_id: {config.model.eos_id} given, but the tokenizer "
      f"{config.tokenizer.path} ends a reply with id {eos}"
    )
  with config.unlocked():
    config.model.eos_id = eos


def _check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise UserInputError(f"config.{key}: {msg}")


# Where the numbers of each section must lie (rlhf_jax.ranges). Counts where 0 means
# "all" or "off" are `>= 0`; a stage's count where 0 means "derive it" is in its `zero_ok`.
_MODEL_RANGES = {
  **dict.fromkeys(("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads"), "> 0"),
  **dict.fromkeys(("mlp_dim", "max_len", "rope_theta"), "> 0"),
  **dict.fromkeys(("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"), "> 0"),
  "rope_original_max_len": "> 0",
  "eos_id": ">= 0",
  "head_dim": ">= 0",  # 0 = d_model // n_heads
  "norm_eps": ">= 0",
  "dropout": "[0, 1)",
}
_SAMPLING_RANGES = {
  "temperature": ">= 0",
  "top_p": "(0, 1]",
  "top_k": ">= 0",
  "max_new_tokens": "> 0",
}
_GUARD_RANGES = {
  "max_bad_steps": ">= 1",
  "lr_factor": "(0, 1]",
  "max_restores": ">= 0",
  "kl_ceiling": ">= 0",  # 0 = off
  "length_ratio": ">= 0",  # 0 = off; (0, 1) is checked apart: an interval that is empty
  "inject_nan_from": ">= -1",  # -1 = off
  "inject_nan_steps": ">= 0",
}
# Fields any stage's section may have; a stage's own fields are checked by its module's
# `validate(section, key)` hook (rlhf_jax.stages.registry).
_STAGE_RANGES = {
  **dict.fromkeys(("batch_size", "eval_batch_size", "num_steps", "num_iterations"), "> 0"),
  **dict.fromkeys(("num_epochs", "num_minibatches", "seq_len", "prompt_len"), "> 0"),
  **dict.fromkeys(("max_prompt_len", "max_new_tokens", "log_every", "save_every"), "> 0"),
  "keep_checkpoints": "> 0",
  **dict.fromkeys(("seed", "max_comparisons", "eval_every", "top_k"), ">= 0"),
  **dict.fromkeys(("temperature", "eval_temperature"), ">= 0"),  # 0 = greedy
  "top_p": "(0, 1]",
  "dropout": "[0, 1)",
}
_OPTIM_RANGES = {
  **dict.fromkeys(("lr", "warmup_steps", "weight_decay", "grad_clip", "eps"), ">= 0"),
  "end_lr_frac": "[0, 1]",  # cosine decays to lr x end_lr_frac
  **dict.fromkeys(("b1", "b2", "ema_decay"), "[0, 1)"),
  "grad_accum": ">= 1",
}
_SCHEDULES = ("cosine", "constant")


def _validate_length(sec: ml_collections.ConfigDict, name: str, max_len: int) -> None:
  """A stage's sequences (seq_len, or prompt_len + max_new_tokens) fit model.max_len."""
  length = sec.get("seq_len", 0) or sec.get("prompt_len", 0) + sec.get("max_new_tokens", 0)
  if max_len and length:
    what = "seq_len" if "seq_len" in sec else "prompt_len + max_new_tokens"
    _check(
      length <= max_len,
      f"{name}.{what.split(' ')[0]}",
      f"{what} = {length} exceeds model.max_len={max_len}",
    )


def _validate_optim(o: ml_collections.ConfigDict, key: str) -> None:
  ranges.check(o, key, _OPTIM_RANGES)
  if "schedule" in o:
    _check(
      o.schedule in _SCHEDULES,
      f"{key}.schedule",
      f"must be {'|'.join(_SCHEDULES)}, got {o.schedule!r}",
    )


def _validate_stages(config: ml_collections.ConfigDict) -> None:
  """Every registered stage's section: the shared fields here, its own by its hook."""
  from rlhf_jax.stages import registry

  max_len = config.model.get("max_len", 0) if "model" in config else 0
  for stage, sec in registry.iter_sections(config):
    name = stage.section
    hook = stage.hook("validate")
    if hook is not None:  # first: a stage's own rule may be narrower (PPO's temperature > 0)
      hook(sec, name)
    ranges.check(sec, name, {**_STAGE_RANGES, **dict.fromkeys(stage.zero_ok, ">= 0")})
    _validate_length(sec, name, max_len)
    for opt in ("optim", "value_optim"):
      if opt in sec:
        _validate_optim(sec[opt], f"{name}.{opt}")


def _validate_model(config: ml_collections.ConfigDict) -> None:
  m = config.model
  ranges.check(m, "model", _MODEL_RANGES)
  hd = m.get("head_dim", 0) or (m.d_model // m.n_heads)
  if not m.get("head_dim", 0):
    _check(
      m.d_model % m.n_heads == 0,
      "model.n_heads",
      f"{m.n_heads} heads do not divide d_model={m.d_model}",
    )
  _check(
    m.n_heads % m.n_kv_heads == 0,
    "model.n_kv_heads",
    f"{m.n_kv_heads} KV heads do not divide n_heads={m.n_heads}",
  )
  _check(hd % 2 == 0, "model.head_dim", f"RoPE needs an even head dim, got {hd}")
  for k in ("dtype", "param_dtype"):
    _check(m[k] in _DTYPES, f"model.{k}", f"must be one of {_DTYPES}, got {m[k]!r}")
  _check(
    m.remat in ("none", "full", "dots"),
    "model.remat",
    f"must be none|full|dots, got {m.remat!r}",
  )
  from rlhf_jax.models.transformer import ROPE_TYPES

  rope_type = m.get("rope_type", "default")
  _check(
    rope_type in ROPE_TYPES,
    "model.rope_type",
    f"must be {'|'.join(ROPE_TYPES)}, got {rope_type!r}",
  )
  if rope_type == "llama3":
    low, high = m.rope_low_freq_factor, m.rope_high_freq_factor
    _check(high > low, "model.rope_high_freq_factor", f"must exceed rope_low_freq_factor={low}")


def _validate_tokenizer(config: ml_collections.ConfigDict) -> None:
  from rlhf_jax import tokenizer as tokenizer_lib

  t = config.tokenizer
  if not t.get("path", ""):  # trained here: the fixed pieces plus one per character
    least = tokenizer_lib.FIXED_PIECES + 1
    _check(
      t.vocab_size >= least,
      "tokenizer.vocab_size",
      f"must be >= {least} to train one ({tokenizer_lib.FIXED_PIECES} pieces are fixed), "
      f"got {t.vocab_size}",
    )
  if "model" not in config:
    return
  # a checkpoint's embedding may be padded beyond its tokenizer's pieces
  imported = bool(config.get("init") and any(config.init.get(k) for k in init_keys()))
  m = config.model
  _check(
    t.vocab_size <= m.vocab_size if imported else t.vocab_size == m.vocab_size,
    "tokenizer.vocab_size",
    f"{t.vocab_size} {'>' if imported else '!='} model.vocab_size={m.vocab_size}",
  )


def _validate_mesh(mesh: ml_collections.ConfigDict) -> None:
  for k in ("data", "fsdp", "tensor"):
    v = mesh[k]
    _check(v == -1 or v >= 1, f"mesh.{k}", f"must be -1 (the rest) or >= 1, got {v}")
  _check(
    [mesh[k] for k in ("data", "fsdp", "tensor")].count(-1) <= 1,
    "mesh",
    "at most one axis may be -1",
  )


def _validate_guard(g: ml_collections.ConfigDict) -> None:
  ranges.check(g, "guard", _GUARD_RANGES)
  # the alert band [L0 / r, L0 x r] is empty for 0 < r < 1: every iteration would alert
  r = g.get("length_ratio", 0)
  _check(r == 0 or r >= 1, "guard.length_ratio", f"must be 0 (off) or >= 1, got {r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Check values that are well-typed but impossible; errors name the key."""
  if "seed" in config:
    _check(config.seed >= 0, "seed", f"must be >= 0, got {config.seed}")
  if "model" in config:
    _validate_model(config)
  if "tokenizer" in config:
    _validate_tokenizer(config)
  if "mesh" in config:
    _validate_mesh(config.mesh)
  if "sampling" in config:
    ranges.check(config.sampling, "sampling", _SAMPLING_RANGES)
  if "guard" in config:
    _validate_guard(config.guard)
  if "lora" in config:
    from rlhf_jax import lora

    lora.validate(config.lora)
  if "world" in config:
    from rlhf_jax.data import world

    world.validate(config.world.to_dict())
  if "eval" in config:
    from rlhf_jax import evaluate

    evaluate.validate(config.eval)
  _validate_stages(config)
