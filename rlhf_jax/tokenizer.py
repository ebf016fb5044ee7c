"""SentencePiece tokenizer (train or load), how the chat format is encoded with it, and
`load`, which reads either kind (a `.model`, or a Hugging Face tokenizer.json:
`rlhf_jax.hf_tokenizer`). The interface and the plain chat format: `tokenizer_base`.

Reserved ids are fixed so checkpoints and datasets agree on them: pad=0, bos=1, eos=2,
unk=3. The tokenizer is trained with identity normalisation, no dummy prefix and
`byte_fallback=True`, so any UTF-8 text round-trips exactly (`decode(encode(t)) == t`).
A LLaMA-family `tokenizer.model` (unk=0, bos=1, eos=2, no pad; a dummy prefix) loads
too: id 0 then pads, which is safe because with byte fallback no text encodes to unk.

Chat format. A dialogue is a list of messages `{"role": "user"|"assistant", "content"}`.
As text it renders as

    User: <content>
    Assistant: <content>
    User: <content>
    Assistant:

and in tokens every assistant turn is followed by EOS, so a sampler that stops at EOS
stops at the end of a turn. Pieces are encoded separately and concatenated, which
makes the boundary between a prompt and its response exact: the response ids are
`encode(content) + [eos]`, whatever the content starts with. With a dummy-prefix
tokenizer (LLaMA's) the role prefixes drop their trailing space, which the content's
own dummy prefix supplies, and the prefixes after a newline are encoded without one, so
a dialogue's ids are the ones the whole rendered text would get.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from rlhf_jax.errors import UserInputError
from rlhf_jax.tokenizer_base import (  # noqa: F401  (the names every stage imports from here)
  ASSISTANT,
  BOS_ID,
  EOS_ID,
  PAD_ID,
  ROLE_PREFIX,
  TURN_SEP,
  UNK_ID,
  USER,
  Message,
  Tokenizer,
  cut_reply,
  render,
  validate_messages,
)

USER_SYMBOLS = ("\n",)  # pieces of their own, whatever the corpus
# Pieces every trained model has: the reserved ids, USER_SYMBOLS and the 256 byte-fallback
# pieces; each character of the corpus takes one more.
FIXED_PIECES = 4 + len(USER_SYMBOLS) + 256


@dataclasses.dataclass(frozen=True)
class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model plus the chat format. Build with `train` or `load`."""

  proto: bytes

  def __post_init__(self):
    sp = spm.SentencePieceProcessor(model_proto=self.proto)
    object.__setattr__(self, "_sp", sp)
    ids = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
    llama = (-1, BOS_ID, EOS_ID, PAD_ID)  # id 0 = unk stands in for pad
    if ids not in ((PAD_ID, BOS_ID, EOS_ID, UNK_ID), llama):
      raise UserInputError(
        f"tokenizer: reserved ids (pad, bos, eos, unk) are {ids}, expected "
        f"{(PAD_ID, BOS_ID, EOS_ID, UNK_ID)} (rlhf_jax.tokenizer.train) or LLaMA's {llama}"
      )
    plain = _without_dummy_prefix(self.proto)
    cont = spm.SentencePieceProcessor(model_proto=plain) if plain else sp
    object.__setattr__(self, "_cont", cont)  # encodes text that continues a line
    prefix = {r: p.rstrip(" ") if plain else p for r, p in ROLE_PREFIX.items()}
    object.__setattr__(self, "_prefix_ids", {r: sp.encode(p) for r, p in prefix.items()})
    object.__setattr__(self, "_next_prefix_ids", {r: cont.encode(p) for r, p in prefix.items()})
    object.__setattr__(self, "_sep_ids", cont.encode(TURN_SEP))

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  unk_id = UNK_ID

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, dropping pad/bos/eos (use `split_turns` to keep turn ends)."""
    ids = [int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)]
    return self._sp.decode(ids)

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
      f.write(self.proto)
    os.replace(tmp, path)


def _without_dummy_prefix(proto: bytes) -> bytes | None:
  """The model with SentencePiece's dummy prefix turned off, or None if it has none."""
  from sentencepiece import sentencepiece_model_pb2

  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(proto)
  if not m.normalizer_spec.add_dummy_prefix:
    return None
  m.normalizer_spec.add_dummy_prefix = False
  return m.SerializeToString()


def train(
  texts: Iterable[str],
  vocab_size: int,
  *,
  vocab_key: str = "config.tokenizer.vocab_size",
  model_type: str = "bpe",
  max_sentence_length: int = 16384,
  input_sentence_size: int = 0,
  seed_sentencepiece_size: int = 1_000_000,
) -> Tokenizer:
  """Train a SentencePiece model on an iterator of texts.

  Raises UserInputError naming `vocab_key` (the config key or command-line flag that set
  `vocab_size`) and the smallest or largest size that works when the corpus cannot give
  that many pieces (SentencePiece's own message is a C++ assertion).
  """
  model = io.BytesIO()

  def lines() -> Iterator[str]:
    # SentencePiece trains on "sentences"; whole documents with newlines work since
    # normalisation is identity, but very long ones are skipped, so split by line.
    for t in texts:
      for line in t.split("\n"):
        if line:
          yield line[:max_sentence_length]

  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=lines(),
      model_writer=model,
      # Below 4 the reserved ids do not fit and SentencePiece fails on an internal
      # assertion; from 4 on, a size too small fails its check of the corpus's
      # characters, whose message gives the smallest size that works.
      vocab_size=max(vocab_size, UNK_ID + 1),
      model_type=model_type,
      byte_fallback=True,
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
      user_defined_symbols=list(USER_SYMBOLS),
      pad_id=PAD_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      max_sentence_length=max_sentence_length,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True,
      seed_sentencepiece_size=seed_sentencepiece_size,
      num_threads=2,
      minloglevel=2,  # its progress and warnings on stderr: errors come back as one line
    )
  except RuntimeError as e:
    raise training_error(str(e), vocab_size, vocab_key) from None
  return SentencePieceTokenizer(model.getvalue())


def training_error(message: str, vocab_size: int, vocab_key: str) -> UserInputError:
  """SentencePiece's training error as one line: a vocabulary size that does not fit
  names `vocab_key` and the bound, taken from SentencePiece's message."""
  high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
  low = re.search(r"Vocabulary size is smaller than required_chars\. -?\d+ vs (\d+)", message)
  if high:
    why = f"too large for this corpus, must be <= {high.group(1)}"
  elif low:
    why = f"too small for this corpus, must be >= {low.group(1)}"
  elif "sentences_.empty()" in message:
    return UserInputError("tokenizer: no text to train on (the corpus is empty)")
  else:
    return UserInputError(f"tokenizer: SentencePiece training failed: {message.strip()}")
  return UserInputError(f"{vocab_key}={vocab_size}: {why}")


def load(path: str) -> Tokenizer:
  """A SentencePiece `.model` (written by `train`, or LLaMA 2's), or a Hugging Face
  `tokenizer.json` (a directory holding one stands for it) with its tokenizer_config.json
  and chat template beside it."""
  if not os.path.exists(path):
    raise UserInputError(f"{path}: tokenizer model not found")
  if os.path.isdir(path) or path.endswith(".json"):
    from rlhf_jax import hf_tokenizer

    return hf_tokenizer.load(path)
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return SentencePieceTokenizer(proto)
  except UserInputError:
    raise
  except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
    raise UserInputError(f"{path}: not a valid SentencePiece model ({type(e).__name__})") from None


def truncate_prompt(ids: Sequence[int], max_len: int) -> list[int]:
  """A prompt of at most `max_len` tokens: its first (BOS) and its last ones (a long
  dialogue keeps its latest turns)."""
  ids = list(ids)
  return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - max_len + 1 :]


def pad_left(seqs: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
  """Left-pad token lists into int32[B, length] with PAD_ID (the sampler's layout)."""
  length = length or max(len(s) for s in seqs)
  out = np.full((len(seqs), length), PAD_ID, np.int32)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence {i} has {len(s)} tokens > {length}")
    if len(s):
      out[i, length - len(s) :] = s
  return out
