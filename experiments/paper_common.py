"""What the paper-artefact scripts share: run a sweep, tabulate it by setting, plot it.

Each artefact script (ablation_beta.py, ablation_ptx.py, overoptimization.py,
rm_scaling.py, figure1.py) runs its sweep with `rlhf_jax.sweep` (resumable; `--shared`
lets several artefacts train their common stages once) and writes, next to the sweep's
own results.{json,csv,md}, `<name>.md`, `<name>.json` and `<name>.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from rlhf_jax import config_lib, sweep


def parse(doc: str, default_config: str) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
  """--workdir, --shared, --config, --workers and `--config.a.b=v` overrides."""
  ap = argparse.ArgumentParser(description=doc.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--shared", default="", help="stage outputs shared with other sweeps")
  ap.add_argument("--config", default=default_config)
  ap.add_argument("--workers", type=int, default=1)
  args, rest = ap.parse_known_args()
  overrides, unknown = config_lib.parse_overrides(rest)
  if unknown:
    ap.error(f"unknown arguments: {unknown}")
  return args, overrides


def run_sweep(args, overrides) -> list[dict[str, Any]]:
  return sweep.run(args.config, args.workdir, overrides, workers=args.workers, shared=args.shared)


def by_setting(rows: Sequence[dict], key: str, metrics: Sequence[str]) -> list[dict[str, Any]]:
  """One entry per value of `key` (in sweep order): n ok seeds, and per metric the mean
  and the 95% t-interval half-width over the seeds."""
  out: dict[Any, dict[str, Any]] = {}
  for r in rows:
    x = r["overrides"].get(key)
    out.setdefault(x, {"x": x, "rows": []})["rows"].append(r)
  for entry in out.values():
    ok = [r for r in entry.pop("rows") if r["status"] == "ok"]
    entry["seeds"] = len(ok)
    for m in metrics:
      mean, half = sweep.mean_ci([r["metrics"].get(m) for r in ok])
      entry[m] = {"mean": finite(mean), "ci95_half": finite(half)}
  return list(out.values())


def finite(x: float) -> float | None:
  return None if x is None or not math.isfinite(x) else x


def fmt(cell: dict[str, Any]) -> str:
  if cell["mean"] is None:
    return "–"
  half = cell["ci95_half"]
  return f"{cell['mean']:.3f}" + ("" if half is None else f" ± {half:.3f}")


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def write(workdir: str, name: str, table: str, data: Any, plot: Callable[[Any], None]) -> None:
  """`<name>.md` (the table), `<name>.json` (the numbers) and `<name>.png` (via `plot`,
  given a matplotlib pyplot module)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(os.path.join(workdir, f"{name}.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, f"{name}.json"), "w") as f:
    json.dump(data, f, indent=1)
  plot(plt)
  plt.tight_layout()
  plt.savefig(os.path.join(workdir, f"{name}.png"), dpi=120)
  plt.close("all")
  print(table)
  print(f"wrote {workdir}/{name}.{{md,json,png}}")


def errorbars(ax, entries: Sequence[dict], metric: str, xs: Sequence[float], label: str = ""):
  ys = [e[metric]["mean"] for e in entries]
  err = [e[metric]["ci95_half"] or 0.0 for e in entries]
  ok = [i for i, y in enumerate(ys) if y is not None]
  ax.errorbar(
    [xs[i] for i in ok],
    [ys[i] for i in ok],
    yerr=[err[i] for i in ok],
    marker="o",
    capsize=3,
    label=label,
  )


def model_params(
  d_model: int, n_layers: int, mlp_dim: int, head: str = "lm", vocab: int = 1024
) -> int:
  """Parameters of the default model family (untied embeddings, full attention heads,
  SwiGLU, RMSNorm) with an LM head or a scalar head (checked against `count_params`)."""
  block = 4 * d_model * d_model + 3 * d_model * mlp_dim + 2 * d_model
  out = {"lm": d_model * vocab, "scalar": d_model + 1}[head]
  return vocab * d_model + n_layers * block + d_model + out
