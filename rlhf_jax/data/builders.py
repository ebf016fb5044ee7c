"""TFDS builders of the generated world's datasets, and readers that need no TensorFlow.

One `GeneratorBasedBuilder` per dataset (`NAMES`), written offline from
`rlhf_jax.data.records` as ArrayRecord files and read back by random access
(`as_data_source`, grain-compatible). Nothing here imports TensorFlow: TFDS builds
and reads ArrayRecord datasets without it.

The world config travels in a `WorldConfig` (a `tfds.core.BuilderConfig`) whose name
is `seed<seed>_<hash of the world config>`, so a dataset lives under

    <data_dir>/<name>/seed0_1a2b3c4d5e6f/1.0.0/<name>-<split>.array_record-*

and a changed world builds beside, never over, an existing one. Nested fields
(`messages`, `task`, `choices`) are stored as JSON text and decoded by `load`.

Splits: pretrain/train, demonstrations/{train,validation},
prompts/{train,validation}, heldout_text/test, heldout_tasks/test.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rlhf_jax.data import records as records_lib
from rlhf_jax.data import world as world_lib
from rlhf_jax.errors import UserInputError

NAMES = ("pretrain", "demonstrations", "prompts", "heldout_text", "heldout_tasks")
JSON_FIELDS = frozenset({"messages", "task", "choices"})
# World knobs that only affect ranking at comparison time, not any stored dataset.
_NOT_IN_DATA = ("num_labelers", "labeler_noise", "labeler_length_bias", "rank_k_min", "rank_k_max")

WorldLike = Mapping[str, Any] | ml_collections.ConfigDict | None


def _json_text(doc: str) -> tfds.features.Text:
  return tfds.features.Text(doc=f"JSON: {doc}")


def config_name(world: WorldLike) -> str:
  """The BuilderConfig name of a world: `seed<seed>_<12 hex digits>`."""
  cfg = world_lib.make_world(world).cfg
  data_cfg = {k: v for k, v in cfg.items() if k not in _NOT_IN_DATA}
  digest = hashlib.blake2b(json.dumps(data_cfg, sort_keys=True).encode(), digest_size=6)
  return f"seed{int(cfg['seed'])}_{digest.hexdigest()}"


@dataclasses.dataclass(eq=False)
class WorldConfig(tfds.core.BuilderConfig):
  """A BuilderConfig carrying the full world config (a plain dict)."""

  world: dict[str, Any] = dataclasses.field(default_factory=dict)


class _WorldBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common part: world config in, ArrayRecord out. Subclasses set name/features/splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
  SPLITS: ClassVar[tuple[str, ...]] = ("train",)
  DESCRIPTION: ClassVar[str] = ""
  # Configs made at run time, registered so TFDS treats them as known ones.
  _made: ClassVar[dict[tuple[str, str], WorldConfig]] = {}
  # TFDS 4.9.10 derives `code_path` through `importlib_resources`, which it declares
  # only for Python < 3.9 (tensorflow/datasets#11212); naming the file sidesteps it.
  code_path: ClassVar[epath.Path] = epath.Path(__file__)

  def __init__(
    self, *, data_dir: str, world: WorldLike = None, config: WorldConfig | None = None, **kwargs
  ):
    if config is None:  # (unpickling passes the config back instead of the world)
      cfg = world_lib.make_world(world).cfg
      config = WorldConfig(
        name=config_name(cfg), version=self.VERSION, description="generated world", world=cfg
      )
    config = _WorldBuilder._made.setdefault((self.name, config.name), config)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(data_dir=data_dir, config=config, **kwargs)

  def built(self) -> bool:
    """Whether this dataset is fully written (TFDS renames it into place when done)."""
    return os.path.isfile(os.path.join(self.data_dir, "dataset_info.json"))

  @classmethod
  def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig | None:
    return _WorldBuilder._made.get((cls.name, name)) or super().get_builder_config(name, version)

  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    raise NotImplementedError

  def _records(self, world: world_lib.World, split: str) -> Iterator[dict[str, Any]]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(self._features()),
      metadata=tfds.core.MetadataDict(world=self.builder_config.world),
      homepage="https://arxiv.org/abs/2203.02155",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated offline
    world = world_lib.make_world(self.builder_config.world)
    return {split: self._generate_examples(world, split) for split in self.SPLITS}

  def _generate_examples(self, world: world_lib.World, split: str):
    for i, record in enumerate(self._records(world, split)):
      yield i, {k: json.dumps(v) if k in JSON_FIELDS else v for k, v in record.items()}


class Pretrain(_WorldBuilder, skip_registration=True):
  name = "pretrain"
  DESCRIPTION = "Pretraining 'web text' of the generated world, with per-document annotations."

  def _features(self):
    flag = lambda doc: tfds.features.Scalar(dtype=np.bool_, doc=doc)
    return {
      "text": tfds.features.Text(),
      "kind": tfds.features.Text(doc="encyclopedia | worked | question | chat"),
      "has_question": flag("holds an instruction-like question"),
      "question_answered": flag("its first question is followed by the answer"),
      "untruthful": flag("states a false KB fact"),
      "toxic": flag("holds a toxic marker"),
      "chat": flag("is a User:/Assistant: transcript"),
    }

  def _records(self, world, split):
    return records_lib.pretrain_records(world)


class Demonstrations(_WorldBuilder, skip_registration=True):
  name = "demonstrations"
  SPLITS = ("train", "validation")
  DESCRIPTION = "SFT demonstrations written by simulated labelers (split by user)."

  def _features(self):
    return {
      "messages": _json_text("list of {role, content}, ending in the assistant reply"),
      "family": tfds.features.Text(),
      "user_id": tfds.features.Scalar(dtype=np.int64),
      "task": _json_text("the world task (family, params, answer, multi_turn, kb)"),
      "quality": tfds.features.Text(doc="correct | wrong | verbose"),
    }

  def _records(self, world, split):
    return records_lib.demonstration_records(world, split)


class Prompts(_WorldBuilder, skip_registration=True):
  name = "prompts"
  SPLITS = ("train", "validation")
  DESCRIPTION = "Prompts for comparisons and PPO, disjoint from SFT prompts (split by user)."

  def _features(self):
    return {
      "messages": _json_text("list of {role, content}, ending in a user turn"),
      "family": tfds.features.Text(),
      "user_id": tfds.features.Scalar(dtype=np.int64),
      "prompt_id": tfds.features.Scalar(dtype=np.int64),
      "task": _json_text("the world task (family, params, answer, multi_turn, kb)"),
    }

  def _records(self, world, split):
    return records_lib.prompt_records(world, split)


class HeldoutText(_WorldBuilder, skip_registration=True):
  name = "heldout_text"
  SPLITS = ("test",)
  DESCRIPTION = "Held-out documents from the pretraining distribution (held-out LM loss)."

  def _features(self):
    return {"text": tfds.features.Text()}

  def _records(self, world, split):
    return records_lib.heldout_text_records(world)


class HeldoutTasks(_WorldBuilder, skip_registration=True):
  name = "heldout_tasks"
  SPLITS = ("test",)
  DESCRIPTION = "Zero-shot multiple-choice tasks scored by LM log-likelihood of each choice."

  def _features(self):
    return {
      "task_name": tfds.features.Text(doc=" | ".join(records_lib.HELDOUT_TASKS)),
      "context": tfds.features.Text(),
      "choices": _json_text("list of completions of the context"),
      "label": tfds.features.Scalar(dtype=np.int64, doc="index of the right choice"),
    }

  def _records(self, world, split):
    return records_lib.heldout_task_records(world)


BUILDERS: dict[str, type[_WorldBuilder]] = {
  b.name: b for b in (Pretrain, Demonstrations, Prompts, HeldoutText, HeldoutTasks)
}


def _check_name(name: str) -> None:
  if name not in BUILDERS:
    raise UserInputError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")


def builder(name: str, world: WorldLike, data_dir: str) -> _WorldBuilder:
  """The TFDS builder of dataset `name` for `world` under `data_dir`."""
  _check_name(name)
  return BUILDERS[name](world=world, data_dir=data_dir)


def build(name: str, world: WorldLike, data_dir: str) -> dict[str, int]:
  """Build dataset `name` unless already built; returns `{"<name>/<split>": records}`.
  In a multi-process run process 0 builds it and the others read it."""
  from rlhf_jax import distributed

  return distributed.first_then_all(f"build {name}", lambda: _build(name, world, data_dir))


def _build(name: str, world: WorldLike, data_dir: str) -> dict[str, int]:
  b = builder(name, world, data_dir)
  if not b.built():
    # TFDS writes into an `incomplete.*` folder and renames it when done, so an
    # interrupted build never leaves a half-written dataset behind.
    tfds.display_progress_bar(False)
    try:
      b.download_and_prepare()
    finally:
      tfds.display_progress_bar(True)
  return {f"{name}/{s}": int(b.info.splits[s].num_examples) for s in b.SPLITS}


def _decode(record: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for k, v in record.items():
    if isinstance(v, bytes):
      v = v.decode("utf-8")
      if k in JSON_FIELDS:
        v = json.loads(v)
    elif isinstance(v, np.generic | np.ndarray):
      v = v.item() if np.ndim(v) == 0 else v.tolist()
    out[k] = v
  return out


class Source:
  """A random-access source of decoded records (`len(src)`, `src[i]`): grain-ready.

  Fields hold plain Python values: `messages` a list of `{role, content}` dicts,
  `task` a dict, text a `str`, flags `bool`, ids `int`.
  """

  def __init__(self, data_source: Sequence[Mapping[str, Any]]):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    return _decode(self._source[index % len(self)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [_decode(r) for r in self._source.__getitems__(list(indices))]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f"Source({self._source!r})"


def load(data_dir: str, name: str, split: str, world: WorldLike = None) -> Source:
  """Random access to split `split` of dataset `name` built under `data_dir`.

  With `world`, reads that world's build; without it, the only build found there
  (raises UserInputError when there is none or several).
  """
  _check_name(name)
  if world is not None:
    b = builder(name, world, data_dir)
    if not b.built():
      raise UserInputError(f"{b.data_dir}: dataset {name!r} is not built (run `rlhf-jax data`)")
  else:
    pattern = os.path.join(data_dir, name, "*", _WorldBuilder.VERSION.__str__())
    found = sorted(d for d in glob.glob(pattern) if os.path.isfile(f"{d}/dataset_info.json"))
    if not found:
      raise UserInputError(f"{data_dir}: no built dataset {name!r} (run `rlhf-jax data`)")
    if len(found) > 1:
      raise UserInputError(
        f"{data_dir}: several builds of {name!r} ({', '.join(found)}); pass the world config"
      )
    b = tfds.builder_from_directory(found[0])
  if split not in b.info.splits:
    raise UserInputError(f"dataset {name!r} has no split {split!r}; splits: {list(b.info.splits)}")
  return Source(b.as_data_source(split=split))
