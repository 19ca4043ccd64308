# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Option validation (`_options`): the option and the accepted values named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shampoo_optax import _options


def test_static_int():
  assert _options.static_int("n", np.int64(3), 1) == 3
  assert _options.static_int("n", jnp.array(3), 1) == 3
  assert _options.static_int("n", None, 1, allow_none=True) is None
  with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
    _options.static_int("n", 0, 1)
  for bad in (True, 2.0, "2", None, jnp.array(2.0)):
    with pytest.raises(TypeError, match="n must be an int >= 1"):
      _options.static_int("n", bad, 1)
  with pytest.raises(TypeError, match="static_args=shampoo_optax.X"):
    jax.jit(lambda n: _options.static_int("n", n, 1, static_options="X"))(2)


def test_check_range():
  _options.check_range("b", 0.5, 0.0, 1.0)
  _options.check_range("b", 1.0, 0.0, 1.0)
  with pytest.raises(ValueError, match=r"b must be in \[0.0, 1.0\), got 1.0"):
    _options.check_range("b", 1.0, 0.0, 1.0, high_open=True)
  with pytest.raises(ValueError, match="e must be in >= 0.0"):
    _options.check_range("e", -1e-9, 0.0)
  with pytest.raises(TypeError, match="b must be a float"):
    _options.check_range("b", "0.5", 0.0, 1.0)
  # Traced values (schedules, inject_hyperparams) are checked at run time.
  jax.jit(lambda b: _options.check_range("b", b, 0.0, 1.0))(2.0)


def test_choices_flags_dtypes():
  with pytest.raises(ValueError, match="m must be one of 'a', 'b'; got 'c'"):
    _options.check_choice("m", "c", ("a", "b"))
  with pytest.raises(TypeError, match="f must be True or False, got 1"):
    _options.check_flags(f=1)
  assert _options.check_dtype("d", "bfloat16") == jnp.bfloat16
  assert _options.check_dtype("d", None) is None
  for bad in (jnp.int8, "nonsense"):
    with pytest.raises(TypeError, match="d must be a floating dtype"):
      _options.check_dtype("d", bad)
  with pytest.raises(TypeError, match="d must be a floating dtype, got None"):
    _options.check_dtype("d", None, allow_none=False)
