# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors.

SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam",
arXiv 2409.11321) keeps Shampoo's statistics, one per axis of each block
(see `_blocks`), but instead of their inverse roots it uses their
eigenvectors :math:`Q_i` as a basis in which to run Adam. With
:math:`x \times_i A` the product of axis :math:`i` of :math:`x` with
:math:`A`, a block's rotation into the basis and back are

.. math::

  \mathcal{R}(x) = x \times_1 Q_1^\top \cdots \times_k Q_k^\top, \qquad
  \mathcal{R}^{-1}(x) = x \times_1 Q_1 \cdots \times_k Q_k.

The bases change slowly (every ``precondition_every`` steps, by one step of
power iteration), so Adam's second moment, kept in the rotated coordinates,
stays meaningful across refreshes. This module holds SOAP's own math: the
bases (`_refresh_bases`) and Adam in them (`_rotated_adam`); stacking,
blocks, statistics and the update shell are the shared stages of `_stages`.
"""

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from shampoo_optax import _grafting
from shampoo_optax import _options
from shampoo_optax import _refresh as _schedule
from shampoo_optax import _roots
from shampoo_optax import _sharding
from shampoo_optax import _stages
from shampoo_optax import _symmetric


class SoapDiagnostics(NamedTuple):
  """Scalars to log, updated inside the jitted step.

  Attributes:
    basis_failures: cumulative number of refreshed bases rejected because
      they were not finite (each kept its previous basis).
    last_refresh_step: the step (0-based) of the last basis refresh, -1
      before the first.
    nonfinite_steps: steps skipped because a gradient was NaN or infinite.
    bases_refreshed: cumulative number of bases recomputed and accepted
      (per block and factor; with ``refresh="drift"``, how many the drift
      called for).
  """

  basis_failures: chex.Array
  last_refresh_step: chex.Array
  nonfinite_steps: chex.Array
  bases_refreshed: chex.Array


class SoapState(NamedTuple):
  """State of `scale_by_soap`.

  Attributes:
    count: number of (finite) updates applied so far.
    stats: the Shampoo statistics, one float32 ``[n, *grid, *packed]``
      array per factor (or padded rows, see `shampoo_optax.ShampooState`).
    bases: the eigenbases, one ``[n, *grid, d, d]`` (or ``[rows, d, d]``)
      array per factor in ``basis_dtype`` (column ``j`` is the ``j``-th
      eigenvector, by decreasing eigenvalue).
    mu: Adam's first moment in the parameters' tree and coordinates, each
      float32 and shaped and split like its parameter.
    nu: Adam's second moment: first one array per leaf of a diagonal
      family, shaped like the leaf; then per piece of a preconditioned
      family one array, its blocks in
      their rotated coordinates, laid out and split as the piece's factors
      (``[n, *grid, *block]``, or padded rows ``[rows, *block]``), so that
      each device keeps its own blocks' moments.
    diagnostics: `SoapDiagnostics`.
  """

  count: chex.Array
  stats: tuple[chex.Array, ...]
  bases: tuple[chex.Array, ...]
  mu: Any
  nu: tuple[chex.Array, ...]
  diagnostics: SoapDiagnostics


REFRESH_MODES = ("all", "drift")

# Pass as `static_args` to `optax.inject_hyperparams(soap)`; the float options
# (learning_rate, b1, b2, eps, shampoo_beta, drift_tolerance, weight_decay)
# may be traced.
SOAP_STATIC_OPTIONS = (
    "block_size",
    "precondition_every",
    "refresh",
    "max_precondition_dim",
    "skip_nonfinite",
    "shard_axes",
    "layer_axes",
    "precondition",
    "base_width",
    "basis_dtype",
    "cut_at_shards",
    "mask",
)


class _Floats(NamedTuple):
  """The float options, as float32 scalars inside the update."""

  b1: Any
  b2: Any
  eps: Any
  shampoo_beta: Any
  drift_tolerance: Any


def _normalized(s: jax.Array) -> jax.Array:
  """``s`` over its max-abs entry: bases do not depend on the scale."""
  scale = jnp.max(jnp.abs(s), axis=(-2, -1), keepdims=True)
  return s / jnp.where(scale > 0, scale, 1.0)


def _eigenbasis(s: jax.Array):
  """Eigenvectors of ``s``, by decreasing eigenvalue, and the identity order."""
  _, vectors = jnp.linalg.eigh(s, symmetrize_input=False)
  # Built from ``s`` to carry its type, as `_power_qr`'s order does.
  order = jnp.zeros_like(s[..., 0], jnp.int32) + jnp.arange(s.shape[-1])
  return vectors[..., ::-1], order


def _power_qr(s: jax.Array, q: jax.Array):
  """One power-iteration step from ``q``, its columns first sorted.

  The columns of ``q`` are sorted by decreasing estimated eigenvalue
  :math:`\\operatorname{diag}(Q^\\top S Q)`, then :math:`Q \\leftarrow
  \\operatorname{qr}(S Q)`. Returns the basis and the sorting order.
  """
  sq = jnp.matmul(s, q, precision=_stages.HIGHEST)
  estimates = jnp.sum(q * sq, axis=-2)
  # The zeros give the order ``s``'s type: argsort's result takes that of
  # its own iota (not varying over `jax.shard_map` axes).
  order = (jnp.argsort(-estimates, axis=-1, stable=True)
           + jnp.zeros_like(estimates, jnp.int32))
  # qr(S Q[:, order]) = qr((S Q)[:, order]).
  sq = jnp.take_along_axis(sq, order[..., None, :], axis=-1)
  return jnp.linalg.qr(sq)[0], order


def _refresh_bases(layout, stats, bases, now, *, method: str):
  """New bases where ``now``: ``"eigh"`` of, or ``"qr"`` power step on, S.

  Computed on each device for its own blocks (`_sharding.map_blocks`). A
  non-finite basis is rejected and the previous one kept; padding rows keep
  their zeros.

  Returns:
    The bases, per factor the column order ``[n, *grid, d]`` applied to the
    previous basis (the identity where nothing changed), and per factor
    whether each block's new basis was accepted, and rejected.
  """
  plan, specs = layout.plan, layout.specs
  nbatch = [len(s) for s in specs]

  def body(arrays, replicated):
    (now,) = replicated
    shapes = [x.shape for x in arrays[1]]
    stats, old, valid = ([_stages.rows(x, n) for x, n in zip(xs, nbatch)]
                         for xs in arrays)
    old = [q.astype(jnp.float32) for q in old]
    identity = [jnp.zeros_like(q[..., 0], jnp.int32) + jnp.arange(f.dim)
                for f, q in zip(plan.factors, old)]

    def compute(stats, old):
      out = []
      for s, q, f in zip(stats, old, plan.factors):
        unpacked = lambda s, f=f: _normalized(_symmetric.unpack(s, f.dim))
        basis = (
            (lambda s, q: _roots.lapack_safe_map(_eigenbasis, unpacked(s)))
            if method == "eigh" else
            (lambda s, q: _roots.lapack_safe_map(_power_qr, unpacked(s), q)))
        out.append(_stages.in_batches(basis, s, q,
                                      row_bytes=4 * f.dim * f.dim))
      return out

    # Zeros where not refreshing, selected below: a cond branch that passes
    # the bases through would copy them.
    fresh = jax.lax.cond(
        now, compute,
        lambda _, old: [(jnp.zeros_like(q), i) for q, i in zip(old, identity)],
        stats, old)
    new_bases, orders, accepted, rejected = [], [], [], []
    for (q, order), prev, ident, own, shape in zip(fresh, old, identity, valid,
                                                  shapes):
      finite = jnp.all(jnp.isfinite(q), axis=(-2, -1))
      ok = now & finite & own
      new_bases.append(jnp.where(ok[:, None, None], q, prev).reshape(shape))
      orders.append(jnp.where(ok[:, None], order, ident).reshape(shape[:-1]))
      accepted.append(ok.reshape(shape[:-2]))
      rejected.append((now & ~finite & own).reshape(shape[:-2]))
    return new_bases, orders, accepted, rejected

  valid = [_sharding.valid_rows(f, b.shape[:-2])
           for f, b in zip(plan.factors, bases)]
  return _sharding.map_blocks(
      body, specs, (list(stats), list(bases), valid), (now,), num_outputs=4)


def basis_drift(s: jax.Array, q: jax.Array) -> jax.Array:
  r"""The off-diagonal share of ``s`` in the basis ``q``, in ``[0, 1]``.

  .. math::

    \frac{\lVert Q^\top S Q - \operatorname{Diag}(Q^\top S Q)
    \rVert_F}{\lVert Q^\top S Q \rVert_F}

  (the denominator is :math:`\lVert S \rVert_F` for an orthogonal
  :math:`Q`): 0 while ``s`` is diagonal in ``q`` (its eigenbasis), up to 1;
  0 for a zero ``s``. ``[..., d, d]`` in, ``[...]`` out.
  """
  m = jnp.matmul(jnp.swapaxes(q, -1, -2),
                 jnp.matmul(s, q, precision=_stages.HIGHEST),
                 precision=_stages.HIGHEST)
  total = jnp.sum(jnp.square(m), axis=(-2, -1))
  diagonal = jnp.sum(jnp.square(jnp.diagonal(m, axis1=-2, axis2=-1)), axis=-1)
  share = jnp.sqrt(jnp.maximum(total - diagonal, 0.0) / jnp.where(
      total > 0, total, 1.0))
  return jnp.where(jnp.isfinite(share), share, jnp.inf)


def _refresh_drifted_bases(layout, stats, bases, active, tolerance,
                           num_phases: int):
  """A power-iteration step for the bases that drifted most, per device.

  Every block's basis is scored by `basis_drift` against its statistics;
  of each factor's rows on a device, the ``ceil(rows / num_phases)``
  scoring highest above ``tolerance`` take `_power_qr`'s step (skipped when
  none is due). Returns as `_refresh_bases`.
  """
  plan, specs = layout.plan, layout.specs
  nbatch = [len(s) for s in specs]

  def body(arrays, replicated):
    active, tolerance = replicated
    shapes = [x.shape for x in arrays[1]]
    stats, old, valid = ([_stages.rows(x, n) for x, n in zip(xs, nbatch)]
                         for xs in arrays)
    out = ([], [], [], [])
    for s, q, own, f, shape in zip(stats, old, valid, plan.factors, shapes):
      q = q.astype(jnp.float32)
      order = jnp.zeros_like(q[..., 0], jnp.int32) + jnp.arange(f.dim)
      accepted = jnp.zeros_like(own)
      rejected = jnp.zeros_like(own)
      if s.shape[0]:
        unpacked = lambda s, f=f: _normalized(_symmetric.unpack(s, f.dim))
        scores = _stages.in_batches(
            lambda s, q: basis_drift(unpacked(s), q), s, q,
            row_bytes=12 * f.dim * f.dim)
        index, due = _schedule.most_drifted(
            jnp.where(own, scores, -jnp.inf), num_phases, tolerance, active)
        step = lambda s, q: _roots.lapack_safe_map(_power_qr, unpacked(s), q)
        fresh, fresh_order = jax.lax.cond(
            jnp.any(due), step,
            lambda _, q: (jnp.zeros_like(q), order[:q.shape[0]]),
            s[index], q[index])
        finite = jnp.all(jnp.isfinite(fresh), axis=(-2, -1))
        q = _schedule.put(q, index, due & finite, fresh)
        order = _schedule.put(order, index, due & finite, fresh_order)
        accepted = _schedule.put(accepted, index, due & finite, due)
        rejected = _schedule.put(rejected, index, due & ~finite, due)
      for xs, x, x_shape in zip(out, (q, order, accepted, rejected), (
          shape, shape[:-1], shape[:-2], shape[:-2])):
        xs.append(x.reshape(x_shape))
    return out

  valid = [_sharding.valid_rows(f, b.shape[:-2])
           for f, b in zip(plan.factors, bases)]
  return _sharding.map_blocks(
      body, specs, (list(stats), list(bases), valid), (active, tolerance),
      num_outputs=4)


def _second_moment_keys(plan) -> list[tuple]:
  """Where Adam's second moment lives: ``("leaf", i)`` for each leaf of a
  diagonal family (shaped and split as the leaf), then ``(family, piece)``
  for each piece of a preconditioned family (its blocks)."""
  return [("leaf", i) for i, f in enumerate(plan.family_of_leaf)
          if not plan.families[f].preconditioned] + [
              (f, p) for f, fam in enumerate(plan.families)
              if fam.preconditioned for p in range(len(fam.pieces))]


def _second_moment_shapes(layout) -> list[tuple[int, ...]]:
  """The shapes of `SoapState.nu`, in the order of `_second_moment_keys`."""
  plan = layout.plan
  shapes = []
  for f, p in _second_moment_keys(plan):
    if f == "leaf":
      shapes.append(plan.shapes[p])
      continue
    index, factor = plan.factors_of(f, p)[0]
    shapes.append(_sharding.layout_batch_shape(factor, layout.specs[index])
                  + plan.families[f].pieces[p].block)
  return shapes


def _second_moments(layout, nu):
  """`SoapState.nu` by where it is used.

  Returns a dict: ``(family, None)`` a stacked diagonal family (float32),
  ``(family, piece)`` a piece's blocks; and the per-leaf moments as a list,
  one per leaf (None for preconditioned leaves).
  """
  plan = layout.plan
  keys = _second_moment_keys(plan)
  per_leaf = [None] * len(plan.shapes)
  for key, x in zip(keys, nu):
    if key[0] == "leaf":
      per_leaf[key[1]] = x
  stacked = _stages.stacked_state(layout, per_leaf)
  out = {(f, None): stacked[f] for f, fam in enumerate(plan.families)
         if not fam.preconditioned}
  out.update((key, x) for key, x in zip(keys, nu) if key[0] != "leaf")
  return out, per_leaf


def _permuted(layout, key, block, orders) -> jax.Array:
  """Axis ``i`` of every block of piece ``key`` reordered.

  ``block`` is laid out as the piece's factors; axis ``i`` takes the order
  ``orders[index]`` (``[*batch, d]``, ``index`` its factor):
  ``y[j] = x[order[j]]``.
  """
  for index, factor in layout.plan.factors_of(*key):
    spec = layout.specs[index]
    order = jnp.expand_dims(orders[index], tuple(
        len(spec) + a for a in range(block.ndim - len(spec))
        if a != factor.axis))
    block = _sharding.constrain(jnp.take_along_axis(
        block, jnp.broadcast_to(order, block.shape),
        axis=len(spec) + factor.axis), spec)
  return block


def _rotated_adam(layout, grads, old_mu, mus, nus, bases, count,
                  floats: _Floats, base_width):
  """Adam's directions per family, in the bases of preconditioned blocks.

  ``mus``: the new first moments. Returns the directions ``{family: [units,
  *shape]}`` and the new second moments (``nus`` updated in place). A
  diagonal family gets plain Adam from step 0; a preconditioned one zero at
  step 0 (its bases are set up after this step) and Adam in its bases from
  step 1 on.
  """
  b1, b2, eps = floats.b1, floats.b2, floats.eps
  bc = _grafting.bias_correction
  first = count == 0
  directions = {}
  for f, fam in enumerate(layout.plan.families):
    if not fam.preconditioned:
      nus[(f, None)] = _grafting.ema(nus[(f, None)],
                                     jnp.square(grads.stacked[f]), b2)
      directions[f] = (mus[f] / bc(b1, count + 1)) / (
          jnp.sqrt(nus[(f, None)] / bc(b2, count + 1)) + eps)
  adam_step = jnp.maximum(count, 1)
  transposed = lambda i: jnp.swapaxes(bases[i], -1, -2)
  # M's blocks from the old M's and G's: cutting the new M instead would
  # pull its (per-family) computation to the blocks' split.
  moments = _stages.gradient_blocks(layout, list(old_mu))
  rotated = {}
  for key, block in grads.blocks.items():
    into = functools.partial(_stages.multiplied, layout, key,
                             matrices=transposed)
    nu = _grafting.ema(nus[key], jnp.square(into(block)), b2)
    nus[key] = jnp.where(first, nus[key], nu)
    moment = into(_grafting.ema(moments[key], block, b1))
    rotated[key] = _stages.multiplied(
        layout, key, (moment / bc(b1, adam_step))
        / (jnp.sqrt(nu / bc(b2, adam_step)) + eps), lambda i: bases[i])
    if base_width is not None:
      rotated[key] = _stages.width_normalized(layout, key, rotated[key],
                                              base_width)
  for f, direction in _stages.families_of(layout, rotated).items():
    directions[f] = jnp.where(first, 0.0, direction)
  return directions, nus


def _refresh(layout, stats, bases, nus, count, finite, options, tolerance):
  """The bases after this step, V following them, and the counts of
  accepted and rejected bases.

  At step 0 ``eigh``; after it one power-iteration step, whose re-sort V's
  entries follow: for every basis every ``precondition_every`` steps
  (``refresh="all"``), or on every step for the bases that drifted most
  (``"drift"``, `_refresh_drifted_bases`).
  """
  bases, _, accepted_first, rejected_first = _refresh_bases(
      layout, stats, bases, finite & (count == 0), method="eigh")
  if options.refresh == "drift":
    bases, orders, accepted, rejected = _refresh_drifted_bases(
        layout, stats, bases, finite & (count > 0), tolerance,
        options.precondition_every)
  else:
    bases, orders, accepted, rejected = _refresh_bases(
        layout, stats, bases, finite & (count > 0)
        & (count % options.precondition_every == 0), method="qr")
  # Only a refresh sorts: the cond spares every other step the gathers, and
  # yields zeros (selected below) rather than passing V through, which
  # would copy it.
  sorted_now = _stages.count_true(accepted) > 0
  for key in dict.fromkeys((f.family, f.piece) for f in layout.plan.factors):
    permuted = jax.lax.cond(
        sorted_now, functools.partial(_permuted, layout, key),
        lambda nu, _: jnp.zeros_like(nu), nus[key], orders)
    nus[key] = jnp.where(sorted_now, permuted, nus[key])
  return (bases, nus, _stages.count_true(accepted + accepted_first),
          _stages.count_true(rejected + rejected_first))


def _init(plan, leaves, treedef, options) -> SoapState:
  """The state of `scale_by_soap` for the leaves of ``plan``."""
  place = _stages.factor_placement(plan, leaves, options.shard_axes)
  nu = []
  for f, p in _second_moment_keys(plan):
    if f == "leaf":
      nu.extend(_stages.leaf_zeros([leaves[p]], jnp.float32))
    else:
      index, factor = plan.factors_of(f, p)[0]
      nu.extend(place([jnp.zeros(factor.batch_shape
                                 + plan.families[f].pieces[p].block,
                                 jnp.float32)], [index]))
  per_factor = functools.partial(_stages.per_factor, plan)
  return SoapState(
      count=jnp.zeros([], jnp.int32),
      stats=per_factor(place(jnp.zeros(f.shape, jnp.float32)
                             for f in plan.factors)),
      bases=per_factor(place(
          jnp.broadcast_to(jnp.eye(f.dim, dtype=options.basis_dtype),
                           f.batch_shape + (f.dim, f.dim))
          for f in plan.factors)),
      mu=treedef.unflatten(_stages.leaf_zeros(leaves, jnp.float32)),
      nu=per_factor(nu),
      diagnostics=SoapDiagnostics(
          basis_failures=jnp.zeros([], jnp.int32),
          last_refresh_step=jnp.full([], -1, jnp.int32),
          nonfinite_steps=jnp.zeros([], jnp.int32),
          bases_refreshed=jnp.zeros([], jnp.int32),
      ),
  )


def _check_state(layout, paths, leaves, state: SoapState,
                 options) -> None:
  """Raises unless ``state`` was made for these updates and options."""
  _stages.check_layout("scale_by_soap", layout, state.stats)
  _stages.check_per_leaf("scale_by_soap", layout, paths, leaves,
                         (state.mu,))
  _stages.check_dtypes("scale_by_soap", (
      ("basis_dtype", options.basis_dtype, state.bases),))
  got = [tuple(m.shape) for m in state.nu]
  expected = _second_moment_shapes(layout)
  if got != expected:
    raise ValueError(
        "scale_by_soap: the state was made for other parameters or options"
        f" (second moments {got}; these updates need {expected}). Call init"
        " with this transformation.")


class _Options(NamedTuple):
  """The static options of `scale_by_soap`, checked."""

  block_size: int
  precondition_every: int
  refresh: str
  max_precondition_dim: int
  skip_nonfinite: bool
  shard_axes: Any
  layer_axes: Any
  precondition: Any
  base_width: int | None
  basis_dtype: Any
  cut_at_shards: bool


def _checked(b1, b2, eps, shampoo_beta, drift_tolerance, **static) -> _Options:
  """Validates every option of `scale_by_soap` (clear errors, no tracing)."""
  for name in ("block_size", "precondition_every", "max_precondition_dim"):
    static[name] = _options.static_int(name, static[name], 1,
                                       static_options="SOAP_STATIC_OPTIONS")
  static["base_width"] = _options.static_int(
      "base_width", static["base_width"], 1, allow_none=True,
      static_options="SOAP_STATIC_OPTIONS")
  _options.check_range("b1", b1, 0.0, 1.0, high_open=True)
  _options.check_range("b2", b2, 0.0, 1.0)
  _options.check_range("shampoo_beta", shampoo_beta, 0.0, 1.0)
  _options.check_range("eps", eps, 0.0)
  _options.check_range("drift_tolerance", drift_tolerance, 0.0)
  _options.check_choice("refresh", static["refresh"], REFRESH_MODES)
  _options.check_flags(skip_nonfinite=static["skip_nonfinite"],
                       cut_at_shards=static["cut_at_shards"])
  static["shard_axes"] = _sharding.check_shard_axes(static["shard_axes"])
  static["basis_dtype"] = _options.check_dtype(
      "basis_dtype", static["basis_dtype"], allow_none=False)
  return _Options(**static)


def scale_by_soap(
    block_size: int = 128,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    shampoo_beta: float = 0.95,
    precondition_every: int = 2,
    refresh: str = "all",
    drift_tolerance: float = 0.1,
    max_precondition_dim: int = 4096,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    layer_axes: Any = None,
    precondition: Any = None,
    base_width: int | None = None,
    basis_dtype: Any = jnp.float32,
    cut_at_shards: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam run in the eigenbasis of Shampoo's factors.

  SOAP's Algorithm 3 on every block :math:`G` of shape
  :math:`(d_1, \dots, d_k)` (blocks and merged dims as in
  `scale_by_shampoo`), at step :math:`t` (0-based, counting finite steps):

  .. math::

    S_i &\leftarrow \beta_s S_i + (1 - \beta_s) G_{(i)} G_{(i)}^\top, \\
    G' &= G \times_1 Q_1^\top \cdots \times_k Q_k^\top, \qquad
    M \leftarrow \beta_1 M + (1 - \beta_1) G, \qquad
    M' = M \times_1 Q_1^\top \cdots \times_k Q_k^\top, \\
    V &\leftarrow \beta_2 V + (1 - \beta_2) G'^2, \qquad
    N' = \frac{M' / (1 - \beta_1^t)}{\sqrt{V / (1 - \beta_2^t)} + \epsilon},
    \qquad D = N' \times_1 Q_1 \cdots \times_k Q_k,

  so the first moment :math:`M` lives in the parameters' coordinates and is
  rotated each step (a change of basis then needs no correction), the second
  moment :math:`V` in the rotated ones. After the update the bases are
  refreshed from the statistics, which then include :math:`G` (the current
  gradient never rotates itself):

  * at step 0, :math:`Q_i` = the eigenvectors of :math:`S_i` by decreasing
    eigenvalue (``eigh``). As in the authors' reference implementation,
    this step only initializes: the update of every preconditioned block is
    zero and :math:`M, V` stay zero, so Adam's step :math:`t` there counts
    from step 1;
  * at every step :math:`t > 0` with :math:`t \bmod f = 0`
    (:math:`f` = ``precondition_every``), one power-iteration step: the
    columns of :math:`Q_i` are sorted by the estimated eigenvalues
    :math:`\operatorname{diag}(Q_i^\top S_i Q_i)`, decreasing, then
    :math:`Q_i \leftarrow \operatorname{qr}(S_i Q_i)`. The rows of
    :math:`V` along axis :math:`i` follow their basis vectors through the
    sort; otherwise :math:`V` is kept as it is.

  An axis whose blocks' side ``min(dim, block_size)`` is above
  ``max_precondition_dim`` gets no basis (it stays in the coordinate basis:
  one-sided, as the authors do for large dims); scalars, vectors and units
  left with no basis at all get plain Adam from step 0
  (``optax.scale_by_adam``). The result has the
  gradient's sign.

  Args:
    block_size: largest side of a block; see `scale_by_shampoo`.
    b1: Adam's first-moment decay :math:`\beta_1`, in ``[0, 1)``.
    b2: Adam's second-moment decay :math:`\beta_2`, in ``[0, 1]``.
    eps: Adam's :math:`\epsilon`, added to the bias-corrected
      :math:`\sqrt{V / (1 - \beta_2^t)}` as in ``optax.scale_by_adam``.
      The authors' PyTorch code adds it to :math:`\sqrt{V}` before the
      correction, an effective :math:`\epsilon / \sqrt{1 - \beta_2^t}`:
      larger early on (4.5x at :math:`t = 1`, :math:`\beta_2 = 0.95`); the
      two differ only where gradients are as small as :math:`\epsilon`.
    shampoo_beta: decay :math:`\beta_s` of the statistics, in ``[0, 1]``
      (1 sums).
    precondition_every: steps :math:`f` between basis refreshes. The
      default 2 (the paper's is 10) won the protocol of
      ``benchmarks/README.md``: the same steps on the image workloads, a
      third fewer to the char LM's first target and a lower final loss.
    refresh: ``"all"`` refreshes every basis every :math:`f` steps, as
      above; ``"drift"`` spends the same budget on the bases that drifted
      most: on every step :math:`t > 0` each basis is scored by
      `basis_drift` (the off-diagonal share of :math:`Q_i^\top S_i Q_i`, 0
      while :math:`Q_i` is still the eigenbasis), and of each device's
      blocks of each factor the ``ceil(blocks / f)`` scoring highest above
      ``drift_tolerance`` take the power-iteration step.
    drift_tolerance: with ``refresh="drift"``, the off-diagonal share above
      which a basis is due (0: every step, within the budget).
    max_precondition_dim: largest basis side; see `scale_by_shampoo`.
    skip_nonfinite: when any gradient is NaN/Inf (or its squares overflow),
      return a zero update and leave the state unchanged (counted in
      ``diagnostics.nonfinite_steps``).
    shard_axes: mesh axis name(s) over which the per-block state is split;
      see `scale_by_shampoo`.
    layer_axes: axes of a leaf that index stacked layers; see
      `scale_by_shampoo`.
    precondition: which leaves may get matrices, like an optax mask: ``None``
      (every leaf whose shape allows), a bool, a pytree prefix of the params
      of bools, or a callable of the params returning one. The others get
      plain Adam (e.g. embeddings and the output head,
      ``precondition=shampoo_optax.hidden_matrices()``).
    base_width: width-aware scaling: each block of a preconditioned unit at
      RMS ``base_width / width``; see `scale_by_shampoo`.
    basis_dtype: storage dtype of the bases (computed in float32).
    cut_at_shards: cut blocks at the parameters' shard boundaries; see
      `scale_by_shampoo`.

  Returns:
    An ``optax.GradientTransformation`` whose state is a `SoapState`.
  """
  options = _checked(**locals())
  plan_for = functools.partial(
      _stages.plan_of, transform="scale_by_soap", layer_axes=layer_axes,
      precondition=precondition,
      block_size=options.block_size,
      max_precondition_dim=options.max_precondition_dim,
      cut_at_shards=cut_at_shards)

  def update_core(leaves, state, floats, layout):
    floats = _Floats(*(jnp.asarray(x, jnp.float32) for x in floats))
    count = state.count
    mu_leaves = _stages.leaves_of(layout, state.mu)
    old_mu = _stages.stacked_state(layout, mu_leaves)
    grads = _stages.gradients(layout, leaves, old_mu, options.skip_nonfinite)
    finite = grads.finite
    stats = _stages.update_statistics(layout, grads.blocks, list(state.stats),
                                      finite, floats.shampoo_beta)
    bases = [b.astype(jnp.float32) for b in state.bases]
    mus = [grads.pin(_grafting.ema(old, g, floats.b1), f)
           for f, (old, g) in enumerate(zip(old_mu, grads.stacked))]
    old_nu, per_leaf_nu = _second_moments(layout, state.nu)
    directions, nus = _rotated_adam(layout, grads, old_mu, mus, dict(old_nu),
                                    bases, count, floats, options.base_width)
    # Step 0 only sets up the bases: preconditioned blocks keep M = 0.
    mus = [jnp.where(count == 0, old, m) if fam.preconditioned else m
           for fam, old, m in zip(layout.plan.families, old_mu, mus)]
    bases, nus, refreshed, failures = _refresh(
        layout, stats, bases, nus, count, finite, options,
        floats.drift_tolerance)
    keep = functools.partial(_stages.kept_where, finite)
    nus = dict(zip(old_nu, keep(nus.values(), old_nu.values())))
    updates, (mu, diagonal_nu) = _stages.to_leaves(
        layout, grads, count, [directions[f] for f in range(len(mus))],
        leaves, (keep(mus, old_mu), mu_leaves),
        ([nus.get((f, None)) for f in range(len(mus))], per_leaf_nu))
    diagnostics = state.diagnostics
    return updates, SoapState(
        count=jnp.where(finite, optax.safe_increment(count), count),
        stats=tuple(stats),
        bases=tuple(q.astype(old.dtype) for q, old in zip(bases, state.bases)),
        mu=_stages.tree_of(layout, mu),
        nu=tuple(diagonal_nu[i] if f == "leaf" else nus[(f, i)]
                 for f, i in _second_moment_keys(layout.plan)),
        diagnostics=SoapDiagnostics(
            basis_failures=diagnostics.basis_failures + failures,
            last_refresh_step=jnp.where(refreshed + failures > 0, count,
                                        diagnostics.last_refresh_step),
            nonfinite_steps=diagnostics.nonfinite_steps
            + (~finite).astype(jnp.int32),
            bases_refreshed=diagnostics.bases_refreshed + refreshed))

  update_fn = _stages.make_update(
      "scale_by_soap", SoapState, plan_for,
      functools.partial(_check_state, options=options), update_core,
      options.shard_axes, (b1, b2, eps, shampoo_beta, drift_tolerance))
  init_fn = _stages.make_init(
      plan_for, functools.partial(_init, options=options))
  return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    block_size: int = 128,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    shampoo_beta: float = 0.95,
    precondition_every: int = 2,
    refresh: str = "all",
    drift_tolerance: float = 0.1,
    max_precondition_dim: int = 4096,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    layer_axes: Any = None,
    precondition: Any = None,
    base_width: int | None = None,
    basis_dtype: Any = jnp.float32,
    weight_decay: float = 1e-4,
    mask: Any = None,
    cut_at_shards: bool = False,
) -> optax.GradientTransformation:
  r"""SOAP with decoupled weight decay, the drop-in for ``optax.adamw``.

  .. math::

    w \leftarrow w - \eta_t \left(D_t + \lambda w\right)

  where :math:`D_t` is `scale_by_soap`'s direction, :math:`\eta_t` the
  learning rate (a float or an optax schedule) and :math:`\lambda` the
  ``weight_decay``, applied where ``mask`` is true (as in ``optax.adamw``).
  A step skipped for a non-finite gradient changes nothing.

  Args:
    learning_rate: float or ``optax.Schedule``.
    block_size, b1, b2, eps, shampoo_beta, precondition_every, refresh,
      drift_tolerance, max_precondition_dim, skip_nonfinite, shard_axes,
      layer_axes, precondition, base_width, basis_dtype, cut_at_shards: see
      `scale_by_soap`.
    weight_decay: decoupled weight decay :math:`\lambda`; the default is
      ``optax.adamw``'s, so that swapping one for the other changes only
      the direction. With ``base_width``, preconditioned leaves get
      :math:`\lambda \cdot` ``base_width / width``.
    mask: where to apply weight decay.

  Returns:
    An ``optax.GradientTransformation``.
  """
  _options.check_range("weight_decay", weight_decay, 0.0)
  return _stages.with_weight_decay(
      scale_by_soap(
          block_size=block_size,
          b1=b1,
          b2=b2,
          eps=eps,
          shampoo_beta=shampoo_beta,
          precondition_every=precondition_every,
          refresh=refresh,
          drift_tolerance=drift_tolerance,
          max_precondition_dim=max_precondition_dim,
          skip_nonfinite=skip_nonfinite,
          shard_axes=shard_axes,
          layer_axes=layer_axes,
          precondition=precondition,
          base_width=base_width,
          basis_dtype=basis_dtype,
          cut_at_shards=cut_at_shards,
      ), learning_rate, weight_decay, mask, skip_nonfinite,
      _stages.width_decay_scales(
          base_width, transform="soap", layer_axes=layer_axes,
          precondition=precondition, block_size=block_size,
          max_precondition_dim=max_precondition_dim))
