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
stays meaningful across refreshes. The update reuses Shampoo's stages
(`_shampoo`): stacking into families, the finiteness check, the statistics
and the sharding of the per-block state.
"""

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from shampoo_optax import _grafting
from shampoo_optax import _roots
from shampoo_optax import _shampoo
from shampoo_optax import _sharding
from shampoo_optax import _symmetric

_HIGHEST = jax.lax.Precision.HIGHEST


class SoapDiagnostics(NamedTuple):
  """Scalars to log, updated inside the jitted step.

  Attributes:
    basis_failures: cumulative number of refreshed bases rejected because
      they were not finite (each kept its previous basis).
    last_refresh_step: the step (0-based) of the last basis refresh, -1
      before the first.
    nonfinite_steps: steps skipped because a gradient was NaN or infinite.
  """

  basis_failures: chex.Array
  last_refresh_step: chex.Array
  nonfinite_steps: chex.Array


class SoapState(NamedTuple):
  """State of `scale_by_soap`.

  Attributes:
    count: number of (finite) updates applied so far.
    stats: the Shampoo statistics, one float32 ``[n, *grid, *packed]``
      array per factor (or padded rows, see `shampoo_optax.ShampooState`).
    bases: the eigenbases, one ``[n, *grid, d, d]`` (or ``[rows, d, d]``)
      array per factor in ``basis_dtype`` (column ``j`` is the ``j``-th
      eigenvector, by decreasing eigenvalue).
    mu: Adam's first moment, one float32 ``[units, *shape]`` array per
      family, in the parameters' coordinates.
    nu: Adam's second moment: for a diagonal family one ``[units, *shape]``
      array; for a preconditioned family one array per piece, its blocks in
      their rotated coordinates, laid out and split as the piece's factors
      (``[n, *grid, *block]``, or padded rows ``[rows, *block]``), so that
      each device keeps its own blocks' moments.
    diagnostics: `SoapDiagnostics`.
  """

  count: chex.Array
  stats: tuple[chex.Array, ...]
  bases: tuple[chex.Array, ...]
  mu: tuple[chex.Array, ...]
  nu: tuple[chex.Array, ...]
  diagnostics: SoapDiagnostics


# Pass as `static_args` to `optax.inject_hyperparams(soap)`; the float options
# (learning_rate, b1, b2, eps, shampoo_beta, weight_decay) may be traced.
SOAP_STATIC_OPTIONS = (
    "block_size",
    "precondition_every",
    "max_precondition_dim",
    "skip_nonfinite",
    "shard_axes",
    "layer_axes",
    "basis_dtype",
    "cut_at_shards",
    "mask",
)


def _normalized(s: jax.Array) -> jax.Array:
  """``s`` over its max-abs entry: bases do not depend on the scale."""
  scale = jnp.max(jnp.abs(s), axis=(-2, -1), keepdims=True)
  return s / jnp.where(scale > 0, scale, 1.0)


def _eigenbasis(s: jax.Array):
  """Eigenvectors of ``s``, by decreasing eigenvalue, and the identity order."""
  _, vectors = jnp.linalg.eigh(s, symmetrize_input=False)
  order = jnp.broadcast_to(jnp.arange(s.shape[-1]), s.shape[:-1])
  return vectors[..., ::-1], order


def _power_qr(s: jax.Array, q: jax.Array):
  """One power-iteration step from ``q``, its columns first sorted.

  The columns of ``q`` are sorted by decreasing estimated eigenvalue
  :math:`\\operatorname{diag}(Q^\\top S Q)`, then :math:`Q \\leftarrow
  \\operatorname{qr}(S Q)`. Returns the basis and the sorting order.
  """
  sq = jnp.matmul(s, q, precision=_HIGHEST)
  estimates = jnp.sum(q * sq, axis=-2)
  order = jnp.argsort(-estimates, axis=-1, stable=True)
  # qr(S Q[:, order]) = qr((S Q)[:, order]).
  sq = jnp.take_along_axis(sq, order[..., None, :], axis=-1)
  return jnp.linalg.qr(sq)[0], order


def _refresh_bases(plan, stats, bases, now, specs, *, method: str):
  """New bases where ``now``: ``"eigh"`` of, or ``"qr"`` power step on, S.

  Computed on each device for its own blocks (`_sharding.map_blocks`). A
  non-finite basis is rejected and the previous one kept; padding rows keep
  their zeros.

  Returns:
    The bases, per factor the column order ``[n, *grid, d]`` applied to the
    previous basis (the identity where nothing changed), and per factor
    whether each block's new basis was rejected.
  """
  nbatch = [len(s) for s in specs]

  def body(arrays, replicated):
    (now,) = replicated
    shapes = [x.shape for x in arrays[1]]
    stats = [_shampoo._rows(s, n)  # pylint: disable=protected-access
             for s, n in zip(arrays[0], nbatch)]
    old = [_shampoo._rows(q, n).astype(jnp.float32)  # pylint: disable=protected-access
           for q, n in zip(arrays[1], nbatch)]
    valid = [_shampoo._rows(v, n) for v, n in zip(arrays[2], nbatch)]  # pylint: disable=protected-access
    identity = [jnp.broadcast_to(jnp.arange(f.dim), q.shape[:-1])
                for f, q in zip(plan.factors, old)]

    def compute(stats, old):
      out = []
      for s, q, f in zip(stats, old, plan.factors):
        unpacked = lambda s, f=f: _normalized(_symmetric.unpack(s, f.dim))
        basis = (
            (lambda s, q: _roots.lapack_safe_map(_eigenbasis, unpacked(s)))
            if method == "eigh" else
            (lambda s, q: _roots.lapack_safe_map(_power_qr, unpacked(s), q)))
        out.append(_shampoo._in_batches(basis, s, q,  # pylint: disable=protected-access
                                        row_bytes=4 * f.dim * f.dim))
      return out

    # Zeros where not refreshing, selected below: a cond branch that passes
    # the bases through would copy them.
    fresh = jax.lax.cond(
        now, compute,
        lambda _, old: [(jnp.zeros_like(q), i) for q, i in zip(old, identity)],
        stats, old)
    new_bases, orders, rejected = [], [], []
    for (q, order), prev, ident, own, shape in zip(fresh, old, identity, valid,
                                                  shapes):
      finite = jnp.all(jnp.isfinite(q), axis=(-2, -1))
      ok = now & finite & own
      new_bases.append(jnp.where(ok[:, None, None], q, prev).reshape(shape))
      orders.append(jnp.where(ok[:, None], order, ident).reshape(shape[:-1]))
      rejected.append((now & ~finite & own).reshape(shape[:-2]))
    return new_bases, orders, rejected

  valid = [_sharding.valid_rows(f, b.shape[:-2])
           for f, b in zip(plan.factors, bases)]
  new_bases, orders, rejected = _sharding.map_blocks(
      body, specs, (list(stats), list(bases), valid), (now,), num_outputs=3)
  return ([q.astype(b.dtype) for q, b in zip(new_bases, bases)], orders,
          rejected)


def _second_moment_keys(plan) -> list[tuple[int, int | None]]:
  """Where Adam's second moment lives: ``(family, None)`` for a diagonal
  family, ``(family, piece)`` for each piece of a preconditioned one."""
  return [(f, p) for f, fam in enumerate(plan.families)
          for p in (range(len(fam.pieces)) if fam.preconditioned else [None])]


def _second_moment_shapes(plan, specs) -> list[tuple[int, ...]]:
  """The shapes of `SoapState.nu`, in the order of `_second_moment_keys`."""
  shapes = []
  for f, p in _second_moment_keys(plan):
    fam = plan.families[f]
    if p is None:
      shapes.append((fam.units,) + fam.shape)
      continue
    index, factor = plan.factors_of(f, p)[0]
    shapes.append(_sharding.layout_batch_shape(factor, specs[index])
                  + fam.pieces[p].block)
  return shapes


def _permuted(plan, key, block, orders, specs) -> jax.Array:
  """Axis ``i`` of every block of piece ``key`` reordered.

  ``block`` is laid out as the piece's factors; axis ``i`` takes the order
  ``orders[index]`` (``[*batch, d]``, ``index`` its factor):
  ``y[j] = x[order[j]]``.
  """
  for index, factor in plan.factors_of(*key):
    nbatch = len(specs[index])
    order = jnp.expand_dims(orders[index], tuple(
        nbatch + a for a in range(block.ndim - nbatch) if a != factor.axis))
    block = _sharding.constrain(jnp.take_along_axis(
        block, jnp.broadcast_to(order, block.shape),
        axis=nbatch + factor.axis), specs[index])
  return block


def scale_by_soap(
    block_size: int = 128,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    shampoo_beta: float = 0.95,
    precondition_every: int = 10,
    max_precondition_dim: int = 4096,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    layer_axes: Any = None,
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

  Scalars, vectors and units with a dim above ``max_precondition_dim`` get
  plain Adam from step 0 (``optax.scale_by_adam``). The result has the
  gradient's sign.

  Args:
    block_size: largest side of a block; see `scale_by_shampoo`.
    b1: Adam's first-moment decay :math:`\beta_1`, in ``[0, 1)``.
    b2: Adam's second-moment decay :math:`\beta_2`, in ``[0, 1]``.
    eps: Adam's :math:`\epsilon`.
    shampoo_beta: decay :math:`\beta_s` of the statistics, in ``[0, 1]``
      (1 sums).
    precondition_every: steps :math:`f` between basis refreshes.
    max_precondition_dim: units with a (merged) dim above this get plain
      Adam.
    skip_nonfinite: when any gradient is NaN/Inf (or its squares overflow),
      return a zero update and leave the state unchanged (counted in
      ``diagnostics.nonfinite_steps``).
    shard_axes: mesh axis name(s) over which the per-block state is split;
      see `scale_by_shampoo`.
    layer_axes: axes of a leaf that index stacked layers; see
      `scale_by_shampoo`.
    basis_dtype: storage dtype of the bases (computed in float32).
    cut_at_shards: cut blocks at the parameters' shard boundaries; see
      `scale_by_shampoo`.

  Returns:
    An ``optax.GradientTransformation`` whose state is a `SoapState`.
  """
  static_int = functools.partial(
      _shampoo._static_int,  # pylint: disable=protected-access
      static_options="SOAP_STATIC_OPTIONS")
  block_size = static_int("block_size", block_size, 1)
  precondition_every = static_int("precondition_every", precondition_every, 1)
  max_precondition_dim = static_int(
      "max_precondition_dim", max_precondition_dim, 1)
  _shampoo._check_range("b1", b1, 0.0, 1.0, high_open=True)  # pylint: disable=protected-access
  _shampoo._check_range("b2", b2, 0.0, 1.0)  # pylint: disable=protected-access
  _shampoo._check_range("shampoo_beta", shampoo_beta, 0.0, 1.0)  # pylint: disable=protected-access
  _shampoo._check_range("eps", eps, 0.0)  # pylint: disable=protected-access
  for name, flag in (("skip_nonfinite", skip_nonfinite),
                     ("cut_at_shards", cut_at_shards)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be True or False, got {flag!r}.")
  shard_axes = _sharding.check_shard_axes(shard_axes)
  basis_dtype = _shampoo._check_dtype("basis_dtype", basis_dtype)  # pylint: disable=protected-access
  if basis_dtype is None:
    raise TypeError("basis_dtype must be a floating dtype.")

  plan_for = functools.partial(
      _shampoo._plan_of,  # pylint: disable=protected-access
      layer_axes=layer_axes, block_size=block_size,
      max_precondition_dim=max_precondition_dim, cut_at_shards=cut_at_shards,
      transform="scale_by_soap")

  def init_fn(params):
    plan, _, leaves, _ = plan_for(params)
    place = _shampoo._factor_placement(plan, leaves, shard_axes)  # pylint: disable=protected-access
    zeros = functools.partial(_shampoo._family_zeros, plan, leaves,  # pylint: disable=protected-access
                              jnp.float32)
    per_family = zeros()
    nu = []
    for f, p in _second_moment_keys(plan):
      if p is None:
        nu.append(per_family[f])
      else:
        index, factor = plan.factors_of(f, p)[0]
        nu.extend(place([jnp.zeros(factor.batch_shape
                                   + plan.families[f].pieces[p].block,
                                   jnp.float32)], [index]))
    return SoapState(
        count=jnp.zeros([], jnp.int32),
        stats=place(jnp.zeros(f.shape, jnp.float32) for f in plan.factors),
        bases=place(
            jnp.broadcast_to(jnp.eye(f.dim, dtype=basis_dtype),
                             f.batch_shape + (f.dim, f.dim))
            for f in plan.factors),
        mu=per_family,
        nu=tuple(nu),
        diagnostics=SoapDiagnostics(
            basis_failures=jnp.zeros([], jnp.int32),
            last_refresh_step=jnp.full([], -1, jnp.int32),
            nonfinite_steps=jnp.zeros([], jnp.int32),
        ),
    )

  def check_state(plan, paths, leaves, state, specs):
    del paths, leaves
    _shampoo._check_layout("scale_by_soap", plan, state.stats, specs)  # pylint: disable=protected-access
    got = [tuple(m.shape) for m in state.mu + state.nu]
    expected = ([(fam.units,) + fam.shape for fam in plan.families]
                + _second_moment_shapes(plan, specs))
    if got != expected:
      raise ValueError(
          "scale_by_soap: the state was made for other parameters or options"
          f" (moments {got}; these updates need {expected}). Call init with"
          " this transformation.")

  def update_core(leaves, state, floats, plan, specs, family_specs):
    b1, b2, eps, beta_s = (jnp.asarray(x, jnp.float32) for x in floats)
    count = state.count
    pin = _sharding.family_pins(family_specs, state.mu)
    stacked = [pin(plan.stack([g.astype(jnp.float32) for g in leaves], f), f)
               for f in range(len(plan.families))]
    finite = _shampoo._all_finite(stacked) if skip_nonfinite else jnp.array(  # pylint: disable=protected-access
        True)
    blocks = _shampoo._gradient_blocks(plan, stacked, specs, family_specs)  # pylint: disable=protected-access
    stats = _shampoo._update_statistics(  # pylint: disable=protected-access
        plan, blocks, list(state.stats), finite, beta_s, specs)

    first = count == 0
    bases = [b.astype(jnp.float32) for b in state.bases]
    bc = _grafting.bias_correction
    mus = [pin(_grafting.ema(mu, g, b1), f)
           for f, (mu, g) in enumerate(zip(state.mu, stacked))]
    nus = dict(zip(_second_moment_keys(plan), state.nu))
    directions = {}
    # Diagonal families: Adam from step 0.
    for f, fam in enumerate(plan.families):
      if not fam.preconditioned:
        nus[(f, None)] = _grafting.ema(nus[(f, None)], jnp.square(stacked[f]),
                                       b2)
        directions[f] = (mus[f] / bc(b1, count + 1)) / (
            jnp.sqrt(nus[(f, None)] / bc(b2, count + 1)) + eps)
    # Preconditioned families, block by block where their factors live. Step
    # 0 only initializes the bases; Adam's steps start at 1.
    adam_step = jnp.maximum(count, 1)
    transposed = lambda i: jnp.swapaxes(bases[i], -1, -2)
    # M's blocks from the old M's and G's: cutting the new M instead would
    # pull its (per-family) computation to the blocks' split.
    moments = {key: _grafting.ema(old, blocks[key], b1) for key, old in
               _shampoo._gradient_blocks(plan, list(state.mu), specs,  # pylint: disable=protected-access
                                         family_specs).items()}
    rotated = {}
    for key, block in blocks.items():
      into = functools.partial(_shampoo._multiplied, plan, key,  # pylint: disable=protected-access
                               matrices=transposed, specs=specs)
      nu = _grafting.ema(nus[key], jnp.square(into(block)), b2)
      nus[key] = jnp.where(first, nus[key], nu)
      rotated[key] = _shampoo._multiplied(  # pylint: disable=protected-access
          plan, key, (into(moments[key]) / bc(b1, adam_step))
          / (jnp.sqrt(nu / bc(b2, adam_step)) + eps),
          lambda i: bases[i], specs)
    for f, direction in _shampoo._families_of(  # pylint: disable=protected-access
        plan, rotated, specs, family_specs).items():
      directions[f] = jnp.where(first, 0.0, direction)
      mus[f] = jnp.where(first, state.mu[f], mus[f])
    directions = [pin(directions[f], f) for f in range(len(plan.families))]

    refresh_now = finite & (count > 0) & (count % precondition_every == 0)
    bases, _, rejected_first = _refresh_bases(
        plan, stats, bases, finite & first, specs, method="eigh")
    bases, orders, rejected = _refresh_bases(
        plan, stats, bases, refresh_now, specs, method="qr")
    # V's entries follow their basis vectors through the sort. Only a
    # refresh sorts: the cond spares every other step the gathers, and
    # yields zeros (selected below) rather than passing V through, which
    # would copy it.
    for key in blocks:
      permuted = jax.lax.cond(
          refresh_now,
          functools.partial(_permuted, plan, key, specs=specs),
          lambda nu, _: jnp.zeros_like(nu), nus[key], orders)
      nus[key] = jnp.where(refresh_now, permuted, nus[key])
    nus = [nus[key] for key in _second_moment_keys(plan)]

    keep = functools.partial(_shampoo._kept_where, finite)  # pylint: disable=protected-access
    directions = [jnp.where(finite, d, 0.0) for d in directions]
    starts = plan.member_starts(count, _sharding.units_whole(
        family_specs, len(plan.families)))
    updates = [d.astype(g.dtype)
               for d, g in zip(plan.unstack_tree(directions, starts), leaves)]
    failures = _shampoo._count_true(rejected + rejected_first)  # pylint: disable=protected-access
    diagnostics = state.diagnostics
    refreshed = finite & (first | refresh_now) & bool(plan.factors)
    new_state = SoapState(
        count=jnp.where(finite, optax.safe_increment(count), count),
        stats=tuple(stats),
        bases=tuple(q.astype(old.dtype) for q, old in zip(bases, state.bases)),
        mu=keep(mus, state.mu),
        nu=keep(nus, state.nu),
        diagnostics=SoapDiagnostics(
            basis_failures=diagnostics.basis_failures + failures,
            last_refresh_step=jnp.where(refreshed, count,
                                        diagnostics.last_refresh_step),
            nonfinite_steps=diagnostics.nonfinite_steps
            + (~finite).astype(jnp.int32)),
    )
    return updates, new_state

  update_fn = _shampoo._update_fn(  # pylint: disable=protected-access
      "scale_by_soap", SoapState, plan_for, check_state, update_core,
      shard_axes, (b1, b2, eps, shampoo_beta))
  return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    block_size: int = 128,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    shampoo_beta: float = 0.95,
    precondition_every: int = 10,
    max_precondition_dim: int = 4096,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    layer_axes: Any = None,
    basis_dtype: Any = jnp.float32,
    weight_decay: float = 0.0,
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
    block_size, b1, b2, eps, shampoo_beta, precondition_every,
      max_precondition_dim, skip_nonfinite, shard_axes, layer_axes,
      basis_dtype, cut_at_shards: see `scale_by_soap`.
    weight_decay: decoupled weight decay :math:`\lambda`.
    mask: where to apply weight decay.

  Returns:
    An ``optax.GradientTransformation``.
  """
  _shampoo._check_range("weight_decay", weight_decay, 0.0)  # pylint: disable=protected-access
  tx = optax.chain(
      scale_by_soap(
          block_size=block_size,
          b1=b1,
          b2=b2,
          eps=eps,
          shampoo_beta=shampoo_beta,
          precondition_every=precondition_every,
          max_precondition_dim=max_precondition_dim,
          skip_nonfinite=skip_nonfinite,
          shard_axes=shard_axes,
          layer_axes=layer_axes,
          basis_dtype=basis_dtype,
          cut_at_shards=cut_at_shards,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _shampoo._skipping_nonfinite(tx) if skip_nonfinite else tx  # pylint: disable=protected-access
