"""beta ablation (InstructGPT Figs. 34, 36): PPO's KL coefficient, without ptx.

  python experiments/ablation_beta.py --workdir runs/beta --shared runs/stages

Runs configs/sweeps/beta.py (beta in {0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0} x 3
seeds of PPO on one SFT and one RM; resumable) and writes runs/beta/ablation_beta.{md,
json,png}: per beta the gold win rate against SFT, KL to SFT and the alignment tax
(held-out LM loss, zero-shot accuracy), mean ± 95% CI over the seeds. About 40 min on a
2-core CPU (5 min of shared stages).

The paper: raising the KL coefficient does not remove PPO's regressions on public NLP
datasets (Figs. 34, 36); mixing in pretraining gradients does (ablation_ptx.py).
"""

from __future__ import annotations

import paper_common as pc  # (experiments/ is on sys.path when run as a script)

KEY = "ppo.kl_coef"
POLICY = "ppo"


def metrics(policy: str) -> list[str]:
  """The summary metrics tabulated per setting: the policy's five, then SFT's two."""
  p = f"policies.{policy}"
  return [
    f"{p}.winrate_vs_sft",
    f"{p}.gold_score",
    f"{p}.kl_to_sft",
    f"{p}.heldout_lm_loss",
    f"{p}.zero_shot_mean",
    "policies.sft.heldout_lm_loss",
    "policies.sft.zero_shot_mean",
  ]


def table(data: dict, policy: str = POLICY, label: str = "beta") -> str:
  """The Markdown table of `<name>.json` (`{"key", "entries"}`): per setting, the seeds
  and the policy's metrics, mean ± 95% CI (README renders it: readme_tables.py)."""
  header = [
    label,
    "seeds",
    "win rate vs SFT (gold)",
    "gold score",
    "KL to SFT",
    "held-out LM loss",
    "zero-shot acc.",
  ]
  ms = metrics(policy)[:5]
  return pc.markdown(
    header, [[e["x"], e["seeds"], *(pc.fmt(e[m]) for m in ms)] for e in data["entries"]]
  )


def sft_note(data: dict) -> str:
  """SFT's alignment-tax figures, the baseline of the table ("" when not measured)."""
  e = data["entries"][0]
  sft, sft_zs = (e[f"policies.sft.{m}"]["mean"] for m in ("heldout_lm_loss", "zero_shot_mean"))
  return "" if sft is None else f"SFT: held-out LM loss {sft:.3f}, zero-shot accuracy {sft_zs:.3f}."


def main(
  doc: str = __doc__,
  spec: str = "configs/sweeps/beta.py",
  key: str = KEY,
  policy: str = POLICY,
  name: str = "ablation_beta",
  label: str = "beta",
) -> None:
  args, overrides = pc.parse(doc, spec)
  rows = pc.run_sweep(args, overrides)
  ms = metrics(policy)
  entries = pc.by_setting(rows, key, ms)
  data = {"key": key, "entries": entries}
  text = table(data, policy, label)
  note = sft_note(data)
  if note:
    text += "\n\n" + note
  sft = entries[0]["policies.sft.heldout_lm_loss"]["mean"]
  sft_zs = entries[0]["policies.sft.zero_shot_mean"]["mean"]

  def plot(plt):
    xs = [float(e["x"]) for e in entries]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, m, title in zip(
      axes,
      (ms[0], ms[3], ms[4]),
      ("gold win rate vs SFT", "held-out LM loss", "zero-shot accuracy"),
      strict=True,
    ):
      pc.errorbars(ax, entries, m, xs, policy)
      ax.set_xscale("symlog", linthresh=min(x for x in xs if x > 0), linscale=0.5)
      ax.set_xticks(xs, [f"{x:g}" for x in xs], rotation=60, fontsize=8)
      ax.minorticks_off()
      ax.set_xlabel(label)
      ax.set_title(title)
    axes[0].axhline(0.5, color="gray", lw=0.8, ls="--", label="SFT")
    if sft is not None:
      axes[1].axhline(sft, color="gray", lw=0.8, ls="--", label="SFT")
      axes[2].axhline(sft_zs, color="gray", lw=0.8, ls="--", label="SFT")
    axes[0].legend()

  pc.write(args.workdir, name, text, data, plot)


if __name__ == "__main__":
  main()
