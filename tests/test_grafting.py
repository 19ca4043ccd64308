# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests of the grafted optimizers' directions against NumPy and optax."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numerics import assert_close
from shampoo_optax import _grafting


def test_ema_and_bias_correction():
  old, new = jnp.array(2.0), jnp.array(10.0)
  assert float(_grafting.ema(old, new, 0.9)) == pytest.approx(2.8)
  assert float(_grafting.ema(old, new, 1.0)) == 12.0  # plain sum
  assert float(_grafting.bias_correction(0.9, 3)) == pytest.approx(1 - 0.9**3)
  assert float(_grafting.bias_correction(1.0, 3)) == 3.0  # sum -> mean


def test_adam_matches_optax_without_momentum():
  rng = np.random.default_rng(0)
  grads = [jnp.asarray(rng.standard_normal(5), jnp.float32) for _ in range(4)]
  adam = optax.scale_by_adam(b1=0.0, b2=0.95, eps=1e-6)
  state = adam.init(grads[0])
  acc = [jnp.zeros(5)]
  for step, g in enumerate(grads, start=1):
    expected, state = adam.update(g, state)
    out = _grafting.graft_direction("adam", [g], acc, step, 0.95, 1e-6)
    acc = out.accumulators
    assert_close(out.direction[0], expected, rtol=1e-6)


def test_adam_with_sums_divides_by_step():
  grads = [jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5])]
  acc = [jnp.zeros(2)]
  for step, g in enumerate(grads, start=1):
    out = _grafting.graft_direction("adam", [g], acc, step, 1.0, 0.0)
    acc = out.accumulators
  mean_sq = (np.array([1.0, 4.0]) + np.array([9.0, 0.25])) / 2
  assert_close(out.direction[0], grads[1] / np.sqrt(mean_sq), rtol=1e-6)


@pytest.mark.parametrize("graft", _grafting.GRAFTS)
def test_zero_gradient_gives_zero_direction(graft):
  acc = [jnp.zeros(3)] if _grafting.has_accumulator(graft) else None
  out = _grafting.graft_direction(graft, [jnp.zeros(3)], acc, 1, 0.9, 1e-8)
  np.testing.assert_array_equal(out.direction[0], np.zeros(3))


def test_normalized_variant_is_scale_invariant():
  g = jnp.array([[3.0, -4.0]])  # One unit.
  acc = [jnp.zeros((1, 2))]
  small = _grafting.graft_direction("adagrad_normalized", [g * 1e-3], acc, 1,
                                    0.9, 1e-8)
  large = _grafting.graft_direction("adagrad_normalized", [g * 1e3], acc, 1,
                                    0.9, 1e-8)
  assert_close(small.direction[0], large.direction[0], rtol=1e-5)
  assert_close(small.accumulators[0], [[0.36, 0.64]], rtol=1e-5)
