# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Smoke tests of examples/flax_mnist.py and examples/char_lm.py.

Each trains a tiny model for a handful of steps on synthetic data (no data
set needed), through the scripts' ``main(argv)``; one more test checks that
both files run as plain scripts (``python examples/x.py --help``).
"""

import math
import pathlib
import subprocess
import sys

import pytest

from examples import char_lm
from examples import flax_mnist

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_flax_mnist_smoke(capsys):
  summary = flax_mnist.main([
      "--synthetic", "--steps", "6", "--eval-every", "3", "--batch-size", "32",
      "--hidden", "32", "--precondition-every", "2",
  ])
  out = capsys.readouterr().out
  assert "step     3" in out and "step     6" in out
  assert "summary" in out and "final test acc" in out
  assert summary["optimizer"] == "shampoo"
  assert summary["steps"] == 6
  assert math.isfinite(summary["final_train_loss"])
  assert 0.0 <= summary["final_test_acc"] <= 1.0
  assert summary["state_over_param_bytes"] > 1.0


def test_char_lm_smoke(capsys):
  summary = char_lm.main([
      "--synthetic", "--steps", "6", "--eval-every", "3", "--batch-size", "4",
      "--context", "16", "--d-model", "16", "--layers", "1", "--heads", "2",
      "--eval-windows", "8", "--sample", "5", "--precondition-every", "2",
  ])
  out = capsys.readouterr().out
  assert "step     3" in out and "step     6" in out
  assert "summary" in out and "final val loss" in out
  assert summary["steps"] == 6
  assert math.isfinite(summary["final_val_loss"])
  assert len(summary["sample"]) == 5


@pytest.mark.parametrize("script", ["flax_mnist.py", "char_lm.py"])
def test_runs_as_script(script):
  proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"],
                        capture_output=True, text=True, timeout=120,
                        cwd=str(EXAMPLES))
  assert proc.returncode == 0, proc.stderr
  assert "--steps" in proc.stdout and "--synthetic" in proc.stdout
  assert "--data" in proc.stdout
