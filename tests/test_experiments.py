"""The paper-artefact scripts' own arithmetic: parameter counts, per-setting means and
intervals, and the over-optimisation curves, on hand-made inputs."""

import json
import os
import sys

import jax
import pytest

from rlhf_jax import config_lib, sweep
from rlhf_jax.models import TransformerConfig, count_params, init_params

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import overoptimization  # noqa: E402
import paper_common as pc  # noqa: E402


@pytest.mark.parametrize("dims", [(64, 2, 256), (192, 3, 768)])
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_model_params_equals_the_real_count(dims, head, repo_root):
  os.chdir(repo_root)
  d, n, m = dims
  config = config_lib.get(
    "configs/default.py",
    [("model.d_model", str(d)), ("model.n_layers", str(n)), ("model.mlp_dim", str(m))],
  )
  cfg = TransformerConfig.from_config(config.model)
  shapes = jax.eval_shape(lambda r: init_params(cfg, r, heads=(head,))[0], jax.random.key(0))
  assert pc.model_params(d, n, m, head) == count_params(shapes)


def test_by_setting_means_over_ok_seeds():
  rows = [
    {"overrides": {"b": b, "seed": s}, "status": st, "metrics": {"w": w}}
    for b, s, st, w in (
      (0.1, 0, "ok", 0.6),
      (0.1, 1, "ok", 0.7),
      (0.1, 2, "failed", None),
      (0.5, 0, "ok", 0.4),
    )
  ]
  out = pc.by_setting(rows, "b", ["w"])
  assert [e["x"] for e in out] == [0.1, 0.5] and [e["seeds"] for e in out] == [2, 1]
  mean, half = sweep.mean_ci([0.6, 0.7])
  assert out[0]["w"] == {"mean": pytest.approx(0.65), "ci95_half": pytest.approx(half)}
  assert out[1]["w"] == {"mean": 0.4, "ci95_half": None}
  assert pc.fmt(out[1]["w"]) == "0.400" and pc.fmt(out[0]["w"]) == f"0.650 ± {half:.3f}"


def test_overoptimisation_curves_find_the_gold_peak(tmp_path):
  root = str(tmp_path)
  rows = []
  for seed, golds in ((0, (0.3, 0.5, 0.4)), (1, (0.3, 0.6, 0.2))):
    name = f"rm.max_comparisons=250,ppo.seed={seed}"
    os.makedirs(f"{root}/points/{name}/ppo")
    lines = [{"step": 0, "ppo/gold_score": golds[0]}]
    for step, kl, g in ((5, 1.0, golds[1]), (10, 4.0, golds[2])):
      lines += [
        {"step": step, "ppo/kl": kl, "ppo/score": kl / 2},
        {"step": step, "ppo/gold_score": g},
      ]
    with open(f"{root}/points/{name}/ppo/metrics.jsonl", "w") as f:
      f.writelines(json.dumps(x) + "\n" for x in lines)
    rows.append(
      {
        "point": name,
        "status": "ok",
        "overrides": {"rm.max_comparisons": 250, "ppo.seed": seed},
        "metrics": {"rm.val_accuracy": 0.6},
      }
    )
  e = overoptimization.curves(root, rows)[250]
  assert e["seeds"] == 2 and e["gold_start"] == pytest.approx(0.3)
  assert e["gold"]["sqrt_kl"] == pytest.approx([0.0, 1.0, 2.0])
  assert e["gold"]["mean"] == pytest.approx([0.3, 0.55, 0.3])
  assert e["proxy"]["mean"] == pytest.approx([0.5, 2.0])
  assert e["gold_peak"][0] == pytest.approx(0.55) and e["sqrt_kl_at_peak"][0] == 1.0
  assert e["gold_final"][0] == pytest.approx(0.3) and e["sqrt_kl_final"][0] == 2.0
