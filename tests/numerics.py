# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Comparing float32 results: tolerances scaled to the array.

Two correct float32 programs differ in rounding, and by how much depends on
the CPU (vector width, fused multiply-adds). An element near zero can then
differ by more than any elementwise relative tolerance, so these compare
``max|actual - expected| <= rtol * max|expected|`` per array instead. Bitwise
equality is kept for programs that are the same.

Also the float64 NumPy Shampoo that the tests compare against, and a
runner of jitted updates.
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


def run_updates(tx, grads, params=None, state=None):
  """Jitted ``tx.update`` on each gradient in turn: the updates, the state.

  ``state`` defaults to ``jax.jit(tx.init)`` of ``params`` (or of the first
  gradient).
  """
  if state is None:
    state = jax.jit(tx.init)(grads[0] if params is None else params)
  update = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = update(g, state, params)
    outs.append(u)
  return outs, state


def np_inv_root(stat, p, eps, mode="relative"):
  """Float64 inverse p-th root of ``S``; identity for S = 0.

  ``mode``: ``"relative"``, ``(S + eps lambda_max I)^(-1/p)``;
  ``"absolute"``, ``(S + eps I)^(-1/p)``; ``"pseudo_inverse"``, the root of
  the eigenvalues above ``eps lambda_max``, zero elsewhere.
  """
  w, v = np.linalg.eigh(stat.astype(np.float64))
  if w.max() <= 0:
    return np.eye(len(stat))
  if mode == "pseudo_inverse":
    kept = w > eps * w.max()
    inv = np.where(kept, np.where(kept, w, 1.0) ** (-1.0 / p), 0.0)
    return (v * inv) @ v.T
  w = np.maximum(w, 0) + (eps if mode == "absolute" else eps * w.max())
  return (v * w ** (-1.0 / p)) @ v.T


def np_drift(stat, root, p, eps, mode="relative"):
  """Float64 drift of ``root`` from ``stat``: ``max|M / (tr M / n) - I|``,
  ``M = X^(p-h) (S + ridge I) X^h``, ``h = p // 2``, with the ridge ``S``
  gets now; 0 for ``S = 0``."""
  a = np.asarray(stat, np.float64)
  x = np.asarray(root, np.float64)
  top = np.linalg.eigvalsh(a)[-1]
  if top <= 0:
    return 0.0
  ridge = eps * (top if mode == "relative" else 1.0)
  h = p // 2
  m = (np.linalg.matrix_power(x, p - h) @ (a + ridge * np.eye(len(a)))
       @ np.linalg.matrix_power(x, h))
  return np.abs(m / (np.trace(m) / len(a)) - np.eye(len(a))).max()


def mode_product(x, matrix, axis):
  """Multiplies axis ``axis`` of ``x`` by ``matrix``."""
  return np.moveaxis(np.tensordot(matrix, x, axes=([1], [axis])), 0, axis)


def unfold_gram(x, axis):
  rest = [i for i in range(x.ndim) if i != axis]
  return np.tensordot(x, x, axes=(rest, rest))


class NumpyShampoo:
  """Blocked Shampoo on one tensor in float64, written from the paper."""

  def __init__(self, block_shape, b2=1.0, eps=1e-6, p=None, spans=None,
               factored=None, eps_mode="relative"):
    """``spans``: per axis, the number of equal spans it is first cut into
    (each blocked on its own, as ``cut_at_shards`` does); default 1.
    ``factored``: per axis, whether it gets a factor (default all); an axis
    without one is not cut and not preconditioned. ``p``: an int, or a dict
    by the number ``k`` of factored axes; default ``2k``."""
    self.block_shape, self.b2, self.eps, self.p = block_shape, b2, eps, p
    self.spans, self.factored, self.eps_mode = spans, factored, eps_mode
    self.stats, self.roots = {}, {}

  def blocks(self, shape):
    spans = self.spans or (1,) * len(shape)
    ranges = [
        [(s, min(s + b, e)) for e in range(d // c, d + 1, d // c)
         for s in range(e - d // c, e, b)]
        for d, b, c, f in zip(shape, self.block_shape, spans,
                              self.factored or (True,) * len(shape))
        for b in [b if f else d]
    ]
    return [tuple(slice(*r) for r in combo)
            for combo in np.ndindex(*[len(r) for r in ranges])
            for combo in [tuple(ranges[i][c] for i, c in enumerate(combo))]]

  def update(self, g, refresh=True, drift_tolerance=None):
    """The direction for ``g``; ``refresh=False`` keeps the last roots;
    with ``drift_tolerance``, a root is recomputed where its `np_drift`
    from the new statistics exceeds it."""
    out = np.zeros_like(g, dtype=np.float64)
    axes = [a for a, f in enumerate(self.factored or (True,) * g.ndim) if f]
    p = self.p or 2 * len(axes)
    if isinstance(p, dict):
      p = p.get(len(axes), 2 * len(axes))
    for idx in self.blocks(g.shape):
      block = g[idx].astype(np.float64)
      key = tuple((s.start, s.stop) for s in idx)
      stats = self.stats.setdefault(
          key, {a: np.zeros((block.shape[a],) * 2) for a in axes})
      for axis in axes:
        gram = unfold_gram(block, axis)
        stats[axis] = (stats[axis] + gram if self.b2 == 1.0
                       else self.b2 * stats[axis] + (1 - self.b2) * gram)
      if drift_tolerance is not None and key in self.roots:
        for a in axes:
          if np_drift(stats[a], self.roots[key][a], p, self.eps,
                      self.eps_mode) > drift_tolerance:
            self.roots[key][a] = np_inv_root(stats[a], p, self.eps,
                                             self.eps_mode)
      elif refresh or key not in self.roots:
        self.roots[key] = {a: np_inv_root(stats[a], p, self.eps,
                                          self.eps_mode) for a in axes}
      d = block
      for axis in axes:
        d = mode_product(d, self.roots[key][axis], axis)
      out[idx] = d
    return out
