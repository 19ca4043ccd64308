# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Fast checks of benchmarks/memory_bench.py and benchmarks/refresh_bench.py.

No training: the memory bench's numbers for the MLP workload (synthetic data,
same parameter tree) are compared with `shampoo_optax.state_report` and with
the shapes of a real ``init``, and the refresh bench's timing function runs 3
steps of a tiny linear model in both modes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shampoo_optax

from benchmarks import memory_bench
from benchmarks import refresh_bench
from benchmarks import run as run_lib
from benchmarks import workloads as workloads_lib


@pytest.fixture(scope="module")
def mlp_params():
  w = workloads_lib.fmnist_mlp(synthetic=True)
  return memory_bench.abstract_params(w)


def test_memory_matches_state_report_and_init(mlp_params):
  params = mlp_params
  param_bytes = run_lib.tree_bytes(params)
  rows = {label: memory_bench.measure(params, name, options)
          for label, name, options in memory_bench.CONFIGS}
  for label, name, options in memory_bench.CONFIGS:
    got = rows[label]
    assert got["param_bytes"] == param_bytes
    # The bench's optimizer (with a schedule) against real init shapes.
    tx = run_lib.make_optimizer(name, workloads_lib.schedule(1e-3, 1000),
                                1e-4, options)
    assert got["state_bytes"] == run_lib.tree_bytes(
        jax.eval_shape(tx.init, params))
    if name == "shampoo":
      # A plain `shampoo` (no schedule count) has the same Shampoo state.
      report = shampoo_optax.state_report(
          shampoo_optax.shampoo(1e-3, weight_decay=1e-4, **options), params)
      for kind in ("statistics", "roots", "grafting", "momentum"):
        assert got["by_kind"][kind] == report.total(kind) / param_bytes
      assert abs(got["bytes_per_param_byte"]
                 - report.bytes_per_param_byte) < 16 / param_bytes
  assert rows["adamw"]["bytes_per_param_byte"] == pytest.approx(2.0, abs=1e-4)
  default = rows["shampoo defaults"]["by_kind"]
  low = rows["low memory: preconditioner_dtype=bfloat16, b1=0"]["by_kind"]
  assert low["roots"] == pytest.approx(default["roots"] / 2)
  assert low["momentum"] == 0.0
  assert rows["mu_dtype=bfloat16"]["by_kind"]["momentum"] == pytest.approx(
      default["momentum"] / 2)
  for label, limit in memory_bench.TARGETS.items():
    assert rows[label]["bytes_per_param_byte"] <= limit


def _tiny_workload():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 6)).astype(np.float32)
  y = rng.normal(size=(16, 4)).astype(np.float32)

  def batches(seed):
    del seed
    while True:
      yield {"x": x, "y": y}

  return workloads_lib.Workload(
      name="tiny", init_params=lambda seed: {"w": jnp.zeros((6, 4))},
      loss_fn=lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2),
      batches=batches, eval_fn=lambda p: {}, metric="loss",
      higher_is_better=False, targets=(), steps=10, eval_every=10)


def test_refresh_timing_runs_every_mode():
  times = refresh_bench.time_modes(_tiny_workload(), rounds=1,
                                   steps_per_round=3, lr=1e-2)
  assert set(times) == set(refresh_bench.MODES)
  for t in times.values():
    assert t["counts"] == [2, 3, 4]
    assert all(math.isfinite(s) and s > 0 for s in t["seconds"])
  summary = refresh_bench.summarize(times, period=3)
  assert summary["staggered"]["max_over_median"] >= 1.0
  assert summary["staggered_mean_over_all_mean"] > 0
  assert summary["drift_mean_over_all_mean"] > 0
