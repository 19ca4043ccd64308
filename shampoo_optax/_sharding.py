# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""How the stacked preconditioner state is split over a device mesh.

Every stacked statistics or preconditioner array has shape ``[N, d, d]``;
with ``shard_axes`` set, its leading axis is split over those mesh axes (``N``
is padded to a multiple ``D`` of their total size with inert zero blocks, at
most ``D - 1`` per bucket), so each device holds ``N / D`` matrices of every
bucket and computes only their inverse roots (owner computes).

The mesh comes from the context, ``jax.set_mesh(mesh)``, at trace time: with
explicit axes (``jax.make_mesh(..., axis_types=(AxisType.Explicit,))``, the
default) the stacks are placed with `jax.sharding.reshard` and the Shampoo
arithmetic runs inside `jax.sharding.auto_axes` with the caller's types as
output shardings, so every state leaf keeps its type across ``update``; with
``Auto`` axes (the "pjit way": `jax.jit` with ``in_shardings`` /
``out_shardings``) they are pinned with `jax.lax.with_sharding_constraint`.
Either way the batched inverse roots run inside `jax.shard_map` over the
shard axes, so each device's LAPACK/Newton call sees only its own
``[N / D, d, d]`` slice (the SPMD partitioner is free to replicate a custom
call such as ``eigh``; ``shard_map`` takes that choice away from it).

Communication (read from the compiled step on 8 simulated CPU devices,
``benchmarks/sharding_bench.py``; see the README section "Sharding"):

* refresh: none for the roots themselves (every device inverts its slice);
  the diagnostics are two scalar all-reduces (failure count, max error).
* every step, data-parallel (replicated) parameters: the statistics update
  reads replicated gradient blocks and writes only local rows (no collective);
  the factor slices a block needs are moved to the block's owner by
  collective-permutes of at most ``N / D`` roots per device; each device
  preconditions its own blocks and the results are all-gathered into the
  (replicated) update: one all-gather of preconditioned blocks per parameter.
  The statistics themselves are never all-gathered.
* FSDP parameters: the all-gather is replaced by the all-to-all that moves
  blocks between the parameter's layout and the block owners.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

ShardAxes = str | tuple[str, ...] | None


def axis_names(shard_axes: ShardAxes) -> tuple[str, ...]:
  """``shard_axes`` as a tuple of mesh axis names."""
  if shard_axes is None:
    return ()
  return (shard_axes,) if isinstance(shard_axes, str) else tuple(shard_axes)


def _check_axes(shard_axes: ShardAxes, mesh, where: str):
  names = axis_names(shard_axes)
  if any(not isinstance(a, str) for a in names) or len(set(names)) != len(
      names
  ):
    raise ValueError(
        f"shard_axes must be a mesh axis name or a tuple of distinct names,"
        f" got {shard_axes!r}."
    )
  missing = [a for a in names if a not in mesh.axis_names]
  if missing:
    if not mesh.axis_names:
      hint = (
          "no mesh is set. Trace init and update under `with"
          " jax.set_mesh(mesh):` (explicit sharding, or around the calls of"
          " a jax.jit with in/out_shardings), or pass shard_axes=None on a"
          " single device."
      )
    else:
      hint = (
          f"the {where} has axes {tuple(mesh.axis_names)}; name axes of that"
          " mesh."
      )
    raise ValueError(
        f"shard_axes={shard_axes!r}: mesh axes {missing} not found: {hint}"
    )
  return mesh


def context_mesh(shard_axes: ShardAxes):
  """The (abstract) mesh set by `jax.set_mesh`; raises if it lacks an axis."""
  return _check_axes(
      shard_axes, jax.sharding.get_abstract_mesh(), "current mesh"
  )


def shard_count(shard_axes: ShardAxes) -> int:
  """Number of shards the stacked axis is split into (1 without a mesh)."""
  if shard_axes is None:
    return 1
  mesh = context_mesh(shard_axes)
  return math.prod(mesh.shape[a] for a in axis_names(shard_axes))


def stack_spec(shard_axes: ShardAxes) -> PartitionSpec:
  """``PartitionSpec`` of a stacked ``[N, d, d]`` state array."""
  names = axis_names(shard_axes)
  if not names:
    return PartitionSpec()
  return PartitionSpec(names[0] if len(names) == 1 else names)


def _explicit(mesh, names) -> bool:
  return any(mesh._name_to_type[a] == AxisType.Explicit for a in names)  # pylint: disable=protected-access


def is_explicit(shard_axes: ShardAxes) -> bool:
  """Whether a shard axis is an ``Explicit`` axis of the current mesh."""
  if shard_axes is None:
    return False
  return _explicit(context_mesh(shard_axes), axis_names(shard_axes))


def constrain(x: jax.Array, shard_axes: ShardAxes) -> jax.Array:
  """Pins a stacked array's leading axis to ``shard_axes``."""
  if shard_axes is None:
    return x
  spec = stack_spec(shard_axes)
  if is_explicit(shard_axes):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def map_stacks(fn: Callable[..., Any], shard_axes: ShardAxes, num_replicated=0):
  """``fn`` applied to each device's slice of ``[N, ...]`` stacks.

  ``fn(*stacks, *replicated)`` takes and returns arrays whose leading axis
  is the stacked one, and must be row-wise (row ``i`` of an output depends
  only on row ``i`` of the inputs); its last ``num_replicated`` arguments are
  passed whole to every device. Without ``shard_axes`` it is ``fn`` itself.
  """
  if shard_axes is None:
    return fn
  spec = stack_spec(shard_axes)

  def mapped(*args):
    num_stacked = len(args) - num_replicated
    in_specs = (spec,) * num_stacked + (PartitionSpec(),) * num_replicated
    return jax.shard_map(
        fn,
        mesh=context_mesh(shard_axes),
        in_specs=in_specs,
        out_specs=spec,
        axis_names=frozenset(axis_names(shard_axes)),
    )(*args)

  return mapped


def explicit_axes_in_context() -> tuple[str, ...]:
  """The ``Explicit`` axes of the mesh set by `jax.set_mesh` (may be empty)."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(mesh.explicit_axes) if mesh.axis_names else ()


def _spec_of(x) -> PartitionSpec:
  return jax.typeof(x).sharding.spec


def in_auto_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Runs ``fn(updates, state)`` with the mesh's explicit axes made auto.

  Under explicit sharding, reshaping a parameter into blocks may be
  ambiguous (JAX then raises); inside `jax.sharding.auto_axes` the SPMD
  partitioner chooses instead. The outputs ``(updates, state)`` get back the
  inputs' shardings, so the types are the same before and after ``update``.
  ``fn`` also receives the inputs' ``PartitionSpec``s of the updates (to pin
  each leaf's direction to its parameter's layout). Without explicit axes
  in the context, ``fn`` is called directly.
  """

  def wrapped(updates, state):
    axes = explicit_axes_in_context()
    if not axes:
      return fn(updates, state, None)
    specs = (jax.tree.map(_spec_of, updates), jax.tree.map(_spec_of, state))
    return jax.sharding.auto_axes(
        lambda u, s: fn(u, s, specs[0]), axes=axes, out_sharding=specs
    )(updates, state)

  return wrapped


def constrain_like(x: jax.Array, spec: PartitionSpec | None) -> jax.Array:
  """Pins ``x`` to ``spec`` (a leaf's layout) inside `in_auto_mode`."""
  if spec is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------
# Shardings of a whole optimizer state, for jax.jit and Orbax.


def _param_sharding(leaf, mesh) -> NamedSharding:
  """The sharding of a parameter (array, ShapeDtypeStruct, spec, sharding)."""
  if isinstance(leaf, PartitionSpec):
    return NamedSharding(mesh, leaf)
  if isinstance(leaf, NamedSharding):
    return NamedSharding(mesh, leaf.spec)
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding):
    return NamedSharding(mesh, sharding.spec)
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(tx, params, mesh, param_shardings=None):
  """The `NamedSharding` of every leaf of ``tx.init(params)`` on ``mesh``.

  Use it for ``out_shardings`` of ``jax.jit(tx.init)`` and of the train step
  (and its ``in_shardings``), and to build the abstract target of an Orbax
  restore. ``tx`` may be `shampoo_optax.shampoo`, `scale_by_shampoo` or any
  optax chain or wrapper containing them:

  * Shampoo statistics and preconditioner stacks ``[N, d, d]`` are split
    along ``N`` over that transform's ``shard_axes`` (``N`` is padded for the
    size of those axes in ``mesh``);
  * per-parameter state (grafting accumulators, momentum, and the state of
    other optax transforms built with ``zeros_like``) gets its parameter's
    sharding;
  * scalars (counts, diagnostics, schedule states) are replicated.

  It traces ``tx.init`` abstractly on an explicit-axes copy of ``mesh`` and
  reads every leaf's sharding from its type, so it agrees with what
  ``jax.jit(tx.init)(params)`` produces under explicit sharding.

  Args:
    tx: an ``optax.GradientTransformation``.
    params: the parameters, as arrays or `jax.ShapeDtypeStruct`s (only
      shapes, dtypes and, when ``param_shardings`` is ``None``, shardings are
      read).
    mesh: a `jax.sharding.Mesh` (any axis types) with the ``shard_axes``.
    param_shardings: a pytree like ``params`` of `NamedSharding` or
      `PartitionSpec` (each dim's axes must divide it evenly); ``None`` takes
      each parameter's own ``.sharding`` when it is a `NamedSharding`, else
      replicated.

  Returns:
    A pytree of `NamedSharding` with the structure of ``tx.init(params)``
    (``None`` fields stay ``None``).
  """
  if param_shardings is None:
    param_shardings = params
  is_spec = lambda x: isinstance(x, (PartitionSpec, NamedSharding))
  param_shardings = jax.tree.map(
      lambda leaf: _param_sharding(leaf, mesh), param_shardings,
      is_leaf=is_spec,
  )
  if jax.tree.structure(param_shardings, is_leaf=is_spec) != (
      jax.tree.structure(params)
  ):
    raise ValueError(
        "state_shardings: param_shardings must have the structure of params;"
        f" got {jax.tree.structure(param_shardings, is_leaf=is_spec)} and"
        f" {jax.tree.structure(params)}."
    )
  explicit = jax.sharding.Mesh(
      mesh.devices, mesh.axis_names,
      axis_types=(AxisType.Explicit,) * len(mesh.axis_names),
  )
  abstract_params = jax.tree.map(
      lambda p, s: jax.ShapeDtypeStruct(
          p.shape, p.dtype, sharding=NamedSharding(explicit, s.spec)
      ),
      params,
      param_shardings,
      is_leaf=is_spec,
  )
  specs = []

  def init_specs(p):
    state = tx.init(p)
    specs.append(jax.tree.map(_spec_of, state))
    return state

  with jax.set_mesh(explicit):
    jax.eval_shape(init_specs, abstract_params)
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, spec), specs[0],
      is_leaf=lambda x: isinstance(x, PartitionSpec),
  )

