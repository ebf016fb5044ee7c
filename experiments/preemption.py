"""Preemption harness: interrupt each stage at random moments; the resumed runs must match.

  python experiments/preemption.py --kills 20                       # every stage + pipeline
  python experiments/preemption.py --kills 5 --stages rm,ppo --workdir runs/preempt
  python experiments/preemption.py --kills 20 --stages pipeline --modes sigint  # Ctrl-C

For each stage (pretrain, sft, rm, ppo on the runlocal world, then the pipeline as a
whole) it builds the stage's inputs once, runs the stage once uninterrupted (the
reference, and its wall time T), then runs it again from the same inputs as a user's
preemptible job would: `rlhf-jax <stage>` is started, interrupted, restarted, ... until
it completes. The interruptions (`--modes`) are, in turn:

- `random`: a SIGKILL at a uniform random time in [0.2 s, T];
- `checkpoint`: a SIGKILL the moment a checkpoint write is seen in progress (an Orbax
  `*.orbax-checkpoint-tmp*` directory; `mid_write` counts the kills that left one);
- `sigint`: a SIGINT (Ctrl-C) at a uniform random time in [0.2 s, T], which must end
  the run with exit status 130 and its stop message (`sigint_ok`);
- `sigterm`: a SIGTERM once a new metrics line is written, which must end it with exit
  status 0 and its stop message (`sigterm_ok`).

A signal stops a training loop at its next logging step, after a checkpoint
(`*_in_loop`: the message says so), and anything else at once (rlhf_jax/interrupts.py).
When a run completes before its share of interruptions, the stage starts over from its
inputs (a new episode), so every stage gets `--kills` of them. Each episode's result
must be bitwise identical to the reference: every parameter of the stage's export and
every logged metric (the throughput ones aside); for the pipeline, every stage's and the
evaluation summary.

Prints a table (stage, episodes, interruptions, those during a checkpoint write, the
signals of each kind, those that ended as they must and those that checkpointed in the
loop, resumes, identical finals) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.stages import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/default.py:runlocal"
# Frequent checkpoints (the same for the reference and the interrupted runs: a run also
# logs at every checkpoint).
OVERRIDES = (
  "pretrain.save_every=5",
  "sft.save_every=4",
  "rm.save_every=4",
  "ppo.save_every=2",
  "ppo_ptx.save_every=2",
)
HARNESSED = ("pretrain", "sft", "rm", "ppo")  # the stages run alone under kills
# `pipeline` runs every stage; its trained ones' exports are compared.
PIPELINE_STAGES = tuple(s.name for s in registry.stages() if s.exports != "data")
# stage -> the stages whose outputs it starts from (from the stage registry)
UPSTREAM = {stage: registry.upstream([stage])[:-1] for stage in HARNESSED} | {"pipeline": ()}
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def command(stage: str, workdir: str) -> list[str]:
  args = [sys.executable, "-m", "rlhf_jax", stage, "--config", CONFIG, "--workdir", workdir]
  return args + [f"--config.{o}" for o in OVERRIDES]


def run_through(stage: str, workdir: str) -> float:
  """Run `stage` to completion; its wall seconds."""
  t = time.time()
  r = subprocess.run(command(stage, workdir), env=ENV, cwd=REPO, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{stage} in {workdir} failed:\n{r.stderr[-3000:]}")
  return time.time() - t


def prepare_inputs(root: str, stages) -> str:
  """A work directory with the inputs of `stages` done once (copied out for each run)."""
  base = os.path.join(root, "base")
  need = {s for stage in stages for s in UPSTREAM[stage]}
  for stage in registry.names():
    if stage in need and not os.path.exists(os.path.join(base, stage, "params.json")):
      run_through(stage, base)  # (complete stages are skipped; data has no params.json)
  return base


def inputs_copy(base: str, stage: str, dst: str) -> str:
  shutil.rmtree(dst, ignore_errors=True)
  os.makedirs(dst)
  for name in UPSTREAM[stage]:
    shutil.copytree(os.path.join(base, name), os.path.join(dst, name), symlinks=True)
  return dst


def _params(path: str) -> list[np.ndarray]:
  tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _metrics(stage_dir: str) -> list[dict]:
  from rlhf_jax.train import metrics_io

  return [
    {k: v for k, v in r.items() if not k.endswith("per_s")}
    for r in metrics_io.read_metrics(stage_dir)
  ]


def _summary(workdir: str) -> dict:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return {}
  drop = lambda d: {
    k: drop(v) if isinstance(v, dict) else v
    for k, v in d.items()
    if "wall" not in k and "seconds" not in k
  }
  return drop(json.load(open(path)))


def result(stage: str, workdir: str) -> dict:
  """What must not change: params and metrics of the stage (every stage, the pipeline)."""
  stages = PIPELINE_STAGES if stage == "pipeline" else (stage,)
  out = {s: (_params(f"{workdir}/{s}/params"), _metrics(f"{workdir}/{s}")) for s in stages}
  if stage == "pipeline":
    out["summary"] = _summary(workdir)
  return out


def identical(a: dict, b: dict) -> bool:
  for k in a:
    if k == "summary":
      if a[k] != b[k]:
        return False
      continue
    (pa, ma), (pb, mb) = a[k], b[k]
    if len(pa) != len(pb) or ma != mb:
      return False
    if not all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(pa, pb, strict=True)):
      return False
  return True


def differences(a: dict, b: dict) -> list[str]:
  out = []
  for k in a:
    if k == "summary":
      out += ["summary"] if a[k] != b[k] else []
      continue
    (pa, ma), (pb, mb) = a[k], b[k]
    if ma != mb:
      out.append(f"{k} metrics (steps {[r['step'] for r in ma]} vs {[r['step'] for r in mb]})")
    if len(pa) != len(pb) or not all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True)):
      out.append(f"{k} params")
  return out


def _ckpt_dirs(stage: str, workdir: str) -> list[str]:
  stages = PIPELINE_STAGES if stage == "pipeline" else (stage,)
  return [f"{workdir}/{s}/checkpoints" for s in stages]


def _writing(dirs: list[str]) -> bool:
  for d in dirs:
    try:
      if any("orbax-checkpoint-tmp" in n for n in os.listdir(d)):
        return True
    except FileNotFoundError:
      continue
  return False


def _metric_lines(stage: str, workdir: str) -> int:
  stages = PIPELINE_STAGES if stage == "pipeline" else (stage,)
  n = 0
  for s in stages:
    try:
      with open(f"{workdir}/{s}/metrics.jsonl") as f:
        n += sum(1 for _ in f)
    except FileNotFoundError:
      pass
  return n


# mode -> (the signal, the exit status it must end the run with); the others SIGKILL
SIGNALS = {"sigint": (signal.SIGINT, 130), "sigterm": (signal.SIGTERM, 0)}
MODES = ("random", "checkpoint", "sigint", "checkpoint", "sigterm")


def _complete(stage: str, workdir: str) -> bool:
  """Whether the run's outputs are all written: what is left is the process's exit, which
  a signal no longer interrupts (the interpreter's teardown stops handling them)."""
  if stage == "pipeline":
    return os.path.exists(os.path.join(workdir, "report.md"))  # (evaluation's last write)
  return registry.get(stage).is_complete(workdir)


def interrupt(
  proc: subprocess.Popen, stage: str, workdir: str, mode: str, t_ref: float, rng: random.Random
) -> dict:
  """Interrupt `proc` as `mode` says; what happened (`killed` False if it finished)."""
  deadline = time.time() + 4 * t_ref + 60
  dirs = _ckpt_dirs(stage, workdir)
  if mode in ("random", "sigint"):
    until = time.time() + rng.uniform(0.2, t_ref)
    while time.time() < until and proc.poll() is None:
      time.sleep(0.005)
  elif mode == "checkpoint":
    while not _writing(dirs) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.001)
  else:  # sigterm, once the training loop is logging
    start = _metric_lines(stage, workdir)
    while _metric_lines(stage, workdir) <= start and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
  if proc.poll() is not None or _complete(stage, workdir):
    proc.wait()
    return {"killed": False}
  signum, status = SIGNALS.get(mode, (signal.SIGKILL, -signal.SIGKILL))
  proc.send_signal(signum)
  proc.wait()
  out = {"killed": True, "mode": mode, "mid_write": _writing(dirs)}
  if mode in SIGNALS:
    log = _log(proc)
    name = signal.Signals(signum).name
    out["exit_ok"] = proc.returncode == status
    stopped = (f"rlhf-jax: {name}: checkpointed step", f"rlhf-jax: {name}: stopped;")
    out["ok"] = proc.returncode == status and any(m in log for m in stopped)
    out["in_loop"] = f"{name}: checkpointed" in log
    if not out["ok"]:
      print(f"{stage}: {name} ended with exit status {proc.returncode}:\n{log[-2000:]}")
  return out


def _start(stage: str, workdir: str) -> subprocess.Popen:
  # stderr to a file: a pipe nobody reads until the end could fill and stall the run
  log = open(os.path.join(workdir, f".attempt-{time.time_ns()}.log"), "w+")
  proc = subprocess.Popen(
    command(stage, workdir), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log
  )
  proc.log = log
  return proc


def _log(proc: subprocess.Popen) -> str:
  proc.log.seek(0)
  text = proc.log.read()
  proc.log.close()
  return text


def harness(
  stage: str, root: str, base: str, kills: int, rng: random.Random, modes: tuple[str, ...] = MODES
) -> dict:
  """`kills` interruptions of `stage` (`modes` in turn) over as many episodes as it
  takes; the counts."""
  ref_dir = inputs_copy(base, stage, os.path.join(root, f"{stage}_reference"))
  t_ref = run_through(stage, ref_dir)
  reference = result(stage, ref_dir)
  row = {
    "stage": stage,
    "reference_s": round(t_ref, 1),
    "episodes": 0,
    "kills": 0,
    "mid_write": 0,
    **{f"{m}{c}": 0 for m in SIGNALS for c in ("", "_ok", "_exit_ok", "_in_loop")},
    "resumes": 0,
    "identical": 0,
  }
  while row["kills"] < kills:
    wd = inputs_copy(base, stage, os.path.join(root, f"{stage}_episode{row['episodes']}"))
    row["episodes"] += 1
    while True:
      proc = _start(stage, wd)
      mode = modes[row["kills"] % len(modes)]
      if row["kills"] >= kills:  # enough: let this run finish
        proc.wait()
        if proc.returncode:
          raise RuntimeError(f"{stage}: a resumed run failed:\n{_log(proc)[-3000:]}")
        break
      what = interrupt(proc, stage, wd, mode, t_ref, rng)
      if not what["killed"]:
        if proc.returncode:
          raise RuntimeError(f"{stage}: a resumed run failed:\n{_log(proc)[-3000:]}")
        break
      if mode not in SIGNALS:
        proc.log.close()
      row["kills"] += 1
      row["resumes"] += 1
      row["mid_write"] += int(what["mid_write"])
      if mode in SIGNALS:
        row[mode] += 1
        for c in ("ok", "exit_ok", "in_loop"):
          row[f"{mode}_{c}"] += int(what[c])
    if identical(reference, result(stage, wd)):
      row["identical"] += 1
      shutil.rmtree(wd, ignore_errors=True)
    else:  # kept for inspection
      row.setdefault("differing", []).append(wd)
      print(f"{stage}: {wd} differs from {ref_dir}: {differences(reference, result(stage, wd))}")
  return row


COLUMNS = (
  "stage",
  "reference_s",
  "episodes",
  "kills",
  "mid_write",
  "sigint",
  "sigint_ok",
  "sigint_in_loop",
  "sigterm",
  "sigterm_ok",
  "sigterm_in_loop",
  "resumes",
  "identical",
)
STAGES = "pretrain,sft,rm,ppo,pipeline"


def table(out: dict) -> str:
  """The Markdown table `main` prints, one row per stage, from its JSON (`out`)."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  return "\n".join(
    lines + ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in out["rows"]]
  )


def command_line(out: dict) -> str:
  """The command line that produced `out` (its non-default flags)."""
  args = ["python experiments/preemption.py", f"--kills {out['kills_per_stage']}"]
  stages = ",".join(r["stage"] for r in out["rows"])
  if stages != STAGES:
    args.append(f"--stages {stages}")
  if tuple(out["modes"]) != MODES:
    args.append(f"--modes {','.join(out['modes'])}")
  if out["seed"] != 0:
    args.append(f"--seed {out['seed']}")
  return " ".join(args)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--kills", type=int, default=20, help="interruptions per stage")
  ap.add_argument("--stages", default=STAGES)
  ap.add_argument("--workdir", default="runs/preemption")
  ap.add_argument(
    "--modes",
    default=",".join(MODES),
    help="the interruptions, in turn: random, checkpoint (SIGKILL), sigint, sigterm",
  )
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help="also write the JSON here (README renders it)")
  args = ap.parse_args(argv)
  modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
  if not modes or set(modes) - {"random", "checkpoint", *SIGNALS}:
    raise SystemExit(f"--modes: {args.modes!r} (known: random, checkpoint, sigint, sigterm)")
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  rng = random.Random(args.seed)
  t0 = time.time()
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  unknown = set(stages) - set(UPSTREAM)
  if unknown:
    raise SystemExit(f"unknown stages {sorted(unknown)} (known: {', '.join(UPSTREAM)})")
  base = prepare_inputs(root, stages)
  rows = []
  for stage in stages:
    rows.append(harness(stage, root, base, args.kills, rng, modes))
    r = rows[-1]
    print(
      f"{stage}: {r['kills']} kills over {r['episodes']} episodes, identical "
      f"{r['identical']}/{r['episodes']}",
      flush=True,
    )
  out = {
    "rows": rows,
    "kills_per_stage": args.kills,
    "modes": modes,
    "seed": args.seed,
    "all_identical": all(r["identical"] == r["episodes"] for r in rows),
    "wall_s": round(time.time() - t0, 1),
  }
  print("\n" + table(out))
  print(json.dumps(out))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
