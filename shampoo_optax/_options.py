# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Validation of the transforms' options: clear errors before any tracing.

Each check names the option and the accepted values. Float options may be
traced (schedules, ``optax.inject_hyperparams``): they are checked only when
concrete. Every other option shapes the compiled program and must be a
Python value; a traced one gets a `TypeError` that says to pass it in
``static_args``.
"""

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def static_int(name: str, value, minimum: int, allow_none: bool = False,
               static_options: str = "STATIC_OPTIONS"):
  """``value`` as a Python int ``>= minimum`` (or ``None`` if allowed)."""
  if value is None and allow_none:
    return None
  if is_traced(value):
    raise TypeError(
        f"{name} must be a static Python int, got a traced value; with"
        " optax.inject_hyperparams pass"
        f" static_args=shampoo_optax.{static_options}."
    )
  if isinstance(value, (bool, np.bool_)) or not (
      isinstance(value, (int, np.integer))
      or (isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
          and jnp.issubdtype(value.dtype, jnp.integer))
  ):
    raise TypeError(
        f"{name} must be an int >= {minimum}"
        + (" or None" if allow_none else "")
        + f", got {value!r}."
    )
  value = int(value)
  if value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value}.")
  return value


def check_range(name: str, value, low: float, high: float | None = None,
                high_open: bool = False):
  """Checks a float option when it is a concrete number (not traced)."""
  if is_traced(value):
    return
  if isinstance(value, (str, bytes)):
    raise TypeError(f"{name} must be a float, got {value!r}.")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a float, got {value!r}.") from None
  upper = np.inf if high is None else high
  if not (low <= number < upper if high_open else low <= number <= upper):
    accepted = (f">= {low}" if high is None
                else f"[{low}, {high})" if high_open else f"[{low}, {high}]")
    raise ValueError(f"{name} must be in {accepted}, got {value!r}.")


def check_choice(name: str, value, choices):
  if not isinstance(value, (str, bool)) or value not in choices:
    raise ValueError(
        f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}."
    )


def check_flags(**flags):
  """Each flag must be a bool."""
  for name, flag in flags.items():
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be True or False, got {flag!r}.")


def check_dtype(name: str, value, allow_none: bool = True):
  """``value`` as a floating dtype (``None`` passes through if allowed)."""
  if value is None and allow_none:
    return None
  try:
    # jnp.dtype(None) is NumPy's default float64: never a choice made here.
    dtype = None if value is None else jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating dtype{' or None' if allow_none else ''},"
        f" got {value!r}.")
  return dtype


def check_exponent(name: str, value):
  """An int ``>= 1``, ``None``, or a mapping ``{k: p}`` of such ints.

  Returns ``None``, the int, or the mapping as sorted ``((k, p), ...)``
  pairs (hashable, for the plan's cache).
  """
  if not isinstance(value, dict):
    return static_int(name, value, 1, allow_none=True)
  pairs = []
  for order, p in value.items():
    pairs.append((static_int(f"{name} key (a number of factored axes)",
                             order, 1),
                  static_int(f"{name}[{order!r}]", p, 1)))
  return tuple(sorted(pairs))
