"""`rlhf-jax sample` and `rlhf-jax chat`: look at what training did to a policy.

  rlhf-jax sample --workdir DIR --policy ppo --prompt "What is 7 + 5?" --prompt "..."
  rlhf-jax chat   --workdir DIR --policy sft      # one line per turn; /quit or EOF ends

`--policy` is any registered policy (stages/registry.py): pretrained (`DIR/pretrain`),
sft, ppo, ppo_ptx and any method registered after them. No config is needed: the
model's shape comes from the export's `params.json` (what it was trained with) and the
tokenizer from
`DIR/data/tokenizer.model` (`--tokenizer` for a user's own). Sampling runs on one
device; `--temperature 0` (the default) is greedy. A pretrained model's reply is cut
where it runs on into a further "User:" / "Assistant:" turn, as in evaluation.

`chat` keeps the whole dialogue in the chat format (`User: ...` / `Assistant: ...`
turns, each reply ending in EOS) and drops the oldest exchanges when it outgrows
`--max-prompt-len` tokens; `/reset` starts a new dialogue.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, TextIO

from rlhf_jax.errors import UserInputError
from rlhf_jax.stages import registry

# Light at import (the CLI builds its parser from `add_arguments`); jax loads on use.
COMMANDS = ("sample", "chat")


def add_arguments(subparsers) -> None:
  """Add the `sample` and `chat` subcommands to an argparse subparsers object."""
  for name, default, help_ in (
    ("sample", registry.primary().policy, "print a trained policy's replies to prompts"),
    (
      "chat",
      registry.reference().policy,
      "chat with a trained policy (stdin, one line per turn; /quit ends)",
    ),
  ):
    p = subparsers.add_parser(name, help=help_)
    p.add_argument("--workdir", required=True, help="the run's work directory")
    p.add_argument(
      "--policy",
      default=default,
      choices=tuple(registry.policies()),
      help=f"which stage's export to load (default {default})",
    )
    p.add_argument("--tokenizer", default="", help="SentencePiece model; default DIR/data's")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit")
    p.add_argument("--max-prompt-len", type=int, default=512, help="dialogue tokens kept")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    if name == "sample":
      p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="a user message (repeat for several prompts)",
      )
      p.add_argument("--num-samples", type=int, default=1, help="replies per prompt")


@dataclasses.dataclass
class Policy:
  """A loaded policy: its model config, parameters and tokenizer."""

  name: str
  model_cfg: Any  # TransformerConfig
  params: Any
  tok: Any  # tokenizer.Tokenizer
  sample_fn: Any = None  # an inference-time policy's sampler (best-of-n); None: sample

  def reply(
    self,
    dialogues: list[list[dict[str, str]]],
    rng: Any,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    max_prompt_len: int = 512,
  ) -> list[str]:
    """One reply per dialogue (each ending in a user turn)."""
    from rlhf_jax import tokenizer
    from rlhf_jax.stages import common

    texts = common.generate(
      self.model_cfg,
      self.params,
      self.tok,
      dialogues,
      rng,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      batch_size=len(dialogues),
      max_prompt_len=max_prompt_len,
      sample_fn=self.sample_fn,
    )
    if registry.policies()[self.name].few_shot:
      return [tokenizer.cut_reply(t) for t in texts]
    return [t.strip() for t in texts]


def load_policy(workdir: str, name: str, tokenizer_path: str = "") -> Policy:
  """The export of policy `name` in `workdir`, on the first device (UserInputError when
  the export or the tokenizer is missing)."""
  import jax

  from rlhf_jax import tokenizer
  from rlhf_jax.data import prepare
  from rlhf_jax.models import TransformerConfig, abstract_params
  from rlhf_jax.train import checkpoints

  directory = registry.policies()[name].directory(workdir)
  info = checkpoints.params_info(directory)
  if info is None:
    raise UserInputError(f"{directory}: no exported parameters (train the {name} policy first)")
  try:
    model_cfg = TransformerConfig.from_config(info.get("model", {}), dropout=0.0)
  except TypeError as e:
    raise UserInputError(f"{directory}/params.json: bad model config ({e})") from None
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
    abstract_params(info["model"]),
  )
  params = checkpoints.load_params(directory, like, info["model"])
  recorded = info.get("tokenizer", "")  # every export records its run's tokenizer
  path = tokenizer_path or (recorded if os.path.exists(recorded) else "")
  path = path or prepare.tokenizer_path(workdir)
  if not os.path.exists(path):
    raise UserInputError(f"{path}: tokenizer model not found (pass --tokenizer)")
  tok = tokenizer.load(path)
  padded = info["model"].get("size") == "imported"  # an HF embedding may be padded
  if tok.vocab_size > model_cfg.vocab_size or (
    tok.vocab_size != model_cfg.vocab_size and not padded
  ):
    raise UserInputError(
      f"{path}: {tok.vocab_size} pieces, but {directory} was trained with "
      f"vocab_size={model_cfg.vocab_size}"
    )
  own_sampler = registry.policies()[name].hook("sample_fn")
  sample_fn = own_sampler(workdir, model_cfg) if own_sampler is not None else None
  return Policy(name, model_cfg, params, tok, sample_fn)


def _check_args(args) -> None:
  if args.temperature < 0:
    raise UserInputError(f"--temperature: must be >= 0, got {args.temperature}")
  if not 0 < args.top_p <= 1:
    raise UserInputError(f"--top-p: must be in (0, 1], got {args.top_p}")
  if args.max_new_tokens < 1:
    raise UserInputError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
  if args.max_prompt_len < 8:
    raise UserInputError(f"--max-prompt-len: must be >= 8, got {args.max_prompt_len}")
  if getattr(args, "num_samples", 1) < 1:
    raise UserInputError(f"--num-samples: must be >= 1, got {args.num_samples}")


def _gen_kwargs(args) -> dict[str, Any]:
  return dict(
    temperature=args.temperature,
    top_p=args.top_p,
    max_new_tokens=args.max_new_tokens,
    max_prompt_len=args.max_prompt_len,
  )


def sample_main(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
  """`rlhf-jax sample`: print `--num-samples` replies to every `--prompt`."""
  import jax

  from rlhf_jax import tokenizer

  out = stdout or sys.stdout
  _check_args(args)
  policy = load_policy(args.workdir, args.policy, args.tokenizer)
  dialogues = [
    [tokenizer.Message(role="user", content=p)]
    for p in args.prompt
    for _ in range(args.num_samples)
  ]
  replies = policy.reply(dialogues, jax.random.PRNGKey(args.seed), **_gen_kwargs(args))
  for i, (d, r) in enumerate(zip(dialogues, replies, strict=True)):
    if i % args.num_samples == 0:
      print(("\n" if i else "") + tokenizer.render(d), file=out)
    print(f"Assistant: {r}", file=out)
  return 0


def fit_dialogue(tok, dialogue: list[dict[str, str]], max_len: int) -> list[dict[str, str]]:
  """`dialogue` without its oldest exchanges until its prompt fits `max_len` tokens
  (the last user turn is always kept; `generate` cuts it if it alone is too long)."""
  while len(dialogue) > 1 and len(tok.encode_prompt(dialogue)) > max_len:
    dialogue = dialogue[2:]
  return dialogue


def chat_main(
  args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
  """`rlhf-jax chat`: read user turns from stdin (one per line) until EOF or `/quit`,
  print each reply as `Assistant: ...`."""
  import jax

  from rlhf_jax import tokenizer

  inp, out = stdin or sys.stdin, stdout or sys.stdout
  _check_args(args)
  policy = load_policy(args.workdir, args.policy, args.tokenizer)
  interactive = inp.isatty()
  if interactive:
    print(f"chatting with {args.policy} ({args.workdir}); /reset starts over, /quit ends", file=out)
  dialogue: list[dict[str, str]] = []
  turn = 0
  while True:
    if interactive:
      print("User: ", end="", file=out, flush=True)
    line = inp.readline()
    if not line or line.strip() == "/quit":
      break
    text = line.rstrip("\n")
    if text.strip() == "/reset":
      dialogue = []
      continue
    if not text.strip():
      continue
    dialogue = fit_dialogue(
      policy.tok, [*dialogue, tokenizer.Message(role="user", content=text)], args.max_prompt_len
    )
    rng = jax.random.fold_in(jax.random.PRNGKey(args.seed), turn)
    reply = policy.reply([dialogue], rng, **_gen_kwargs(args))[0]
    dialogue.append(tokenizer.Message(role="assistant", content=reply))
    turn += 1
    print(f"Assistant: {reply}", file=out, flush=True)
  return 0


MAINS = {"sample": sample_main, "chat": chat_main}
