"""The preemption harness (experiments/preemption.py) on SFT: a SIGKILL during a
checkpoint write, a SIGTERM that must exit 0, a SIGINT (Ctrl-C) at a random moment that
must exit 130; the resumed run's parameters and metrics equal an uninterrupted run's,
bitwise.

SFT has dropout (a key per step) and a mixed data iterator (10% pretraining batches),
the state most easily lost on a resume. The script runs every stage, with 20 kills each
(README "Reliability")."""

import os
import random
import sys

import pytest

EXPERIMENTS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)
sys.path.insert(0, EXPERIMENTS)

import preemption  # noqa: E402


@pytest.mark.slow
def test_sft_survives_kills_bitwise(tmp_path):
  root = str(tmp_path)
  base = preemption.prepare_inputs(root, ["sft"])
  modes = ("checkpoint", "sigterm", "sigint")
  row = preemption.harness("sft", root, base, kills=3, rng=random.Random(0), modes=modes)
  assert row["kills"] == 3 and row["sigterm"] == row["sigint"] == 1, row
  # Each signal ends the run with its exit status (0, 130) and its stop message: after a
  # checkpoint at the next logging step, or at once outside the training loop.
  assert row["sigterm_ok"] == row["sigint_ok"] == 1, row
  assert row["identical"] == row["episodes"] >= 1, row


def test_identical_sees_a_difference(tmp_path):
  """The comparison the harness relies on can fail: one ulp in one parameter, or one
  metric, is a difference."""
  import numpy as np

  a = {"sft": ([np.zeros(3, np.float32)], [{"step": 1, "sft/loss": 1.0}])}
  b = {"sft": ([np.nextafter(np.zeros(3, np.float32), 1)], [{"step": 1, "sft/loss": 1.0}])}
  c = {"sft": ([np.zeros(3, np.float32)], [{"step": 1, "sft/loss": 1.0000001}])}
  assert preemption.identical(a, a) and not preemption.identical(a, b)
  assert not preemption.identical(a, c)
