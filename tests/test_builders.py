"""TFDS builders (ArrayRecord, read without TensorFlow) and `prepare`."""

import glob
import os
import pickle
import sys

import ml_collections
import pytest

from rlhf_jax import tokenizer as tok
from rlhf_jax.data import builders, prepare
from rlhf_jax.data import records as records_lib
from rlhf_jax.data import world as world_lib
from rlhf_jax.errors import UserInputError

SPLITS = {
  "pretrain": ("train",),
  "demonstrations": ("train", "validation"),
  "prompts": ("train", "validation"),
  "heldout_text": ("test",),
  "heldout_tasks": ("test",),
}


def small_world(**overrides):
  c = world_lib.world_config()
  c.num_pretrain, c.num_demonstrations, c.num_demonstrations_val = 300, 60, 20
  c.num_prompts, c.num_prompts_val, c.num_heldout_text, c.num_heldout_tasks = 40, 10, 20, 5
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  counts = {}
  for name in builders.NAMES:
    counts.update(builders.build(name, small_world(), data_dir))
  return data_dir, counts


def test_builds_array_record_and_reads_back_without_tensorflow(built):
  data_dir, counts = built
  assert counts == {
    "pretrain/train": 300,
    "demonstrations/train": 60,
    "demonstrations/validation": 20,
    "prompts/train": 40,
    "prompts/validation": 10,
    "heldout_text/test": 20,
    "heldout_tasks/test": 20,
  }
  for name, splits in SPLITS.items():
    for split in splits:
      files = glob.glob(f"{data_dir}/{name}/seed0_*/1.0.0/{name}-{split}.array_record-*")
      assert files, (name, split)
      src = builders.load(data_dir, name, split)
      assert len(src) == counts[f"{name}/{split}"]
      first, last = src[0], src[len(src) - 1]
      # random access reads the records themselves: a fresh source gives the same ones,
      # and the first record is not the last
      again = builders.load(data_dir, name, split)
      assert again[0] == first and again[len(src) - 1] == last and first != last
  assert "tensorflow" not in sys.modules


def test_decoded_records(built):
  data_dir, _ = built
  world = world_lib.make_world(small_world())
  pre = builders.load(data_dir, "pretrain", "train")[0]
  assert isinstance(pre["text"], str) and isinstance(pre["toxic"], bool)
  assert set(pre) == {"text", "kind", "has_question", "question_answered", "untruthful"} | {
    "toxic",
    "chat",
  }
  demo = builders.load(data_dir, "demonstrations", "train", small_world())[3]
  tok.validate_messages(demo["messages"])
  assert isinstance(demo["task"], dict) and isinstance(demo["user_id"], int)
  assert demo["messages"][-1]["role"] == "assistant"
  prompt = builders.load(data_dir, "prompts", "validation")[0]
  assert set(prompt) == {"messages", "family", "user_id", "prompt_id", "task"}
  assert prompt["messages"][-1]["role"] == "user"
  assert prompt["task"]["answer"] == world_lib.answer_of(
    world, prompt["task"]["family"], prompt["task"]["params"]
  )
  task = builders.load(data_dir, "heldout_tasks", "test")[0]
  assert isinstance(task["choices"], list) and isinstance(task["label"], int)


def test_stored_records_equal_generated_ones(built):
  data_dir, _ = built
  world = world_lib.make_world(small_world())
  stored = list(builders.load(data_dir, "prompts", "train"))
  generated = list(records_lib.prompt_records(world, "train"))
  key = lambda r: r["prompt_id"]
  assert sorted(stored, key=key) == sorted(generated, key=key)


def test_deterministic_per_seed(built, tmp_path):
  data_dir, _ = built
  builders.build("demonstrations", small_world(), str(tmp_path))
  builders.build("demonstrations", small_world(seed=1), str(tmp_path))
  a = list(builders.load(data_dir, "demonstrations", "train"))
  b = list(builders.load(str(tmp_path), "demonstrations", "train", small_world()))
  c = list(builders.load(str(tmp_path), "demonstrations", "train", small_world(seed=1)))
  assert a == b and a != c
  with pytest.raises(UserInputError, match="several builds"):
    builders.load(str(tmp_path), "demonstrations", "train")


def test_source_pickles_and_batches(built):
  data_dir, _ = built
  src = builders.load(data_dir, "prompts", "train")
  again = pickle.loads(pickle.dumps(src))
  assert again[5] == src[5]
  assert src.__getitems__([1, 2]) == [src[1], src[2]]


def test_bad_names(built, tmp_path):
  data_dir, _ = built
  with pytest.raises(UserInputError, match="unknown dataset"):
    builders.load(data_dir, "nope", "train")
  with pytest.raises(UserInputError, match="no split 'test'"):
    builders.load(data_dir, "prompts", "test")
  with pytest.raises(UserInputError, match="not built"):
    builders.load(str(tmp_path), "prompts", "train", small_world())


def test_config_name_ignores_ranking_knobs():
  base = builders.config_name(small_world())
  assert builders.config_name(small_world(labeler_noise=0.5)) == base
  assert builders.config_name(small_world(num_entities=41)) != base


def test_prepare_builds_everything_once(tmp_path):
  config = ml_collections.ConfigDict()
  config.world = small_world()
  config.tokenizer = ml_collections.ConfigDict({"vocab_size": 400})
  workdir = str(tmp_path)
  counts = prepare.prepare(config, workdir)
  assert counts["pretrain/train"] == 300 and len(counts) == 7
  model = os.path.join(workdir, "data", "tokenizer.model")
  t = tok.load(model)
  assert t.vocab_size == 400
  mtime = os.path.getmtime(model)
  assert prepare.prepare(config, workdir) == counts
  assert os.path.getmtime(model) == mtime  # skipped, not rebuilt
  config.tokenizer.vocab_size = 420
  with pytest.raises(UserInputError, match="fresh --workdir"):
    prepare.prepare(config, workdir)
  assert os.path.getmtime(model) == mtime
  assert "tensorflow" not in sys.modules
