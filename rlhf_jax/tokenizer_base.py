"""What every tokenizer gives the stages, and the plain chat format.

`Tokenizer` is the interface (text <-> ids, the special ids, dialogues as ids with the
SFT target mask); `rlhf_jax.tokenizer` (SentencePiece) and `rlhf_jax.hf_tokenizer`
(a Hugging Face tokenizer.json) implement it, and `rlhf_jax.tokenizer.load` picks one by
the file. The plain chat format (`render`, `ROLE_PREFIX`) is what a model without its own
chat template reads; see rlhf_jax/tokenizer.py for how its pieces are encoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypedDict

from rlhf_jax.errors import UserInputError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
USER, ASSISTANT = "user", "assistant"
ROLE_PREFIX = {USER: "User: ", ASSISTANT: "Assistant: "}
TURN_SEP = "\n"


class Message(TypedDict):
  role: str  # "user" | "assistant"
  content: str


def render(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
  """The dialogue as plain text (what a person reads; tokens add EOS after replies)."""
  lines = [ROLE_PREFIX[m["role"]] + m["content"] for m in messages]
  if add_generation_prompt:
    lines.append(ROLE_PREFIX[ASSISTANT].rstrip())
  return TURN_SEP.join(lines)


def cut_reply(text: str) -> str:
  """A reply up to the first further turn it runs on into (a base LM, prompted few-shot,
  writes the next `User:` turn itself), stripped."""
  for role in (USER, ASSISTANT):
    text = text.split(TURN_SEP + ROLE_PREFIX[role].rstrip(), 1)[0]
  return text.strip()


def validate_messages(messages: object, *, where: str = "messages") -> list[Message]:
  """Check the shape of a dialogue; raise UserInputError naming the bad field."""
  if not isinstance(messages, list) or not messages:
    raise UserInputError(f"{where}: expected a non-empty list of messages")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise UserInputError(f"{where}[{i}]: expected an object with role and content")
    role, content = m.get("role"), m.get("content")
    if role not in ROLE_PREFIX:
      raise UserInputError(f"{where}[{i}].role: expected 'user' or 'assistant', got {role!r}")
    if not isinstance(content, str):
      raise UserInputError(f"{where}[{i}].content: expected a string")
    out.append(Message(role=role, content=content))
  return out


class Tokenizer:
  """What every stage uses: text <-> ids, the special ids and the chat format.

  Two kinds: `SentencePieceTokenizer` (a `.model`, ours or LLaMA 2's) and
  `rlhf_jax.hf_tokenizer.HFTokenizer` (a Hugging Face `tokenizer.json`, byte-level BPE,
  maybe with the model's chat template). `load` picks by the file. Subclasses set
  `_prefix_ids`, `_next_prefix_ids` and `_sep_ids` (the plain chat format's pieces) and
  the special ids; `pad_id` is a layout value only (rows are padded with it and masked,
  it is never read as a token), so it may be an id the vocabulary also uses.
  """

  pad_id: int = PAD_ID
  bos_id: int | None = BOS_ID
  eos_id: int = EOS_ID  # what ends a reply (a sampler stops at it)
  document_end_id: int = EOS_ID  # what ends a pretraining document
  chat_template = None  # a chat_template.ChatTemplate, when the model brings one

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def bos(self) -> list[int]:
    """[bos_id], or [] for a tokenizer without one (Qwen's)."""
    return [] if self.bos_id is None else [self.bos_id]

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def encode_document(self, text: str) -> list[int]:
    """A pretraining document: BOS (if any), the text, the end-of-document token."""
    return [*self.bos, *self.encode(text), self.document_end_id]

  # --- chat format -------------------------------------------------------------------

  def encode_dialogue(
    self, messages: Sequence[Message], add_generation_prompt: bool = False
  ) -> tuple[list[int], list[bool]]:
    """Token ids of a dialogue and a per-token target mask.

    Returns `(ids, is_target)`, both of length `len(ids)`: `is_target[i]` is True for
    tokens of assistant contents and their EOS (what SFT learns to produce); the role
    prefixes, user turns and BOS are False. With `add_generation_prompt` the ids end in
    the assistant prefix, ready for sampling a reply.
    """
    ids, target = list(self.bos), [False] * len(self.bos)
    for i, m in enumerate(messages):
      if i:
        ids += self._sep_ids
        target += [False] * len(self._sep_ids)
      prefix = (self._next_prefix_ids if i else self._prefix_ids)[m["role"]]
      ids += prefix
      target += [False] * len(prefix)
      body = self.encode(m["content"])
      if m["role"] == ASSISTANT:
        body = body + [self.eos_id]
      ids += body
      target += [m["role"] == ASSISTANT] * len(body)
    if add_generation_prompt:
      gen = (
        self._sep_ids + self._next_prefix_ids[ASSISTANT]
        if messages
        else self._prefix_ids[ASSISTANT]
      )
      ids += gen
      target += [False] * len(gen)
    return ids, target

  def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
    """Ids of a prompt (dialogue ending in a user turn) ready for an assistant reply."""
    return self.encode_dialogue(messages, add_generation_prompt=True)[0]

  def encode_response(self, content: str) -> list[int]:
    """Ids of one assistant reply as it follows `encode_prompt`: content + EOS."""
    return self.encode(content) + [self.eos_id]

  def decode_response(self, ids: Iterable[int]) -> str:
    """Text of a sampled reply: everything before the first EOS, pads dropped."""
    out = []
    for i in ids:
      if int(i) == self.eos_id:
        break
      out.append(int(i))
    return self.decode(out)
