"""Loaders for users' own data files, converted to the record dicts every stage reads.

Records (plain dicts, the same schema the generated default world uses):

  pretraining    {"text": str}
  demonstrations {"messages": [..., {"role": "assistant", ...}], ...metadata}
  prompts        {"messages": [..., {"role": "user", ...}], ...metadata}
  rankings       {"messages": [... ending with a user turn], "responses": [str] * K,
                  "ranking": [response indices, best first], ...metadata}

File formats (any of them may be gzipped: a `.gz` suffix is read through gzip):

  pretraining    `.txt`: documents separated by one or more blank lines (a line of only
                 whitespace counts as blank; a document's lines are joined with "\\n").
                 Pass `txt_documents="line"` for one document per line instead.
                 `.jsonl`: one object per line with a text field (default "text").
  demonstrations JSONL `{"prompt": str, "response": str}` (a single user turn and its
                 answer) or `{"messages": [...]}` whose last message is the assistant's.
  prompts        JSONL `{"prompt": str}` or `{"messages": [...]}` ending with a user turn.
  rankings       JSONL `{"prompt": str | messages, "responses": [str], "ranking": [int]}`
                 (`"messages"` is accepted for `"prompt"`); K = len(responses) >= 2, no
                 empty response, no two responses of the same text (compared stripped),
                 and `ranking` a permutation of range(K), best first (no ties: a nested
                 list or a repeated index is an error).
  hh             Anthropic HH-RLHF pairs `{"chosen": str, "rejected": str}`, each a
                 dialogue "\\n\\nHuman: ...\\n\\nAssistant: ...", split only at markers after
                 a blank line; turns are stripped. The turns before the final reply are
                 the prompt; the final replies (all the text after the last Human turn,
                 verbatim) the responses, ranking [0, 1]. A marker inside a reply ("...
                 drag kings.  Human: Then how...", a second "\\n\\nAssistant:") is text the
                 sample ran on into, ranked as such: the other reply of the pair answers
                 that same Human turn (every pair of the release shares its prompt so).
                 Replies of the same text are a bad record. Quirks (`LoadStats.quirks`):
                 - `empty_reply`: an empty final reply is kept as "" (a few in the release);
                 - `turn_markers_in_reply`: "Human:" / "Assistant:" in a final reply (kept);
                 - `prompt_mismatch`: the replies answer different prompts: skipped.
                 Consecutive turns of one role (a few in the release) are kept as they are.

Errors. A bad record raises a one-line `UserInputError` naming `file:line` and the
field (`data.jsonl:17: field 'ranking': index 5 out of range for 4 responses`); so do
invalid JSON, non-UTF-8 or NUL bytes, and a line longer than `max_line_bytes` (read in
bounded pieces, never whole). A file missing, a directory, unreadable (any OSError) or
without records is one line naming it. With `skip_bad=True` bad records are skipped
instead, counted in `LoadStats.skipped`, and one warning line is logged per file.

Every `load_*` function returns `Loaded(records, stats)`; `iter_records` streams.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from rlhf_jax.errors import UserInputError, at_line
from rlhf_jax.tokenizer import ASSISTANT, USER, validate_messages

MAX_LINE_BYTES = 64 << 20  # a 10 MB document line is fine; a file with no newlines is not
KINDS = ("pretraining", "demonstrations", "prompts", "rankings", "hh")


@dataclasses.dataclass
class LoadStats:
  """What a loader read from one file."""

  path: str
  records: int = 0  # records returned
  skipped: int = 0  # bad records skipped (only with skip_bad=True)
  first_error: str | None = None  # the message of the first skipped record
  quirks: dict[str, int] = dataclasses.field(default_factory=dict)  # counted, not errors

  def counts(self) -> dict[str, int]:
    """What a stage records about the file (its metrics / params.json)."""
    return {"records": self.records, "skipped_bad": self.skipped, **self.quirks}


class Loaded(NamedTuple):
  records: list[dict[str, Any]]
  stats: LoadStats


class _BadRecord(Exception):
  """A problem with one record; the reader adds `file:line` (or skips it)."""


class _Quirk(Exception):
  """A record dropped on purpose (not an error), counted under `quirks[name]`."""

  def __init__(self, name: str):
    super().__init__(name)
    self.name = name


def _bad_field(field: str, message: str) -> _BadRecord:
  return _BadRecord(f"field '{field}': {message}")


# --- reading lines ------------------------------------------------------------------


def _raw_lines(path: str, max_line_bytes: int) -> Iterator[tuple[int, str | _BadRecord]]:
  """Yield `(line_number, text)` or `(line_number, _BadRecord)`; fatal errors raise."""
  try:
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
      lineno = 0
      while True:
        chunk = f.readline(max_line_bytes + 1)
        if not chunk:
          return
        lineno += 1
        if len(chunk) > max_line_bytes:
          # Consume the rest of the line piece by piece; never hold it whole.
          while chunk and not chunk.endswith(b"\n"):
            chunk = f.readline(1 << 20)
          yield lineno, _BadRecord(f"line longer than {max_line_bytes} bytes")
          continue
        try:
          text = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
          yield lineno, _BadRecord(f"not valid UTF-8 (byte {e.start} of the line)")
          continue
        if "\x00" in text:  # valid UTF-8, yet no text: it would load as a "document"
          yield lineno, _BadRecord("contains NUL bytes (a binary or zero-filled file?)")
          continue
        if lineno == 1:
          text = text.removeprefix("\ufeff")
        yield lineno, text.rstrip("\r\n")
  except (gzip.BadGzipFile, zlib.error, EOFError) as e:
    raise UserInputError(f"{path}: not a valid gzip file ({e})") from None
  except OSError as e:
    raise UserInputError(f"{path}: cannot read ({e.strerror or e})") from None


def _json_lines(path: str, max_line_bytes: int) -> Iterator[tuple[int, dict | _BadRecord]]:
  """Yield `(line_number, object)` for each non-blank JSONL line."""
  for lineno, text in _raw_lines(path, max_line_bytes):
    if isinstance(text, _BadRecord):
      yield lineno, text
      continue
    if not text.strip():
      continue
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      yield lineno, _BadRecord(f"invalid JSON: {e.msg} (column {e.colno})")
      continue
    except RecursionError:
      yield lineno, _BadRecord("invalid JSON: nested too deeply")
      continue
    if not isinstance(obj, dict):
      yield lineno, _BadRecord(f"expected a JSON object, got {type(obj).__name__}")
      continue
    yield lineno, obj


def _text_documents(path: str, per_line: bool, max_line_bytes: int):
  """Yield `(first_line_number, text)` of each document of a `.txt` file."""
  doc, start = [], 0
  for lineno, text in _raw_lines(path, max_line_bytes):
    if isinstance(text, _BadRecord):
      if doc:
        yield start, "\n".join(doc)
        doc = []
      yield lineno, text
      continue
    if not text.strip():
      if doc:
        yield start, "\n".join(doc)
        doc = []
      continue
    if per_line:
      yield lineno, text
      continue
    if not doc:
      start = lineno
    doc.append(text)
  if doc:
    yield start, "\n".join(doc)


# --- fields ---------------------------------------------------------------------------


def _get(rec: dict, field: str, kind: type | tuple[type, ...], what: str) -> Any:
  if field not in rec:
    raise _BadRecord(f"missing field '{field}'")
  value = rec[field]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise _bad_field(field, f"expected {what}, got {_type_name(value)}")
  return value


def _type_name(value: Any) -> str:
  names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
  return names.get(type(value), type(value).__name__)


def _messages(value: Any, field: str, last_role: str) -> list[dict]:
  """Validate a dialogue; its last message must have `last_role`."""
  try:
    messages = validate_messages(value, where=field)
  except UserInputError as e:
    where, _, message = str(e).partition(": ")
    raise _bad_field(where, message) from None
  if messages[-1]["role"] != last_role:
    raise _bad_field(
      field, f"the last message must be the {last_role}'s, got {messages[-1]['role']}"
    )
  return messages


def _prompt(rec: dict) -> list[dict]:
  """A prompt given as `prompt` (string or messages) or `messages`, ending with a user turn."""
  if "prompt" in rec and "messages" in rec:
    raise _BadRecord("give either 'prompt' or 'messages', not both")
  field = "prompt" if "prompt" in rec else "messages"
  if field not in rec:
    raise _BadRecord("missing field 'prompt' (or 'messages')")
  value = rec[field]
  if isinstance(value, str):
    if not value.strip():
      raise _bad_field(field, "empty prompt")
    return [{"role": USER, "content": value}]
  if not isinstance(value, list):
    raise _bad_field(field, f"expected a string or a list of messages, got {_type_name(value)}")
  return _messages(value, field, USER)


def _metadata(rec: dict, *consumed: str) -> dict:
  return {k: v for k, v in rec.items() if k not in consumed}


# --- record parsers: dict -> record ----------------------------------------------------


def _parse_demonstration(rec: dict) -> dict:
  """`{prompt, response}` or `{messages}` -> `{"messages": [...assistant], ...}`."""
  if "messages" in rec:
    if "prompt" in rec or "response" in rec:
      raise _BadRecord("give either 'messages' or 'prompt' and 'response', not both")
    messages = _messages(rec["messages"], "messages", ASSISTANT)
    return {**_metadata(rec, "messages"), "messages": messages}
  if "prompt" not in rec and "response" not in rec:
    raise _BadRecord("missing field 'messages' (or 'prompt' and 'response')")
  prompt = _get(rec, "prompt", str, "a string")
  response = _get(rec, "response", str, "a string")
  if not prompt.strip():
    raise _bad_field("prompt", "empty prompt")
  if not response.strip():
    raise _bad_field("response", "empty response")
  messages = [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": response}]
  return {**_metadata(rec, "prompt", "response"), "messages": messages}


def _parse_prompt(rec: dict) -> dict:
  """`{prompt}` or `{messages}` -> `{"messages": [...user], ...}`."""
  return {**_metadata(rec, "prompt", "messages"), "messages": _prompt(rec)}


def _parse_ranking(rec: dict) -> dict:
  """`{prompt, responses, ranking}` -> `{"messages", "responses", "ranking", ...}`."""
  messages = _prompt(rec)
  responses = _get(rec, "responses", list, "a list of strings")
  k = len(responses)
  if k < 2:
    raise _bad_field("responses", f"need at least 2 responses to rank, got {k}")
  first_of: dict[str, int] = {}  # stripped text -> index of its first response
  for i, r in enumerate(responses):
    if not isinstance(r, str):
      raise _bad_field(f"responses[{i}]", f"expected a string, got {_type_name(r)}")
    if not r.strip():
      raise _bad_field(f"responses[{i}]", "empty response")
    if (j := first_of.setdefault(r.strip(), i)) != i:  # a text above itself: no signal
      raise _bad_field(f"responses[{i}]", f"the same text as responses[{j}] (no preference)")
  ranking = _get(rec, "ranking", list, "a list of response indices, best first")
  seen = set()
  for j, idx in enumerate(ranking):
    if isinstance(idx, list):
      raise _bad_field(
        "ranking", f"entry {j} is a list: ties are not supported, give a strict order"
      )
    if not isinstance(idx, int) or isinstance(idx, bool):
      raise _bad_field("ranking", f"entry {j} is {idx!r}, expected an integer index")
    if not 0 <= idx < k:
      raise _bad_field("ranking", f"index {idx} out of range for {k} responses")
    if idx in seen:
      raise _bad_field("ranking", f"index {idx} appears twice (ties are not supported)")
    seen.add(idx)
  if len(ranking) != k:
    raise _bad_field(
      "ranking", f"has {len(ranking)} entries for {k} responses, expected a permutation"
    )
  return {
    **_metadata(rec, "prompt", "messages", "responses", "ranking"),
    "messages": messages,
    "responses": list(responses),
    "ranking": list(ranking),
  }


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": USER, "Assistant": ASSISTANT}
_HH_MARKER = re.compile(r"(?:^|\s)(?:Human|Assistant):")  # in a reply (see the docstring)


def _parse_hh_dialogue(text: str, field: str) -> tuple[list[dict], str]:
  """ "\\n\\nHuman: a\\n\\nAssistant: b" -> (turns before the final reply, the reply): the
  reply is all the text after the last Human turn (why: see the module docstring)."""
  marks = list(_HH_TURN.finditer(text))
  if not marks or text[: marks[0].start()].strip():
    raise _bad_field(field, "expected a dialogue of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
  if marks[-1].group(1) != "Assistant":
    raise _bad_field(field, "the dialogue must end with an Assistant turn")
  first = len(marks) - 1  # the first Assistant turn of the trailing run
  while first > 0 and marks[first - 1].group(1) == "Assistant":
    first -= 1
  if first == 0:
    raise _bad_field(field, "the final Assistant reply must follow a Human turn")
  ends = [m.start() for m in marks[1 : first + 1]]
  turns = [
    {"role": _HH_ROLE[m.group(1)], "content": text[m.end() : end].strip()}
    for m, end in zip(marks[:first], ends, strict=True)
  ]
  return turns, text[marks[first].end() :].strip()


def _pretraining_text(rec: dict, field: str) -> dict:
  text = _get(rec, field, str, "a string")
  if not text.strip():
    raise _Quirk("empty_text")  # (skipped; a file of nothing else is an error)
  return {"text": text}


def _parse_hh_pair(rec: dict) -> dict:
  """`{chosen, rejected}` HH dialogues -> a K=2 ranking record, chosen first."""
  dialogues = {}
  for field in ("chosen", "rejected"):
    dialogues[field] = _parse_hh_dialogue(_get(rec, field, str, "a dialogue string"), field)
  (prompt, chosen), (other_prompt, rejected) = dialogues["chosen"], dialogues["rejected"]
  if prompt != other_prompt:
    raise _Quirk("prompt_mismatch")
  if chosen == rejected:
    raise _bad_field("rejected", "final reply is the same text as chosen's (no preference)")
  return {
    **_metadata(rec, "chosen", "rejected"),
    "messages": prompt,
    "responses": [chosen, rejected],
    "ranking": [0, 1],
  }


# --- loaders ----------------------------------------------------------------------------


def _kind_of_text_file(path: str) -> str:
  name = path.removesuffix(".gz")
  if name.endswith(".txt"):
    return "txt"
  if name.endswith((".jsonl", ".json")):
    return "jsonl"
  raise UserInputError(f"{path}: unknown pretraining text format, expected .txt or .jsonl[.gz]")


def iter_records(
  kind: str,
  path: str,
  *,
  skip_bad: bool = False,
  stats: LoadStats | None = None,
  text_field: str = "text",
  txt_documents: str = "blank_line",
  max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[dict]:
  """Stream the records of one file of `kind` (see KINDS), filling `stats` as it goes.

  Raises UserInputError at the first bad record (or skips it with `skip_bad`), and when
  the file holds no records at all.
  """
  if kind not in KINDS:
    raise UserInputError(f"data kind must be one of {', '.join(KINDS)}, got {kind!r}")
  if txt_documents not in ("blank_line", "line"):
    raise UserInputError(f"txt_documents must be 'blank_line' or 'line', got {txt_documents!r}")
  stats = stats if stats is not None else LoadStats(path)
  if not os.path.exists(path):  # (before its name's suffix is taken for a format)
    raise UserInputError(f"{path}: file not found")
  if os.path.isdir(path):
    raise UserInputError(f"{path}: is a directory, expected a data file")
  parse: Callable[[Any], dict]
  if kind == "pretraining" and _kind_of_text_file(path) == "txt":
    items = _text_documents(path, txt_documents == "line", max_line_bytes)
    parse = lambda text: {"text": text}
  else:
    items = _json_lines(path, max_line_bytes)
    parse = {
      "pretraining": lambda rec: _pretraining_text(rec, text_field),
      "demonstrations": _parse_demonstration,
      "prompts": _parse_prompt,
      "rankings": _parse_ranking,
      "hh": _parse_hh_pair,
    }[kind]

  seen = 0
  for lineno, item in items:
    seen += 1
    try:
      if isinstance(item, _BadRecord):
        raise item
      record = parse(item)
    except _Quirk as q:
      stats.quirks[q.name] = stats.quirks.get(q.name, 0) + 1
      continue
    except _BadRecord as e:
      error = at_line(path, lineno, str(e))
      if not skip_bad:
        raise error from None
      stats.skipped += 1
      stats.first_error = stats.first_error or str(error)
      continue
    if kind == "hh":
      replies = record["responses"]
      if "" in replies:
        stats.quirks["empty_reply"] = stats.quirks.get("empty_reply", 0) + 1
      if any(_HH_MARKER.search(r) for r in replies):
        stats.quirks["turn_markers_in_reply"] = stats.quirks.get("turn_markers_in_reply", 0) + 1
    stats.records += 1
    yield record

  if not seen:
    raise UserInputError(f"{path}: file is empty (no {kind} records)")
  if not stats.records:
    raise UserInputError(
      f"{path}: no valid {kind} records ({stats.skipped} bad, quirks {stats.quirks}; "
      f"first error: {stats.first_error})"
    )
  # After the error above, so that a failing run still ends with one line on stderr.
  if stats.skipped:
    logging.warning(
      "%s: skipped %d bad %s records (first: %s)", path, stats.skipped, kind, stats.first_error
    )
  if stats.quirks:
    logging.info("%s: %s", path, ", ".join(f"{k}={v}" for k, v in sorted(stats.quirks.items())))


def load(kind: str, path: str, *, skip_bad: bool = False, **options) -> Loaded:
  """All records of one file of `kind` (see KINDS) and what was read; see `iter_records`."""
  stats = LoadStats(path)
  records = list(iter_records(kind, path, skip_bad=skip_bad, stats=stats, **options))
  return Loaded(records, stats)


def hold_out(loaded: Loaded, every: int, purpose: str) -> tuple[list[dict], list[dict]]:
  """(rest, held out): the first max(1, n // every) records are held out for `purpose`;
  with fewer than 2 nothing would be left, which the pipeline could not blame on a file."""
  records, stats = loaded
  if len(records) < 2:
    raise UserInputError(
      f"{stats.path}: {len(records)} usable record ({stats.skipped} skipped as bad, quirks "
      f"{stats.quirks}); at least 2 are needed, as one is held out for {purpose}"
    )
  n = max(1, len(records) // every)
  return records[n:], records[:n]


def load_pretraining_text(
  path: str,
  *,
  text_field: str = "text",
  txt_documents: str = "blank_line",
  skip_bad: bool = False,
) -> Loaded:
  """`{"text"}` records from a `.txt` or `.jsonl` file (see the module docstring)."""
  return load(
    "pretraining", path, skip_bad=skip_bad, text_field=text_field, txt_documents=txt_documents
  )


def load_demonstrations(path: str, *, skip_bad: bool = False) -> Loaded:
  """`{"messages"}` dialogues ending with the assistant's answer, from JSONL."""
  return load("demonstrations", path, skip_bad=skip_bad)


def load_prompts(path: str, *, skip_bad: bool = False) -> Loaded:
  """`{"messages"}` prompts ending with a user turn, from JSONL."""
  return load("prompts", path, skip_bad=skip_bad)


def load_rankings(path: str, *, skip_bad: bool = False) -> Loaded:
  """`{"messages", "responses", "ranking"}` comparisons from JSONL."""
  return load("rankings", path, skip_bad=skip_bad)


def load_hh_pairs(path: str, *, skip_bad: bool = False) -> Loaded:
  """Anthropic HH `{chosen, rejected}` pairs as K=2 ranking records (chosen first)."""
  return load("hh", path, skip_bad=skip_bad)
