# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Comparing float32 results: tolerances scaled to the array.

Two correct float32 programs differ in rounding, and by how much depends on
the CPU (vector width, fused multiply-adds). An element near zero can then
differ by more than any elementwise relative tolerance, so these compare
``max|actual - expected| <= rtol * max|expected|`` per array instead. Bitwise
equality is kept for programs that are the same.
"""

import jax
import numpy as np


def assert_close(actual, expected, rtol=1e-5, err_msg=""):
  """Pytrees equal up to ``rtol`` times each expected array's max-abs.

  An array ``actual`` may be compared with anything ``np.asarray`` takes.
  """
  if isinstance(actual, (np.ndarray, jax.Array)):
    actual_leaves, expected_leaves = [actual], [np.asarray(expected)]
  else:
    actual_leaves, expected_leaves = (jax.tree.leaves(actual),
                                      jax.tree.leaves(expected))
  assert len(actual_leaves) == len(expected_leaves), err_msg
  for i, (a, e) in enumerate(zip(actual_leaves, expected_leaves)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (err_msg, i, a.shape, e.shape)
    scale = np.abs(e).max(initial=0.0)
    error = np.abs(a - e).max(initial=0.0)
    assert error <= rtol * scale or error == 0.0, (
        f"{err_msg} leaf {i}: max|diff| {error:.3e} > {rtol:g} * max|expected|"
        f" {scale:.3e} (ratio {error / max(scale, 1e-300):.3e})")
