"""tokenizer.json (byte-level BPE) and chat templates against transformers' own outputs.

tests/fixtures/hf/bpe_cases.json holds what transformers' AutoTokenizer and
apply_chat_template give on two tokenizers written by bpe_fixtures.py there (Qwen2-style
ChatML and LLaMA-3-style); nothing here needs transformers.
"""

import json
import os
import unicodedata

import pytest

from rlhf_jax import chat_template, cli, hf_tokenizer, tokenizer
from rlhf_jax.errors import UserInputError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
with open(os.path.join(FIX, "bpe_cases.json"), encoding="utf-8") as f:
  CASES = json.load(f)
KINDS = ("bpe_chatml", "bpe_llama3", "sp_llama2")


def _load(kind):
  return tokenizer.load(os.path.join(FIX, kind, "tokenizer.json"))


@pytest.mark.parametrize("kind", KINDS)
def test_ids_equal_transformers(kind):
  tok = _load(kind)
  texts = CASES[kind]["texts"]
  assert len(texts) >= 25
  for case in texts:
    assert tok.encode(case["text"]) == case["ids"], case["text"]
  assert tok.encode_batch([c["text"] for c in texts]) == [c["ids"] for c in texts]
  # decode inverts encode on text without special tokens (byte-level: every byte), up to
  # the ChatML tokenizer's NFC normaliser (LLaMA 2's Metaspace drops a leading space)
  norm = (lambda t: unicodedata.normalize("NFC", t)) if kind == "bpe_chatml" else (lambda t: t)
  for case in texts:
    if kind.startswith("bpe") and "<|" not in case["text"]:
      assert tok.decode(case["ids"]) == norm(case["text"])


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_equals_apply_chat_template(kind):
  tok = _load(kind)
  rows = CASES[kind]["dialogues"]
  for row in rows:
    msgs, gen = row["messages"], row["add_generation_prompt"]
    assert tok.chat_template.render(msgs, add_generation_prompt=gen) == row["text"]
    if any(m["role"] == "system" for m in msgs):
      continue  # our stages' dialogues are user / assistant turns
    ids, target = tok.encode_dialogue(msgs, add_generation_prompt=gen)
    assert ids == row["ids"]
    if gen:
      assert tok.encode_prompt(msgs) == row["ids"]
    if "assistant_masks" in row:  # transformers' own mask from {% generation %} blocks
      assert [int(t) for t in target] == row["assistant_masks"]


def test_a_model_with_a_template_is_read_through_its_tokenizer_json(tmp_path):
  from rlhf_jax.models import hf

  assert hf.tokenizer_file(os.path.join(FIX, "mistral")).endswith("tokenizer.model")
  sp = hf.tokenizer_file(os.path.join(FIX, "sp_llama2"))  # tokenizer.model, .json, template
  assert sp.endswith("tokenizer.json") and _load("sp_llama2").eos_id == 2


def test_special_ids_from_the_model_files():
  chatml, llama3 = _load("bpe_chatml"), _load("bpe_llama3")
  s = CASES["bpe_chatml"]["special"]
  assert chatml.bos_id is None and chatml.bos == [] and s["bos"] is None
  assert chatml.eos_id == chatml.document_end_id == s["eos"]  # eos_token is <|im_end|>
  s = CASES["bpe_llama3"]["special"]
  assert llama3.bos_id == s["bos"] and llama3.document_end_id == s["eos"]
  # a reply ends where the template ends a turn, not at <|end_of_text|>
  assert llama3.eos_id == llama3.encode("<|eot_id|>")[0] != s["eos"]
  assert llama3.encode_document("hi") == [s["bos"], *llama3.encode("hi"), s["eos"]]


def test_sft_targets_are_the_assistant_turns_and_their_end():
  tok = _load("bpe_chatml")
  msgs = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "Sort 3 1 2."},
    {"role": "assistant", "content": " 1 2 3\n"},
  ]
  ids, target = tok.encode_dialogue(msgs)
  got = [i for i, t in zip(ids, target, strict=True) if t]
  # content and <|im_end|>, never the template's "<|im_start|>assistant\n" or the newline after
  assert tok._tok.decode(got, skip_special_tokens=False) == (
    "Hi. How can I help?<|im_end|> 1 2 3\n<|im_end|>"
  )
  # a prompt and a reply concatenate to the dialogue (what PPO scores is what SFT taught)
  prompt, reply = tok.encode_prompt(msgs[:3]), tok.encode_response(msgs[3]["content"])
  assert prompt + reply == ids[: len(prompt) + len(reply)]
  assert tok.decode_response(tok.encode_response("Hi there") + [7, 8]) == "Hi there"


def test_template_from_tokenizer_config_and_named_templates(tmp_path):
  src = os.path.join(FIX, "bpe_chatml")
  with open(os.path.join(src, "chat_template.jinja"), encoding="utf-8") as f:
    source = f.read()
  for value in (
    source,
    [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}],
  ):
    d = tmp_path / str(type(value).__name__)
    d.mkdir()
    with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
      cfg = json.load(f)
    cfg["chat_template"] = value
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text(open(os.path.join(src, "tokenizer.json")).read())
    tok = tokenizer.load(str(d))  # a directory stands for its tokenizer.json
    row = CASES["bpe_chatml"]["dialogues"][0]
    assert tok.chat_template.render(row["messages"], row["add_generation_prompt"]) == row["text"]


def _with_template(tmp_path, template: str):
  src = os.path.join(FIX, "bpe_chatml")
  (tmp_path / "tokenizer.json").write_text(open(os.path.join(src, "tokenizer.json")).read())
  cfg = {"eos_token": "<|im_end|>", "chat_template": template}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  return str(tmp_path / "tokenizer.json")


@pytest.mark.parametrize(
  "template, expect",
  [
    ("{{ raise_exception('no system turns') }}", "failed to render"),
    ("{% for m in messages %}{{ m.content", "does not compile"),
    ("{{ ''.__class__.__mro__ }}", "failed to render"),  # the sandbox
    ("{{ namespace(_x=1) }}", "failed to render"),
    ("{% for m in messages %}{{ m.role }}{% endfor %}", "does not render the assistant's content"),
  ],
)
def test_bad_templates_are_one_line(tmp_path, template, expect):
  with pytest.raises(UserInputError, match=expect) as e:
    tokenizer.load(_with_template(tmp_path, template))
  assert "\n" not in str(e.value) and "tokenizer_config.json" in str(e.value)


def test_history_rewritten_by_the_template_is_refused(tmp_path):
  # renders only the last assistant turn: earlier ones vanish once later turns follow
  t = (
    "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
  )
  tok = tokenizer.load(_with_template(tmp_path, t))
  msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
  assert tok.encode_dialogue(msgs)[1].count(True) >= 2
  with pytest.raises(UserInputError, match="renders assistant turn 1 differently"):
    tok.encode_dialogue(msgs * 2)


def test_trained_bpe_round_trips_and_reserves_our_ids(tmp_path):
  # (literal "<s>" in text is the special token, as transformers encodes added tokens)
  texts = [c["text"] for c in CASES["bpe_llama3"]["texts"] if "<" not in c["text"]] * 5
  tok = hf_tokenizer.train_bpe(texts, 300)
  assert tok.vocab_size == 300 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.chat_template is None
  for t in texts:
    assert tok.decode(tok.encode(t)) == t
    assert 0 not in tok.encode(t) and 1 not in tok.encode(t)
  ids, target = tok.encode_dialogue(
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
  )
  assert ids[0] == 1 and ids[-1] == 2 and target[-2:] == [True, True]
  tok.save(str(tmp_path / "tokenizer.json"))
  again = tokenizer.load(str(tmp_path / "tokenizer.json"))
  assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
  with pytest.raises(UserInputError, match="--vocab-size=100: too small for byte-level BPE"):
    hf_tokenizer.train_bpe(texts, 100)


def test_bad_tokenizer_json(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(UserInputError, match="not a valid tokenizer.json"):
    tokenizer.load(str(tmp_path / "tokenizer.json"))
  src = os.path.join(FIX, "bpe_chatml", "tokenizer.json")
  (tmp_path / "tokenizer.json").write_text(open(src).read())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
  with pytest.raises(UserInputError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
    tokenizer.load(str(tmp_path / "tokenizer.json"))
  assert chat_template.TEMPLATE_FILE == "chat_template.jinja"


def test_cli_writes_either_kind(tmp_path, capsys):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(c["text"] for c in CASES["bpe_llama3"]["texts"] if c["text"]) * 20)
  out = tmp_path / "bpe" / "tokenizer.json"
  argv = ["tokenizer", "--text", str(corpus), "--vocab-size", "300"]
  assert cli.main([*argv, "--out", str(out)]) == 0
  assert "byte-level BPE" in capsys.readouterr().out
  tok = tokenizer.load(str(out))
  assert isinstance(tok, hf_tokenizer.HFTokenizer) and tok.vocab_size == 300
  assert (tmp_path / "bpe" / "tokenizer_config.json").exists()
  assert cli.main([*argv, "--out", str(tmp_path / "sp.model"), "--vocab-size", "400"]) == 0
  assert isinstance(tokenizer.load(str(tmp_path / "sp.model")), tokenizer.SentencePieceTokenizer)


def test_a_changed_template_is_another_tokenizer(tmp_path):
  from rlhf_jax.models import hf
  from rlhf_jax.train import checkpoints

  src = os.path.join(FIX, "bpe_chatml")
  for d in ("a", "b"):
    (tmp_path / d).mkdir()
    hf.copy_tokenizer(os.path.join(src, "tokenizer.json"), str(tmp_path / d))
  a, b = (str(tmp_path / d / "tokenizer.json") for d in ("a", "b"))
  assert checkpoints.tokenizer_sha256(a) == checkpoints.tokenizer_sha256(b)
  (tmp_path / "b" / "chat_template.jinja").write_text("{{ messages[0].content }}")
  assert checkpoints.tokenizer_sha256(a) != checkpoints.tokenizer_sha256(b)
