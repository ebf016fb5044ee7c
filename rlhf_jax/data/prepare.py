"""Build every dataset of the generated world and train the tokenizer on its web text.

    counts = prepare(config, workdir)

writes `workdir/data/tfds/<name>/<world config>/1.0.0/` for each of
`builders.NAMES` and `workdir/data/tokenizer.model`, skipping whatever is already
there, and returns the record count of every split (`{"pretrain/train": 20000, ...}`).
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from rlhf_jax import tokenizer as tokenizer_lib
from rlhf_jax.data import builders
from rlhf_jax.errors import UserInputError


def data_dir(workdir: str) -> str:
  """Where the TFDS datasets of a work directory live."""
  return os.path.join(workdir, "data", "tfds")


def tokenizer_path(workdir: str) -> str:
  """Where the SentencePiece model of a work directory lives."""
  return os.path.join(workdir, "data", "tokenizer.model")


def _tokenizer_fingerprint(config: ml_collections.ConfigDict) -> dict[str, object]:
  return {
    "world": builders.config_name(config.world),
    "vocab_size": int(config.tokenizer.vocab_size),
  }


def train_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
  """Train (or load, when already trained on this world) the SentencePiece model.

  With `config.tokenizer.path` set, loads that model instead and trains nothing.

  Raises UserInputError when the work directory holds a tokenizer trained for another
  world or vocabulary size: it is never overwritten, as checkpoints depend on it.
  """
  given = config.tokenizer.get("path", "")
  if given:  # the user's own model: check it loads, train nothing
    return tokenizer_lib.load(given)
  from rlhf_jax import distributed  # process 0 trains it, the others load it

  return distributed.first_then_all("tokenizer", lambda: _train_or_load(config, workdir))


def _train_or_load(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
  path = tokenizer_path(workdir)
  stamp_path = f"{path}.json"
  want = _tokenizer_fingerprint(config)
  if os.path.exists(path):
    have = None
    if os.path.exists(stamp_path):
      with open(stamp_path) as f:
        have = json.load(f)
    if have is not None and have != want:
      raise UserInputError(
        f"{path}: trained for {have}, but the config asks for {want} "
        "(config.world / config.tokenizer.vocab_size); use a fresh --workdir"
      )
    return tokenizer_lib.load(path)
  texts = builders.load(data_dir(workdir), "pretrain", "train", config.world)
  tok = tokenizer_lib.train((r["text"] for r in texts), int(config.tokenizer.vocab_size))
  tok.save(path)
  with open(f"{stamp_path}.tmp", "w") as f:
    json.dump(want, f)
  os.replace(f"{stamp_path}.tmp", stamp_path)
  return tok


def prepare(config: ml_collections.ConfigDict, workdir: str) -> dict[str, int]:
  """Build all world datasets and the tokenizer under `workdir/data`; skip what exists.

  `config` needs `world` (a `world.world_config()`) and `tokenizer.vocab_size`.
  Returns `{"<dataset>/<split>": number of records}` (the CLI prints it).
  """
  start = time.time()
  counts = {}
  for name in builders.NAMES:
    counts.update(builders.build(name, config.world, data_dir(workdir)))
  train_tokenizer(config, workdir)
  print(f"data ready in {data_dir(workdir)} ({time.time() - start:.1f}s)")
  return counts


def is_complete(workdir: str) -> bool:
  """Never: preparing is cheap and idempotent (it checks what is built itself), so the
  pipeline always runs it."""
  return False
