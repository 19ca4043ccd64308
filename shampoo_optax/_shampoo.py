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
leaf to the norm of a simple optimizer's direction (grafting, see
`_grafting`), then momentum follows.
"""

import functools
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

_HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = "abcdefghijklmnopqrstuvwx"


class ShampooDiagnostics(NamedTuple):
  """Scalars to log; all are cheap and updated inside the jitted step.

  Attributes:
    root_failures: cumulative number of inverse roots rejected (non-finite or
      error above ``max_root_error``); each kept its previous root.
    max_root_error: largest root error of the last refresh (see
      `shampoo_optax.root_error`).
    last_refresh_step: the step (0-based) of the last root refresh, -1 before
      the first.
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
    stats: one ``[N_d, d, d]`` float32 stack per bucket of equal-size,
      equal-exponent Kronecker factors (see `shampoo_optax._blocks`).
    preconditioners: inverse roots of ``stats``, same layout.
    graft: per-leaf float32 accumulators of the grafted optimizer, or
      ``None`` for ``"sgd"``/``"none"`` grafting.
    mu: per-leaf momentum, or ``None`` when ``b1 == 0``.
    diagnostics: `ShampooDiagnostics`.
  """

  count: chex.Array
  stats: tuple[chex.Array, ...]
  preconditioners: tuple[chex.Array, ...]
  graft: Any
  mu: Any
  diagnostics: ShampooDiagnostics


# Options that shape the state or the compiled program: they must be Python
# values, so `optax.inject_hyperparams` must get them in `static_args`.
STATIC_OPTIONS = (
    "block_size",
    "graft",
    "precondition_every",
    "statistics_every",
    "start_preconditioning_step",
    "root_method",
    "exponent_override",
    "nesterov",
    "heavy_ball",
    "max_precondition_dim",
    "skip_nonfinite",
    "shard_axes",
    "mu_dtype",
)


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def _static_int(name: str, value, minimum: int, allow_none: bool = False):
  if value is None and allow_none:
    return None
  if _is_traced(value):
    raise TypeError(
        f"{name} must be a static Python int, got a traced value; with"
        " optax.inject_hyperparams pass"
        " static_args=shampoo_optax.STATIC_OPTIONS."
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


def _check_range(name: str, value, low: float, high: float | None = None):
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
  if not low <= number <= upper:
    accepted = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be in {accepted}, got {value!r}.")


def _check_choice(name: str, value, choices):
  if value not in choices:
    raise ValueError(
        f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}."
    )


def _check_leaves(leaves_with_paths, what: str):
  for path, leaf in leaves_with_paths:
    dtype = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"scale_by_shampoo: {what} {jax.tree_util.keystr(path)} has dtype"
          f" {dtype}; Shampoo needs real floating-point {what}s (float32,"
          " bfloat16, float16). Exclude it with optax.masked or"
          " optax.partition."
      )


def _stats_contribution(block: jax.Array, axis: int) -> jax.Array:
  """``G_(axis) G_(axis)^T`` for each block of ``[N, b_1, ..., b_k]``."""
  letters = _LETTERS[: block.ndim - 1]
  other = letters.replace(letters[axis], "y")
  out = "z" + letters[axis] + "y"
  return jnp.einsum(
      f"z{letters},z{other}->{out}", block, block, precision=_HIGHEST
  )


def _apply_factor(block: jax.Array, root: jax.Array, axis: int) -> jax.Array:
  """Multiplies axis ``axis`` of every block by its (symmetric) root."""
  letters = _LETTERS[: block.ndim - 1]
  out = letters.replace(letters[axis], "y")
  return jnp.einsum(
      f"zy{letters[axis]},z{letters}->z{out}", root, block, precision=_HIGHEST
  )


def _inverse_root_rows(stat, ridge_epsilon, *, p, method):
  return _roots.inverse_pth_root(
      stat, p, method=method, ridge_epsilon=ridge_epsilon
  )


def _global_norm_ratio(numerator: jax.Array, denominator: jax.Array):
  num, den = jnp.linalg.norm(numerator), jnp.linalg.norm(denominator)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


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
    root_method: str = "auto",
    exponent_override: int | None = None,
    nesterov: bool = False,
    heavy_ball: bool = False,
    max_precondition_dim: int = 4096,
    max_root_error: float = 0.5,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    mu_dtype: Any = None,
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

  rescaled per leaf to the norm of the grafted optimizer's direction, then
  momentum. For a matrix this is :math:`\hat L^{-1/4} G \hat R^{-1/4}`. The
  result has the gradient's sign (apply ``-learning_rate`` after it, as
  `shampoo` does).

  Args:
    block_size: largest side of a preconditioned block; larger dims are cut
      into blocks, adjacent small dims of rank >= 3 tensors are merged.
    b1: momentum decay; 0 disables momentum.
    b2: decay of the statistics; 1.0 accumulates plain sums (the paper).
    matrix_eps: ridge :math:`\epsilon`, relative to the largest eigenvalue.
    graft: grafted optimizer, one of ``"adam"``, ``"rmsprop"``,
      ``"adagrad"``, ``"sgd"``, their ``"*_normalized"`` variants, or
      ``"none"`` (Shampoo's own step size).
    graft_eps: :math:`\epsilon` of the grafted optimizer.
    graft_b2: second-moment decay of the grafted optimizer; ``None`` uses
      ``b2``.
    precondition_every: steps between recomputations of the inverse roots.
    statistics_every: steps between statistics updates.
    start_preconditioning_step: before this step (0-based) the grafted
      optimizer alone drives the update.
    root_method: ``"eigh"``, ``"newton"`` (coupled Newton iteration) or
      ``"auto"`` (the faster on the current backend).
    exponent_override: use :math:`S^{-1/p}` with this ``p`` for every factor.
    nesterov: Nesterov momentum.
    heavy_ball: ``m = b1 m + u`` instead of the (bias-corrected) average
      ``m = b1 m + (1 - b1) u``.
    max_precondition_dim: leaves with a dim above this (e.g. embedding
      tables) get only the grafted (diagonal) optimizer.
    max_root_error: a new root whose error
      :math:`\max|X^p \hat S - I|` exceeds this (or is not finite) is
      rejected and the previous root kept.
    skip_nonfinite: when any gradient is NaN/Inf, or a leaf's sum of squares
      overflows float32 (``|g|_F > ~1.8e19``, which would make the statistics
      infinite), return a zero update and leave the state unchanged (counted
      in ``diagnostics.nonfinite_steps``).
    shard_axes: mesh axis name(s) over which the stacked statistics and roots
      are split; ``None`` keeps them whole on every device.
    mu_dtype: dtype of the momentum; ``None`` uses the parameters' dtype.

  Returns:
    An ``optax.GradientTransformation`` whose state is a `ShampooState`.
  """
  block_size = _static_int("block_size", block_size, 1)
  precondition_every = _static_int("precondition_every", precondition_every, 1)
  statistics_every = _static_int("statistics_every", statistics_every, 1)
  start_preconditioning_step = _static_int(
      "start_preconditioning_step", start_preconditioning_step, 0
  )
  exponent_override = _static_int(
      "exponent_override", exponent_override, 1, allow_none=True
  )
  max_precondition_dim = _static_int(
      "max_precondition_dim", max_precondition_dim, 1
  )
  _check_range("b1", b1, 0.0, 1.0)
  _check_range("b2", b2, 0.0, 1.0)
  if graft_b2 is None:
    graft_b2 = b2
  _check_range("graft_b2", graft_b2, 0.0, 1.0)
  _check_range("matrix_eps", matrix_eps, 0.0)
  _check_range("graft_eps", graft_eps, 0.0)
  _check_range("max_root_error", max_root_error, 0.0)
  _check_choice("graft", graft, _grafting.GRAFTS)
  _check_choice("root_method", root_method, _roots.ROOT_METHODS)
  for name, flag in (("nesterov", nesterov), ("heavy_ball", heavy_ball),
                     ("skip_nonfinite", skip_nonfinite)):
    _check_choice(name, flag, (True, False))
  use_momentum = _is_traced(b1) or not (
      isinstance(b1, (int, float)) and float(b1) == 0.0
  )
  if mu_dtype is not None:
    try:
      mu_dtype = jnp.dtype(mu_dtype)
    except TypeError:
      raise TypeError(
          f"mu_dtype must be a dtype or None, got {mu_dtype!r}.") from None

  def make_plan(leaves) -> _blocks.Plan:
    return _blocks.make_plan(
        tuple(tuple(leaf.shape) for leaf in leaves),
        block_size,
        max_precondition_dim,
        exponent_override,
        _sharding.shard_count(shard_axes),
    )

  def constrain(stacks):
    return tuple(_sharding.constrain(x, shard_axes) for x in stacks)

  def init_fn(params):
    _check_leaves(jax.tree_util.tree_leaves_with_path(params), "parameter")
    plan = make_plan(jax.tree.leaves(params))
    stats = constrain(
        jnp.zeros(shape, jnp.float32) for shape in plan.bucket_shapes
    )
    preconditioners = constrain(
        jnp.broadcast_to(jnp.eye(shape[-1], dtype=jnp.float32), shape)
        for shape in plan.bucket_shapes
    )
    # zeros_like keeps each parameter's sharding (explicit mode).
    f32_zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)
    return ShampooState(
        count=jnp.zeros([], jnp.int32),
        stats=stats,
        preconditioners=preconditioners,
        graft=jax.tree.map(f32_zeros, params)
        if _grafting.has_accumulator(graft)
        else None,
        mu=jax.tree.map(
            lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        if use_momentum
        else None,
        diagnostics=ShampooDiagnostics(
            root_failures=jnp.zeros([], jnp.int32),
            max_root_error=jnp.zeros([], jnp.float32),
            last_refresh_step=jnp.full([], -1, jnp.int32),
            nonfinite_steps=jnp.zeros([], jnp.int32),
        ),
    )

  def update_stats(plan, blocks, stats):
    if shard_axes is not None:  # Each device computes only its own rows.
      return constrain(
          _grafting.ema(old, new, b2) for old, new in zip(
              stats, _sharding.owned_contributions(
                  plan, blocks, _stats_contribution, shard_axes)))
    contributions = {key: [] for key in plan.buckets}
    for group, factors in plan.factors.items():
      for factor in factors:
        contributions[factor.bucket].append(
            (factor.offset, _stats_contribution(blocks[group], factor.axis))
        )
    new_stats = []
    for (key, length), old in zip(plan.buckets.items(), stats):
      parts = [c for _, c in sorted(contributions[key], key=lambda x: x[0])]
      used = sum(c.shape[0] for c in parts)
      if used < length:  # Inert padding for sharding.
        parts.append(jnp.zeros((length - used,) + old.shape[1:], jnp.float32))
      new_stats.append(_grafting.ema(old, jnp.concatenate(parts), b2))
    return constrain(new_stats)

  def candidate_roots(plan, stats):
    results = []
    uses_eigh = (root_method if root_method != "auto"
                 else _roots.default_root_method()) == "eigh"
    for (_, p), stat in zip(plan.buckets, stats):
      # Each device inverts only its own rows of the stack.
      results.append(_sharding.map_stacks(
          functools.partial(_inverse_root_rows, p=p, method=root_method),
          shard_axes, num_replicated=1, calls_lapack=uses_eigh,
      )(stat, jnp.asarray(matrix_eps, jnp.float32)))
    return results

  def refresh(plan, is_refresh, stats, preconditioners, diagnostics, count):
    """New roots where ``is_refresh`` and the root is acceptable."""
    # The cond yields zeros when not refreshing and the selection happens
    # outside: a cond branch that passes a large operand through is a slow
    # copy on CPU, an elementwise select is not.
    candidates = jax.lax.cond(
        is_refresh,
        functools.partial(candidate_roots, plan),
        lambda s: [_roots.InverseRootResult(jnp.zeros_like(x),
                                            jnp.zeros(x.shape[:1]))
                   for x in s],
        stats,
    )
    roots, failures, max_error = [], 0, jnp.zeros([], jnp.float32)
    for result, old in zip(candidates, preconditioners):
      ok = jnp.isfinite(result.error) & (result.error <= max_root_error)
      roots.append(jnp.where((is_refresh & ok)[:, None, None], result.root,
                             old))
      failures += jnp.sum(is_refresh & ~ok, dtype=jnp.int32)
      max_error = jnp.maximum(
          max_error, jnp.max(jnp.where(jnp.isnan(result.error), jnp.inf,
                                       result.error))
      )
    return constrain(roots), diagnostics._replace(
        root_failures=diagnostics.root_failures + failures,
        max_root_error=jnp.where(is_refresh, max_error,
                                 diagnostics.max_root_error),
        last_refresh_step=jnp.where(is_refresh, count,
                                    diagnostics.last_refresh_step),
    )

  def precondition(plan, blocks, preconditioners):
    # With shard_axes, the blocks of each group are split in D chunks, each
    # factor's roots are moved to the chunk owners (collective-permutes), each
    # device preconditions its chunk, and the results are gathered: the one
    # collective that carries the update. Without, both pins do nothing.
    split = functools.partial(_sharding.constrain, shard_axes=shard_axes)
    index = dict(zip(plan.buckets, preconditioners))
    out = {}
    for group, block in blocks.items():
      block = split(_sharding.replicate(block, shard_axes))
      for factor in plan.factors[group]:
        root = index[factor.bucket][factor.offset : factor.offset + len(block)]
        block = split(_apply_factor(block, split(root), factor.axis))
      out[group] = _sharding.replicate(block, shard_axes)
    return out

  def update_core(updates, state):
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
    _check_leaves(leaves_with_paths, "update")
    leaves = [leaf for _, leaf in leaves_with_paths]
    plan = make_plan(leaves)
    # Per-leaf state (if any) records the tree given to init.
    per_leaf = state.graft if state.graft is not None else state.mu
    if tuple(s.shape for s in state.stats) != plan.bucket_shapes or (
        per_leaf is not None
        and (jax.tree.structure(per_leaf) != treedef
             or [tuple(x.shape) for x in jax.tree.leaves(per_leaf)]
             != [tuple(x.shape) for x in leaves])
    ):
      raise ValueError(
          "scale_by_shampoo: the updates do not match the tree given to"
          " init (different structure or leaf shapes): got leaf shapes"
          f" {[(jax.tree_util.keystr(k), tuple(x.shape)) for k, x in leaves_with_paths]}"
          + ("" if per_leaf is None else ", init leaf shapes"
             f" {[(jax.tree_util.keystr(k), tuple(x.shape)) for k, x in jax.tree_util.tree_leaves_with_path(per_leaf)]}")
          + f", state statistics {[tuple(s.shape) for s in state.stats]}."
      )
    grads = [g.astype(jnp.float32) for g in leaves]
    count = state.count
    step = optax.safe_increment(count)
    if skip_nonfinite:
      # A finite sum of squares bounds every entry of G G^T and of g^2, so
      # the statistics and accumulators cannot overflow to inf either.
      squares = [jnp.sum(jnp.square(g)) for g in grads]
      # The squares are >= 0: the total is finite only when every leaf's is
      # (a total overflowing float32 is skipped too, conservatively). The
      # sqrt changes no answer; XLA deems it expensive and computes it once,
      # where it would copy a chain of cheap scalar adds into every per-leaf
      # select fusion (compiled size quadratic in the number of leaves).
      finite = jnp.isfinite(jnp.sqrt(sum(squares, jnp.zeros([]))))
      # Non-finite values reach only results that are discarded below (the
      # statistics and roots are behind conds on `finite`).
    else:
      finite = jnp.array(True)

    blocks = plan.stack(grads) if plan.groups else {}
    update_stats_now = finite & (count % statistics_every == 0)
    new_stats = jax.lax.cond(
        update_stats_now,
        functools.partial(update_stats, plan, blocks),
        lambda s: tuple(jnp.zeros_like(x) for x in s),
        state.stats,
    )
    stats = constrain(jnp.where(update_stats_now, new, old)
                      for new, old in zip(new_stats, state.stats))
    use_shampoo = count >= start_preconditioning_step
    is_refresh = (
        finite
        & use_shampoo
        & ((count - start_preconditioning_step) % precondition_every == 0)
    )
    preconditioners, diagnostics = refresh(
        plan, is_refresh, stats, state.preconditioners, state.diagnostics,
        count)
    shampoo_blocks = jax.lax.cond(
        use_shampoo,
        functools.partial(precondition, plan),
        lambda b, _: jax.tree.map(jnp.zeros_like, b),
        blocks,
        preconditioners,
    )
    shampoo_directions = plan.unstack(shampoo_blocks)

    grafted = _grafting.graft_direction(
        graft,
        grads,
        None if state.graft is None else jax.tree.leaves(state.graft),
        step,
        graft_b2,
        graft_eps,
    )
    directions = []
    for g, graft_dir, shampoo_dir in zip(
        grads, grafted.direction, shampoo_directions
    ):
      if shampoo_dir is None:  # Diagonal leaf: the grafted optimizer alone.
        directions.append(graft_dir)
        continue
      if graft != "none":
        shampoo_dir *= _global_norm_ratio(graft_dir, shampoo_dir)
      directions.append(jnp.where(use_shampoo, shampoo_dir, graft_dir))

    if use_momentum:
      mus = [m.astype(jnp.float32) for m in jax.tree.leaves(state.mu)]
      if heavy_ball:
        mus = [b1 * m + d for m, d in zip(mus, directions)]
        directions = [
            d + b1 * m if nesterov else m for m, d in zip(mus, directions)
        ]
      else:
        mus = [_grafting.ema(m, d, b1) for m, d in zip(mus, directions)]
        if nesterov:
          # Nesterov's look-ahead: one more average with the fresh direction.
          directions = [
              _grafting.ema(m, d, b1) / _grafting.bias_correction(b1, step + 1)
              for m, d in zip(mus, directions)
          ]
        else:
          scale = _grafting.bias_correction(b1, step)
          directions = [m / scale for m in mus]
      mu = jax.tree.unflatten(
          treedef,
          [m.astype(old.dtype)
           for m, old in zip(mus, jax.tree.leaves(state.mu))],
      )
    else:
      mu = None

    new_state = ShampooState(
        count=step,
        stats=stats,
        preconditioners=preconditioners,
        graft=None
        if grafted.accumulators is None
        else jax.tree.unflatten(treedef, grafted.accumulators),
        mu=mu,
        diagnostics=diagnostics,
    )
    new_updates = [d.astype(g.dtype) for d, g in zip(directions, leaves)]
    if skip_nonfinite:
      # The statistics and roots are already guarded by their conds.
      keep_old = lambda new, old: jnp.where(finite, new, old)
      new_state = new_state._replace(
          count=keep_old(step, count),
          graft=jax.tree.map(keep_old, new_state.graft, state.graft),
          mu=jax.tree.map(keep_old, new_state.mu, state.mu),
          diagnostics=new_state.diagnostics._replace(
              nonfinite_steps=state.diagnostics.nonfinite_steps
              + (~finite).astype(jnp.int32)
          ),
      )
      new_updates = [jnp.where(finite, u, jnp.zeros_like(u))
                     for u in new_updates]
    return jax.tree.unflatten(treedef, new_updates), new_state

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, ShampooState):
      raise TypeError(
          "scale_by_shampoo: expected the ShampooState made by this"
          f" transformation's init, got {type(state).__name__}."
      )
    return _sharding.in_auto_mode(update_core)(updates, state)

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
    root_method: str = "auto",
    exponent_override: int | None = None,
    nesterov: bool = False,
    heavy_ball: bool = False,
    max_precondition_dim: int = 4096,
    max_root_error: float = 0.5,
    skip_nonfinite: bool = True,
    shard_axes: _sharding.ShardAxes = None,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
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
      root_method, exponent_override, nesterov, heavy_ball,
      max_precondition_dim, max_root_error, skip_nonfinite, shard_axes,
      mu_dtype: see `scale_by_shampoo`.
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
          root_method=root_method,
          exponent_override=exponent_override,
          nesterov=nesterov,
          heavy_ball=heavy_ball,
          max_precondition_dim=max_precondition_dim,
          max_root_error=max_root_error,
          skip_nonfinite=skip_nonfinite,
          shard_axes=shard_axes,
          mu_dtype=mu_dtype,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  if not skip_nonfinite:
    return tx

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = tx.update(updates, state, params, **extra_args)
    # A step scale_by_shampoo skipped is a no-op for the whole chain: no
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
