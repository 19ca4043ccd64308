# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
r"""Symmetric matrices stored as packed triangles, without gathers.

A symmetric :math:`n \times n` matrix has :math:`n(n+1)/2` free entries. With
:math:`k_1 = \lceil n/2 \rceil`, :math:`k_2 = n - k_1` and the split

.. math::

  A = \begin{pmatrix} A_{11} & A_{21}^\top \\ A_{21} & A_{22} \end{pmatrix},
  \qquad A_{11} \in \mathbb{R}^{k_1 \times k_1},\;
  A_{22} \in \mathbb{R}^{k_2 \times k_2},

it is stored as a :math:`(n + s) \times k_1` array (:math:`s = 1` for even
:math:`n`, else 0), the rows of :math:`A_{21}` under a square-ish
:math:`(k_2 + 1) \times k_1` tile :math:`T` that holds the lower triangle of
:math:`A_{11}` shifted down by :math:`s` rows and, in the free upper part,
the transposed lower triangle of :math:`A_{22}`:

.. math::

  T_{rc} = \begin{cases} (A_{11})_{r - s,\,c} & r - s \ge c \\
                          (A_{22})_{c - 1 + s,\,r} & \text{otherwise.}
           \end{cases}

This is LAPACK's rectangular full packed idea: packing and unpacking are
slices, transposes and selects (fused, elementwise), never gathers, and the
packed array is a plain matrix that shards like any other. The leading axes
are batch axes.
"""

import jax
import jax.numpy as jnp


def packed_shape(n: int) -> tuple[int, int]:
  """The trailing shape of a packed ``n x n`` symmetric matrix."""
  k1 = (n + 1) // 2
  return (n + 1 - n % 2, k1) if n > 1 else (1, 1)


def _split(n: int):
  k1 = (n + 1) // 2
  return k1, n - k1, 1 - n % 2


def _tile_masks(n: int):
  """Where the tile holds ``A11`` (lower part) and ``A22`` (upper part)."""
  k1, k2, s = _split(n)
  r = jnp.arange(k2 + 1)[:, None]
  c = jnp.arange(k1)[None, :]
  return r - s >= c


def _from_tiles(a11, a22, a21, n: int) -> jax.Array:
  """The packed array from the lower triangles of ``A11``, ``A22`` and ``A21``."""
  k1, k2, s = _split(n)
  batch = [(0, 0)] * (a11.ndim - 2)
  # Row r of the tile: row r - s of A11 (a zero row on top when s = 1) below
  # the diagonal, row r of A22^T above it.
  lower = jnp.pad(a11, batch + [(s, 0), (0, 0)])[..., : k2 + 1, :]
  upper = jnp.pad(jnp.swapaxes(a22, -1, -2), batch + [(0, 1), (1 - s, 0)])
  tile = jnp.where(_tile_masks(n), lower, upper)
  return jnp.concatenate([tile, a21], axis=-2)


def pack(a: jax.Array) -> jax.Array:
  """``[..., n, n]`` symmetric -> ``[..., *packed_shape(n)]``.

  Only the lower triangle of ``a`` is read.
  """
  n = a.shape[-1]
  if n == 1:
    return a
  k1 = (n + 1) // 2
  return _from_tiles(a[..., :k1, :k1], a[..., k1:, k1:], a[..., k1:, :k1], n)


def _mirror(lower: jax.Array) -> jax.Array:
  """The symmetric matrix whose lower triangle (with diagonal) is ``lower``."""
  k = lower.shape[-1]
  strict = jnp.swapaxes(lower, -1, -2) * (1 - jnp.eye(k, dtype=lower.dtype))
  return lower + strict


def unpack(packed: jax.Array, n: int) -> jax.Array:
  """Inverse of `pack`: ``[..., *packed_shape(n)]`` -> ``[..., n, n]``."""
  if n == 1:
    return packed
  k1, k2, s = _split(n)
  tile, a21 = packed[..., : k2 + 1, :], packed[..., k2 + 1 :, :]
  mask = _tile_masks(n)
  a11 = _mirror(jnp.where(mask, tile, 0)[..., s : s + k1, :])
  a22 = _mirror(jnp.swapaxes(jnp.where(mask, 0, tile)[..., :k2, 1 - s :],
                             -1, -2))
  top = jnp.concatenate([a11, jnp.swapaxes(a21, -1, -2)], axis=-1)
  bottom = jnp.concatenate([a21, a22], axis=-1)
  return jnp.concatenate([top, bottom], axis=-2)


def packed_gram(x: jax.Array,
                precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """``pack(x @ x^T)`` for ``x`` ``[..., n, m]``, with 3/4 of the products.

  Only the products of the packed tiles are formed: ``A11 = X1 X1^T``,
  ``A22 = X2 X2^T`` and ``A21 = X2 X1^T`` (``X1``, ``X2``: the first
  ``ceil(n/2)`` rows and the rest).
  """
  n = x.shape[-2]
  if n == 1:
    return jnp.sum(x * x, axis=-1, keepdims=True)
  k1 = (n + 1) // 2
  x1, x2 = x[..., :k1, :], x[..., k1:, :]
  gram = lambda u, v: jnp.einsum("...im,...jm->...ij", u, v,
                                 precision=precision)
  return _from_tiles(gram(x1, x1), gram(x2, x2), gram(x2, x1), n)
