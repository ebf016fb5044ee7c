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
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

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
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except UserInputError:
    raise
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


def _check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise UserInputError(f"config.{key}: {msg}")


_POSITIVE = (
  "num_steps",
  "batch_size",
  "seq_len",
  "num_iterations",
  "prompt_len",
  "max_new_tokens",
  "num_epochs",
  "num_minibatches",
  "log_every",
  "save_every",
  "keep_checkpoints",
  "eval_batch_size",
)
_NON_NEGATIVE = ("max_comparisons", "seed")


def _validate_stages(config: ml_collections.ConfigDict) -> None:
  """Sizes, counts, lengths and optimiser numbers of every registered stage's section."""
  from rlhf_jax.stages import registry

  max_len = config.model.get("max_len", 0) if "model" in config else 0
  for stage, sec in registry.iter_sections(config):
    name = stage.section
    for k in _POSITIVE:
      if k in sec and isinstance(sec[k], (int, float)):
        if k in stage.zero_ok:  # 0 = derive it (e.g. the RM's steps from num_epochs)
          _check(sec[k] >= 0, f"{name}.{k}", f"must be >= 0 (0: from num_epochs), got {sec[k]}")
        else:
          _check(sec[k] > 0, f"{name}.{k}", f"must be > 0, got {sec[k]}")
    for k in _NON_NEGATIVE:
      if k in sec and isinstance(sec[k], (int, float)):
        _check(sec[k] >= 0, f"{name}.{k}", f"must be >= 0, got {sec[k]}")
    length = sec.get("seq_len", 0) or sec.get("prompt_len", 0) + sec.get("max_new_tokens", 0)
    if max_len and length:
      what = "seq_len" if "seq_len" in sec else "prompt_len + max_new_tokens"
      _check(
        length <= max_len,
        f"{name}.{what.split(' ')[0]}",
        f"{what} = {length} exceeds model.max_len={max_len}",
      )
    for opt in ("optim", "value_optim"):
      if opt not in sec:
        continue
      o, key = sec[opt], f"{name}.{opt}"
      _check(o.lr >= 0, f"{key}.lr", f"must be >= 0, got {o.lr}")
      for k in ("b1", "b2"):
        _check(0 <= o[k] < 1, f"{key}.{k}", f"must be in [0, 1), got {o[k]}")
      for k in ("warmup_steps", "weight_decay", "grad_clip", "eps"):
        if k in o:
          _check(o[k] >= 0, f"{key}.{k}", f"must be >= 0, got {o[k]}")
      if "ema_decay" in o:
        _check(0 <= o.ema_decay < 1, f"{key}.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
      if "grad_accum" in o:
        _check(o.grad_accum >= 1, f"{key}.grad_accum", f"must be >= 1, got {o.grad_accum}")
  if "guard" in config:
    g = config.guard
    _check(g.max_bad_steps >= 1, "guard.max_bad_steps", f"must be >= 1, got {g.max_bad_steps}")
    _check(0 < g.lr_factor <= 1, "guard.lr_factor", f"must be in (0, 1], got {g.lr_factor}")
    _check(g.max_restores >= 0, "guard.max_restores", f"must be >= 0, got {g.max_restores}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Check values that are well-typed but impossible; errors name the key."""
  if "model" in config:
    m = config.model
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim"):
      _check(m[k] > 0, f"model.{k}", f"must be > 0, got {m[k]}")
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
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    for k in ("dtype", "param_dtype"):
      _check(m[k] in _DTYPES, f"model.{k}", f"must be one of {_DTYPES}, got {m[k]!r}")
    _check(
      m.remat in ("none", "full", "dots"),
      "model.remat",
      f"must be none|full|dots, got {m.remat!r}",
    )
    if "tokenizer" in config:
      # a checkpoint's embedding may be padded beyond its tokenizer's pieces
      imported = bool(config.get("init") and any(config.init.get(k) for k in init_keys()))
      _check(
        config.tokenizer.vocab_size <= m.vocab_size
        if imported
        else config.tokenizer.vocab_size == m.vocab_size,
        "tokenizer.vocab_size",
        f"{config.tokenizer.vocab_size} {'>' if imported else '!='} model.vocab_size="
        f"{m.vocab_size}",
      )
  if "mesh" in config:
    for k in ("data", "fsdp", "tensor"):
      v = config.mesh[k]
      _check(v == -1 or v >= 1, f"mesh.{k}", f"must be -1 (the rest) or >= 1, got {v}")
    _check(
      [config.mesh[k] for k in ("data", "fsdp", "tensor")].count(-1) <= 1,
      "mesh",
      "at most one axis may be -1",
    )
  if "sampling" in config:
    s = config.sampling
    _check(s.temperature >= 0, "sampling.temperature", f"must be >= 0, got {s.temperature}")
    _check(0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    _check(s.top_k >= 0, "sampling.top_k", f"must be >= 0, got {s.top_k}")
    _check(s.max_new_tokens > 0, "sampling.max_new_tokens", "must be > 0")
  _validate_stages(config)
