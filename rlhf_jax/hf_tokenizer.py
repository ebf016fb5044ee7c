"""A Hugging Face `tokenizer.json` (byte-level BPE: GPT-2, LLaMA 3, Qwen, SmolLM) behind our
Tokenizer interface, read with the `tokenizers` package (Rust; no PyTorch, no transformers).

  tok = hf_tokenizer.load("MODEL/tokenizer.json")   # or the directory holding it
  tok = hf_tokenizer.train_bpe(texts, 1024)          # our own, for `rlhf-jax tokenizer`

Ids are what transformers' `AutoTokenizer(...).encode(text, add_special_tokens=False)`
gives: the pipeline in tokenizer.json (normaliser, pre-tokeniser, model) and its added
tokens, which match in text as they do there (a literal "<|im_end|>" in a message is
the special token, transformers' default). The special tokens come from
tokenizer_config.json (`bos_token`, `eos_token`, `pad_token`, `unk_token`; strings or
transformers' AddedToken objects), falling back to special_tokens_map.json.

Which id ends a reply: with a chat template, the special token the template writes after
an assistant's content (ChatML's `<|im_end|>`, LLaMA 3's `<|eot_id|>`); without one,
`eos_token`. A pretraining document ends with `eos_token` (Qwen's `<|endoftext|>` in a
base model's files). A tokenizer without BOS (Qwen) starts documents and dialogues with
nothing, as transformers does. `pad_id` stays our layout value 0: rows are padded with it
and masked, so it never reaches a model as a token even where id 0 is a real piece.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers

from rlhf_jax import chat_template as chat_template_lib
from rlhf_jax import tokenizer_base as tokenizer_lib
from rlhf_jax.errors import UserInputError

TOKENIZER_JSON = "tokenizer.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
SPECIAL_KEYS += ("mask_token",)
# The files that travel with a tokenizer.json (copied by `save`, exports and imports).
FILES = (
  TOKENIZER_JSON,
  chat_template_lib.CONFIG_FILE,
  chat_template_lib.TEMPLATE_FILE,
  "special_tokens_map.json",
)
# What `train_bpe` reserves, at the ids our SentencePiece models use for them.
OWN_SPECIALS = ("<pad>", "<s>", "</s>")


def _token_text(value: Any) -> str | None:
  if isinstance(value, dict):  # transformers' serialised AddedToken
    value = value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer(tokenizer_lib.Tokenizer):
  """tokenizer.json's pipeline, the special tokens of tokenizer_config.json and, when the
  model brings one, its chat template."""

  def __init__(
    self,
    tokenizer_json: str,
    config: Mapping[str, Any] | None = None,
    template: str | None = None,
    *,
    where: str = TOKENIZER_JSON,
  ):
    self.where = where
    self.tokenizer_json, self.config = tokenizer_json, dict(config or {})
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
      raise UserInputError(f"{where}: not a valid tokenizer.json ({e})") from None
    self.special_tokens = {
      k: t for k in SPECIAL_KEYS if (t := _token_text(self.config.get(k))) is not None
    }
    self.bos_id = self._special_id("bos_token")
    self.unk_id = self._special_id("unk_token")
    self.pad_token_id = self._special_id("pad_token")  # the model's own (HF's RM pooling)
    eos = self._special_id("eos_token")
    if eos is None:
      raise UserInputError(f"{where}: no eos_token (tokenizer_config.json names none)")
    self.document_end_id = self.eos_id = eos
    controls = sorted(
      (t.content for t in self._tok.get_added_tokens_decoder().values() if t.special),
      key=len,
      reverse=True,
    )
    if template:
      self.chat_template = chat_template_lib.ChatTemplate(
        template, self.special_tokens, where, controls
      )
      if self.chat_template.end_of_turn:
        self.eos_id = self._tok.token_to_id(self.chat_template.end_of_turn)
    self._prefix_ids = {r: self.encode(p) for r, p in tokenizer_lib.ROLE_PREFIX.items()}
    self._next_prefix_ids = self._prefix_ids
    self._sep_ids = self.encode(tokenizer_lib.TURN_SEP)

  def _special_id(self, key: str) -> int | None:
    text = self.special_tokens.get(key)
    if text is None:
      return None
    i = self._tok.token_to_id(text)
    if i is None:
      raise UserInputError(f"{self.where}: {key} {text!r} is not in the vocabulary")
    return i

  @property
  def vocab_size(self) -> int:
    """One more than the largest id (added tokens included): the embedding rows needed."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` without the special tokens (transformers' skip_special_tokens)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_dialogue(self, messages, add_generation_prompt: bool = False):
    if self.chat_template is None:
      return super().encode_dialogue(messages, add_generation_prompt)
    text, spans = self.chat_template.assistant_spans(messages)
    if add_generation_prompt:
      full = self.chat_template.render(messages, add_generation_prompt=True)
      if not full.startswith(text):
        raise UserInputError(
          f"{self.where}: chat_template's generation prompt rewrites the dialogue"
        )
      text = full
    enc = self._tok.encode(text, add_special_tokens=False)
    # transformers' assistant mask: a token is the assistant's if it overlaps a span
    target = [any(s < end and e > start for start, end in spans) for s, e in enc.offsets]
    return list(enc.ids), target

  def encode_prompt(self, messages) -> list[int]:
    if self.chat_template is None:
      return super().encode_prompt(messages)
    return self.encode(self.chat_template.render(messages, add_generation_prompt=True))

  def save(self, path: str) -> None:
    """tokenizer.json at `path`, tokenizer_config.json (with the template) beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    config = dict(self.config)
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template.source
    config_path = os.path.join(directory, chat_template_lib.CONFIG_FILE)
    for target, body in (
      (path, self.tokenizer_json),
      (config_path, json.dumps(config, indent=2, ensure_ascii=False)),
    ):
      with open(f"{target}.tmp", "w", encoding="utf-8") as f:
        f.write(body)
      os.replace(f"{target}.tmp", target)


def json_path(path: str) -> str:
  """`path` itself, or the tokenizer.json of a directory."""
  return os.path.join(path, TOKENIZER_JSON) if os.path.isdir(path) else path


def load(path: str) -> HFTokenizer:
  path = json_path(path)
  if not os.path.exists(path):
    raise UserInputError(f"{path}: not found (a Hugging Face tokenizer.json)")
  directory = os.path.dirname(os.path.abspath(path))
  with open(path, encoding="utf-8") as f:
    body = f.read()
  config = {}
  for name in ("special_tokens_map.json", chat_template_lib.CONFIG_FILE):  # the latter wins
    if os.path.exists(p := os.path.join(directory, name)):
      config.update(chat_template_lib.read_json(p))
  template, where = chat_template_lib.read_source(directory)
  return HFTokenizer(body, config, template, where=path if template is None else where)


def copy_files(path: str, directory: str) -> list[str]:
  """Copy a tokenizer.json and the files that travel with it into `directory`."""
  src = os.path.dirname(os.path.abspath(json_path(path)))
  names = [n for n in FILES if os.path.exists(os.path.join(src, n))]
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(directory, n))
  return names


def train_bpe(texts: Iterable[str], vocab_size: int, *, vocab_key: str = "--vocab-size"):
  """A byte-level BPE tokenizer.json (GPT-2's pre-tokenisation, no normalisation) trained
  on `texts`, with <pad>, <s>, </s> at ids 0, 1, 2 as in our SentencePiece models."""
  n_min = len(OWN_SPECIALS) + 256
  if vocab_size < n_min:
    raise UserInputError(
      f"{vocab_key}={vocab_size}: too small for byte-level BPE, must be >= {n_min}"
    )
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(OWN_SPECIALS),
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator((t for t in texts if t), trainer)
  pad, bos, eos = OWN_SPECIALS
  config = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  return HFTokenizer(tok.to_str(), config)
