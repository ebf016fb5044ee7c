"""`rlhf-jax` command line: one subcommand per job, configs as `--config=path[:arg]`.

  rlhf-jax config --config configs/default.py:size=s --config.model.dropout=0.1
  rlhf-jax info   --config configs/default.py          # parameter count and layout
  rlhf-jax plan   --config configs/default.py:size=7b --devices 64 --config.mesh.fsdp=-1
  rlhf-jax data   --config configs/default.py --workdir DIR   # one subcommand per stage
  rlhf-jax pretrain --config configs/default.py --workdir DIR   # (stages/registry.py)
  rlhf-jax pipeline --config configs/default.py --workdir DIR   # every stage, then eval
  rlhf-jax sweep --config configs/sweeps/beta.py --workdir DIR  # many runs, shared stages
  rlhf-jax sample --workdir DIR --policy ppo --prompt "What is 7 + 5?"
  rlhf-jax tokenizer --text corpus.txt --vocab-size 1024 --out tok.model
  rlhf-jax tokenizer --text corpus.txt --vocab-size 1024 --out tok/tokenizer.json   # byte-level BPE
  rlhf-jax import-hf --src HF_DIR --dst DIR      # a Hugging Face LLaMA / Qwen checkpoint
  rlhf-jax export-hf --workdir DIR --policy ppo --dst OUT   # back to the HF layout

Bad input of any kind (an unknown override key, a wrong type, an impossible size, a
malformed data file) ends with one line on stderr naming the key or `file:line`, and
exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rlhf_jax import config_lib, interrupts
from rlhf_jax.errors import EXIT_DIVERGED, EXIT_USAGE, Diverged, Preempted, UserInputError
from rlhf_jax.stages import registry


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
    raise UserInputError(f"{self.prog}: {message}")


def _add_config(p: argparse.ArgumentParser, workdir: bool = False) -> None:
  p.add_argument(
    "--config",
    required=True,
    help="config file, optionally with presets: configs/default.py:size=s,runlocal=True; "
    "override fields with --config.a.b=value",
  )
  if workdir:
    p.add_argument("--workdir", required=True, help="directory for this run's outputs")


def _cmd_config(args, config) -> int:
  print(config)
  return 0


def _cmd_info(args, config) -> int:
  import jax

  from rlhf_jax import sharding
  from rlhf_jax.models import TransformerConfig, count_params, init_params

  cfg = TransformerConfig.from_config(config.model)
  mesh = sharding.make_mesh(config.mesh)
  abstract = jax.eval_shape(lambda r: init_params(cfg, r)[0], jax.random.key(0))
  print(f"model: {config.model.size} ({count_params(abstract):,} parameters)")
  print(f"mesh: {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
  if args.layout:
    params, _ = init_params(cfg, jax.random.key(0), mesh, sharding.rules(config.mesh))
    for path, x in jax.tree_util.tree_leaves_with_path(params):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      print(f"  {name:40s} {str(x.shape):20s} {x.sharding.spec}")
  return 0


def _cmd_plan(args, config) -> int:
  import jax

  from rlhf_jax import plan

  n = args.devices or jax.device_count()
  mesh, plans = plan.plan(config, n)
  print(plan.format_plan(config, mesh, plans, args.capacity_gib))
  return 0


def _cmd_stage(args, config) -> int:
  from rlhf_jax import pipeline

  stage = registry.get(args.command)
  result = pipeline.run_stage(stage, config, args.workdir)
  if stage.prints_result and result is not None:
    print(json.dumps(result, indent=1))
  from rlhf_jax import distributed

  distributed.barrier(f"end of {args.command}")  # every process's writes are done
  return 0


def _cmd_eval(args, config) -> int:
  from rlhf_jax import evaluate

  return evaluate.main(args, config)


def _cmd_pipeline(args, config) -> int:
  from rlhf_jax import pipeline

  pipeline.run(config, args.workdir)
  return 0


def _cmd_sweep(args, config) -> int:
  from rlhf_jax import sweep

  rows = sweep.run(
    args.config,
    args.workdir,
    args.overrides,
    workers=args.workers,
    vmap=args.vmap,
    shared=args.shared,
  )
  return 0 if all(r["status"] == "ok" for r in rows) else 1


def _cmd_chat(args) -> int:
  from rlhf_jax import chat

  return chat.MAINS[args.command](args)


def _cmd_tokenizer(args) -> int:
  from rlhf_jax import tokenizer
  from rlhf_jax.data import user_data

  texts = []
  for path in args.text:
    texts += [r["text"] for r in user_data.load_pretraining_text(path).records]
  if args.kind == "bpe" or (args.kind == "auto" and args.out.endswith(".json")):
    from rlhf_jax import hf_tokenizer

    tok = hf_tokenizer.train_bpe(texts, args.vocab_size, vocab_key="--vocab-size")
    kind = "byte-level BPE tokenizer.json + tokenizer_config.json"
  else:
    tok = tokenizer.train(texts, args.vocab_size, vocab_key="--vocab-size")
    kind = "SentencePiece model"
  tok.save(args.out)
  print(f"wrote {args.out}: {kind} ({tok.vocab_size} ids from {len(texts)} documents)")
  return 0


def _cmd_import_hf(args) -> int:
  from rlhf_jax.models import hf

  info = hf.import_checkpoint(args.src, args.dst, dtype=args.dtype or "float32")
  m = info["model"]
  print(
    f"imported {args.src} -> {args.dst}: {info['heads'][0]} head, d_model {m['d_model']}, "
    f"{m['n_layers']} layers, vocab {m['vocab_size']}, {m['param_dtype']}"
  )
  return 0


def export_choices() -> dict[str, str]:
  """`export-hf --policy` name -> stage: every policy, and every reward model by its stage."""
  kinds = {"policy": lambda s: s.policy, "reward_model": lambda s: s.name}
  return {kinds[s.exports](s): s.name for s in registry.stages() if s.exports in kinds}


def _cmd_export_hf(args) -> int:
  import os

  from rlhf_jax.models import hf_export

  if not (args.src or args.workdir):
    raise UserInputError("export-hf: give --workdir (with --policy) or --src")
  src = args.src or os.path.join(os.path.abspath(args.workdir), export_choices()[args.policy])
  if args.lora_only:
    dtype = args.dtype or None
    files = hf_export.export_adapters(src, args.dst, dtype=dtype, base_model=args.base_model)
    print(f"exported {src}'s LoRA adapters -> {args.dst} (PEFT): {', '.join(files)}")
    return 0
  size = _bytes(args.max_shard_size)
  files = hf_export.export_checkpoint(
    src, args.dst, dtype=args.dtype or None, max_shard_bytes=size, tokenizer_path=args.tokenizer
  )
  print(f"exported {src} -> {args.dst}: {', '.join(files)}")
  return 0


def _bytes(text: str) -> int:
  units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
  t = text.strip().upper()
  try:
    for u, n in units.items():
      if t.endswith(u):
        return int(float(t[: -len(u)]) * n)
    return int(t)
  except ValueError:
    raise UserInputError(f"--max-shard-size: {text!r} is not a size (e.g. 2GB, 500MB)") from None


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="rlhf-jax", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  p = sub.add_parser("config", help="print the resolved config")
  _add_config(p)
  p = sub.add_parser("info", help="model size and parameter layout on the mesh")
  _add_config(p)
  p.add_argument("--layout", action="store_true", help="list every parameter's sharding")
  p = sub.add_parser("plan", help="memory per device of every stage on a mesh of N devices")
  _add_config(p)
  p.add_argument("--devices", type=int, default=0, help="devices in the mesh (default: here)")
  p.add_argument(
    "--capacity-gib",
    type=float,
    default=0.0,
    help="memory of one device: mark the stages that do not fit",
  )
  for stage in registry.stages():
    p = sub.add_parser(stage.name, help=stage.help)
    _add_config(p, workdir=True)
  p = sub.add_parser("pipeline", help="every stage, data to report (resumes; skips done stages)")
  _add_config(p, workdir=True)
  p = sub.add_parser(
    registry.EVAL, help="evaluate every trained policy: summary.json, report, plots"
  )
  _add_config(p, workdir=True)
  p = sub.add_parser("sweep", help="every point of a sweep file (get_hyper), sharing stages")
  _add_config(p, workdir=True)
  p.add_argument("--workers", type=int, default=1, help="stages run at once (processes)")
  p.add_argument(
    "--vmap",
    default="auto",
    choices=("auto", "on", "off"),
    help="train PPO points that differ only in numbers as one vmapped program (auto: on "
    "GPU / TPU, not on CPU, where it is slower)",
  )
  p.add_argument(
    "--shared",
    default="",
    help="where stage outputs live (default WORKDIR/stages); sweeps of one base config that "
    "name the same directory train their common stages once",
  )
  from rlhf_jax import chat  # light: no jax at import

  chat.add_arguments(sub)  # `sample` and `chat` (no --config: the export names the model)
  p = sub.add_parser("tokenizer", help="train a SentencePiece or byte-level BPE tokenizer")
  p.add_argument("--text", nargs="+", required=True, help=".txt or .jsonl(.gz) files")
  p.add_argument("--vocab-size", type=int, default=1024)
  p.add_argument(
    "--kind",
    choices=("auto", "sentencepiece", "bpe"),
    default="auto",
    help="auto: bpe when --out ends in .json (a Hugging Face tokenizer.json), else sentencepiece",
  )
  p.add_argument("--out", required=True, help="the .model or tokenizer.json file to write")
  dtypes = ("float32", "bfloat16", "float16")
  p = sub.add_parser("import-hf", help="a Hugging Face LLaMA / Qwen checkpoint -> our export")
  p.add_argument(
    "--src",
    required=True,
    help="HF directory: config.json, *.safetensors, tokenizer.model or tokenizer.json",
  )
  p.add_argument(
    "--dst", required=True, help="directory to write params, params.json and the tokenizer to"
  )
  p.add_argument(
    "--dtype", default="", choices=("", *dtypes), help="parameter dtype (default float32)"
  )
  p = sub.add_parser("export-hf", help="a trained policy or RM -> Hugging Face LLaMA layout")
  p.add_argument("--workdir", default="", help="the run's work directory (with --policy)")
  p.add_argument(
    "--policy",
    default=registry.primary().policy,
    choices=tuple(export_choices()),
    help="which stage's export (rm: LlamaForSequenceClassification)",
  )
  p.add_argument("--src", default="", help="a stage directory instead of --workdir/--policy")
  p.add_argument("--dst", required=True, help="new directory for the HF checkpoint")
  p.add_argument(
    "--dtype", default="", choices=("", *dtypes), help="tensor dtype (default: the parameters')"
  )
  p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file")
  p.add_argument(
    "--tokenizer", default="", help="SentencePiece model (default: the one the export records)"
  )
  p.add_argument(
    "--lora-only",
    action="store_true",
    help="a stage trained with LoRA: its adapters alone, in PEFT's layout (default: merged)",
  )
  p.add_argument(
    "--base-model",
    default="",
    help="--lora-only: the adapters' base_model_name_or_path (default: the HF checkpoint "
    "the base was imported from, if any)",
  )
  return parser


_WITH_CONFIG = {"config": _cmd_config, "info": _cmd_info, "plan": _cmd_plan}
_WITH_CONFIG.update({registry.EVAL: _cmd_eval, "pipeline": _cmd_pipeline, "sweep": _cmd_sweep})
_WITHOUT_CONFIG = {
  "tokenizer": _cmd_tokenizer,
  "sample": _cmd_chat,
  "chat": _cmd_chat,
  "import-hf": _cmd_import_hf,
  "export-hf": _cmd_export_hf,
}


def run(argv: Sequence[str]) -> int:
  overrides, rest = config_lib.parse_overrides(argv)
  args = build_parser().parse_args(rest)
  if args.command not in ("config", "tokenizer"):
    from rlhf_jax import distributed

    distributed.initialize()  # a multi-process run, when the environment says so
  if args.command in _WITHOUT_CONFIG:
    if overrides:
      raise UserInputError(f"{args.command}: takes no --config overrides")
    return _WITHOUT_CONFIG[args.command](args)
  config = config_lib.get(args.config, overrides)  # (a sweep: checks its base config)
  args.overrides = overrides
  command = _WITH_CONFIG.get(args.command, _cmd_stage)  # (or a registered stage's)
  if not getattr(args, "workdir", None):
    return command(args, config)
  import jax

  from rlhf_jax import workdir

  with workdir.locked(args.workdir, jax.process_index()):
    return command(args, config)


def main(argv: Sequence[str] | None = None) -> int:
  """The program (`argv` None: SIGTERM and SIGINT handled for the rest of the process,
  its shutdown included) or one command in this process (handled while it runs).

  A signal stops a training loop at its next logging step's checkpoint and any other
  work at once, with exit status 0 after SIGTERM and 130 after SIGINT
  (`rlhf_jax.interrupts`)."""
  if argv is None:
    interrupts.install()
  argv = sys.argv[1:] if argv is None else argv
  with interrupts.handled():
    return _main(argv)


def _main(argv: Sequence[str]) -> int:
  try:
    return run(argv)
  except UserInputError as e:
    print(f"rlhf-jax: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except Diverged as e:
    print(f"rlhf-jax: error: {e}", file=sys.stderr)
    return EXIT_DIVERGED
  except Preempted as e:  # (a training loop's checkpoint is written)
    print(f"rlhf-jax: {e}", file=sys.stderr)
    return e.exit_status
  except OSError as e:  # a full disk, a read-only or unwritable path
    where = f"{e.filename}: " if e.filename else ""
    print(f"rlhf-jax: error: {where}{e.strerror or e}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
