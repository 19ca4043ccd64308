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

Owner computes: row ``r`` of a bucket lives on device ``r // (N / D)``.

* statistics (`owned_contributions`, under `jax.shard_map`): each device adds
  ``G G^T`` for its own rows only, from replicated gradient blocks;
* roots (`map_stacks`, under `jax.shard_map`): each device inverts only its
  ``[N / D, d, d]`` slice (the SPMD partitioner would be free to replicate a
  custom call such as LAPACK's ``eigh``; ``shard_map`` takes that choice
  away from it);
* preconditioning (`constrain`/`replicate` around the batched products):
  the blocks of each shape are split in ``D`` chunks, each factor's roots
  are moved to the chunk owners, each device preconditions its chunk, and
  the results are all-gathered into the update.

Communication, read from the compiled step (8 simulated CPU devices,
``tests/test_sharding.py`` and ``benchmarks/sharding_bench.py``; data
parallel, 16 layers of 512 x 512, block 128, one bucket ``[512, 128, 128]``):

* every step: collective-permutes of roots to the owners of their blocks
  (``f32[64,128,128]`` + 3 x ``f32[32,128,128]``, 10 MiB per device), one
  all-gather of the preconditioned blocks (``f32[256,128,128]``, the update
  itself); a group with fewer blocks than devices is broadcast from its one
  owner with an all-reduce of that block instead;
* refresh steps: nothing more than two scalar all-reduces (failure count,
  max root error);
* FSDP parameters add the all-gather of the gradients into replicated
  blocks (an all-to-all plus all-gather) and the scalar all-reduces of the
  grafting norms.

The statistics are never all-gathered, and no device ever holds a whole
``[N, d, d]`` stack (checked on the compiled HLO by the tests).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
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


def is_explicit(shard_axes: ShardAxes) -> bool:
  """Whether a shard axis is an ``Explicit`` axis of the current mesh."""
  if shard_axes is None:
    return False
  explicit = context_mesh(shard_axes).explicit_axes
  return any(a in explicit for a in axis_names(shard_axes))


def constrain(x: jax.Array, shard_axes: ShardAxes) -> jax.Array:
  """Pins a stacked array's leading axis to ``shard_axes``."""
  if shard_axes is None:
    return x
  spec = stack_spec(shard_axes)
  if is_explicit(shard_axes):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def replicate(x: jax.Array, shard_axes: ShardAxes) -> jax.Array:
  """Pins ``x`` whole on every device (nothing to do without shard axes)."""
  if shard_axes is None:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec())


def _device_index(shard_axes: ShardAxes) -> jax.Array:
  """Inside `jax.shard_map`: this device's index along the stacked axis."""
  return jax.lax.axis_index(axis_names(shard_axes))


def owned_contributions(plan, blocks, contribution, shard_axes):
  """Each bucket's statistics increments, each row computed by its owner.

  Row ``r`` of a bucket of length ``N`` lives on device ``r // (N / D)``.
  The gradient blocks are replicated (an all-gather only when the gradients
  are sharded, e.g. FSDP); every device computes ``contribution(block,
  axis)`` for a window of ``min(n, N / D)`` blocks of each factor of the
  bucket that covers its rows, and keeps the rows it owns. No communication;
  the work per device is at most (factors per bucket) / D of the total.

  Args:
    plan: the `_blocks.Plan`.
    blocks: group -> ``[n, *group]`` gradient blocks.
    contribution: ``(blocks [w, *group], axis) -> [w, d, d]``.
    shard_axes: the mesh axes of the stacked axis.

  Returns:
    One ``[N, d, d]`` array per bucket, split along ``N`` over
    ``shard_axes``; padding rows are zero.
  """
  count = shard_count(shard_axes)
  spec = stack_spec(shard_axes)
  groups = tuple(blocks)
  buckets = tuple(plan.buckets.items())

  def body(*local_blocks):
    index = _device_index(shard_axes)
    group_blocks = dict(zip(groups, local_blocks))
    out = []
    for key, length in buckets:
      rows = length // count
      dim = key[0]
      acc = jnp.zeros((rows, dim, dim), jnp.float32)
      for group in groups:
        for factor in plan.factors[group]:
          if factor.bucket != key:
            continue
          n = plan.groups[group]
          width = min(n, rows)
          start = jnp.clip(index * rows - factor.offset, 0, n - width)
          window = jax.lax.dynamic_slice_in_dim(
              group_blocks[group], start, width)
          local = factor.offset + start - index * rows + jnp.arange(width)
          local = jnp.where((local >= 0) & (local < rows), local, rows)
          acc = acc.at[local].add(
              contribution(window, factor.axis), mode="drop")
      out.append(acc)
    return tuple(out)

  if not buckets:
    return ()
  return jax.shard_map(
      body,
      mesh=context_mesh(shard_axes),
      in_specs=(PartitionSpec(),) * len(groups),
      out_specs=(spec,) * len(buckets),
      axis_names=frozenset(axis_names(shard_axes)),
  )(*(replicate(blocks[g], shard_axes) for g in groups))


def map_stacks(fn: Callable[..., Any], shard_axes: ShardAxes, num_replicated=0,
               calls_lapack=False):
  """``fn`` applied to each device's slice of ``[N, ...]`` stacks.

  ``fn(*stacks, *replicated)`` takes and returns arrays whose leading axis
  is the stacked one, and must be row-wise (row ``i`` of an output depends
  only on row ``i`` of the inputs); its last ``num_replicated`` arguments are
  passed whole to every device. With ``shard_axes`` it runs under
  `jax.shard_map`, so each device computes only its ``N / D`` rows; without,
  it is ``fn`` itself. ``calls_lapack``: ``fn`` calls a LAPACK kernel
  (``eigh``), which on CPU runs one row at a time (see `_one_row_at_a_time`).
  """

  def mapped(*args):
    body = fn
    if calls_lapack and jax.default_backend() == "cpu":
      body = _one_row_at_a_time(fn, num_replicated)
    if shard_axes is None:
      return body(*args)
    spec = stack_spec(shard_axes)
    num_stacked = len(args) - num_replicated
    in_specs = (spec,) * num_stacked + (PartitionSpec(),) * num_replicated
    return jax.shard_map(
        body,
        mesh=context_mesh(shard_axes),
        in_specs=in_specs,
        out_specs=spec,
        axis_names=frozenset(axis_names(shard_axes)),
        # fn's loops start from unsharded constants (e.g. Newton's carry);
        # every row is independent, so nothing varies across devices
        # unexpectedly.
        check_vma=False,
    )(*args)

  return mapped


# CPU programs (one device, or several simulated ones with
# --xla_force_host_platform_device_count) run on one intra-op thread pool.
# Two parts of the CPU LAPACK path (jaxlib's eigh, via scipy's OpenBLAS) then
# deadlock intermittently (observed with jax 0.10.2 on 1 and 8 devices): a
# batched eigh fans out over the intra-op pool and blocks a pool thread
# waiting for its chunks, and OpenBLAS's own threads wait on each other when
# several devices call it at once. So on CPU the eigh roots are computed one
# matrix at a time (a batch of one is run inline) and OpenBLAS is limited to
# one thread; the numbers are those of the batched call.


def _one_row_at_a_time(fn, num_replicated):
  _single_threaded_openblas()

  def body(*args):
    num_stacked = len(args) - num_replicated
    stacks, replicated = args[:num_stacked], args[num_stacked:]
    return jax.lax.map(lambda rows: fn(*rows, *replicated), stacks)

  return body


_OPENBLAS_LIMITED = []


def _single_threaded_openblas() -> None:
  """Sets every loaded OpenBLAS (jaxlib's LAPACK provider) to one thread."""
  if _OPENBLAS_LIMITED:
    return
  _OPENBLAS_LIMITED.append(True)
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    import scipy.linalg.cython_lapack  # pylint: disable=g-import-not-at-top,unused-import

    with open("/proc/self/maps") as maps:
      paths = {
          line.split()[-1] for line in maps
          if "openblas" in line and line.split()[-1].startswith("/")
      }
    for path in sorted(paths):
      lib = ctypes.CDLL(path)
      for name in ("scipy_openblas_set_num_threads",
                   "scipy_openblas_set_num_threads64_",
                   "openblas_set_num_threads",
                   "openblas_set_num_threads64_"):
        if hasattr(lib, name):
          getattr(lib, name)(1)
          break
  except (ImportError, OSError):  # Not Linux, or no OpenBLAS: nothing to do.
    pass


def explicit_axes_in_context() -> tuple[str, ...]:
  """The ``Explicit`` axes of the mesh set by `jax.set_mesh` (may be empty)."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(mesh.explicit_axes) if mesh.axis_names else ()


def _spec_of(x) -> PartitionSpec:
  return jax.typeof(x).sharding.spec


def in_auto_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Runs ``fn(updates, state)`` with the mesh's explicit axes made auto.

  Under explicit sharding, cutting a sharded parameter into blocks may be
  ambiguous (JAX then raises); inside `jax.sharding.auto_axes` the SPMD
  partitioner chooses instead. The outputs ``(updates, state)`` get back the
  inputs' shardings, so the types are the same before and after ``update``
  and each update has its gradient's sharding. Without explicit axes in the
  context, ``fn`` is called directly.
  """

  def wrapped(updates, state):
    axes = explicit_axes_in_context()
    if not axes:
      return fn(updates, state)
    specs = (jax.tree.map(_spec_of, updates), jax.tree.map(_spec_of, state))
    return jax.sharding.auto_axes(fn, axes=axes, out_sharding=specs)(
        updates, state)

  return wrapped


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

