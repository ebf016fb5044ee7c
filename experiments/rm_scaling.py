"""Reward-model accuracy against the number of comparisons and against model size.

  python experiments/rm_scaling.py --workdir runs/rm --shared runs/stages

Runs configs/sweeps/rm_data.py (the default RM on the first 125 ... 2,000 comparisons,
three data orders each) into WORKDIR/data, then configs/sweeps/rm_size.py (RMs of three
sizes, each from an SFT model of its size, on the same comparisons: those of the data
sweep) into WORKDIR/size, and writes WORKDIR/rm_scaling.{md,json,png}: validation
accuracy against the labelers and against the gold judge's order. About 25 min on a
2-core CPU after the shared stages (most of it pretraining and SFT of the other sizes).

The paper trains 6B reward models (175B ones were unstable); reward-model accuracy
grows with data and size in later work (e.g. Gao et al. 2022).
"""

from __future__ import annotations

import json
import os

import paper_common as pc  # (experiments/ is on sys.path when run as a script)

from rlhf_jax import sweep

METRICS = ("rm.val_accuracy", "rm.val_gold_accuracy")


def table(data: dict) -> str:
  """The Markdown tables of rm_scaling.json (`{"by_comparisons", "by_size"}`): accuracy
  by training comparisons (mean ± 95% CI over data orders), then by model size."""
  text = "By comparisons (d_model 128; mean ± 95% CI over 3 data orders):\n\n" + pc.markdown(
    ["comparisons", "seeds", "accuracy vs labelers", "accuracy vs gold order"],
    [[e["x"], e["seeds"], *(pc.fmt(e[m]) for m in METRICS)] for e in data["by_comparisons"]],
  )
  fmt = lambda v: "–" if v is None else f"{v:.3f}"
  return (
    text
    + "\n\nBy size (2,000 comparisons, one run each):\n\n"
    + pc.markdown(
      ["parameters", "d_model x layers", "accuracy vs labelers", "accuracy vs gold order"],
      [
        [
          f"{s['params']:,}",
          f"{s['model.d_model']} x {s['model.n_layers']}",
          *(fmt(s[m]) for m in METRICS),
        ]
        for s in data["by_size"]
      ],
    )
  )


def main() -> None:
  args, overrides = pc.parse(__doc__, "configs/sweeps/rm_data.py")
  root = args.workdir
  shared = args.shared or os.path.join(root, "stages")
  data_args = type(args)(**{**vars(args), "workdir": f"{root}/data", "shared": shared})
  rows = pc.run_sweep(data_args, overrides)
  by_n = pc.by_setting(rows, "rm.max_comparisons", METRICS)
  with open(f"{root}/data/sweep.json") as f:
    fp = json.load(f)["points"][0]["fingerprints"]["comparisons"]
  comparisons = sweep.stage_dir(shared, "comparisons", fp)
  size_args = type(args)(
    **{
      **vars(args),
      "workdir": f"{root}/size",
      "shared": shared,
      "config": "configs/sweeps/rm_size.py",
    }
  )
  given = [
    ("comparisons.user_train", f"{comparisons}/train.jsonl"),
    ("comparisons.user_validation", f"{comparisons}/validation.jsonl"),
  ]
  size_rows = pc.run_sweep(size_args, [*overrides, *given])
  sizes = []
  for r in size_rows:
    o = r["overrides"]
    n = pc.model_params(o["model.d_model"], o["model.n_layers"], o["model.mlp_dim"], "scalar")
    sizes.append(
      {"params": n, **o, "status": r["status"], **{m: r["metrics"].get(m) for m in METRICS}}
    )

  data = {"by_comparisons": by_n, "by_size": sizes}

  def plot(plt):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [float(e["x"]) for e in by_n]
    for m, label in zip(METRICS, ("vs labelers", "vs gold order"), strict=True):
      pc.errorbars(a, by_n, m, xs, label)
      b.plot([s["params"] for s in sizes], [s[m] for s in sizes], marker="o", label=label)
    a.set(xscale="log", xlabel="training comparisons", ylabel="validation accuracy")
    b.set(xscale="log", xlabel="parameters", ylabel="validation accuracy")
    ns = [s["params"] for s in sizes]
    for ax, ticks, labels in (
      (a, xs, [f"{x:,.0f}" for x in xs]),
      (b, ns, [f"{n / 1e6:.2f}M" for n in ns]),
    ):
      ax.minorticks_off()  # (log-axis minor labels overlap)
      ax.set_xticks(ticks, labels)
    a.legend(), b.legend()

  pc.write(root, "rm_scaling", table(data), data, plot)


if __name__ == "__main__":
  main()
