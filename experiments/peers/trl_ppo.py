"""TRL's PPOTrainer (0.19.1) on bench_peers' PPO workload, timed one iteration at a time.

Runs in a Python with torch and trl (not this project's environment; it imports only
torch, numpy and the Hugging Face libraries trl needs, never rlhf_jax):

  /work/hfvenv/bin/python experiments/peers/trl_ppo.py --rounds 7     # standalone
  /work/hfvenv/bin/python experiments/peers/trl_ppo.py --serve --spec '{...}'  # driven

Standalone, it runs `--warmup` + `--rounds` rounds of (one generation, one PPO
iteration) and prints one JSON line per round and event. `--serve` (how
experiments/bench_peers.py drives it) reads one command a line on stdin -- `iter`, `gen`,
`matmul`, `quit` -- and answers each with one JSON line on stdout (everything else the
libraries print goes to stderr), so that its rounds interleave with another system's.

The workload (`--spec`, JSON; DEFAULT_SPEC is the issue workload): policy and reference
`LlamaForCausalLM`, value and reward `LlamaForSequenceClassification` (num_labels 1), each
randomly initialised (seeds 0..3), f32; `batch` prompts of exactly `prompt_len` tokens
drawn as bench_ppo draws them (`np.random.default_rng(seed).integers(4, vocab, (B, P))`);
`PPOConfig`: response_length N, stop_token / stop_token_id None, no missing-EOS penalty,
num_ppo_epochs, num_mini_batches, per_device_train_batch_size = B (one rollout batch of B
episodes; gradient_accumulation_steps 1, so each minibatch is one optimiser step),
local_rollout_forward_batch_size B, kl_coef, kl_estimator k1, temperature, f32 (bf16 and
fp16 off), no evaluation, no sample generations, no logging / saving, report_to none.

Fixed-length responses: the policy's `generation_config.eos_token_id` is None (TRL sets it
from stop_token_id) and the model configs have no EOS or pad id, so `generate` never ends
a row before N new tokens. The "tokenizer" TRL sees is a stand-in whose pad id is
`vocab` (a token no model can emit or receive): TRL derives attention masks, sequence
lengths and the reward position from `token != pad_token_id`, so with an in-vocabulary
pad id every sampled pad token would be masked out and end its episode early; with this
one every episode is exactly P + N tokens, all attended to. Its eos id (2) only feeds
TRL's `val/num_eos_tokens` metric (missing_eos_penalty is None).

Timing: a TrainerCallback holds `PPOTrainer.train`'s loop between updates (in
`on_train_begin` / `on_step_end`, waiting for the next command). `iter` releases one
update; its time runs from the release to the next `on_step_end`: exactly one pass of
TRL's loop body (rollout: generation, reference / value / reward forwards; rewards, GAE,
whitening; the epochs x minibatches of forward + backward + AdamW; metrics; TRL's own
`empty_cache()` / `gc.collect()` calls). `gen` times `batch_generation` alone, as the loop
calls it (the unwrapped policy, the loop's GenerationConfig, all B prompts in one call).
`matmul` times torch's f32 2048 x 2048 @ 2048 x 2048.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

DEFAULT_SPEC = {
  "model": {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
  },
  "batch": 64,
  "prompt_len": 32,
  "response_length": 32,
  "temperature": 1.0,
  "num_ppo_epochs": 1,
  "num_mini_batches": 4,
  "kl_coef": 0.02,
  "seed": 0,
}
PEAK_N = 2048
EOS_ID = 2  # bench_ppo's EOS id: only TRL's `val/num_eos_tokens` metric reads it


class _Quit(Exception):
  pass


class _Tokens:
  """What PPOTrainer reads of its `processing_class` (no text is ever decoded)."""

  def __init__(self, vocab_size: int):
    self.pad_token_id = vocab_size  # out of the vocabulary: never sampled (module docstring)
    self.eos_token_id = EOS_ID


def versions() -> dict:
  import accelerate
  import datasets
  import torch
  import transformers
  import trl

  return {
    "torch": torch.__version__,
    "trl": trl.__version__,
    "transformers": transformers.__version__,
    "accelerate": accelerate.__version__,
    "datasets": datasets.__version__,
    "peer_python": sys.version.split()[0],
  }


def build(spec: dict, workdir: str):
  """(trainer, queries, generation_config) for `spec`; nothing is run yet."""
  import numpy as np
  import torch
  from datasets import Dataset
  from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
  )
  from trl import PPOConfig, PPOTrainer

  torch.set_num_threads(os.cpu_count() or 1)  # what XLA's CPU client uses
  m = dict(spec["model"])
  theta = float(m.pop("rope_theta"))
  common = dict(
    m,
    rope_theta=theta,  # transformers < 5
    rope_parameters={"rope_type": "default", "rope_theta": theta},  # transformers >= 5
    pad_token_id=None,  # no padding_idx row in the embedding, no pad in `generate`
    bos_token_id=1,
    eos_token_id=None,  # `generate` never stops early
  )

  def model(cls, seed: int, **extra):
    torch.manual_seed(seed)
    net = cls.from_config(LlamaConfig(**common, **extra)).to(torch.float32)
    if getattr(net, "generation_config", None) is not None:  # causal LMs only
      net.generation_config.eos_token_id = net.generation_config.pad_token_id = None
    return net

  policy = model(AutoModelForCausalLM, 0)
  ref = model(AutoModelForCausalLM, 1)
  value = model(AutoModelForSequenceClassification, 2, num_labels=1)
  reward = model(AutoModelForSequenceClassification, 3, num_labels=1)

  b, p, n, vocab = spec["batch"], spec["prompt_len"], spec["response_length"], m["vocab_size"]
  prompts = np.random.default_rng(spec["seed"]).integers(4, vocab, (b, p)).astype(np.int64)
  dataset = Dataset.from_dict({"input_ids": prompts.tolist()})
  collate = lambda rows: {"input_ids": torch.tensor([r["input_ids"] for r in rows])}
  args = PPOConfig(
    output_dir=workdir,
    per_device_train_batch_size=b,
    gradient_accumulation_steps=1,
    num_mini_batches=spec["num_mini_batches"],
    num_ppo_epochs=spec["num_ppo_epochs"],
    total_episodes=b * 1_000_000,  # the loop runs until `quit`
    local_rollout_forward_batch_size=b,
    response_length=n,
    stop_token=None,
    stop_token_id=None,
    missing_eos_penalty=None,
    temperature=spec["temperature"],
    kl_coef=spec["kl_coef"],
    kl_estimator="k1",
    num_sample_generations=0,
    eval_strategy="no",
    save_strategy="no",
    logging_strategy="no",
    report_to="none",
    disable_tqdm=True,
    bf16=False,
    fp16=False,
    use_cpu=True,
    seed=spec["seed"],
    dataloader_num_workers=0,
  )
  trainer = PPOTrainer(
    args=args,
    processing_class=_Tokens(vocab),
    model=policy,
    ref_model=ref,
    reward_model=reward,
    value_model=value,
    train_dataset=dataset,
    eval_dataset=dataset,  # never read (no evaluation, no sample generations)
    data_collator=collate,
  )
  from transformers.trainer_callback import PrinterCallback, ProgressCallback

  for cb in (PrinterCallback, ProgressCallback):  # the per-update log lines
    trainer.remove_callback(cb)
  # PPOTrainer.train's own GenerationConfig (ppo_trainer.py), for `gen`.
  gen_config = GenerationConfig(
    max_new_tokens=n,
    temperature=spec["temperature"] + 1e-7,
    top_k=0.0,
    top_p=1.0,
    do_sample=True,
  )
  return trainer, torch.tensor(prompts), gen_config


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--spec", default="", help="the workload as JSON (default: DEFAULT_SPEC)")
  ap.add_argument("--serve", action="store_true", help="commands on stdin (bench_peers.py)")
  ap.add_argument("--rounds", type=int, default=7, help="standalone: timed rounds")
  ap.add_argument("--warmup", type=int, default=2, help="standalone: untimed rounds first")
  args = ap.parse_args(argv)
  spec = {**DEFAULT_SPEC, **json.loads(args.spec)} if args.spec else DEFAULT_SPEC

  if args.serve:  # stdout is the protocol; the libraries' prints go to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    commands = ((line.strip(), {}) for line in sys.stdin)
  else:  # (command, what its answer also says)
    proto = sys.stdout
    commands = iter(
      [
        *(
          (cmd, {"round": r, "warmup": r < args.warmup})
          for r in range(args.warmup + args.rounds)
          for cmd in ("gen", "iter")
        ),
        ("quit", {}),
      ]
    )

  def emit(event: dict, meta: dict | None = None):
    proto.write(json.dumps({**event, **(meta or {})}) + "\n")
    proto.flush()

  import torch
  from transformers import TrainerCallback
  from trl.models.utils import unwrap_model_for_generation
  from trl.trainer.utils import batch_generation

  t = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="trl_ppo_") as workdir:
    trainer, queries, gen_config = build(spec, workdir)
    b, p = spec["batch"], spec["prompt_len"]
    pad = trainer.processing_class.pad_token_id
    a = torch.randn(PEAK_N, PEAK_N, generator=torch.Generator().manual_seed(2))
    optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    emit(
      {
        "event": "ready",
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "params": sum(x.numel() for x in trainer.policy_model.parameters()),
        "optimizer": f"{optim} lr {trainer.args.learning_rate:g}",
        "attention": trainer.policy_model.config._attn_implementation,
        "setup_s": time.perf_counter() - t,
      }
    )

    class Driver(TrainerCallback):
      t0, meta = None, {}

      def on_train_begin(self, *args, **kwargs):
        self.serve()

      def on_step_end(self, _args, state, *rest, **kwargs):
        s = time.perf_counter() - self.t0
        emit({"event": "iter", "s": s, "episodes": b, "step": state.global_step}, self.meta)
        self.serve()

      def serve(self):
        for cmd, meta in commands:
          if cmd == "iter":
            self.meta, self.t0 = meta, time.perf_counter()
            return
          if cmd == "gen":
            with (
              torch.no_grad(),
              unwrap_model_for_generation(trainer.model, trainer.accelerator) as unwrapped,
            ):
              t = time.perf_counter()
              qr, _ = batch_generation(unwrapped.policy, queries, b, pad, gen_config)
              s = time.perf_counter() - t
            responses = qr[:, p:]
            new = int((responses != pad).sum())
            emit({"event": "gen", "s": s, "new_tokens": new, "shape": list(qr.shape)}, meta)
          elif cmd == "matmul":
            t = time.perf_counter()
            a @ a
            s = time.perf_counter() - t
            emit({"event": "matmul", "s": s, "gflop_per_s": 2 * PEAK_N**3 / s / 1e9}, meta)
          elif cmd == "quit":
            raise _Quit
          else:
            emit({"event": "error", "message": f"unknown command {cmd!r}"}, meta)
        raise _Quit  # stdin closed

    trainer.add_callback(Driver())
    with contextlib.suppress(_Quit):
      trainer.train()
  return 0


if __name__ == "__main__":
  sys.exit(main())
