"""A model's own chat template: Jinja from its tokenizer files, rendered as transformers does.

  template = hf_tokenizer.load(model_dir).chat_template   # None when the model has none
  text = template.render(messages, add_generation_prompt=True)
  text, spans = template.assistant_spans(messages)        # [(start, end)] in `text`

Where the template lives: `chat_template.jinja` beside tokenizer.json (transformers >= 4.43
writes it there) or `tokenizer_config.json["chat_template"]` (a string, or a list of named
templates of which "default" is used). Templates from the Hub are untrusted code: they run
in jinja2's immutable sandbox with the globals and filters transformers gives them
(`raise_exception`, `strftime_now`, `tojson` without HTML escaping, `dict`, a `namespace`
that refuses private names, the `{% generation %}` tag, loop controls), and see the
tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables. So a rendering
equals `AutoTokenizer.apply_chat_template(messages, tokenize=False, ...)`.

Which characters are the assistant's (what SFT learns to write) is found by rendering
prefixes of the dialogue: assistant message i covers the text that rendering messages[:i+1]
adds to rendering messages[:i] with the generation prompt, up to and including the first
end-of-turn token after it (the template's own text between turns, like ChatML's newline
after `<|im_end|>`, is not the model's to write). A template that renders an earlier
turn differently once later turns follow (so no prefix of the whole is a turn) is refused.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from rlhf_jax.errors import UserInputError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` renders its body (spans are found by prefixes)."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _Namespace(jinja2.utils.Namespace):
  """jinja2's namespace without underscore names (no reaching into Python internals)."""

  def __init__(*args, **kwargs):
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: private names refused")


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


class _Dict:
  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals.update(
    raise_exception=_raise,
    strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt),
    dict=_Dict(),
    namespace=_Namespace,
  )
  return env.from_string(source)


class ChatTemplate:
  """A compiled template, the special tokens it sees and the token that ends a turn."""

  def __init__(self, source: str, special_tokens: Mapping[str, str], where: str, controls=()):
    """`controls`: the tokenizer's special token strings, longest first; the first of them
    after an assistant reply's content is the token that ends its turn."""
    self.source, self.where = source, where
    self.special_tokens = dict(special_tokens)
    try:
      self._template = _compile(source)
    except jinja2.exceptions.TemplateError as e:
      raise UserInputError(f"{where}: chat_template does not compile ({e})") from None
    self.end_of_turn = self._end_of_turn(controls)

  def _end_of_turn(self, controls: Sequence[str]) -> str:
    probe = "\u2402probe reply\u2403"  # text no template writes itself
    text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    at = text.find(probe)
    if at < 0:
      raise UserInputError(f"{self.where}: chat_template does not render the assistant's content")
    rest = text[at + len(probe) :]
    found = [(rest.find(c), -len(c), c) for c in controls if c and c in rest]
    return min(found)[2] if found else ""

  def render(
    self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
  ) -> str:
    try:
      return self._template.render(
        messages=[dict(m) for m in messages],
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **self.special_tokens,
      )
    except Exception as e:  # the template's own raise_exception, a sandbox refusal, a bug
      raise UserInputError(
        f"{self.where}: chat_template failed to render a dialogue of roles "
        f"{[m.get('role') for m in messages]} ({type(e).__name__}: {e})"
      ) from None

  def assistant_spans(
    self, messages: Sequence[Mapping[str, Any]]
  ) -> tuple[str, list[tuple[int, int]]]:
    """The whole dialogue's text and the [start, end) character span of every assistant turn."""
    text = self.render(messages)
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True) if i else ""
      upto = self.render(messages[: i + 1])
      if not (upto.startswith(before) and text.startswith(upto)):
        raise UserInputError(
          f"{self.where}: chat_template renders assistant turn {i} differently once later "
          "turns follow, so its tokens cannot be told apart for the loss"
        )
      end = upto.find(self.end_of_turn, len(before)) if self.end_of_turn else -1
      spans.append((len(before), end + len(self.end_of_turn) if end >= 0 else len(upto)))
    return text, spans


def read_source(directory: str) -> tuple[str | None, str]:
  """The template text in `directory` (None if it has none) and the file it came from."""
  path = os.path.join(directory, TEMPLATE_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read(), path
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    return None, path
  cfg = read_json(path)
  source = cfg.get("chat_template")
  if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    source = named.get("default")
  if source is not None and not isinstance(source, str):
    raise UserInputError(f"{path}: chat_template: expected a string")
  return source, path


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserInputError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(out, dict):
    raise UserInputError(f"{path}: expected a JSON object")
  return out
