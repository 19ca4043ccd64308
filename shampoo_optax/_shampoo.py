# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
r"""Distributed Shampoo as an optax transformation.

Shampoo (Gupta et al. 2018; Anil et al., "Scalable Second Order Optimization
for Deep Learning", arXiv 2002.09018) preconditions a matrix gradient
:math:`G_t \in \mathbb{R}^{m \times n}` with Kronecker factors

.. math::

  L_t = \beta_2 L_{t-1} + (1 - \beta_2) G_t G_t^\top, \qquad
  R_t = \beta_2 R_{t-1} + (1 - \beta_2) G_t^\top G_t,

(plain sums :math:`L_t = L_{t-1} + G_t G_t^\top` when :math:`\beta_2 = 1`) and
the direction :math:`D_t = \hat L_t^{-1/4} G_t \hat R_t^{-1/4}`, where
:math:`\hat X = X + \epsilon \lambda_{max}(X) I`. A rank-:math:`k` tensor has
one factor per axis, each with exponent :math:`-1/(2k)`. The roots are
recomputed every ``precondition_every`` steps. :math:`D_t` is rescaled per
unit (a leaf, or one layer of a stacked leaf) to the norm of a simple
optimizer's direction (grafting, see `_grafting`), then momentum follows.

The update is a sequence of stages, each a function below: stack the
gradients into families (`_blocks`), check them (`_all_finite`), update the
statistics (`_update_statistics`), refresh a share of the roots
(`_refresh_roots`), precondition (`_precondition`), graft (`_graft`) and
apply momentum (`_momentum`).
"""

import functools
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from shampoo_optax import _blocks
from shampoo_optax import _grafting
from shampoo_optax import _roots
from shampoo_optax import _sharding
from shampoo_optax import _symmetric

_HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = "abcdefghijklmnopqrstuvw"
REFRESH_MODES = ("all", "staggered")


class ShampooDiagnostics(NamedTuple):
  """Scalars to log; all are cheap and updated inside the jitted step.

  Attributes:
    root_failures: cumulative number of inverse roots rejected (non-finite or
      error above ``max_root_error``); each kept its previous root.
    max_root_error: largest root error of the last refresh (see
      `shampoo_optax.root_error`).
    last_refresh_step: the step (0-based) of the last refresh of any root,
      -1 before the first.
    nonfinite_steps: steps skipped because a gradient was NaN or infinite.
  """

  root_failures: chex.Array
  max_root_error: chex.Array
  last_refresh_step: chex.Array
  nonfinite_steps: chex.Array


class ShampooState(NamedTuple):
  """State of `scale_by_shampoo`.

  Attributes:
    count: number of (finite) updates applied so far.
    stats: one float32 array ``[n, *grid, *packed]`` per factor: the
      statistics of one axis of every block of a piece of a family, stored
      as packed triangles (see `shampoo_optax._blocks`, `_symmetric`). On a
      mesh that divides none of its batch axes, ``[rows, *packed]``: the
      batch axes flattened and padded with zero rows (see `_sharding`).
    preconditioners: their inverse roots, same layout, in
      ``preconditioner_dtype``.
    refreshed_at: one int32 array ``[n, *grid]`` (or ``[rows]``) per factor:
      the step (0-based) at which each root was last accepted, -1 for
      never.
    graft: float32 accumulators of the grafted optimizer, one
      ``[units, *shape]`` array per family (the parameters' units stacked
      as the gradients are, see `shampoo_optax._blocks`), or ``None`` for
      ``"sgd"``/``"none"`` grafting.
    mu: momentum, one ``[units, *shape]`` array per family in ``mu_dtype``,
      or ``None`` when ``b1 == 0``.
    diagnostics: `ShampooDiagnostics`.
  """

  count: chex.Array
  stats: tuple[chex.Array, ...]
  preconditioners: tuple[chex.Array, ...]
  refreshed_at: tuple[chex.Array, ...]
  graft: Any
  mu: Any
  diagnostics: ShampooDiagnostics


# The float options of `shampoo`: they may be traced (schedules, values
# injected by `optax.inject_hyperparams`). Every other option shapes the state
# or the compiled program and must be static: pass STATIC_OPTIONS as
# `static_args` to `optax.inject_hyperparams`.
FLOAT_OPTIONS = ("learning_rate", "b1", "b2", "matrix_eps", "graft_eps",
                 "graft_b2", "max_root_error", "weight_decay")
STATIC_OPTIONS = (
    "block_size",
    "graft",
    "precondition_every",
    "statistics_every",
    "start_preconditioning_step",
    "refresh",
    "root_method",
    "exponent_override",
    "nesterov",
    "heavy_ball",
    "max_precondition_dim",
    "skip_nonfinite",
    "shard_axes",
    "layer_axes",
    "mu_dtype",
    "preconditioner_dtype",
    "cut_at_shards",
    "mask",
)


class _Floats(NamedTuple):
  """The float options, as float32 scalars inside the update."""

  b1: Any
  b2: Any
  matrix_eps: Any
  graft_eps: Any
  graft_b2: Any
  max_root_error: Any


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def _static_int(name: str, value, minimum: int, allow_none: bool = False,
                static_options: str = "STATIC_OPTIONS"):
  if value is None and allow_none:
    return None
  if _is_traced(value):
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


def _check_range(name: str, value, low: float, high: float | None = None,
                 high_open: bool = False):
  """Checks a float option when it is a concrete number (not traced)."""
  if _is_traced(value):
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


def _check_choice(name: str, value, choices):
  if not isinstance(value, (str, bool)) or value not in choices:
    raise ValueError(
        f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}."
    )


def _check_dtype(name: str, value):
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise TypeError(f"{name} must be a dtype or None, got {value!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating dtype or None, got {dtype}.")
  return dtype


def _as_leaves(tree, what: str, transform: str = "scale_by_shampoo"):
  """Flattens ``tree``; Python and NumPy scalars become arrays."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = []
  for path, leaf in with_paths:
    if not hasattr(leaf, "dtype"):
      leaf = jnp.asarray(leaf)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"{transform}: {what} {jax.tree_util.keystr(path)} has dtype"
          f" {leaf.dtype}; it needs real floating-point {what}s"
          " (float32, bfloat16, float16, float64). Exclude it with"
          " optax.masked or optax.partition.")
    leaves.append(leaf)
  return [p for p, _ in with_paths], leaves, treedef


def _resolve_layer_axes(layer_axes, tree, paths, leaves, treedef):
  """``layer_axes`` as one sorted tuple of non-negative axes per leaf."""
  if layer_axes is None:
    return ((),) * len(leaves)
  spec = layer_axes(tree) if callable(layer_axes) else layer_axes
  try:
    per_leaf = treedef.flatten_up_to(spec)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "layer_axes must be None, a pytree with the structure of the params"
        " whose leaves are an int, a tuple of ints or None, or a callable of"
        f" the params returning one; got {spec!r} ({e}).") from None
  resolved = []
  for path, leaf, axes in zip(paths, leaves, per_leaf):
    axes = () if axes is None else (axes,) if isinstance(
        axes, (int, np.integer)) else axes
    name = jax.tree_util.keystr(path)
    if not isinstance(axes, (tuple, list)) or not all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool)
        and -leaf.ndim <= a < leaf.ndim for a in axes):
      raise ValueError(
          f"layer_axes of {name} (shape {tuple(leaf.shape)}) must be None, an"
          f" int or a tuple of ints in [-{leaf.ndim}, {leaf.ndim}), got"
          f" {axes!r}.")
    axes = tuple(sorted(int(a) % leaf.ndim for a in axes))
    if len(set(axes)) != len(axes):
      raise ValueError(f"layer_axes of {name} repeats an axis: {axes!r}.")
    resolved.append(axes)
  return tuple(resolved)


def _plan_of(tree, layer_axes, block_size: int, max_precondition_dim: int,
             exponent_override=None, cut_at_shards: bool = False,
             transform: str = "scale_by_shampoo"):
  """The plan of a tree of updates or params, and its flattened leaves."""
  paths, leaves, treedef = _as_leaves(tree, "update", transform)
  axes = _resolve_layer_axes(layer_axes, tree, paths, leaves, treedef)
  plan = _blocks.make_plan(
      tuple(tuple(x.shape) for x in leaves), axes, block_size,
      max_precondition_dim, exponent_override,
      _sharding.shard_counts(leaves) if cut_at_shards else None)
  return plan, paths, leaves, treedef


def _update_fn(transform: str, state_type, plan_for, check_state, update_core,
               shard_axes, floats):
  """A transform's ``update`` around its arithmetic ``update_core``.

  Reads the splits (`_sharding.update_specs`), checks the state against them
  (``check_state(plan, paths, leaves, state, specs)``) and runs
  ``update_core(leaves, state, floats, plan=, specs=, family_specs=)`` under
  `_sharding.in_auto_mode`. The float options are arguments, not closed
  over: under explicit sharding they must cross into ``in_auto_mode`` like
  every traced value.
  """

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, state_type):
      raise TypeError(
          f"{transform}: expected the {state_type.__name__} made by this"
          f" transformation's init, got {type(state).__name__}.")
    plan, paths, leaves, treedef = plan_for(updates)
    specs, family_specs = _sharding.update_specs(plan, state.stats, leaves,
                                                 shard_axes)
    check_state(plan, paths, leaves, state, specs)
    core = functools.partial(update_core, plan=plan, specs=specs,
                             family_specs=family_specs)
    new_leaves, new_state = _sharding.in_auto_mode(core)(leaves, state, floats)
    return jax.tree.unflatten(treedef, new_leaves), new_state

  return update_fn


# ---------------------------------------------------------------------------
# Stages of the update. Each takes the static plan and per-family or
# per-factor lists of arrays.


def _all_finite(stacked) -> jax.Array:
  """Whether every gradient is finite and its squares do not overflow."""
  # A finite sum of squares bounds every entry of G G^T and of g^2, so the
  # statistics and accumulators cannot overflow either. The sqrt changes no
  # answer; XLA deems it expensive and computes it once, where it would copy
  # a chain of cheap scalar adds into every fusion that selects on it.
  total = sum((jnp.sum(jnp.square(x)) for x in stacked),
              jnp.zeros([], jnp.float32))
  return jnp.isfinite(jnp.sqrt(total))


def _gram(block: jax.Array, axis: int, nbatch: int) -> jax.Array:
  """Packed ``G_(axis) G_(axis)^T`` of every block ``[*batch, *block]``."""
  x = jnp.moveaxis(block, nbatch + axis, nbatch)
  x = x.reshape(x.shape[:nbatch + 1] + (-1,))
  return _symmetric.packed_gram(x, precision=_HIGHEST)


def _apply_root(block: jax.Array, root: jax.Array, axis: int,
                nbatch: int) -> jax.Array:
  """Multiplies axis ``axis`` of every block by its (symmetric) root."""
  batch = _LETTERS[:nbatch]
  dims = _LETTERS[nbatch:block.ndim]
  out = dims.replace(dims[axis], "z")
  return jnp.einsum(f"{batch}z{dims[axis]},{batch}{dims}->{batch}{out}", root,
                    block, precision=_HIGHEST)


def _gradient_blocks(plan, stacked, specs, family_specs):
  """Blocks of every piece of every preconditioned family, laid out as the
  piece's factors are (`_sharding.to_layout`) and pinned."""
  out = {}
  for index, factor in enumerate(plan.factors):
    key = (factor.family, factor.piece)
    if key in out:
      continue
    piece = plan.families[factor.family].pieces[factor.piece]
    route = _sharding.rows_route(plan, factor.family, specs, family_specs)
    if route is None:
      whole = _sharding.pin(stacked[factor.family],
                            _sharding.cut_spec(plan, factor, specs[index]))
      blocks = _sharding.to_layout(
          _blocks.blocks_of(whole, piece),
          factor.batch_shape,
          _sharding.layout_batch_shape(factor, specs[index]))
    else:
      blocks = _sharding.to_rows(stacked[factor.family], piece, route)
    out[key] = _sharding.constrain(blocks, specs[index])
  return out


def _update_statistics(plan, blocks, stats, update_now, b2, specs):
  """``S <- b2 S + (1 - b2) G G^T`` for every factor, where ``update_now``."""

  def contributions(blocks):
    return [
        _sharding.constrain(
            _gram(blocks[(f.family, f.piece)], f.axis, len(spec)),
            spec)
        for f, spec in zip(plan.factors, specs)
    ]

  # The cond yields zeros when not updating and the selection happens
  # outside: a cond branch that passes a large operand through is a slow
  # copy on CPU, an elementwise select is not.
  grams = jax.lax.cond(update_now, contributions,
                       lambda _: [jnp.zeros_like(s) for s in stats], blocks)
  return [jnp.where(update_now, _grafting.ema(old, new, b2), old)
          for old, new in zip(stats, grams)]


def _share(rows: int, phase, num_phases: int):
  """``(start, size)``: share ``phase`` of ``rows`` cut into ``num_phases``.

  The shares are contiguous and of equal size (the last one overlaps its
  neighbour rather than being short), so that every row falls in at least
  one share and every share costs the same.
  """
  size = -(-rows // num_phases)
  return jnp.minimum(phase * size, rows - size), size


def _rows(array: jax.Array, nbatch: int) -> jax.Array:
  """``array`` with its ``nbatch`` leading axes flattened into one."""
  batch = array.shape[:nbatch]
  return array.reshape((math.prod(batch),) + array.shape[nbatch:])


# Rows of matrices computed at once (roots, bases): unpacked, a batch of them
# takes at most this many bytes (a few such temporaries live meanwhile).
_BATCH_BYTES = 32 * 2**20


def _in_batches(fn, *arrays, row_bytes: int):
  """``fn(*arrays)`` computed on batches of rows, one after the other.

  ``fn`` maps arrays ``[m, ...]`` to a pytree of arrays ``[m, ...]``, each
  row on its own; it is called on at most ``_BATCH_BYTES // row_bytes`` rows
  at a time, so that what it unpacks is not held for all rows at once.
  """
  size = max(1, _BATCH_BYTES // row_bytes)
  rows = arrays[0].shape[0]
  if rows <= size:
    return fn(*arrays)
  count, rest = divmod(rows, size)
  full = count * size
  out = jax.lax.map(lambda xs: fn(*xs), tuple(
      x[:full].reshape((count, size) + x.shape[1:]) for x in arrays))
  out = jax.tree.map(lambda x: x.reshape((full,) + x.shape[2:]), out)
  if not rest:
    return out
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out,
                      fn(*(x[full:] for x in arrays)))


def _packed_roots(packed: jax.Array, *, dim: int, p: int, method: str,
                  ridge_epsilon) -> tuple[jax.Array, jax.Array]:
  """Packed inverse roots of packed ``[m, *packed]`` matrices, and errors."""

  def roots(c):
    result = _roots.stacked_inverse_pth_root(
        _symmetric.unpack(c, dim), p, method=method,
        ridge_epsilon=ridge_epsilon)
    return _symmetric.pack(result.root), result.error

  return _in_batches(roots, packed, row_bytes=4 * dim * dim)


def _refresh_roots(plan, stats, roots, refreshed_at, phases, count, floats,
                   specs, *, num_phases, root_method):
  """Recomputes the roots of phases ``[lo, hi)`` of every device's rows.

  Every factor's rows (on each device, its own) are cut into ``num_phases``
  equal shares (`_share`); phase ``k`` recomputes share ``k`` of every
  factor, so each phase costs about ``1 / num_phases`` of a full refresh
  (a ``d x d`` root costs about ``d^3``, and every size is split alike).
  The shares of all factors with the same ``(d, p)`` form one batched root
  call. A root that is not finite or whose error exceeds ``max_root_error``
  is rejected and the previous one kept.

  Padding rows (`_sharding.valid_rows`) keep their zeros and report
  nothing.

  Returns:
    New roots, new ``refreshed_at``, and per row the error of the root
    computed in this call (0 where none was) and whether it was rejected.
  """
  buckets = {}
  for index, factor in enumerate(plan.factors):
    buckets.setdefault((factor.dim, factor.exponent), []).append(index)
  nbatch = [len(s) for s in specs]

  def body(arrays, replicated):
    (lo, hi), count, eps, max_error = replicated
    root_shapes, batch_shapes = (
        [x.shape for x in xs] for xs in arrays[1:3])
    # Flat [rows, ...] views of this device's blocks: rows are what shares cut.
    stats, roots, refreshed_at, valid = (
        [_rows(x, n) for x, n in zip(xs, nbatch)] for xs in arrays)
    take = jax.lax.dynamic_slice_in_dim
    put = lambda x, rows, start: jax.lax.dynamic_update_slice_in_dim(
        x, rows, start, 0)

    def phase(k, carry):
      roots, refreshed_at, errors, rejected = map(list, carry)
      for (dim, p), members in buckets.items():
        shares = [_share(stats[i].shape[0], k, num_phases) for i in members]
        candidates = jnp.concatenate(
            [take(stats[i], *share) for i, share in zip(members, shares)])
        # With one phase the candidates do not depend on k, and XLA would
        # hoist the roots out of the loop, computing them on every step,
        # whatever the trip count. A cond on k (true inside the loop) keeps
        # them in.
        new_roots, error = jax.lax.cond(
            k < hi,
            functools.partial(_packed_roots, dim=dim, p=p,
                              method=root_method, ridge_epsilon=eps),
            lambda c: (jnp.zeros(c.shape, jnp.float32),
                       jnp.full(c.shape[:1], jnp.inf, jnp.float32)),
            candidates)
        ok = jnp.isfinite(error) & (error <= max_error)
        offset = 0
        for i, (start, size) in zip(members, shares):
          part = slice(offset, offset + size)
          offset += size
          own = take(valid[i], start, size)
          accepted = ok[part] & own
          old = take(roots[i], start, size)
          roots[i] = put(roots[i], jnp.where(
              accepted.reshape((size,) + (1,) * (old.ndim - 1)),
              new_roots[part].astype(old.dtype), old), start)
          refreshed_at[i] = put(refreshed_at[i], jnp.where(
              accepted, count, take(refreshed_at[i], start, size)), start)
          errors[i] = put(errors[i], jnp.where(own, error[part], 0.0), start)
          rejected[i] = put(rejected[i], own & ~ok[part], start)
      return roots, refreshed_at, errors, rejected

    per_row = lambda dtype: [jnp.zeros(x.shape[:1], dtype)
                             for x in refreshed_at]
    out = jax.lax.fori_loop(lo, hi, phase, (
        roots, refreshed_at, per_row(jnp.float32), per_row(jnp.bool_)))
    return tuple([x.reshape(shape) for x, shape in zip(xs, shapes)]
                 for xs, shapes in zip(out, (root_shapes,) + (batch_shapes,) * 3))

  valid = [_sharding.valid_rows(f, x.shape)
           for f, x in zip(plan.factors, refreshed_at)]
  return _sharding.map_blocks(
      body, specs, (list(stats), list(roots), list(refreshed_at), valid),
      (phases, count, floats.matrix_eps, floats.max_root_error),
      num_outputs=4)


def _multiplied(plan, key, block, matrices, specs) -> jax.Array:
  """Axis ``i`` of every block of piece ``key`` times ``matrices(index)``.

  ``block`` is laid out as the piece's factors, ``index`` runs over them.
  """
  for index, factor in plan.factors_of(*key):
    block = _sharding.constrain(
        _apply_root(block, matrices(index), factor.axis, len(specs[index])),
        specs[index])
  return block


def _families_of(plan, blocks, specs, family_specs):
  """Inverse of `_gradient_blocks`: ``{family: [units, *shape]}``."""
  out = {}
  for f, fam in enumerate(plan.families):
    if not fam.preconditioned:
      continue
    route = _sharding.rows_route(plan, f, specs, family_specs)
    if route is not None:
      out[f] = _sharding.from_rows(blocks[(f, 0)], fam.pieces[0], fam.shape,
                                   route)
      continue
    pieces = []
    for p in range(len(fam.pieces)):
      index, factor = plan.factors_of(f, p)[0]
      cut = _sharding.cut_spec(plan, factor, specs[index])
      x = blocks[(f, p)]
      if _sharding.is_rows(factor, specs[index]):
        x = _sharding.pin(x, (None,) * x.ndim)
      x = _sharding.from_layout(
          x, factor.batch_shape,
          _sharding.layout_batch_shape(factor, specs[index]))
      pieces.append(_sharding.pin(x, cut + (None,) * len(fam.shape)))
    out[f] = _blocks.assemble(pieces, fam.pieces)
  return out


def _precondition(plan, blocks, roots, specs, family_specs):
  """``G x_1 S_1^(-1/p) ... x_k S_k^(-1/p)`` of every block, per family."""
  unpacked = lambda i: _symmetric.unpack(
      roots[i], plan.factors[i].dim).astype(jnp.float32)
  return _families_of(plan, {
      key: _multiplied(plan, key, block, unpacked, specs)
      for key, block in blocks.items()}, specs, family_specs)


def _graft(plan, grafted, preconditioned, use_shampoo, graft: str):
  """Each unit's Shampoo direction at the norm of its grafted direction."""
  directions = []
  for f, (fam, graft_dir) in enumerate(zip(plan.families, grafted)):
    if not fam.preconditioned:  # Diagonal: the grafted optimizer alone.
      directions.append(graft_dir)
      continue
    shampoo_dir = preconditioned[f]
    if graft != "none":
      num, den = (_grafting.unit_norm(graft_dir),
                  _grafting.unit_norm(shampoo_dir))
      shampoo_dir = shampoo_dir * jnp.where(
          den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    directions.append(jnp.where(use_shampoo, shampoo_dir, graft_dir))
  return directions


def _momentum(directions, mus, step, b1, *, nesterov: bool, heavy_ball: bool):
  """Momentum on the grafted directions: new directions and new buffers."""
  if heavy_ball:
    mus = [b1 * m + d for m, d in zip(mus, directions)]
    return [d + b1 * m if nesterov else m
            for m, d in zip(mus, directions)], mus
  mus = [_grafting.ema(m, d, b1) for m, d in zip(mus, directions)]
  if nesterov:
    # Nesterov's look-ahead: one more average with the fresh direction.
    return [_grafting.ema(m, d, b1) / _grafting.bias_correction(b1, step + 1)
            for m, d in zip(mus, directions)], mus
  scale = _grafting.bias_correction(b1, step)
  return [m / scale for m in mus], mus


def _kept_where(finite, new, old) -> tuple[jax.Array, ...]:
  """``new`` where ``finite``, else ``old``, in ``old``'s dtypes."""
  return tuple(jnp.where(finite, n, o).astype(o.dtype)
               for n, o in zip(new, old))


def _count_true(masks) -> jax.Array:
  """The number of true entries over a list of boolean arrays, int32."""
  return sum((jnp.sum(m, dtype=jnp.int32) for m in masks),
             jnp.zeros([], jnp.int32))


def _factor_placement(plan, leaves, shard_axes):
  """For ``init``: per-factor arrays ``[*batch, ...]`` laid out and split.

  Returns ``place(arrays, indices=None)``: one array per factor of
  ``indices`` (default all; each in the factor's own batch shape) in the
  factor's layout (padding rows are zeros), pinned to its split
  (`_sharding.factor_batch_specs`).
  """
  specs = _sharding.factor_batch_specs(
      plan, [_sharding.leaf_spec(x) for x in leaves], shard_axes)

  def place(arrays, indices=None):
    factors = enumerate(plan.factors) if indices is None else (
        (i, plan.factors[i]) for i in indices)
    return tuple(
        _sharding.constrain(_sharding.to_layout(
            x, f.batch_shape, _sharding.layout_batch_shape(f, specs[i])),
                            specs[i])
        for x, (i, f) in zip(arrays, factors))

  return place


def _check_layout(transform, plan, stats, specs):
  """Raises unless the statistics have the shapes the plan and split need."""
  expected = [_sharding.layout_batch_shape(f, spec)
              + f.shape[len(f.batch_shape):]
              for f, spec in zip(plan.factors, specs)]
  got = [tuple(s.shape) for s in stats]
  if got == expected:
    return
  if got == [f.shape for f in plan.factors]:
    raise ValueError(
        f"{transform}: the state is in the checkpoint layout (unpadded), but"
        " on this mesh some statistics are stored as padded rows"
        f" ({expected}). After restoring a checkpoint call"
        " shampoo_optax.pad_state(tx, params, state, mesh).")
  raise ValueError(
      f"{transform}: the state's statistics have shapes {got}, but these"
      f" options, updates and mesh need {expected}: the state was made with"
      " other options (block_size, max_precondition_dim, exponent_override,"
      " layer_axes, cut_at_shards), for other parameters or for another mesh"
      " (with cut_at_shards, parameters split into other shard counts). Call"
      " init with this transformation, or build it with the options the state"
      " was made with; a checkpoint moves between meshes with"
      " shampoo_optax.unpad_state and shampoo_optax.pad_state.")


def _family_zeros(plan, leaves, dtype) -> tuple[jax.Array, ...]:
  """Zeros ``[units, *shape]`` per family, split like its leaves.

  ``dtype`` ``None`` takes the dtype of the family's first leaf.
  """
  leaf_specs = [_sharding.leaf_spec(x) for x in leaves]
  return tuple(
      _sharding.constrain(
          jnp.zeros((fam.units,) + fam.shape,
                    dtype or leaves[fam.members[0].leaf].dtype),
          _sharding.family_spec(plan, f, leaf_specs))
      for f, fam in enumerate(plan.families))


# ---------------------------------------------------------------------------


def scale_by_shampoo(
    block_size: int = 128,
    b1: float = 0.9,
    b2: float = 0.999,
    matrix_eps: float = 1e-6,
    graft: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float | None = None,
    precondition_every: int = 20,
    statistics_every: int = 1,
    start_preconditioning_step: int = 1,
    refresh: str = "all",
    root_method: str = "auto",
    exponent_override: int | None = None,
    nesterov: bool = False,
    heavy_ball: bool = False,
    max_precondition_dim: int = 4096,
    max_root_error: float = 0.5,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    layer_axes: Any = None,
    mu_dtype: Any = None,
    preconditioner_dtype: Any = jnp.float32,
    cut_at_shards: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales updates by Shampoo's Kronecker-factored preconditioner.

  For each parameter block :math:`G` of shape :math:`(d_1, \dots, d_k)` it
  keeps one statistic per axis,
  :math:`S_i \leftarrow \beta_2 S_i + (1 - \beta_2) G_{(i)} G_{(i)}^\top`
  (:math:`G_{(i)}` is :math:`G` unfolded along axis :math:`i`; plain sums when
  :math:`\beta_2 = 1`), and returns

  .. math::

    D = G \times_1 \hat S_1^{-1/p} \times_2 \dots \times_k \hat S_k^{-1/p},
    \qquad \hat S = S + \epsilon\, \lambda_{max}(S)\, I,\quad p = 2k,

  rescaled per unit (a leaf, or a layer of a stacked leaf, see
  ``layer_axes``) to the norm of the grafted optimizer's direction, then
  momentum. For a matrix this is :math:`\hat L^{-1/4} G \hat R^{-1/4}`. The
  result has the gradient's sign (apply ``-learning_rate`` after it, as
  `shampoo` does).

  Args:
    block_size: largest side of a preconditioned block; larger dims are cut
      into blocks, adjacent small dims of rank >= 3 tensors are merged.
    b1: momentum decay in ``[0, 1)``; 0 disables momentum.
    b2: decay of the statistics; 1.0 accumulates plain sums (the paper).
    matrix_eps: ridge :math:`\epsilon`, relative to the largest eigenvalue.
    graft: grafted optimizer, one of ``"adam"``, ``"rmsprop"``,
      ``"adagrad"``, ``"sgd"``, their ``"*_normalized"`` variants, or
      ``"none"`` (Shampoo's own step size; diagonal units then get the plain
      gradient, as with ``"sgd"``).
    graft_eps: :math:`\epsilon` of the grafted optimizer.
    graft_b2: second-moment decay of the grafted optimizer; ``None`` uses
      ``b2``.
    precondition_every: steps between recomputations of each inverse root.
    statistics_every: steps between statistics updates.
    start_preconditioning_step: before this step (0-based) the grafted
      optimizer alone drives the update; at this step every root is
      computed.
    refresh: ``"all"`` recomputes every root on one step in
      ``precondition_every``; ``"staggered"`` recomputes a
      ``1 / precondition_every`` share of each device's roots on every step
      (each root still every ``precondition_every`` steps), so no step
      stalls.
    root_method: ``"eigh"``, ``"newton"`` (coupled Newton iteration) or
      ``"auto"`` (the faster on the current backend).
    exponent_override: use :math:`S^{-1/p}` with this ``p`` for every factor.
    nesterov: Nesterov momentum.
    heavy_ball: ``m = b1 m + u`` instead of the (bias-corrected) average
      ``m = b1 m + (1 - b1) u``.
    max_precondition_dim: units with a dim above this (e.g. embedding
      tables) get only the grafted (diagonal) optimizer.
    max_root_error: a new root whose error
      :math:`\max|X^p \hat S - I|` exceeds this (or is not finite) is
      rejected and the previous root kept.
    skip_nonfinite: when any gradient is NaN/Inf, or a leaf's sum of squares
      overflows float32 (``|g|_F > ~1.8e19``, which would make the statistics
      infinite), return a zero update and leave the state unchanged (counted
      in ``diagnostics.nonfinite_steps``).
    shard_axes: mesh axis name(s) over which the factors are split (on top
      of following the parameters' own shardings, see `_sharding`); ``None``
      splits them only as the parameters are split.
    layer_axes: which axes of a leaf index independent stacked layers (e.g.
      0 for an ``nn.scan`` kernel ``[L, d_in, d_out]``): ``None`` (none), a
      pytree like the params of ``int`` / ``tuple[int, ...]`` / ``None``, or
      a callable of the params returning one. Each slice is preconditioned
      exactly as if it were a leaf of its own.
    mu_dtype: dtype of the momentum; ``None`` uses the parameters' dtype.
    preconditioner_dtype: storage dtype of the inverse roots (e.g.
      ``jnp.bfloat16`` halves them); the statistics are always float32.
    cut_at_shards: under explicit sharding, cut blocks at the boundaries of
      the parameters' shards where blocks of ``block_size`` would straddle
      them (e.g. a 768-row kernel split 8 ways, block 128: 8 blocks of 96
      rows, one per shard, instead of 6 of 128), so that FSDP never gathers
      a gradient. The state's shapes then depend on those shard counts: a
      checkpoint restores only where each parameter is split into as many
      shards.

  Returns:
    An ``optax.GradientTransformation`` whose state is a `ShampooState`.
  """
  block_size = _static_int("block_size", block_size, 1)
  precondition_every = _static_int("precondition_every", precondition_every, 1)
  statistics_every = _static_int("statistics_every", statistics_every, 1)
  start_preconditioning_step = _static_int(
      "start_preconditioning_step", start_preconditioning_step, 0)
  exponent_override = _static_int(
      "exponent_override", exponent_override, 1, allow_none=True)
  max_precondition_dim = _static_int(
      "max_precondition_dim", max_precondition_dim, 1)
  _check_range("b1", b1, 0.0, 1.0, high_open=True)
  _check_range("b2", b2, 0.0, 1.0)
  if graft_b2 is None:
    graft_b2 = b2
  _check_range("graft_b2", graft_b2, 0.0, 1.0)
  _check_range("matrix_eps", matrix_eps, 0.0)
  _check_range("graft_eps", graft_eps, 0.0)
  _check_range("max_root_error", max_root_error, 0.0)
  _check_choice("graft", graft, _grafting.GRAFTS)
  _check_choice("refresh", refresh, REFRESH_MODES)
  _check_choice("root_method", root_method, _roots.ROOT_METHODS)
  for name, flag in (("nesterov", nesterov), ("heavy_ball", heavy_ball),
                     ("skip_nonfinite", skip_nonfinite),
                     ("cut_at_shards", cut_at_shards)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be True or False, got {flag!r}.")
  shard_axes = _sharding.check_shard_axes(shard_axes)
  mu_dtype = _check_dtype("mu_dtype", mu_dtype)
  preconditioner_dtype = _check_dtype("preconditioner_dtype",
                                      preconditioner_dtype)
  if preconditioner_dtype is None:
    raise TypeError("preconditioner_dtype must be a floating dtype.")
  use_momentum = _is_traced(b1) or float(b1) != 0.0
  num_phases = precondition_every if refresh == "staggered" else 1
  floats = _Floats(b1, b2, matrix_eps, graft_eps, graft_b2, max_root_error)

  plan_for = functools.partial(
      _plan_of, layer_axes=layer_axes, block_size=block_size,
      max_precondition_dim=max_precondition_dim,
      exponent_override=exponent_override, cut_at_shards=cut_at_shards)

  def init_fn(params):
    plan, _, leaves, _ = plan_for(params)
    place = _factor_placement(plan, leaves, shard_axes)
    eye = lambda f: _symmetric.pack(jnp.eye(f.dim, dtype=preconditioner_dtype))
    per_family = functools.partial(_family_zeros, plan, leaves)

    return ShampooState(
        count=jnp.zeros([], jnp.int32),
        stats=place(jnp.zeros(f.shape, jnp.float32) for f in plan.factors),
        preconditioners=place(jnp.broadcast_to(eye(f), f.shape)
                              for f in plan.factors),
        refreshed_at=place(jnp.full(f.batch_shape, -1, jnp.int32)
                           for f in plan.factors),
        graft=per_family(jnp.float32) if _grafting.has_accumulator(graft)
        else None,
        mu=per_family(mu_dtype) if use_momentum else None,
        diagnostics=ShampooDiagnostics(
            root_failures=jnp.zeros([], jnp.int32),
            max_root_error=jnp.zeros([], jnp.float32),
            last_refresh_step=jnp.full([], -1, jnp.int32),
            nonfinite_steps=jnp.zeros([], jnp.int32),
        ),
    )

  def check_state(plan, paths, leaves, state, specs):
    # A traced b1 (optax.inject_hyperparams) momentum iff init made it.
    for name, field, wanted in (("graft", state.graft,
                                 _grafting.has_accumulator(graft)),
                                ("b1", state.mu, use_momentum)):
      if (field is not None) != wanted and not (name == "b1" and
                                                _is_traced(b1)):
        value = graft if name == "graft" else b1
        raise ValueError(
            f"scale_by_shampoo: the state was made with another {name}:"
            f" {name}={value!r} {'needs' if wanted else 'has no'}"
            f" {'accumulators' if name == 'graft' else 'momentum'}, the state"
            f" {'has none' if wanted else 'has them'}. Call init again with"
            " this transformation.")
    families = [(fam.units,) + fam.shape for fam in plan.families]
    for field in (state.graft, state.mu):
      if field is not None and [tuple(x.shape) for x in field] != families:
        raise ValueError(
            "scale_by_shampoo: the updates do not match the tree given to"
            " init: their units stack as "
            f"{families}, the state's as {[tuple(x.shape) for x in field]};"
            " leaves: "
            f"{[(jax.tree_util.keystr(k), tuple(x.shape)) for k, x in zip(paths, leaves)]}.")
    _check_layout("scale_by_shampoo", plan, state.stats, specs)

  def update_core(leaves, state, floats, plan, specs, family_specs):
    floats = _Floats(*(jnp.asarray(x, jnp.float32) for x in floats))
    count = state.count
    step = optax.safe_increment(count)
    pin = _sharding.family_pins(
        family_specs, state.mu if state.mu is not None else state.graft)
    stacked = [pin(plan.stack([g.astype(jnp.float32) for g in leaves], f), f)
               for f in range(len(plan.families))]
    finite = _all_finite(stacked) if skip_nonfinite else jnp.array(True)
    # Non-finite values reach only results that are discarded below.

    blocks = _gradient_blocks(plan, stacked, specs, family_specs)
    stats = _update_statistics(
        plan, blocks, list(state.stats),
        finite & (count % statistics_every == 0), floats.b2, specs)

    use_shampoo = count >= start_preconditioning_step
    since_start = count - start_preconditioning_step
    first = finite & (since_start == 0)
    if refresh == "staggered":
      lo = jnp.where(first, 0, since_start % num_phases)
      hi = jnp.where(first, num_phases, lo + 1)
      active = finite & use_shampoo
    else:
      lo = jnp.zeros([], jnp.int32)
      hi = jnp.ones([], jnp.int32)
      active = finite & use_shampoo & (since_start % precondition_every == 0)
    hi = jnp.where(active, hi, lo).astype(jnp.int32)
    lo = lo.astype(jnp.int32)
    roots, refreshed_at, errors, rejected = _refresh_roots(
        plan, stats, state.preconditioners, state.refreshed_at, (lo, hi),
        count, floats, specs, num_phases=num_phases, root_method=root_method)

    preconditioned = jax.lax.cond(
        use_shampoo,
        functools.partial(_precondition, plan, specs=specs,
                          family_specs=family_specs),
        lambda b, _: {f: jnp.zeros_like(stacked[f])
                      for f, fam in enumerate(plan.families)
                      if fam.preconditioned},
        blocks, roots)
    preconditioned = {f: pin(d, f) for f, d in preconditioned.items()}

    # Without skip_nonfinite, `finite` is a constant True and the selects
    # below fold away.
    keep = functools.partial(_kept_where, finite)
    accumulators = None if state.graft is None else list(state.graft)
    grafted = _grafting.graft_direction(graft, stacked, accumulators, step,
                                        floats.graft_b2, floats.graft_eps)
    directions = _graft(plan, grafted.direction, preconditioned, use_shampoo,
                        graft)
    graft_state = None
    if accumulators is not None:
      graft_state = keep(grafted.accumulators, state.graft)
    mu = None
    if state.mu is not None:
      directions, new_mus = _momentum(
          directions, [m.astype(jnp.float32) for m in state.mu], step,
          floats.b1, nesterov=nesterov, heavy_ball=heavy_ball)
      mu = keep(new_mus, state.mu)
    # The per-leaf work is only this: a slice of each family, cast. The
    # barrier makes XLA compute the families once instead of copying their
    # whole elementwise expression into every leaf's slice (compile time).
    directions = jax.lax.optimization_barrier(
        [pin(jnp.where(finite, d, 0.0), f) for f, d in enumerate(directions)])
    starts = plan.member_starts(count, _sharding.units_whole(
        family_specs, len(plan.families)))
    updates = [
        d.astype(g.dtype) for d, g in zip(
            plan.unstack_tree(directions, starts), leaves)]

    refreshed = hi > lo
    failures = _count_true(rejected)
    max_error = functools.reduce(jnp.maximum, (
        jnp.max(jnp.where(jnp.isnan(e), jnp.inf, e), initial=0.0)
        for e in errors), jnp.zeros([], jnp.float32))
    diagnostics = state.diagnostics
    # The statistics and roots are already guarded (by update_now and empty
    # refresh phases).
    new_state = ShampooState(
        count=jnp.where(finite, step, count),
        stats=tuple(stats),
        preconditioners=tuple(roots),
        refreshed_at=tuple(refreshed_at),
        graft=graft_state,
        mu=mu,
        diagnostics=ShampooDiagnostics(
            root_failures=diagnostics.root_failures + failures,
            max_root_error=jnp.where(refreshed, max_error,
                                     diagnostics.max_root_error),
            last_refresh_step=jnp.where(refreshed, count,
                                        diagnostics.last_refresh_step),
            nonfinite_steps=diagnostics.nonfinite_steps
            + (~finite).astype(jnp.int32)),
    )
    return updates, new_state

  update_fn = _update_fn("scale_by_shampoo", ShampooState, plan_for,
                         check_state, update_core, shard_axes, floats)
  return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    block_size: int = 128,
    b1: float = 0.9,
    b2: float = 0.999,
    matrix_eps: float = 1e-6,
    graft: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float | None = None,
    precondition_every: int = 20,
    statistics_every: int = 1,
    start_preconditioning_step: int = 1,
    refresh: str = "all",
    root_method: str = "auto",
    exponent_override: int | None = None,
    nesterov: bool = False,
    heavy_ball: bool = False,
    max_precondition_dim: int = 4096,
    max_root_error: float = 0.5,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    layer_axes: Any = None,
    mu_dtype: Any = None,
    preconditioner_dtype: Any = jnp.float32,
    weight_decay: float = 0.0,
    mask: Any = None,
    cut_at_shards: bool = False,
) -> optax.GradientTransformation:
  r"""Shampoo with decoupled weight decay, the drop-in for ``optax.adamw``.

  .. math::

    w \leftarrow w - \eta_t \left(D_t + \lambda w\right)

  where :math:`D_t` is `scale_by_shampoo`'s direction, :math:`\eta_t` the
  learning rate (a float or an optax schedule) and :math:`\lambda` the
  ``weight_decay``, applied where ``mask`` is true (a pytree of bools or a
  callable of the params, as in ``optax.adamw``).

  Args:
    learning_rate: float or ``optax.Schedule``.
    block_size, b1, b2, matrix_eps, graft, graft_eps, graft_b2,
      precondition_every, statistics_every, start_preconditioning_step,
      refresh, root_method, exponent_override, nesterov, heavy_ball,
      max_precondition_dim, max_root_error, skip_nonfinite, shard_axes,
      layer_axes, mu_dtype, preconditioner_dtype, cut_at_shards: see
      `scale_by_shampoo`.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: where to apply weight decay.

  Returns:
    An ``optax.GradientTransformation``.
  """
  _check_range("weight_decay", weight_decay, 0.0)
  tx = optax.chain(
      scale_by_shampoo(
          block_size=block_size,
          b1=b1,
          b2=b2,
          matrix_eps=matrix_eps,
          graft=graft,
          graft_eps=graft_eps,
          graft_b2=graft_b2,
          precondition_every=precondition_every,
          statistics_every=statistics_every,
          start_preconditioning_step=start_preconditioning_step,
          refresh=refresh,
          root_method=root_method,
          exponent_override=exponent_override,
          nesterov=nesterov,
          heavy_ball=heavy_ball,
          max_precondition_dim=max_precondition_dim,
          max_root_error=max_root_error,
          skip_nonfinite=skip_nonfinite,
          shard_axes=shard_axes,
          layer_axes=layer_axes,
          mu_dtype=mu_dtype,
          preconditioner_dtype=preconditioner_dtype,
          cut_at_shards=cut_at_shards,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _skipping_nonfinite(tx) if skip_nonfinite else tx


def _skipping_nonfinite(tx) -> optax.GradientTransformationExtraArgs:
  """``tx`` made a no-op on the steps its first transform skipped.

  ``tx`` is a chain whose first state has ``diagnostics.nonfinite_steps``.
  """

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = tx.update(updates, state, params, **extra_args)
    # A step the first transform skipped is a no-op for the whole chain: no
    # weight decay, and the learning-rate schedule does not advance.
    skipped = (new_state[0].diagnostics.nonfinite_steps
               != state[0].diagnostics.nonfinite_steps)
    new_state = (new_state[0],) + tuple(jax.tree.map(
        lambda new, old: jnp.where(skipped, old, new), new_state[1:],
        state[1:]))
    new_updates = jax.tree.map(
        lambda u: jnp.where(skipped, jnp.zeros_like(u), u), new_updates)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
