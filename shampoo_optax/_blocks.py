# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The static plan: how each leaf is reshaped, blocked and stacked.

Everything here runs in Python on shapes only, once per tree of shapes. The
result tells the update how to

* route each leaf: ``shampoo`` (Kronecker-factored preconditioning) or
  ``diagonal`` (the grafted optimizer alone: scalars, vectors, empty leaves and
  leaves with a dimension above ``max_precondition_dim``);
* reshape a preconditioned leaf: drop unit dimensions, then merge adjacent
  small dimensions while their product stays ``<= block_size`` (never below
  rank 2), e.g. a ``[3, 3, 64, 128]`` conv kernel becomes ``[9, 64, 128]`` and
  a ``[128, 4, 32]`` attention kernel becomes ``[128, 128]``;
* cut the merged tensor into blocks of at most ``block_size`` along every
  axis (the remainder block of an axis may be smaller);
* stack blocks of equal shape from all leaves into one ``[N, b_1, ..., b_k]``
  array (a *group*), so that one batched op serves every layer;
* stack the statistics of all blocks whose axis has the same size ``d`` and
  the same root exponent ``p`` into one ``[N_d, d, d]`` array (a *bucket*),
  so that one batched inverse-root call serves every layer.

Buckets are padded to a multiple of ``pad_multiple`` (the number of shards)
with inert zero matrices; the root of a zero matrix is the identity.
"""

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
  """A rectangular region of a merged leaf, cut into equal blocks.

  Attributes:
    leaf: index of the leaf in the flattened tree.
    start: start of the region along each merged axis.
    grid: number of blocks along each axis.
    group: the block shape, key of the group the blocks are stacked into.
    offset: index of the region's first block in its group's stack.
  """

  leaf: int
  start: Shape
  grid: Shape
  group: Shape
  offset: int

  @property
  def count(self) -> int:
    return math.prod(self.grid)


@dataclasses.dataclass(frozen=True)
class Factor:
  """Where the statistics of one axis of one group live in a bucket."""

  group: Shape
  axis: int
  bucket: tuple[int, int]  # (dim, exponent p)
  offset: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static layout of a tree of shapes (see module docstring).

  Attributes:
    shapes: original leaf shapes, in flattened order.
    merged: merged shape of each leaf, ``None`` for diagonal leaves.
    pieces: all regions of all preconditioned leaves.
    groups: block shape -> number of stacked blocks.
    factors: group -> one ``Factor`` per axis.
    buckets: ``(dim, p)`` -> stack length (padded).
  """

  shapes: tuple[Shape, ...]
  merged: tuple[Shape | None, ...]
  pieces: tuple[Piece, ...]
  groups: dict[Shape, int]
  factors: dict[Shape, tuple[Factor, ...]]
  buckets: dict[tuple[int, int], int]

  @property
  def bucket_shapes(self) -> tuple[Shape, ...]:
    return tuple((n, d, d) for (d, _), n in self.buckets.items())

  def is_preconditioned(self, leaf: int) -> bool:
    return self.merged[leaf] is not None

  def stack(self, leaves: Sequence[jax.Array]) -> dict[Shape, jax.Array]:
    """Cuts leaves into blocks: group -> ``[N, *group]``."""
    parts = {group: [] for group in self.groups}
    for piece in self.pieces:
      merged = leaves[piece.leaf].reshape(self.merged[piece.leaf])
      region = merged[
          tuple(
              slice(s, s + n * b)
              for s, n, b in zip(piece.start, piece.grid, piece.group)
          )
      ]
      parts[piece.group].append(_to_blocks(region, piece.grid, piece.group))
    return {group: _concat(p) for group, p in parts.items()}

  def unstack(
      self, blocks: dict[Shape, jax.Array]
  ) -> list[jax.Array | None]:
    """Inverse of `stack`; diagonal leaves come back as ``None``."""
    regions = [dict() for _ in self.shapes]
    for piece in self.pieces:
      stacked = blocks[piece.group][piece.offset : piece.offset + piece.count]
      regions[piece.leaf][piece.start] = _from_blocks(
          stacked, piece.grid, piece.group
      )
    return [
        None
        if merged is None
        else _assemble(regions[i]).reshape(self.shapes[i])
        for i, merged in enumerate(self.merged)
    ]


def _concat(arrays):
  return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays)


def _to_blocks(region: jax.Array, grid: Shape, block: Shape) -> jax.Array:
  """``[n_1*b_1, ..., n_k*b_k] -> [n_1*...*n_k, b_1, ..., b_k]``."""
  k = len(grid)
  x = region.reshape(tuple(itertools.chain(*zip(grid, block))))
  x = x.transpose(tuple(range(0, 2 * k, 2)) + tuple(range(1, 2 * k, 2)))
  return x.reshape((-1,) + block)


def _from_blocks(blocks: jax.Array, grid: Shape, block: Shape) -> jax.Array:
  """Inverse of `_to_blocks`."""
  k = len(grid)
  x = blocks.reshape(grid + block)
  x = x.transpose(tuple(itertools.chain(*zip(range(k), range(k, 2 * k)))))
  return x.reshape(tuple(n * b for n, b in zip(grid, block)))


def _assemble(regions: dict[Shape, jax.Array], axis: int = 0) -> jax.Array:
  """Concatenates regions keyed by their start back into one tensor.

  The regions form a grid (a choice of full-blocks part or remainder part on
  every axis), so grouping by the start on ``axis`` and recursing on the next
  axis rebuilds the tensor.
  """
  if len(regions) == 1:
    return next(iter(regions.values()))
  slabs = {}
  for start, region in regions.items():
    slabs.setdefault(start[axis], {})[start] = region
  return jnp.concatenate(
      [_assemble(slabs[s], axis + 1) for s in sorted(slabs)], axis=axis
  )


def merge_dims(shape: Shape, block_size: int) -> Shape:
  """Drops unit dims and merges adjacent dims while the product fits a block.

  Merging never takes the rank below 2, so a matrix stays a matrix.
  """
  dims = [d for d in shape if d != 1]
  if len(dims) < 2:
    return tuple(dims)
  merged = [dims[0]]
  for i, d in enumerate(dims[1:], start=1):
    rank_if_merged = len(merged) + len(dims) - i - 1
    if merged[-1] * d <= block_size and rank_if_merged >= 2:
      merged[-1] *= d
    else:
      merged.append(d)
  return tuple(merged)


@functools.lru_cache(maxsize=64)
def make_plan(
    shapes: tuple[Shape, ...],
    block_size: int,
    max_precondition_dim: int,
    exponent_override: int | None = None,
    pad_multiple: int = 1,
) -> Plan:
  """Builds the static plan for leaves of the given shapes.

  Args:
    shapes: the shape of every leaf, in flattened order.
    block_size: largest block side.
    max_precondition_dim: leaves with a (merged) dim above this are diagonal.
    exponent_override: root exponent ``p`` for every factor (``X^(-1/p)``);
      ``None`` uses ``p = 2k`` for a rank-``k`` merged tensor.
    pad_multiple: bucket lengths are padded to a multiple of this.

  Returns:
    The `Plan`.
  """
  merged_shapes = []
  pieces = []
  groups: dict[Shape, int] = {}
  for leaf, shape in enumerate(shapes):
    merged = merge_dims(shape, block_size)
    if (
        len(merged) < 2
        or math.prod(merged) == 0
        or max(merged) > max_precondition_dim
    ):
      merged_shapes.append(None)
      continue
    merged_shapes.append(merged)
    # Per axis: the run of full blocks and the remainder block, if any.
    parts = []
    for dim in merged:
      full, rest = divmod(dim, block_size)
      parts.append(
          ([(0, full, block_size)] if full else [])
          + ([(full * block_size, 1, rest)] if rest else [])
      )
    for combo in itertools.product(*parts):
      start, grid, group = (tuple(c[i] for c in combo) for i in range(3))
      offset = groups.get(group, 0)
      groups[group] = offset + math.prod(grid)
      pieces.append(Piece(leaf, start, grid, group, offset))

  factors = {}
  buckets: dict[tuple[int, int], int] = {}
  for group, count in groups.items():
    p = exponent_override or 2 * len(group)
    group_factors = []
    for axis, dim in enumerate(group):
      offset = buckets.get((dim, p), 0)
      buckets[(dim, p)] = offset + count
      group_factors.append(Factor(group, axis, (dim, p), offset))
    factors[group] = tuple(group_factors)
  buckets = {
      key: -(-n // pad_multiple) * pad_multiple for key, n in buckets.items()
  }
  return Plan(
      shapes=tuple(shapes),
      merged=tuple(merged_shapes),
      pieces=tuple(pieces),
      groups=groups,
      factors=factors,
      buckets=buckets,
  )
