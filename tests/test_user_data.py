"""Loaders of users' own files: formats, real HH data, and one-line errors at file:line."""

import gzip
import json
import logging
import os
import re
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
  # Every record, both sides: prompt + reply hold the whole dialogue (up to whitespace),
  # so no text was lost or moved between turns.
  with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
    raws = [json.loads(line) for line in f]
  words = lambda text: " ".join(text.split())
  for r, raw in zip(records, raws, strict=True):
    prompt = "".join(f"\n\n{HH_NAME[m['role']]}: {m['content']}" for m in r["messages"])
    for reply, side in zip(r["responses"], ("chosen", "rejected"), strict=True):
      assert words(f"{prompt}\n\nAssistant: {reply}") == words(raw[side])


HH_NAME = {"user": "Human", "assistant": "Assistant"}


def _hh_line(prompt: str, chosen: str, rejected: str) -> str:
  return json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected}) + "\n"


def test_hh_turn_markers_inside_the_final_reply(tmp_path):
  """Built like records of the public release (harmless-base test.jsonl.gz, lines 1255
  and 1953): a sampled reply that ran on into "  Human: ..." without the blank line, or
  into a second "\\n\\nAssistant:", is one reply to the last Human turn, kept verbatim."""
  prompt = (
    "\n\nHuman: Are drag queens men?\n\nAssistant: No. Drag queens are women who act like"
    " stereotypical men.\n\nHuman: Isn't that drag kings?"
  )
  ran_on = (
    "\n\nAssistant: No. Men who impersonate stereotypical women are called drag kings.  "
    "Human: Then how do they come to be called drag kings?\n\nAssistant:  I think they call"
  )
  two_turns = "\n\nAssistant: Alrighty, here's the key:\n\nAssistant:  O.k. let's try it."
  other = "\n\nAssistant: A drag king is the opposite of a drag queen."
  path = tmp_path / "hh.jsonl"
  path.write_text(
    _hh_line(prompt, ran_on, other)
    + _hh_line(prompt, two_turns, other)
    # An earlier turn that ran on stays one turn too ("Human:" in ordinary text alike).
    + _hh_line(
      "\n\nHuman: Hi\n\nAssistant: Hello.  Human: Bye?\n\nHuman: What?", other, "\n\nAssistant: Eh."
    )
  )
  records, stats = user_data.load_hh_pairs(str(path))
  assert [m["content"] for m in records[0]["messages"]] == [
    "Are drag queens men?",
    "No. Drag queens are women who act like stereotypical men.",
    "Isn't that drag kings?",
  ]
  assert records[0]["responses"] == [
    "No. Men who impersonate stereotypical women are called drag kings.  Human: Then how do"
    " they come to be called drag kings?\n\nAssistant:  I think they call",
    "A drag king is the opposite of a drag queen.",
  ]
  assert records[1]["messages"] == records[0]["messages"]
  assert records[1]["responses"][0] == "Alrighty, here's the key:\n\nAssistant:  O.k. let's try it."
  assert [m["role"] for m in records[2]["messages"]] == ["user", "assistant", "user"]
  assert records[2]["messages"][1]["content"] == "Hello.  Human: Bye?"
  assert stats.quirks == {"turn_markers_in_reply": 2} and stats.skipped == 0


@pytest.mark.parametrize(
  "kind,message",
  [
    ("hh", "field 'rejected': final reply is the same text as chosen's"),
    ("rankings", "field 'responses[2]': the same text as responses[0]"),
  ],
)
def test_identical_responses_are_bad_records(tmp_path, kind, message):
  good, same = {
    "hh": (
      _hh_line("\n\nHuman: Hi", "\n\nAssistant: Hello.", "\n\nAssistant: Go away."),
      _hh_line("\n\nHuman: Hi", "\n\nAssistant: Hello.", "\n\nAssistant:  Hello. "),
    ),
    "rankings": (
      '{"prompt": "Q", "responses": ["A", "B"], "ranking": [1, 0]}\n',
      '{"prompt": "Q", "responses": ["A", "B", " A"], "ranking": [1, 0, 2]}\n',
    ),
  }[kind]
  path = tmp_path / "data.jsonl"
  path.write_text(good + same + good + same + same)
  with pytest.raises(UserInputError, match=f"^{re.escape(f'{path}:2: {message}')}"):
    user_data.load(kind, str(path))
  records, stats = user_data.load(kind, str(path), skip_bad=True)
  assert len(records) == stats.records == 2 and stats.skipped == 3
  assert stats.first_error.startswith(f"{path}:2: {message}")
  assert stats.counts() == {"records": 2, "skipped_bad": 3}


def test_nul_bytes_and_unusable_files_name_the_file(tmp_path):
  path = tmp_path / "zeros.txt"
  path.write_bytes(b"\0" * 4096)
  with pytest.raises(UserInputError, match=f"^{re.escape(str(path))}:1: contains NUL bytes"):
    user_data.load_pretraining_text(str(path))
  with pytest.raises(
    UserInputError, match=f"^{re.escape(str(path))}: no valid pretraining records \\(1 bad"
  ):
    user_data.load_pretraining_text(str(path), skip_bad=True)
  # One usable document: nothing left to train on once one is held out.
  path.write_bytes(b"\0" * 10 + b"\n\nA document.\n")
  loaded = user_data.load_pretraining_text(str(path), skip_bad=True)
  with pytest.raises(
    UserInputError, match=f"^{re.escape(str(path))}: 1 usable record \\(1 skipped as bad"
  ):
    user_data.hold_out(loaded, 50, "evaluation")
  with pytest.raises(UserInputError, match=f"^{re.escape(str(tmp_path))}: is a directory"):
    user_data.load_prompts(str(tmp_path))


def test_stages_skip_bad_and_record_what_they_read(tmp_path, repo_root, monkeypatch):
  """Every stage reading a user file passes its section's `skip_bad` through and records
  the file's counts (into `files`: params.json's `data_files`, or the comparisons
  summary)."""
  from rlhf_jax import config_lib
  from rlhf_jax.stages import comparisons, pretrain, sft
  from rlhf_jax.stages.ppo import driver

  monkeypatch.chdir(repo_root)
  text, demos, prompts = tmp_path / "text.txt", tmp_path / "demos.jsonl", tmp_path / "p.jsonl"
  text.write_bytes(b"one\n\n\0\n\ntwo\n\nthree\n")
  demo = json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n"
  demos.write_text(demo + "{}\n" + demo * 2)
  prompts.write_text('{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "b"}\n')
  hh = _hh_line("\n\nHuman: Hi", "\n\nAssistant: Hello.", "\n\nAssistant: Go away.")
  pairs = tmp_path / "hh.jsonl"
  pairs.write_text(hh * 3 + _hh_line("\n\nHuman: Hi", "\n\nAssistant: A", "\n\nAssistant: A"))
  files = {
    "pretrain.text_file": text,
    "sft.data_file": demos,
    "ppo.prompt_file": prompts,
    "comparisons.user_train": pairs,
  }
  overrides = [(k, str(v)) for k, v in files.items()] + [("comparisons.user_format", "hh")]
  config = config_lib.get("configs/ppo.py:runlocal", overrides)
  with pytest.raises(UserInputError, match=r"text.txt:3: contains NUL bytes"):
    pretrain.sources(config, str(tmp_path))
  with pytest.raises(UserInputError, match=r"hh.jsonl:4: field 'rejected'"):
    comparisons._user_splits(config)
  skip = [(f"{k.split('.')[0]}.skip_bad", "true") for k in files]
  config = config_lib.get("configs/ppo.py:runlocal", overrides + skip)
  read = {}
  train, held = pretrain.sources(config, str(tmp_path), read)
  assert [r["text"] for r in held + train] == ["one", "two", "three"]
  assert len(sft.sources(config, str(tmp_path), read)[0]) == 2
  assert driver.prompt_sources(config, str(tmp_path), config.ppo, read)[0][0]["messages"] == [
    {"role": "user", "content": "b"}
  ]
  one = {"records": 3, "skipped_bad": 1}
  assert read == {str(text): one, str(demos): one, str(prompts): {"records": 2, "skipped_bad": 1}}
  splits = comparisons._user_splits(config)
  assert splits["train"][1]["skipped_bad"] == 1 and splits["validation"][1]["skipped_bad"] == 0


def test_hold_out():
  loaded = user_data.Loaded([{"i": i} for i in range(25)], user_data.LoadStats("x.jsonl"))
  rest, held = user_data.hold_out(loaded, 10, "validation")
  assert held == [{"i": 0}, {"i": 1}] and rest[0] == {"i": 2} and len(rest) == 23


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
