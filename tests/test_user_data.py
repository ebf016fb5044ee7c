"""Loaders of users' own files: formats, real HH data, and one-line errors at file:line."""

import gzip
import json
import logging
import os
import tracemalloc

import pytest

from rlhf_jax.data import user_data
from rlhf_jax.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "user_data")
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
HH_FILE = os.path.join(SHARED_DATA, "hh-rlhf", "harmless-base-test-part1.jsonl.gz")


def fixture(name):
  return os.path.join(FIXTURES, name)


# --- good files --------------------------------------------------------------------------


def test_demonstrations_both_formats():
  records, stats = user_data.load_demonstrations(fixture("demonstrations.jsonl"))
  assert stats.records == 2 and stats.skipped == 0
  assert records[0] == {
    "task": "qa",
    "messages": [
      {"role": "user", "content": "Name a colour."},
      {"role": "assistant", "content": "Blue."},
    ],
  }
  assert [m["role"] for m in records[1]["messages"]] == ["user", "assistant"] * 2


def test_prompts():
  records, _ = user_data.load_prompts(fixture("prompts.jsonl"))
  assert records[0] == {"prompt_id": 7, "messages": [{"role": "user", "content": "Write a haiku."}]}
  assert records[1]["messages"][-1] == {"role": "user", "content": "Bye?"}


def test_rankings():
  records, _ = user_data.load_rankings(fixture("rankings.jsonl"))
  assert records[0] == {
    "messages": [{"role": "user", "content": "Best fruit?"}],
    "responses": ["Apple.", "Mango.", "Rock."],
    "ranking": [1, 0, 2],
  }
  assert len(records[1]["messages"]) == 3 and records[1]["ranking"] == [1, 0]


def test_pretraining_txt_blank_line_and_per_line():
  records, _ = user_data.load_pretraining_text(fixture("pretraining.txt"))
  assert records == [
    {"text": "First document,\nsecond line of it."},
    {"text": "Second document."},
    {"text": "Third."},
  ]
  records, _ = user_data.load_pretraining_text(fixture("pretraining.txt"), txt_documents="line")
  assert len(records) == 4 and records[1] == {"text": "second line of it."}


def test_pretraining_jsonl_gz_with_text_field():
  records, _ = user_data.load_pretraining_text(fixture("pretraining.jsonl.gz"), text_field="body")
  assert records == [{"text": "gz doc one"}, {"text": "gz doc two"}]
  with pytest.raises(UserInputError, match=r"pretraining.jsonl.gz:1: missing field 'text'"):
    user_data.load_pretraining_text(fixture("pretraining.jsonl.gz"))


def test_hh_quirks():
  records, stats = user_data.load_hh_pairs(fixture("hh.jsonl"))
  assert records[0] == {
    "messages": [{"role": "user", "content": "Hi"}],
    "responses": ["Hello, how can I help?", "Go away."],
    "ranking": [0, 1],
  }
  # Whitespace around turns is stripped, so both dialogues share the prompt.
  assert records[1]["messages"] == [{"role": "user", "content": "What is 2+2?"}]
  assert records[1]["responses"] == ["4", "5"]
  assert records[2]["responses"] == ["", "Something!"]  # empty final reply kept
  assert len(records) == 3  # the record whose dialogues differ earlier is skipped
  assert stats.quirks == {"empty_reply": 1, "prompt_mismatch": 1}


@pytest.mark.skipif(
  not os.path.exists(HH_FILE), reason=f"shared test data not found at {HH_FILE} (../shared/data)"
)
def test_hh_real_data_all_records():
  records, stats = user_data.load_hh_pairs(HH_FILE)
  assert len(records) == 1000 and stats.records == 1000 and stats.skipped == 0
  for r in records:
    assert r["messages"][-1]["role"] == "user"
    assert len(r["responses"]) == 2 and r["ranking"] == [0, 1]
    assert r["responses"][0] != r["responses"][1]
  first = records[0]
  assert first["messages"][0] == {
    "role": "user",
    "content": "what are some pranks with a pen i can do?",
  }
  assert first["messages"][1] == {
    "role": "assistant",
    "content": "Are you looking for practical joke ideas?",
  }
  assert len(first["messages"]) == 5
  assert first["responses"][0].startswith("No, sorry!  All of these involve a pen")
  assert first["responses"][1].startswith("There are lots of funny things you can do with pens")
  # Round trip of the chosen side: prompt + chosen reply renders the original dialogue.
  with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
    raw = json.loads(f.readline())
  turns = first["messages"] + [{"role": "assistant", "content": first["responses"][0]}]
  rendered = "".join(
    f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns
  )
  assert rendered == raw["chosen"]


# --- bad files ------------------------------------------------------------------------------

BAD = [
  (
    "rankings",
    "ranking_out_of_range.jsonl",
    3,
    "field 'ranking': index 5 out of range for 4 responses",
  ),
  (
    "rankings",
    "ranking_tie.jsonl",
    2,
    "field 'ranking': entry 1 is a list: ties are not supported",
  ),
  ("rankings", "ranking_duplicate.jsonl", 2, "field 'ranking': index 1 appears twice"),
  (
    "rankings",
    "ranking_not_permutation.jsonl",
    2,
    "field 'ranking': has 2 entries for 3 responses",
  ),
  ("rankings", "ranking_one_response.jsonl", 2, "field 'responses': need at least 2 responses"),
  ("rankings", "ranking_empty_response.jsonl", 2, "field 'responses[1]': empty response"),
  ("demonstrations", "demo_invalid_json.jsonl", 2, "invalid JSON"),
  ("demonstrations", "demo_not_utf8.jsonl", 3, "not valid UTF-8"),
  ("demonstrations", "demo_missing_field.jsonl", 2, "missing field 'response'"),
  ("demonstrations", "demo_wrong_type.jsonl", 2, "field 'response': expected a string, got int"),
  ("demonstrations", "demo_last_turn_user.jsonl", 2, "field 'messages': the last message must be"),
  ("demonstrations", "demo_bad_role.jsonl", 2, "field 'messages[1].role': expected 'user' or"),
  ("hh", "hh_not_a_dialogue.jsonl", 1, "field 'chosen': expected a dialogue"),
]


@pytest.mark.parametrize("kind,name,line,message", BAD, ids=[b[1] for b in BAD])
def test_bad_record_names_file_line_and_field(kind, name, line, message):
  path = fixture(name)
  with pytest.raises(UserInputError) as e:
    user_data.load(kind, path)
  text = str(e.value)
  assert text.startswith(f"{path}:{line}: "), text
  assert message in text
  assert "\n" not in text


@pytest.mark.parametrize("name", ["empty.jsonl", "blank_lines.jsonl"])
def test_empty_file_names_the_file(name):
  with pytest.raises(UserInputError, match=rf"{name}: file is empty"):
    user_data.load_demonstrations(fixture(name))


def test_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(UserInputError, match="nope.jsonl: file not found"):
    user_data.load_rankings(str(tmp_path / "nope.jsonl"))
  (tmp_path / "x.csv").write_text("a\n")
  with pytest.raises(UserInputError, match=r"x.csv: unknown pretraining text format"):
    user_data.load_pretraining_text(str(tmp_path / "x.csv"))


def test_corrupt_gzip(tmp_path):
  path = tmp_path / "bad.jsonl.gz"
  path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
  with pytest.raises(UserInputError, match="bad.jsonl.gz: not a valid gzip file"):
    user_data.load_pretraining_text(str(path))


def test_skip_bad_counts_and_warns(caplog):
  path = fixture("demonstrations_mixed.jsonl")
  with pytest.raises(UserInputError, match=r"demonstrations_mixed.jsonl:2: invalid JSON"):
    user_data.load_demonstrations(path)
  with caplog.at_level(logging.WARNING):
    records, stats = user_data.load_demonstrations(path, skip_bad=True)
  assert len(records) == stats.records == 3
  assert stats.skipped == 4
  assert stats.first_error.startswith(f"{path}:2: invalid JSON")
  assert any("skipped 4 bad demonstrations records" in r.getMessage() for r in caplog.records)


def test_skip_bad_with_no_good_record_is_an_error(tmp_path):
  path = tmp_path / "all_bad.jsonl"
  path.write_text("[]\n{}\n")
  with pytest.raises(UserInputError, match=r"all_bad.jsonl: no valid rankings records \(2 bad"):
    user_data.load_rankings(str(path), skip_bad=True)


def test_long_lines(tmp_path):
  path = tmp_path / "long.jsonl"
  long_text = "word " * 2_000_000  # 10 MB on one line
  path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": long_text}) + "\n")
  records, _ = user_data.load_pretraining_text(str(path))
  assert len(records[1]["text"]) == len(long_text)
  # Over the limit: an error at the line, read in bounded pieces (never the whole line).
  tracemalloc.start()
  with pytest.raises(UserInputError, match=r"long.jsonl:2: line longer than 1048576 bytes"):
    list(user_data.iter_records("pretraining", str(path), max_line_bytes=1 << 20))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 4 << 20, peak
  records, stats = user_data.load("pretraining", str(path), skip_bad=True, max_line_bytes=1 << 20)
  assert records == [{"text": "short"}] and stats.skipped == 1
