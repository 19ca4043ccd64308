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
one factor per axis, each with exponent :math:`-1/(2k)` (:math:`k` the
number of factored axes, see ``max_precondition_dim``). The roots are
recomputed every ``precondition_every`` steps. :math:`D_t` is rescaled per
unit (a leaf, or one layer of a stacked leaf) to the norm of a simple
optimizer's direction (grafting, see `_grafting`), then momentum follows.

This module holds Shampoo's own math: the refresh of the inverse roots
(`_refresh_roots`), preconditioning (`_precondition`), grafting (`_graft`)
and momentum (`_momentum`). Stacking, blocks, statistics and the update
shell are the shared stages of `_stages`.
"""

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from shampoo_optax import _grafting
from shampoo_optax import _options
from shampoo_optax import _refresh
from shampoo_optax import _roots
from shampoo_optax import _sharding
from shampoo_optax import _stages
from shampoo_optax import _symmetric

REFRESH_MODES = ("all", "staggered", "drift")


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
    roots_refreshed: cumulative number of inverse roots recomputed and
      accepted (per block and factor; with ``refresh="drift"``, how many
      the drift called for).
  """

  root_failures: chex.Array
  max_root_error: chex.Array
  last_refresh_step: chex.Array
  nonfinite_steps: chex.Array
  roots_refreshed: chex.Array


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
      never (and on padding rows).
    graft: float32 accumulators of the grafted optimizer in the
      parameters' tree, each shaped and split like its parameter, or
      ``None`` for ``"sgd"``/``"none"`` grafting.
    mu: momentum in the parameters' tree, each shaped and split like its
      parameter, in ``mu_dtype``; ``None`` when ``b1 == 0``.
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
                 "graft_b2", "max_root_error", "drift_tolerance",
                 "weight_decay")
STATIC_OPTIONS = (
    "block_size",
    "graft",
    "precondition_every",
    "statistics_every",
    "start_preconditioning_step",
    "refresh",
    "root_method",
    "matrix_eps_mode",
    "exponent_override",
    "nesterov",
    "heavy_ball",
    "max_precondition_dim",
    "skip_nonfinite",
    "shard_axes",
    "layer_axes",
    "precondition",
    "base_width",
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
  drift_tolerance: Any


class _Options(NamedTuple):
  """The static options of `scale_by_shampoo`, checked (`_checked`)."""

  block_size: int
  graft: str
  precondition_every: int
  statistics_every: int
  start_preconditioning_step: int
  refresh: str
  root_method: str
  matrix_eps_mode: str
  exponent_override: int | tuple[tuple[int, int], ...] | None
  nesterov: bool
  heavy_ball: bool
  max_precondition_dim: int
  skip_nonfinite: bool
  shard_axes: Any
  layer_axes: Any
  precondition: Any
  base_width: int | None
  mu_dtype: Any
  preconditioner_dtype: Any
  cut_at_shards: bool
  use_momentum: bool
  floats: _Floats


def _checked(b1, b2, matrix_eps, graft_eps, graft_b2, max_root_error,
             drift_tolerance, **static) -> _Options:
  """Validates every option of `scale_by_shampoo` (clear errors, no tracing).
  """
  for name, minimum in (("block_size", 1), ("precondition_every", 1),
                        ("statistics_every", 1),
                        ("start_preconditioning_step", 0),
                        ("max_precondition_dim", 1)):
    static[name] = _options.static_int(name, static[name], minimum)
  static["base_width"] = _options.static_int(
      "base_width", static["base_width"], 1, allow_none=True)
  static["exponent_override"] = _options.check_exponent(
      "exponent_override", static["exponent_override"])
  _options.check_range("b1", b1, 0.0, 1.0, high_open=True)
  _options.check_range("b2", b2, 0.0, 1.0)
  if graft_b2 is None:
    graft_b2 = b2
  _options.check_range("graft_b2", graft_b2, 0.0, 1.0)
  _options.check_range("matrix_eps", matrix_eps, 0.0)
  _options.check_range("graft_eps", graft_eps, 0.0)
  _options.check_range("max_root_error", max_root_error, 0.0)
  _options.check_range("drift_tolerance", drift_tolerance, 0.0)
  _options.check_choice("graft", static["graft"], _grafting.GRAFTS)
  _options.check_choice("refresh", static["refresh"], REFRESH_MODES)
  _options.check_choice("root_method", static["root_method"],
                        _roots.ROOT_METHODS)
  _options.check_choice("matrix_eps_mode", static["matrix_eps_mode"],
                        _roots.REGULARIZATIONS)
  if static["matrix_eps_mode"] == "pseudo_inverse" and (
      static["root_method"] == "newton"):
    raise ValueError(
        "matrix_eps_mode='pseudo_inverse' needs eigenvalues: use"
        " root_method='eigh' or 'auto' (which then picks 'eigh'), not"
        " 'newton'.")
  if static["matrix_eps_mode"] == "pseudo_inverse" and (
      static["refresh"] == "drift"):
    raise ValueError(
        "refresh='drift' scores a root against the current statistics, which"
        " a pseudo-inverse root cannot do on the directions it dropped: use"
        " matrix_eps_mode 'relative' or 'absolute', or refresh 'all' or"
        " 'staggered'.")
  _options.check_flags(**{name: static[name] for name in (
      "nesterov", "heavy_ball", "skip_nonfinite", "cut_at_shards")})
  static["shard_axes"] = _sharding.check_shard_axes(static["shard_axes"])
  static["mu_dtype"] = _options.check_dtype("mu_dtype", static["mu_dtype"])
  static["preconditioner_dtype"] = _options.check_dtype(
      "preconditioner_dtype", static["preconditioner_dtype"], allow_none=False)
  return _Options(
      **static, use_momentum=_options.is_traced(b1) or float(b1) != 0.0,
      floats=_Floats(b1, b2, matrix_eps, graft_eps, graft_b2, max_root_error,
                     drift_tolerance))


# ---------------------------------------------------------------------------
# Shampoo's stages.


def _packed_roots(packed: jax.Array, *, dim: int, p: int, method: str,
                  ridge_epsilon, regularization: str
                  ) -> tuple[jax.Array, jax.Array]:
  """Packed inverse roots of packed ``[m, *packed]`` matrices, and errors."""

  def roots(c):
    result = _roots.stacked_inverse_pth_root(
        _symmetric.unpack(c, dim), p, method=method,
        ridge_epsilon=ridge_epsilon, regularization=regularization)
    return _symmetric.pack(result.root), result.error

  return _stages.in_batches(roots, packed, row_bytes=4 * dim * dim)


def _refresh_window(count, active, options: _Options):
  """The phases ``[lo, hi)`` of the roots to recompute at step ``count``.

  ``hi == lo`` (nothing) unless ``active``. With ``refresh="staggered"``
  one phase a step, and every phase at the first preconditioned step; with
  ``"drift"`` the single phase at the first preconditioned step only
  (`_refresh_drifted` takes over after it).
  """
  since_start = count - options.start_preconditioning_step
  if options.refresh == "drift":
    lo = jnp.zeros([], jnp.int32)
    hi = jnp.ones([], jnp.int32)
    active = active & (since_start == 0)
  elif options.refresh == "staggered":
    first = since_start == 0
    lo = jnp.where(first, 0, since_start % options.precondition_every)
    hi = jnp.where(first, options.precondition_every, lo + 1)
  else:
    lo = jnp.zeros([], jnp.int32)
    hi = jnp.ones([], jnp.int32)
    active = active & (since_start % options.precondition_every == 0)
  return lo.astype(jnp.int32), jnp.where(active, hi, lo).astype(jnp.int32)


def _refresh_roots(layout, stats, roots, refreshed_at, phases, count, floats,
                   *, num_phases, root_method, regularization):
  """Recomputes the roots of phases ``[lo, hi)`` of every device's rows.

  Each device's rows of all factors are scheduled by `_refresh.schedule`:
  every root is recomputed in exactly one of the ``num_phases`` phases, and
  the phases cost about the same (a ``d x d`` root costs about ``d^3``).
  The rows of one phase with the same ``(d, p)`` form one batched root call.
  A root that is not finite or whose error exceeds ``max_root_error`` is
  rejected and the previous one kept.

  Padding rows (`_sharding.valid_rows`) keep their zeros and report
  nothing.

  Returns:
    New roots, new ``refreshed_at``, and per row the error of the root
    computed in this call (0 where none was) and whether it was rejected.
  """
  plan, specs = layout.plan, layout.specs
  nbatch = [len(s) for s in specs]

  def body(arrays, replicated):
    (lo, hi), count, eps, max_error = replicated
    root_shapes, batch_shapes = (
        [x.shape for x in xs] for xs in arrays[1:3])
    # Flat [rows, ...] views of this device's blocks: rows are scheduled.
    stats, roots, refreshed_at, valid = (
        [_stages.rows(x, n) for x, n in zip(xs, nbatch)] for xs in arrays)
    buckets = _refresh.schedule([(f.dim, f.exponent) for f in plan.factors],
                                [x.shape[0] for x in stats], num_phases)

    def phase(k, carry):
      carry = tuple(map(list, carry))
      for bucket in buckets:
        for slot in bucket.slots:
          take = lambda xs, slot=slot, bucket=bucket: _refresh.gather(
              bucket, slot, [xs[i] for i in bucket.members], k)[0]
          candidates, chunk = _refresh.gather(
              bucket, slot, [stats[i] for i in bucket.members], k)
          # A cond on k: XLA would otherwise hoist roots that do not depend
          # on the loop out of it, computing them whatever the trip count.
          new_roots, error = jax.lax.cond(
              chunk & (k < hi),
              functools.partial(_packed_roots, dim=bucket.key[0],
                                p=bucket.key[1], method=root_method,
                                ridge_epsilon=eps,
                                regularization=regularization),
              lambda c: (jnp.zeros_like(c),
                         jnp.full_like(c[:, 0, 0], jnp.inf)),
              candidates)
          own = take(valid) & chunk
          ok = jnp.isfinite(error) & (error <= max_error)
          accepted = ok & own
          old = [take(x) for x in carry]
          new = (jnp.where(accepted[:, None, None],
                           new_roots.astype(old[0].dtype), old[0]),
                 jnp.where(accepted, count, old[1]),
                 jnp.where(own, error, old[2]),
                 jnp.where(own, ~ok, old[3]))
          for xs, values in zip(carry, new):
            updated = _refresh.scatter(
                bucket, slot, [xs[i] for i in bucket.members], values, k)
            for i, x in zip(bucket.members, updated):
              xs[i] = x
      return carry

    per_row = lambda dtype: [jnp.zeros_like(x, dtype) for x in refreshed_at]
    out = jax.lax.fori_loop(lo, hi, phase, (
        roots, refreshed_at, per_row(jnp.float32), per_row(jnp.bool_)))
    out_shapes = (root_shapes,) + (batch_shapes,) * 3
    return tuple([x.reshape(shape) for x, shape in zip(xs, shapes)]
                 for xs, shapes in zip(out, out_shapes))

  valid = [_sharding.valid_rows(f, x.shape)
           for f, x in zip(plan.factors, refreshed_at)]
  return _sharding.map_blocks(
      body, specs, (list(stats), list(roots), list(refreshed_at), valid),
      (phases, count, floats.matrix_eps, floats.max_root_error),
      num_outputs=4)


def _drift_scores(packed_stats, packed_roots, at, own, *, dim, p, eps,
                  regularization):
  """`_roots.drift_error` of each row's root; +inf for roots never accepted,
  -inf for padding rows."""

  def scores(s, r):
    return _roots.drift_error(
        _symmetric.unpack(s, dim), _symmetric.unpack(r, dim), p,
        ridge_epsilon=eps, regularization=regularization)

  drift = _stages.in_batches(scores, packed_stats, packed_roots,
                             row_bytes=8 * dim * dim)
  return jnp.where(own, jnp.where(at < 0, jnp.inf, drift), -jnp.inf)


def _refresh_drifted(layout, stats, roots, refreshed_at, active, count, floats,
                     *, num_phases, root_method, regularization):
  """Recomputes, on each device, the roots that drifted most.

  Every root is scored by `_roots.drift_error` against its current
  statistics; of each factor's rows on a device, the ``ceil(rows /
  num_phases)`` with the highest scores above ``drift_tolerance`` are
  recomputed (one batched call per bucket of factors with the same
  ``(d, p)``, skipped when none is due), and accepted as in
  `_refresh_roots`.

  Returns:
    As `_refresh_roots`.
  """
  plan, specs = layout.plan, layout.specs
  nbatch = [len(s) for s in specs]

  def body(arrays, replicated):
    active, count, eps, max_error, tolerance = replicated
    shapes = [[x.shape for x in xs] for xs in arrays[1:3]]
    stats, roots, refreshed_at, valid = (
        [_stages.rows(x, n) for x, n in zip(xs, nbatch)] for xs in arrays)
    errors = [jnp.zeros_like(x, jnp.float32) for x in refreshed_at]
    rejected = [jnp.zeros_like(x, jnp.bool_) for x in refreshed_at]
    for bucket in _refresh.schedule([(f.dim, f.exponent) for f in plan.factors],
                                    [x.shape[0] for x in stats], 1):
      dim, p = bucket.key
      picked = [_refresh.most_drifted(
          _drift_scores(stats[i], roots[i], refreshed_at[i], valid[i],
                        dim=dim, p=p, eps=eps, regularization=regularization),
          num_phases, tolerance, active) for i in bucket.members]
      chosen = jnp.concatenate([c for _, c in picked])
      new_roots, error = jax.lax.cond(
          jnp.any(chosen),
          functools.partial(_packed_roots, dim=dim, p=p, method=root_method,
                            ridge_epsilon=eps, regularization=regularization),
          lambda c: (jnp.zeros_like(c), jnp.full_like(c[:, 0, 0], jnp.inf)),
          jnp.concatenate([stats[i][index]
                           for i, (index, _) in zip(bucket.members, picked)]))
      ok = jnp.isfinite(error) & (error <= max_error)
      start = 0
      for i, (index, due) in zip(bucket.members, picked):
        part = slice(start, start + index.shape[0])
        start = part.stop
        accepted = due & ok[part]
        roots[i] = _refresh.put(roots[i], index, accepted, new_roots[part])
        refreshed_at[i] = _refresh.put(refreshed_at[i], index, accepted,
                                       jnp.broadcast_to(count, index.shape))
        errors[i] = _refresh.put(errors[i], index, due, error[part])
        rejected[i] = _refresh.put(rejected[i], index, due, ~ok[part])
    return ([x.reshape(s) for x, s in zip(roots, shapes[0])],) + tuple(
        [x.reshape(s) for x, s in zip(xs, shapes[1])]
        for xs in (refreshed_at, errors, rejected))

  valid = [_sharding.valid_rows(f, x.shape)
           for f, x in zip(plan.factors, refreshed_at)]
  return _sharding.map_blocks(
      body, specs, (list(stats), list(roots), list(refreshed_at), valid),
      (active, count, floats.matrix_eps, floats.max_root_error,
       floats.drift_tolerance), num_outputs=4)


def _precondition(layout, grads, roots, use_shampoo, base_width) -> dict:
  """``G x_1 S_1^(-1/p) ... x_k S_k^(-1/p)`` of every block, per family.

  With ``base_width``, each block at the RMS of `_stages.width_normalized`.
  Zeros before ``use_shampoo`` (a cond: the products are skipped).
  """
  plan = layout.plan

  def precondition(blocks, roots):
    unpacked = lambda i: _symmetric.unpack(
        roots[i], plan.factors[i].dim).astype(jnp.float32)
    directions = {key: _stages.multiplied(layout, key, block, unpacked)
                  for key, block in blocks.items()}
    if base_width is not None:
      directions = {key: _stages.width_normalized(layout, key, d, base_width)
                    for key, d in directions.items()}
    return _stages.families_of(layout, directions)

  preconditioned = jax.lax.cond(
      use_shampoo, precondition,
      lambda b, _: {f: jnp.zeros_like(grads.stacked[f])
                    for f, fam in enumerate(plan.families)
                    if fam.preconditioned},
      grads.blocks, roots)
  return {f: grads.pin(d, f) for f, d in preconditioned.items()}


def _graft(plan, grafted, preconditioned, use_shampoo, graft: str,
           base_width):
  """Each unit's Shampoo direction at the norm of its grafted direction.

  With ``base_width`` the blocks' RMS is already set (`_precondition`): no
  grafting; before ``use_shampoo`` the grafted direction times
  `_stages.width_scale`.
  """
  directions = []
  for f, (fam, graft_dir) in enumerate(zip(plan.families, grafted)):
    if not fam.preconditioned:  # Diagonal: the grafted optimizer alone.
      directions.append(graft_dir)
      continue
    shampoo_dir = preconditioned[f]
    if base_width is not None:
      graft_dir = graft_dir * _stages.width_scale(fam, base_width)
    elif graft != "none":
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


def _diagnostics(old: ShampooDiagnostics, count, errors, rejected,
                 refreshed_at, finite) -> ShampooDiagnostics:
  """The diagnostics after step ``count``.

  ``errors`` and ``rejected``: per row, the error of the root computed at
  this step (0 where none was) and whether it was rejected;
  ``refreshed_at`` is ``count`` where one was accepted.
  """
  accepted = _stages.count_true([at == count for at in refreshed_at])
  refreshed = accepted + _stages.count_true(rejected) > 0
  max_error = functools.reduce(jnp.maximum, (
      jnp.max(jnp.where(jnp.isnan(e), jnp.inf, e), initial=0.0)
      for e in errors), jnp.zeros([], jnp.float32))
  return ShampooDiagnostics(
      root_failures=old.root_failures + _stages.count_true(rejected),
      max_root_error=jnp.where(refreshed, max_error, old.max_root_error),
      last_refresh_step=jnp.where(refreshed, count, old.last_refresh_step),
      nonfinite_steps=old.nonfinite_steps + (~finite).astype(jnp.int32),
      roots_refreshed=old.roots_refreshed + accepted)


def _init(plan, leaves, treedef, options: _Options) -> ShampooState:
  """The state of `scale_by_shampoo` for the leaves of ``plan``."""
  place = _stages.factor_placement(plan, leaves, options.shard_axes)
  eye = lambda f: _symmetric.pack(
      jnp.eye(f.dim, dtype=options.preconditioner_dtype))
  per_factor = functools.partial(_stages.per_factor, plan)
  return ShampooState(
      count=jnp.zeros([], jnp.int32),
      stats=per_factor(place(jnp.zeros(f.shape, jnp.float32)
                             for f in plan.factors)),
      preconditioners=per_factor(place(jnp.broadcast_to(eye(f), f.shape)
                                       for f in plan.factors)),
      refreshed_at=per_factor(place((jnp.full(f.batch_shape, -1, jnp.int32)
                                     for f in plan.factors), fill=-1)),
      graft=treedef.unflatten(_stages.leaf_zeros(leaves, jnp.float32))
      if _grafting.has_accumulator(options.graft) else None,
      mu=treedef.unflatten(_stages.leaf_zeros(leaves, options.mu_dtype))
      if options.use_momentum else None,
      diagnostics=ShampooDiagnostics(
          root_failures=jnp.zeros([], jnp.int32),
          max_root_error=jnp.zeros([], jnp.float32),
          last_refresh_step=jnp.full([], -1, jnp.int32),
          nonfinite_steps=jnp.zeros([], jnp.int32),
          roots_refreshed=jnp.zeros([], jnp.int32),
      ),
  )


def _check_state(layout, paths, leaves, state: ShampooState,
                 options: _Options) -> None:
  """Raises unless ``state`` was made for these updates and options."""
  # A traced b1 (optax.inject_hyperparams) has momentum iff init made it.
  b1 = options.floats.b1
  for name, field, wanted in (
      ("graft", state.graft, _grafting.has_accumulator(options.graft)),
      ("b1", state.mu, options.use_momentum)):
    if (field is not None) != wanted and not (name == "b1" and
                                              _options.is_traced(b1)):
      value = options.graft if name == "graft" else b1
      raise ValueError(
          f"scale_by_shampoo: the state was made with another {name}:"
          f" {name}={value!r} {'needs' if wanted else 'has no'}"
          f" {'accumulators' if name == 'graft' else 'momentum'}, the state"
          f" {'has none' if wanted else 'has them'}. Call init again with"
          " this transformation.")
  _stages.check_per_leaf("scale_by_shampoo", layout, paths, leaves,
                         (state.graft, state.mu))
  _stages.check_dtypes("scale_by_shampoo", (
      ("preconditioner_dtype", options.preconditioner_dtype,
       state.preconditioners), ("mu_dtype", options.mu_dtype, state.mu)))
  _stages.check_layout("scale_by_shampoo", layout, state.stats)


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
    drift_tolerance: float = 0.1,
    root_method: str = "auto",
    matrix_eps_mode: str = "relative",
    exponent_override: int | dict[int, int] | None = None,
    nesterov: bool = False,
    heavy_ball: bool = False,
    max_precondition_dim: int = 4096,
    max_root_error: float = 0.5,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    layer_axes: Any = None,
    precondition: Any = None,
    base_width: int | None = None,
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
    matrix_eps: :math:`\epsilon` of the statistics' roots, used as
      ``matrix_eps_mode`` says.
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
      stalls; ``"drift"`` spends the same per-step budget on the roots
      that drifted most: on every step each root is scored by
      `shampoo_optax.drift_error` against its current statistics (how far
      the preconditioned spectrum is from flat), and of each device's rows of
      each factor the ``ceil(rows / precondition_every)`` scoring highest
      above ``drift_tolerance`` are recomputed (the scoring costs a few
      matrix products per root, no eigendecomposition). Fresh roots where
      the statistics move, none where they do not.
    drift_tolerance: with ``refresh="drift"``, the score above which a root
      is due (0: every step, within the budget). Fresh float32 roots score
      below 0.08 (`shampoo_optax.inverse_pth_root`).
    root_method: ``"eigh"``, ``"newton"`` (coupled Newton iteration) or
      ``"auto"`` (the faster on the current backend).
    matrix_eps_mode: how ``matrix_eps`` regularizes a root:
      ``"relative"``, the ridge :math:`\epsilon \lambda_{max}(S)` (the
      paper's, scale-free); ``"absolute"``, the ridge :math:`\epsilon`;
      ``"pseudo_inverse"``, no ridge, the eigenvalues at or below
      :math:`\epsilon \lambda_{max}(S)` dropped (the root is zero on
      directions the statistics have not seen, rather than
      :math:`(\epsilon \lambda_{max})^{-1/p}`, which a rank-deficient block's
      statistics otherwise amplify most; needs ``root_method`` ``"eigh"``
      or ``"auto"``).
    exponent_override: ``p`` of :math:`S^{-1/p}` instead of ``2k``: an
      int for every factor, or a dict ``{k: p}`` by the number ``k`` of
      factored axes of a block (``{2: 2}``: ``-1/2`` per side of a matrix;
      orders not listed keep ``2k``).
    nesterov: Nesterov momentum.
    heavy_ball: ``m = b1 m + u`` instead of the (bias-corrected) average
      ``m = b1 m + (1 - b1) u``.
    max_precondition_dim: largest statistics side. An axis whose blocks'
      side ``min(dim, block_size)`` is above this gets no factor (identity
      on that side: one-sided, with ``p = 2`` for a matrix); a unit with no
      factored axis gets only the grafted (diagonal) optimizer. With
      ``block_size <= max_precondition_dim`` every matrix is factored on
      both sides, in blocks.
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
      0 for an ``nn.scan`` kernel ``[L, d_in, d_out]``): ``None`` (none), an
      ``int`` or ``tuple[int, ...]`` for every leaf, a pytree prefix of the
      params with such entries (or ``None``), or a callable of the params
      returning one. Each slice is preconditioned
      exactly as if it were a leaf of its own.
    precondition: which leaves may get matrices, like an optax mask: ``None``
      (every leaf whose shape allows), a bool, a pytree prefix of the params
      of bools, or a callable of the params returning one. The others get
      the grafted optimizer alone (e.g. embeddings and the output head on
      Adam, ``precondition=shampoo_optax.hidden_matrices()``).
    base_width: width-aware scaling, for one learning rate across widths
      (sweep a narrow model, train a wide one with the same value): every
      block of a preconditioned unit is rescaled to RMS
      ``base_width / width``, the unit's width being the square root of its
      size (``d`` for a ``d x d`` matrix), replacing grafting for them;
      `shampoo` then also scales their weight decay by
      ``base_width / width``. Set it to the width (``d_model``) of the
      model the learning rate was tuned on; ``None``: off. See
      `shampoo_optax._stages.width_normalized` (arXiv 2512.05620).
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
  options = _checked(**locals())
  floats = options.floats
  plan_for = functools.partial(
      _stages.plan_of, transform="scale_by_shampoo", layer_axes=layer_axes,
      precondition=precondition,
      block_size=options.block_size,
      max_precondition_dim=options.max_precondition_dim,
      exponent_override=options.exponent_override,
      cut_at_shards=cut_at_shards)

  def update_core(leaves, state, floats, layout):
    floats = _Floats(*(jnp.asarray(x, jnp.float32) for x in floats))
    count, step = state.count, optax.safe_increment(state.count)
    mu_leaves, graft_leaves = (_stages.leaves_of(layout, x)
                               for x in (state.mu, state.graft))
    mus = _stages.stacked_state(layout, mu_leaves)
    accumulators = _stages.stacked_state(layout, graft_leaves)
    grads = _stages.gradients(
        layout, leaves, mus if mus is not None else accumulators,
        options.skip_nonfinite)
    finite = grads.finite
    stats = _stages.update_statistics(
        layout, grads.blocks, list(state.stats),
        finite & (count % options.statistics_every == 0), floats.b2)

    use_shampoo = count >= options.start_preconditioning_step
    phases = _refresh_window(count, finite & use_shampoo, options)
    roots, refreshed_at, errors, rejected = _refresh_roots(
        layout, stats, state.preconditioners, state.refreshed_at, phases,
        count, floats, root_method=options.root_method,
        regularization=options.matrix_eps_mode,
        num_phases=(options.precondition_every
                    if options.refresh == "staggered" else 1))
    if options.refresh == "drift":
      roots, refreshed_at, drift_errors, drift_rejected = _refresh_drifted(
          layout, stats, roots, refreshed_at,
          finite & use_shampoo & (phases[1] == phases[0]),
          count, floats, num_phases=options.precondition_every,
          root_method=options.root_method,
          regularization=options.matrix_eps_mode)
      errors, rejected = errors + drift_errors, rejected + drift_rejected
    preconditioned = _precondition(layout, grads, roots, use_shampoo,
                                   options.base_width)

    # Without skip_nonfinite, `finite` is a constant True and the selects
    # below fold away.
    keep = functools.partial(_stages.kept_where, finite)
    grafted = _grafting.graft_direction(
        options.graft, grads.stacked, accumulators, step, floats.graft_b2,
        floats.graft_eps)
    directions = _graft(layout.plan, grafted.direction, preconditioned,
                        use_shampoo, options.graft, options.base_width)
    if mus is not None:
      directions, new_mus = _momentum(
          directions, mus, step, floats.b1, nesterov=options.nesterov,
          heavy_ball=options.heavy_ball)
      mus = keep(new_mus, mus)
    if accumulators is not None:
      accumulators = keep(grafted.accumulators, accumulators)
    updates, (graft, mu) = _stages.to_leaves(
        layout, grads, count, directions, leaves,
        (accumulators, graft_leaves), (mus, mu_leaves))
    # The statistics and roots are already guarded (by their update's
    # condition and empty refresh phases).
    return updates, ShampooState(
        count=jnp.where(finite, step, count),
        stats=tuple(stats),
        preconditioners=tuple(roots),
        refreshed_at=tuple(refreshed_at),
        graft=_stages.tree_of(layout, graft),
        mu=_stages.tree_of(layout, mu),
        diagnostics=_diagnostics(state.diagnostics, count, errors, rejected,
                                 refreshed_at, finite))

  update_fn = _stages.make_update(
      "scale_by_shampoo", ShampooState, plan_for,
      functools.partial(_check_state, options=options), update_core,
      options.shard_axes, floats)
  init_fn = _stages.make_init(
      plan_for, functools.partial(_init, options=options))
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
    drift_tolerance: float = 0.1,
    root_method: str = "auto",
    matrix_eps_mode: str = "relative",
    exponent_override: int | dict[int, int] | None = None,
    nesterov: bool = False,
    heavy_ball: bool = False,
    max_precondition_dim: int = 4096,
    max_root_error: float = 0.5,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    layer_axes: Any = None,
    precondition: Any = None,
    base_width: int | None = None,
    mu_dtype: Any = None,
    preconditioner_dtype: Any = jnp.float32,
    weight_decay: float = 1e-4,
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
      refresh, drift_tolerance, root_method, matrix_eps_mode,
      exponent_override, nesterov, heavy_ball, max_precondition_dim,
      max_root_error, skip_nonfinite, shard_axes, layer_axes, precondition,
      base_width, mu_dtype, preconditioner_dtype, cut_at_shards: see
      `scale_by_shampoo`.
    weight_decay: decoupled weight decay :math:`\lambda`; the default is
      ``optax.adamw``'s, so that swapping one for the other changes only
      the direction. With ``base_width``, preconditioned leaves get
      :math:`\lambda \cdot` ``base_width / width`` (weight decay as
      1/width, arXiv 2512.05620).
    mask: where to apply weight decay.

  Returns:
    An ``optax.GradientTransformation``.
  """
  _options.check_range("weight_decay", weight_decay, 0.0)
  return _stages.with_weight_decay(
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
          drift_tolerance=drift_tolerance,
          root_method=root_method,
          matrix_eps_mode=matrix_eps_mode,
          exponent_override=exponent_override,
          nesterov=nesterov,
          heavy_ball=heavy_ball,
          max_precondition_dim=max_precondition_dim,
          max_root_error=max_root_error,
          skip_nonfinite=skip_nonfinite,
          shard_axes=shard_axes,
          layer_axes=layer_axes,
          precondition=precondition,
          base_width=base_width,
          mu_dtype=mu_dtype,
          preconditioner_dtype=preconditioner_dtype,
          cut_at_shards=cut_at_shards,
      ), learning_rate, weight_decay, mask, skip_nonfinite,
      _stages.width_decay_scales(
          base_width, transform="shampoo", layer_axes=layer_axes,
          precondition=precondition, block_size=block_size,
          max_precondition_dim=max_precondition_dim))
