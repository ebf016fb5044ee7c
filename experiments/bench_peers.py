"""Our PPO iteration against TRL's PPOTrainer on the same workload, interleaved, same run.

  python experiments/bench_peers.py --peer-python /work/hfvenv/bin/python
  python experiments/bench_peers.py --peer-python /work/hfvenv/bin/python --rounds 7 \\
      --out experiments/results/bench_peers.json

`--peer-python` (default: $RLHF_JAX_PEER_PYTHON) is a Python with torch 2.13.0 and trl
0.19.1 (transformers 5.24.0 measured); without one, or when it cannot import torch and
trl, the script prints how to make one and exits 2. It installs nothing, and torch / trl
are no dependency of this package: the peer runs as a subprocess in its own environment
(experiments/peers/trl_ppo.py, which imports only torch, transformers, trl).

Workload: bench_ppo's "issue" workload (`configs/ppo.py:size=s` + bench_ppo.ISSUE_OVERRIDES;
`--config` / `--config.x=y` apply on top, f32 models only): LLaMA-shaped, 4 layers,
d_model 256, 4 heads (4 KV heads), SwiGLU 1024, vocab 1024, RoPE theta 1e4, untied
embeddings, f32, random weights; 4 separately initialised models (policy and reference with
the LM head, value and reward with a scalar head); 64 prompts x 32 random tokens
(`np.random.default_rng(0).integers(4, 1024, (64, 32))`, the same tokens on both sides, no
padding); exactly 32 new tokens per episode (EOS never ends a row), temperature 1, top-k /
top-p off; 1 epoch x 4 minibatches of 16 (4 optimiser steps); k1 KL penalty, beta 0.02;
gamma 1, lambda 0.95, whitened advantages, clip 0.2 (policy and value). The peer gets the
model shape from `rlhf_jax.models.hf.hf_config(config.model)` (transformers'
`LlamaConfig` / `LlamaForSequenceClassification` num_labels 1), so both sides have the same
4,720,896 parameters per model; threads: XLA's CPU client uses every core, the peer
`torch.set_num_threads(os.cpu_count())`.

Measured, per system, in rounds: ours, TRL, then the matmul peak (JAX's jitted f32
2048^3 matmul, as bench_ppo's; and torch's, in the peer), so the blocks alternate A-B-A-B
in time and neither system runs while the other is timed (the idle one waits on a pipe).
A block is `--block` PPO iterations (one rollout + update of 64 episodes each) and one
generation call; `--warmup` untimed rounds first (after our compile and the peer's setup),
then `--rounds` (>= 7) timed ones. Per system: episodes/s = 64 / the median iteration
time over all timed iterations, with the min-max of 64 / (each block's median); new
tokens/s = 2048 / the median generation time (min-max over blocks). Ours: one call of
`iteration.jit_train_step` (the jitted rollout + update, blocked until ready) and of
`sampling.sample_tokens` (as bench_ppo times them). TRL: the time from releasing
`PPOTrainer.train`'s loop to its next `on_step_end` (one pass of its loop body, data loading
and its own `gc.collect()` included), and `batch_generation` as that loop calls it (peer
script's docstring).

What differs between the two workloads (same shapes, same episode count and length, same
prompts; the random weights differ, so the sampled tokens do):
  * LM head: ours computes logits only at the 32 positions that predict the response (the
    reference forward and the policy update); TRL's forwards compute them at all 64
    positions (and slice), about 3% more FLOPs per trunk+head forward at this shape.
  * Update: ours takes two optimiser steps per minibatch (policy and value, each AdamW with
    its own state after global-norm clipping at 1.0) from two separate backward passes;
    TRL takes one AdamW step (torch fused, no gradient clipping in its PPO loop) on
    pg_loss + 0.1 x vf_loss over the policy and value model together (PolicyAndValueWrapper:
    the same two trunks forward and backward). Learning rates and schedules differ (ours
    1e-4 after 10 warm-up steps, TRL 5e-5 decaying linearly); neither changes the work.
  * Generation: ours is one jitted sampler with a fixed-size KV cache; TRL is
    `transformers`' `generate` (DynamicCache, eager PyTorch, sdpa attention, logits
    processors, `output_scores=True`, which keeps the [64, 32, 1024] scores from which it
    takes the behaviour log-probs; ours takes them from the sampler too).
  * Rollout scoring: the same three full-sequence forwards (reference with LM head, value,
    reward), the policy's log-probs from the sampler in both; TRL's reward and value
    heads run on every position ([B, T, 1]) and it reads the last one.
  * Fixed length: ours turns EOS into an ordinary token (bench_ppo's NoEosSampling); TRL
    has stop_token None, no EOS in the generation config, and a pad id outside the
    vocabulary (so no sampled token is taken for padding; peer docstring).
    missing_eos_penalty None, our no_eos_penalty 0: no penalty in either.
  * Around the maths: ours also runs the numerical guard (finite checks, keep-if) and
    returns its metrics on device; TRL computes its metrics with `.item()` syncs, runs a
    Python loop of 32 steps for GAE, calls `gc.collect()`, loads the batch through a
    DataLoader (shuffled) and steps an LR scheduler each iteration.
  * Engines: ours is XLA-compiled (one program per iteration); TRL is eager PyTorch
    (torch's own CPU kernels / oneDNN).

Prints a table and, last, one JSON line; `--out` also writes the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import bench_ppo  # (experiments/ is on sys.path when run as a script)
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config_lib, sampling, sharding
from rlhf_jax.models import count_params, hf
from rlhf_jax.stages.ppo import iteration, rollout

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "trl_ppo.py")
PEER_ENV = "RLHF_JAX_PEER_PYTHON"
PINS = {"torch": "2.13.0", "trl": "0.19.1"}
PROBE = (
  "import json, torch, transformers, trl; print(json.dumps({'torch': torch.__version__, "
  "'trl': trl.__version__, 'transformers': transformers.__version__}))"
)
SETUP = (
  "python3 -m venv /work/hfvenv && /work/hfvenv/bin/pip install torch==2.13.0 "
  "--index-url https://download.pytorch.org/whl/cpu && /work/hfvenv/bin/pip install "
  "trl==0.19.1 transformers==5.24.0"
)
HF_MODEL_KEYS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "head_dim",
  "hidden_act",
  "max_position_embeddings",
  "rms_norm_eps",
  "rope_theta",
  "tie_word_embeddings",
  "attention_bias",
  "mlp_bias",
)
SYSTEMS = {"ours": "rlhf_jax (ours)", "trl": "TRL PPOTrainer"}
TIMEOUT_S = 900.0  # one answer of the peer (its setup, one iteration)


class PeerMissing(Exception):
  pass


def setup_hint(problem: str) -> str:
  """The one line printed when there is no usable peer environment."""
  return (
    f"bench_peers: no peer environment ({problem}); it needs --peer-python PATH (or "
    f"${PEER_ENV}), a Python with torch=={PINS['torch']} and trl=={PINS['trl']}. Create "
    f"one (nothing is installed for you): {SETUP}; then: python experiments/bench_peers.py "
    "--peer-python /work/hfvenv/bin/python"
  )


def probe_peer(python: str | None) -> dict:
  """The peer's torch / trl / transformers versions; PeerMissing (why) if it has none."""
  if not python:
    raise PeerMissing(f"no --peer-python and ${PEER_ENV} unset")
  try:
    proc = subprocess.run(
      [python, "-c", PROBE], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
  except (OSError, subprocess.TimeoutExpired) as e:
    raise PeerMissing(f"{python}: {e}") from None
  if proc.returncode != 0:
    last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    raise PeerMissing(f"{python}: {last}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_spec(config, c) -> dict:
  """The workload as trl_ppo.py's --spec: the model shape of `config.model` as a
  LlamaConfig, and the PPO numbers of `c` (config.ppo)."""
  h = hf.hf_config(config.model)
  return {
    "model": {k: h[k] for k in HF_MODEL_KEYS},
    "batch": c.batch_size,
    "prompt_len": c.prompt_len,
    "response_length": c.max_new_tokens,
    "temperature": c.temperature,
    "num_ppo_epochs": c.num_epochs,
    "num_mini_batches": c.num_minibatches,
    "kl_coef": c.kl_coef,
    "seed": 0,  # bench_ppo.random_run's prompt seed
  }


class Peer:
  """trl_ppo.py --serve in the peer's Python: one command a line in, one JSON line out."""

  def __init__(self, python: str, spec: dict):
    self.stderr = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    self.proc = subprocess.Popen(
      [python, PEER_SCRIPT, "--serve", "--spec", json.dumps(spec)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.stderr,
      text=True,
      env=env,
    )
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    self.ready = None  # its "ready" line (`wait_ready`), once its setup is done

  def wait_ready(self) -> dict:
    if self.ready is None:
      self.ready = self._answer("ready")
    return self.ready

  def _read(self):
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def _answer(self, event: str) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
      try:
        line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
      except queue.Empty:
        self.fail(f"no answer within {TIMEOUT_S:.0f} s")
      if line is None:
        self.fail(f"exited with status {self.proc.wait()}")
      msg = json.loads(line)
      if msg.get("event") != event:
        self.fail(f"answered {msg} to {event!r}")
      return msg

  def ask(self, cmd: str) -> dict:
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()
    return self._answer(cmd)

  def fail(self, what: str):
    self.close()
    self.stderr.seek(0)
    tail = self.stderr.read()[-3000:]
    raise RuntimeError(f"peer ({PEER_SCRIPT}) {what}; its stderr ends:\n{tail}")

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


class Ours:
  """bench_ppo's issue workload in this process: the jitted iteration, sampler, matmul."""

  def __init__(self, config):
    c = config.ppo
    setup, models, batch = bench_ppo.random_run(config, c, full_prompts=True)
    cfg = setup.model_cfg
    rollout.sampling = bench_ppo.NoEosSampling()  # fixed-length episodes; before tracing
    key = jax.random.PRNGKey(0)
    self.mesh, self.rules, self.batch = setup.mesh, setup.rules, batch
    self.state = rollout.init_state(setup, c, **models)
    self.params = int(count_params(self.state.policy))
    self.step = iteration.jit_train_step(setup, c)
    self.sample = bench_ppo.jit_sampler(cfg, c, key, stop_at_eos=False)
    n = bench_ppo.PEAK_N
    a = np.random.default_rng(2).standard_normal((n, n))
    self.a = jnp.asarray(a, jnp.float32)
    self.matmul = jax.jit(lambda x: x @ x)

  def _timed(self, fn):
    with sharding.use(self.mesh, self.rules):
      t = time.perf_counter()
      out = jax.block_until_ready(fn())
      return time.perf_counter() - t, out

  def iteration(self) -> float:
    def run():
      self.state, metrics = self.step(self.state, self.batch)  # the state is donated
      return metrics

    return self._timed(run)[0]

  def generation(self) -> tuple[float, int]:
    s, out = self._timed(lambda: self.sample(self.state.policy, self.batch["prompt_tokens"]))
    return s, int(np.asarray(jax.device_get(out.lengths)).sum())

  def matmul_s(self) -> float:
    return self._timed(lambda: self.matmul(self.a))[0]


def system_summary(iters: list[list[float]], gens: list[float], episodes: int, new: int):
  """Medians of one system: `iters` the iteration seconds of each timed block, `gens`
  one generation's seconds per block; min-max over the blocks' medians."""
  meds = [statistics.median(b) for b in iters]
  it = statistics.median([s for b in iters for s in b])
  gen = statistics.median(gens)
  return {
    "iteration_s": it,
    "episodes_per_s": episodes / it,
    "episodes_per_s_min": episodes / max(meds),
    "episodes_per_s_max": episodes / min(meds),
    "generation_s": gen,
    "new_tokens": new,
    "new_tokens_per_s": new / gen,
    "new_tokens_per_s_min": new / max(gens),
    "new_tokens_per_s_max": new / min(gens),
    "iteration_s_by_block": iters,
    "generation_s_by_block": gens,
  }


def report(out: dict) -> str:
  """The table `main` prints, from its JSON."""
  w = out["workload"]
  peak = out["matmul_peak_gflop_per_s"]
  lines = [
    f"{w['episodes']} episodes x ({w['prompt_len']} prompt + {w['new_tokens_per_episode']} new)"
    f" tokens, {w['params']:,} params x 4 models, {w['updates_per_iteration']} updates / "
    f"iteration; {out['rounds']} rounds x {out['block']} iteration(s) per system, "
    f"interleaved; machine {out['machine']['cpus']} CPUs, load average at start "
    + " ".join(f"{x:.2f}" for x in out["loadavg_start"]),
    f"matmul peak (f32, {bench_ppo.PEAK_N}^3, medians): jax {peak['jax']:.1f} GFLOP/s, "
    f"torch {peak['torch']:.1f} GFLOP/s",
    f"{'system':22}{'iteration s':>12}{'episodes/s':>12}{'(min-max)':>15}{'gen s':>8}"
    f"{'new tok/s':>11}{'(min-max)':>17}",
  ]
  for key, name in SYSTEMS.items():
    r = out["systems"][key]
    eps = f"({r['episodes_per_s_min']:.1f}-{r['episodes_per_s_max']:.1f})"
    tok = f"({r['new_tokens_per_s_min']:,.0f}-{r['new_tokens_per_s_max']:,.0f})"
    lines.append(
      f"{name:22}{r['iteration_s']:12.3f}{r['episodes_per_s']:12.1f}{eps:>15}"
      f"{r['generation_s']:8.3f}{r['new_tokens_per_s']:11,.0f}{tok:>17}"
    )
  ratio = out["ratio_ours_over_trl"]
  lines.append(
    f"{'ours / TRL':22}{'':12}{ratio['episodes_per_s']:11.2f}x{'':15}{'':8}"
    f"{ratio['new_tokens_per_s']:10.2f}x"
  )
  return "\n".join(lines)


def machine() -> dict:
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
  except OSError:
    pass
  return {
    "node": platform.node(),
    "platform": platform.platform(),
    "cpu": model,
    "cpus": os.cpu_count(),
  }


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--peer-python",
    default=os.environ.get(PEER_ENV),
    help=f"a Python with torch and trl (default: ${PEER_ENV})",
  )
  ap.add_argument("--config", default=bench_ppo.ISSUE_CONFIG)
  ap.add_argument("--rounds", type=int, default=7, help="timed rounds per system (>= 7)")
  ap.add_argument("--block", type=int, default=1, help="PPO iterations per block")
  ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after compile / setup")
  ap.add_argument("--out", default="", help="also write the JSON here")
  args, rest = ap.parse_known_args(argv)
  if args.rounds < 7:
    ap.error("--rounds: at least 7 (the figures are medians)")
  if args.block < 1 or args.warmup < 0:
    ap.error("--block: at least 1; --warmup: at least 0")
  overrides, rest = config_lib.parse_overrides(rest)
  if rest:
    ap.error(f"unknown arguments: {rest}")
  loadavg = list(os.getloadavg())
  try:
    peer_versions = probe_peer(args.peer_python)
  except PeerMissing as e:
    print(setup_hint(str(e)), file=sys.stderr)
    raise SystemExit(2) from None
  for name, pin in PINS.items():
    if not peer_versions[name].startswith(pin):
      print(f"bench_peers: warning: the peer has {name} {peer_versions[name]}, not {pin}")

  config = config_lib.get(args.config, bench_ppo.ISSUE_OVERRIDES + overrides)
  c = config.ppo
  if {config.model.dtype, config.model.param_dtype} != {"float32"}:
    ap.error("the peer runs float32 only: keep config.model.dtype / param_dtype float32")
  spec = peer_spec(config, c)
  b, n = c.batch_size, c.max_new_tokens

  peer = Peer(args.peer_python, spec)  # its imports and setup overlap our compiling
  try:
    ours = Ours(config)
    compile_s = {
      "iteration": ours.iteration(),
      "generation": ours.generation()[0],
      "matmul": ours.matmul_s(),
    }
    peer.wait_ready()
    if peer.ready["params"] != ours.params:
      print(f"bench_peers: warning: {peer.ready['params']:,} vs {ours.params:,} params")
    iters = {"ours": [], "trl": []}
    gens = {"ours": [], "trl": []}
    peaks = {"jax": [], "torch": []}
    new = {}

    def block(system: str) -> tuple[list[float], float]:
      if system == "ours":
        its = [ours.iteration() for _ in range(args.block)]
        s, new["ours"] = ours.generation()
      else:
        its = [peer.ask("iter")["s"] for _ in range(args.block)]
        g = peer.ask("gen")
        s, new["trl"] = g["s"], g["new_tokens"]
      return its, s

    for r in range(args.warmup + args.rounds):
      done = {}
      for system in ("ours", "trl"):
        its, s = done[system] = block(system)
        if r >= args.warmup:
          iters[system].append(its)
          gens[system].append(s)
      m_jax, m_torch = ours.matmul_s(), peer.ask("matmul")["s"]
      if r >= args.warmup:
        peaks["jax"].append(m_jax)
        peaks["torch"].append(m_torch)
      progress = ", ".join(
        f"{k} iteration {statistics.median(v[0]):.3f} s, generation {v[1]:.3f} s"
        for k, v in done.items()
      )
      warm = " (warm-up)" if r < args.warmup else ""
      print(f"round {r}{warm}: {progress}", file=sys.stderr, flush=True)
  finally:
    peer.close()
    rollout.sampling = sampling  # as it was (Ours patched it)
  for system, got in new.items():
    if got != b * n:
      raise RuntimeError(f"{system} generated {got} new tokens, not {b} x {n}")

  flop = 2 * bench_ppo.PEAK_N**3 / 1e9
  out = {
    "benchmark": "bench_peers",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join(["python", "experiments/bench_peers.py", *map(shlex.quote, argv)]),
    "machine": machine(),
    "loadavg_start": loadavg,
    "loadavg_end": list(os.getloadavg()),
    "versions": {
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      "numpy": np.__version__,
      "python": platform.python_version(),
      **peer.ready["versions"],
    },
    "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
    "peer_threads": peer.ready["threads"],
    "peer_optimizer": peer.ready["optimizer"],
    "peer_attention": peer.ready["attention"],
    "workload": {
      "config": args.config,
      "overrides": [f"--config.{k}={v}" for k, v in overrides],
      "episodes": b,
      "prompt_len": c.prompt_len,
      "new_tokens_per_episode": n,
      "updates_per_iteration": c.num_epochs * c.num_minibatches,
      "params": ours.params,
      "peer_params": peer.ready["params"],
      "peer_spec": spec,
    },
    "rounds": args.rounds,
    "block": args.block,
    "warmup": args.warmup,
    "matmul_peak_gflop_per_s": {k: flop / statistics.median(v) for k, v in peaks.items()},
    "matmul_s_by_round": peaks,
    "systems": {k: system_summary(iters[k], gens[k], b, new[k]) for k in SYSTEMS},
    "compile_s": compile_s,
    "peer_setup_s": peer.ready["setup_s"],
  }
  s = out["systems"]
  out["ratio_ours_over_trl"] = {
    k: s["ours"][k] / s["trl"][k] for k in ("episodes_per_s", "new_tokens_per_s")
  }
  print(report(out))
  print(json.dumps(out))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
