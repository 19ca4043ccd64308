# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The width sweep's summary: best grid point per width and transfer."""

import pytest

from benchmarks import width_sweep


def _runs(losses):
  """``losses[name][width]``: per lr, one loss per seed."""
  return [dict(optimizer=name, width=w, lr=lr, seed=s, loss=loss)
          for name, by_width in losses.items()
          for w, by_lr in by_width.items()
          for lr, seeds in by_lr.items() for s, loss in enumerate(seeds)]


def test_summary_finds_the_best_point_and_the_transfer_ratio():
  lrs = (1e-3, 2e-3)
  runs = _runs({
      # Same best lr at both widths.
      "a": {32: {1e-3: [2.0, 2.2], 2e-3: [2.5, 2.5]},
            64: {1e-3: [1.9, 1.9], 2e-3: [2.0, 2.0]}},
      # The best lr moves: the narrow best costs 10% at width 64.
      "b": {32: {1e-3: [2.0, 2.0], 2e-3: [2.4, 2.4]},
            64: {1e-3: [2.2, 2.2], 2e-3: [2.0, 2.0]}},
      # Incomplete grids are left out.
      "c": {32: {1e-3: [2.0]}},
  })
  summary = width_sweep.summarize(runs, (32, 64), lrs)
  assert set(summary) == {"a", "b"}
  assert summary["a"]["best_lr"] == {"32": 1e-3, "64": 1e-3}
  assert summary["a"]["same_best_point"] and summary["a"]["seeds"] == 2
  assert summary["a"]["loss"]["32@0.001"] == pytest.approx(2.1)
  assert summary["b"]["best_lr"] == {"32": 1e-3, "64": 2e-3}
  assert not summary["b"]["same_best_point"]
  assert summary["b"]["transfer_ratio"]["64"] == pytest.approx(1.1)
  assert summary["b"]["transfer_ratio"]["32"] == pytest.approx(1.0)
  text = width_sweep.report(summary, (32, 64), lrs,
                            dict(git="abc", steps=10))
  assert "| b | 2 | 64 | 2.200 | **2.000** | 0.002 | 1.1000 |" in text
  assert "a yes, b no" in text
