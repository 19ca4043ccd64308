# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""How the stacked preconditioner state is split over a device mesh.

Every stacked statistics or preconditioner array has shape ``[N, d, d]``;
with ``shard_axes`` set, its leading axis is split over those mesh axes (``N``
is padded to a multiple of their total size), so each device holds and
inverts only its own ``N / D`` matrices.
"""

import math

import jax
from jax.sharding import PartitionSpec

ShardAxes = str | tuple[str, ...] | None


def _axes(shard_axes: ShardAxes) -> tuple[str, ...]:
  if shard_axes is None:
    return ()
  return (shard_axes,) if isinstance(shard_axes, str) else tuple(shard_axes)


def _mesh_or_raise(shard_axes: ShardAxes):
  mesh = jax.sharding.get_abstract_mesh()
  missing = [a for a in _axes(shard_axes) if a not in mesh.axis_names]
  if missing:
    raise ValueError(
        f"shard_axes={shard_axes!r}: mesh axes {missing} are not in the"
        f" current mesh (axes {mesh.axis_names}); call init and update under"
        " `jax.set_mesh(mesh)` with a mesh that has these axes."
    )
  return mesh


def shard_count(shard_axes: ShardAxes) -> int:
  """Number of shards the stacked axis is split into (1 without a mesh)."""
  if shard_axes is None:
    return 1
  mesh = _mesh_or_raise(shard_axes)
  return math.prod(mesh.shape[a] for a in _axes(shard_axes))


def stack_spec(shard_axes: ShardAxes) -> PartitionSpec:
  """``PartitionSpec`` of a stacked ``[N, d, d]`` state array."""
  axes = _axes(shard_axes)
  if not axes:
    return PartitionSpec()
  return PartitionSpec(axes[0] if len(axes) == 1 else axes)


def constrain(x: jax.Array, shard_axes: ShardAxes) -> jax.Array:
  """Pins a stacked array's leading axis to ``shard_axes``."""
  if shard_axes is None:
    return x
  _mesh_or_raise(shard_axes)
  return jax.lax.with_sharding_constraint(x, stack_spec(shard_axes))
