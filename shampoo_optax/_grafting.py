# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Grafting: the simple optimizers whose per-leaf step size Shampoo borrows.

Shampoo's direction ``D`` gets the norm of a simple optimizer's direction
``A`` (Agarwal et al., "Disentangling Adaptive Gradient Methods from Learning
Rates"; the Shampoo paper's Section 4):

.. math::

  \\text{update} = \\frac{\\lVert A \\rVert_F}{\\lVert D \\rVert_F} D

per leaf. The directions here are elementwise and momentum-free (momentum is
applied after grafting); ``t`` is the 1-based step and ``v`` the accumulator:

=====================  ====================================================
``"sgd"``              ``A = g``
``"adagrad"``          ``v += g^2``,  ``A = g / (sqrt(v) + eps)``
``"rmsprop"``          ``v = b2 v + (1-b2) g^2``,  ``A = g / (sqrt(v) + eps)``
``"adam"``             as rmsprop with ``v / (1 - b2^t)`` (bias-corrected)
``"*_normalized"``     the same applied to ``g / ||g||_F``
``"none"``             no grafting: Shampoo's own scale
=====================  ====================================================

``b2 = 1`` makes rmsprop/adam accumulate plain sums; adam then divides by
``t``, the limit of its bias correction.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

GRAFTS = (
    "adam",
    "rmsprop",
    "adagrad",
    "sgd",
    "adam_normalized",
    "rmsprop_normalized",
    "adagrad_normalized",
    "sgd_normalized",
    "none",
)


class GraftDirection(NamedTuple):
  direction: list[jax.Array]
  accumulators: list[jax.Array] | None


def has_accumulator(graft: str) -> bool:
  return graft.split("_")[0] in ("adam", "rmsprop", "adagrad")


def ema(old: jax.Array, new: jax.Array, decay) -> jax.Array:
  """``decay * old + (1 - decay) * new``, or ``old + new`` when ``decay == 1``.

  ``decay`` may be traced (e.g. under ``optax.inject_hyperparams``).
  """
  return decay * old + jnp.where(decay == 1.0, 1.0, 1.0 - decay) * new


def bias_correction(decay, step) -> jax.Array:
  """Total weight of an `ema` after ``step`` (1-based) updates."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.where(decay == 1.0, step, 1.0 - decay**step)


def unit_norm(x: jax.Array) -> jax.Array:
  """Frobenius norm of each unit of ``[units, ...]``, shaped to broadcast."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)),
                          keepdims=True))


def _normalize(g: jax.Array) -> jax.Array:
  """``g`` divided by the Frobenius norm of each unit."""
  norm = unit_norm(g)
  return jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0), 0.0)


def graft_direction(
    graft: str,
    grads: list[jax.Array],
    accumulators: list[jax.Array] | None,
    step: jax.Array,
    b2,
    eps,
) -> GraftDirection:
  """Direction of the grafted optimizer for float32 ``grads``.

  Args:
    graft: one of `GRAFTS`.
    grads: float32 gradients, each ``[units, ...]`` (the normalized
      variants normalize each unit).
    accumulators: second-moment accumulators (``None`` for sgd and none).
    step: the 1-based step number.
    b2: decay of the rmsprop/adam accumulator.
    eps: added to the square root of the accumulator.

  Returns:
    The direction and the new accumulators.
  """
  base = graft.removesuffix("_normalized")
  if graft.endswith("_normalized"):
    grads = [_normalize(g) for g in grads]
  if base in ("sgd", "none"):
    return GraftDirection(grads, None)
  if base == "adagrad":
    accumulators = [v + g * g for g, v in zip(grads, accumulators)]
    scaled = accumulators
  else:
    accumulators = [ema(v, g * g, b2) for g, v in zip(grads, accumulators)]
    scale = bias_correction(b2, step) if base == "adam" else 1.0
    scaled = [v / scale for v in accumulators]
  return GraftDirection(
      [g / (jnp.sqrt(v) + eps) for g, v in zip(grads, scaled)], accumulators
  )
