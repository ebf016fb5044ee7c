"""SentencePiece round-trips, reserved ids, the chat format, vocab-size errors."""

import pytest

from rlhf_jax import tokenizer
from rlhf_jax.errors import UserInputError

CORPUS = [
  "The colour of Zorbin is blue. 12 + 30 = 42.",
  "User: sort 3 1 2\nAssistant: 1 2 3",
  "Où est la gare? Ça va très bien, merci.",
  "日本語のテキストです。中文文本。",
  "Emoji: 🦄🚀 and tabs\tand  double  spaces.",
] * 40


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train(CORPUS, vocab_size=400)


@pytest.mark.parametrize(
  "text",
  [
    "plain ASCII, punctuation! (and) numbers 0123456789",
    "  leading spaces and trailing  ",
    "accents: àéîõü ÀÉÎÕÜ ñ ç ß",
    "CJK never seen: 漢字仮名交じり文 한국어",
    "emoji 🦄🚀🧪 and ZWJ 👩‍🔬",
    "new\nlines\n\nand\ttabs",
    "",
  ],
)
def test_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_reserved_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 400
  assert tokenizer.EOS_ID not in tok.encode("any text at all </s> <s>")


def test_chat_format_multi_turn(tok):
  dialogue = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20"},
  ]
  ids, target = tok.encode_dialogue(dialogue)
  assert len(ids) == len(target) and ids[0] == tok.bos_id
  # Exactly the assistant contents and their EOS are targets.
  eos_at = [i for i, t in enumerate(ids) if t == tok.eos_id]
  assert len(eos_at) == 2 and all(target[i] for i in eos_at)
  target_text = tok.decode([t for t, m in zip(ids, target, strict=True) if m])
  assert target_text == "520"
  assert tok.decode(ids) == tokenizer.render(dialogue)
  # A prompt + its response is exactly the dialogue's tokens.
  prompt = tok.encode_prompt(dialogue[:3])
  assert prompt + tok.encode_response("20") == ids
  assert tok.decode(prompt) == tokenizer.render(dialogue[:3], add_generation_prompt=True) + " "
  assert tok.decode_response(tok.encode_response("20") + [0, 0]) == "20"


def test_validate_messages_names_the_field():
  with pytest.raises(UserInputError, match=r"messages\[1\].role"):
    tokenizer.validate_messages([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
  with pytest.raises(UserInputError, match=r"messages\[0\].content"):
    tokenizer.validate_messages([{"role": "user", "content": 3}])


def _bound(vocab_size: int, key: str = "config.tokenizer.vocab_size") -> int:
  """The size the vocab-size error names, after checking its one-line form."""
  with pytest.raises(UserInputError) as e:
    tokenizer.train(["tiny corpus"] * 3, vocab_size=vocab_size, vocab_key=key)
  msg = str(e.value)
  assert msg.startswith(f"{key}={vocab_size}: too ") and "\n" not in msg, msg
  assert "SentencePiece" not in msg and "trainer_interface" not in msg, msg
  return int(msg.rsplit(" ", 1)[1])


def test_vocab_too_large_names_the_largest_that_works():
  largest = _bound(5000)
  assert tokenizer.train(["tiny corpus"] * 3, vocab_size=largest).vocab_size == largest
  assert _bound(largest + 1) == largest


@pytest.mark.parametrize("vocab_size", [3, 0, 100])  # 3: below SentencePiece's reserved ids
def test_vocab_too_small_names_the_smallest_that_works(vocab_size):
  smallest = _bound(vocab_size, key="--vocab-size")
  # the fixed pieces plus one per character of "tiny corpus" (t i n y, space, c o r p u s)
  assert smallest == tokenizer.FIXED_PIECES + 11
  assert tokenizer.train(["tiny corpus"] * 3, vocab_size=smallest).vocab_size == smallest
  assert _bound(smallest - 1) == smallest


def test_cli_vocab_size_error_is_one_line(tmp_path, capfd):
  from rlhf_jax import cli

  text, out = tmp_path / "corpus.txt", tmp_path / "tok.model"
  text.write_text("tiny corpus\n" * 3)
  rc = cli.main(["tokenizer", "--text", str(text), "--vocab-size", "3", "--out", str(out)])
  err = capfd.readouterr().err  # file descriptor 2: SentencePiece's own logging too
  assert rc == 2 and not out.exists()
  assert (
    err == f"rlhf-jax: error: --vocab-size=3: too small for this corpus, must be >= "
    f"{tokenizer.FIXED_PIECES + 11}\n"
  ), err


def test_save_load(tok, tmp_path):
  path = str(tmp_path / "tok.model")
  tok.save(path)
  again = tokenizer.load(path)
  assert again.encode("Zorbin 42 🦄") == tok.encode("Zorbin 42 🦄")
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(UserInputError, match="bad.model"):
    tokenizer.load(str(tmp_path / "bad.model"))


def test_pad_left():
  out = tokenizer.pad_left([[5, 6, 7], [8]])
  assert out.tolist() == [[5, 6, 7], [0, 0, 8]]
