# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The static plan: how leaves become units, families, blocks and factors.

Everything here runs in Python on shapes only, once per tree of shapes. The
result tells the update how to

* cut each leaf into *units*: the slices along its ``layer_axes`` (stacked,
  e.g. scanned, layers); a leaf without layer axes is one unit. A unit is
  preconditioned exactly as if it were a leaf of its own;
* route each unit: ``shampoo`` (Kronecker-factored preconditioning) or
  diagonal (the grafted optimizer alone: scalars, vectors, empty units and
  units no side of whose blocks is at most ``max_precondition_dim``);
* reshape a preconditioned unit: drop unit dimensions, then merge adjacent
  small dimensions while their product stays ``<= min(block_size,
  max_precondition_dim)`` (never below rank 2), e.g. a ``[3, 3, 64, 128]``
  conv kernel becomes ``[9, 64, 128]`` and a ``[128, 4, 32]`` attention
  kernel becomes ``[128, 128]``;
* stack the units of equal (merged) shape from all leaves into one
  ``[n, *shape]`` array, a *family*, so that one batched op serves every
  layer (the compiled program does not grow with the number of layers);
* cut a family into *pieces*, the regions of full blocks and of remainder
  blocks along each axis (at most ``block_size`` per side), each viewed as
  ``[n, *grid, *block]``; optionally an axis is first cut into equal
  *spans*, a parameter's shards, and each span is blocked on its own;
* keep, for every *factored* axis of every piece, one *factor*: the
  statistics of that axis of all its blocks, ``[n, *grid, *packed]``
  (symmetric matrices as packed triangles, see `_symmetric`). An axis is
  factored when its blocks' side ``min(dim, block_size)`` is at most
  ``max_precondition_dim``; the others are neither cut nor preconditioned
  (identity on that side: a one-sided preconditioner, e.g. for a
  vocabulary-sized dim when ``block_size`` is larger than it).

A factor's leading axes ``[n, *grid]`` are those of its blocks, so block
``i``'s statistics, root and gradient share an index: preconditioning is
local wherever they are split alike (see `_sharding`). The shapes depend on
the parameters and the options only, and on the parameters' shard counts
where blocks are cut at shards, never on anything else of a mesh.
"""

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from shampoo_optax import _symmetric

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Member:
  """A leaf's units in a family.

  Attributes:
    leaf: index of the leaf in the flattened tree.
    layer_axes: the leaf's axes that index its units (sorted).
    offset: index of the leaf's first unit in the family.
    units: number of units (product of the layer axes' sizes).
    merged_from: for each family axis, the leaf axes merged into it.
  """

  leaf: int
  layer_axes: Shape
  offset: int
  units: int
  merged_from: tuple[Shape, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
  """A region of a family's units, cut into equal blocks.

  Axis ``a`` is first cut into ``cuts[a]`` equal *spans* (1: the whole
  axis; more where a parameter's shards would split blocks, see
  `make_plan`); the piece covers ``[start[a], start[a] + grid[a] / cuts[a]
  * block[a])`` of every span, its blocks ordered span by span.

  Attributes:
    start: start of the region within each span, along each family axis.
    grid: number of blocks along each axis, over all spans.
    block: the block shape.
    cuts: number of spans along each axis.
  """

  start: Shape
  grid: Shape
  block: Shape
  cuts: Shape


@dataclasses.dataclass(frozen=True)
class Family:
  """Units of equal shape, stacked as ``[units, *shape]``.

  Attributes:
    shape: the (merged, for preconditioned families) unit shape.
    members: the leaves whose units it stacks, in order.
    pieces: the regions of blocks; empty for a diagonal family.
    exponent: the root exponent ``p`` of its factors (0 when diagonal).
  """

  shape: Shape
  members: tuple[Member, ...]
  pieces: tuple[Piece, ...]
  exponent: int

  @property
  def units(self) -> int:
    return sum(m.units for m in self.members)

  @property
  def preconditioned(self) -> bool:
    return bool(self.pieces)


@dataclasses.dataclass(frozen=True)
class Factor:
  """The statistics of one axis of one piece: ``[units, *grid, *packed]``.

  Attributes:
    family: index of the family.
    piece: index of the piece in the family.
    axis: the block axis the statistics are of.
    dim: the side ``d`` of the statistics (``block[axis]``).
    exponent: the root exponent ``p``.
    batch_shape: ``(units, *grid)``, one matrix per block.
  """

  family: int
  piece: int
  axis: int
  dim: int
  exponent: int
  batch_shape: Shape

  @property
  def shape(self) -> Shape:
    return self.batch_shape + _symmetric.packed_shape(self.dim)

  @property
  def count(self) -> int:
    return math.prod(self.batch_shape)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static layout of a tree of shapes (see module docstring).

  Attributes:
    shapes: original leaf shapes, in flattened order.
    families: the families, in order of their first leaf.
    factors: every factor of every preconditioned family, in order.
    family_of_leaf: the family of each leaf.
  """

  shapes: tuple[Shape, ...]
  families: tuple[Family, ...]
  factors: tuple[Factor, ...]
  family_of_leaf: tuple[int, ...]

  def factors_of(self, family: int, piece: int | None = None
                 ) -> list[tuple[int, Factor]]:
    """``(index, factor)`` of every factor of a family (or of one piece)."""
    return [(i, f) for i, f in enumerate(self.factors)
            if f.family == family and piece in (None, f.piece)]

  def member_starts(self, anchor: jax.Array, families: Sequence[int]
                    ) -> list[list[jax.Array] | None]:
    """The members' offsets in the given families, hidden from XLA.

    XLA compiles one kernel per distinct slice: cut at constant offsets, a
    family's members cost a kernel each (about 10 ms of compile time on a
    CPU, more than all of AdamW's work on a leaf). At offsets known only at
    run time, the members of one shape share a kernel. ``anchor`` is any
    int32 scalar computed at run time; a sort keyed by it hides the offsets
    from constant folding and is a no-op (each operand holds one value
    twice). Families with one member, or not listed, get ``None``.
    """
    chosen = [f for f in families if len(self.families[f].members) > 1]
    if not chosen:
      return [None] * len(self.families)
    offsets = [m.offset for f in chosen for m in self.families[f].members]
    keys = jnp.broadcast_to(anchor.astype(jnp.int32), (2,))
    # A few dozen operands per sort: a kernel's parameter space is bounded
    # (GPUs), and equal sorts share one kernel.
    hidden = iter(
        x[0] for i in range(0, len(offsets), 32)
        for x in jax.lax.sort(
            (keys,) + tuple(jnp.full((2,), o, jnp.int32)
                            for o in offsets[i:i + 32]),
            num_keys=1)[1:])
    return [[next(hidden) for _ in fam.members] if f in chosen else None
            for f, fam in enumerate(self.families)]

  def stack(self, leaves: Sequence[jax.Array], family: int) -> jax.Array:
    """The family's units from its leaves: ``[units, *shape]``."""
    fam = self.families[family]
    parts = [
        jnp.moveaxis(leaves[m.leaf], m.layer_axes,
                     range(len(m.layer_axes))).reshape((m.units,) + fam.shape)
        for m in fam.members
    ]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

  def unstack(self, stacked: jax.Array, family: int,
              starts: Sequence[jax.Array] | None = None) -> list[jax.Array]:
    """Inverse of `stack`: one array per member leaf, in the leaf's shape.

    ``starts``: the members' offsets from `member_starts`, or None to slice
    at constant offsets.
    """
    members = self.families[family].members
    out = []
    for i, m in enumerate(members):
      shape = self.shapes[m.leaf]
      layer_shape = tuple(shape[a] for a in m.layer_axes)
      unit_shape = tuple(d for a, d in enumerate(shape)
                         if a not in m.layer_axes)
      if len(members) == 1:
        x = stacked
      elif starts is None:
        x = stacked[m.offset:m.offset + m.units]
      else:
        x = jax.lax.dynamic_slice_in_dim(stacked, starts[i], m.units)
      x = x.reshape(layer_shape + unit_shape)
      out.append(jnp.moveaxis(x, range(len(m.layer_axes)), m.layer_axes))
    return out

  def unstack_tree(self, stacked: Sequence[jax.Array],
                   starts: Sequence[Sequence[jax.Array]] | None = None
                   ) -> list[jax.Array]:
    """Leaves in flattened order from one stacked array per family.

    A family given as None leaves its leaves None.
    """
    leaves = [None] * len(self.shapes)
    for f, fam in enumerate(self.families):
      if stacked[f] is None:
        continue
      for m, x in zip(fam.members, self.unstack(
          stacked[f], f, None if starts is None else starts[f])):
        leaves[m.leaf] = x
    return leaves


def _spans(shape: Shape, cuts: Shape) -> Shape:
  """``[*shape]`` viewed as ``[cuts[0], span[0], cuts[1], span[1], ...]``."""
  return tuple(itertools.chain(*((c, d // c) for d, c in zip(shape, cuts))))


def blocks_of(stacked: jax.Array, piece: Piece) -> jax.Array:
  """``[n, *shape]`` -> the piece's blocks ``[n, *grid, *block]``."""
  k = len(piece.grid)
  n = stacked.shape[0]
  per_span = [g // c for g, c in zip(piece.grid, piece.cuts)]
  x = stacked.reshape((n,) + _spans(stacked.shape[1:], piece.cuts))
  x = x[(slice(None),) + tuple(itertools.chain(*(
      (slice(None), slice(s, s + g * b))
      for s, g, b in zip(piece.start, per_span, piece.block))))]
  x = x.reshape((n,) + tuple(itertools.chain(
      *zip(piece.cuts, per_span, piece.block))))
  # [n, c0, g0, b0, c1, g1, b1, ...] -> [n, c0, g0, c1, g1, ..., b0, b1, ...]
  x = x.transpose((0,) + tuple(itertools.chain(
      *((3 * a + 1, 3 * a + 2) for a in range(k))))
                  + tuple(3 * a + 3 for a in range(k)))
  return x.reshape((n,) + piece.grid + piece.block)


def assemble(blocks: Sequence[jax.Array], pieces: Sequence[Piece]) -> jax.Array:
  """Inverse of `blocks_of` over all pieces of a family: ``[n, *shape]``."""
  regions = {}
  for x, piece in zip(blocks, pieces):
    k = len(piece.grid)
    n = x.shape[0]
    per_span = [g // c for g, c in zip(piece.grid, piece.cuts)]
    x = x.reshape((n,) + tuple(itertools.chain(*zip(piece.cuts, per_span)))
                  + piece.block)
    x = x.transpose((0,) + tuple(itertools.chain(
        *((2 * a + 1, 2 * a + 2, 2 * k + a + 1) for a in range(k)))))
    regions[piece.start] = x.reshape((n,) + tuple(itertools.chain(*(
        (c, g * b) for c, g, b in zip(piece.cuts, per_span, piece.block)))))
  x = _concatenate_grid(regions, 0)
  return x.reshape((x.shape[0],) + tuple(
      c * s for c, s in zip(x.shape[1::2], x.shape[2::2])))


def _concatenate_grid(regions: dict[Shape, jax.Array], axis: int) -> jax.Array:
  """Concatenates regions keyed by their start back into one tensor.

  The regions ``[n, c0, s0, c1, s1, ...]`` form a grid (a choice of
  full-blocks part or remainder part on every axis), so grouping by the
  start on ``axis`` and recursing on the next axis rebuilds the spans.
  """
  if len(regions) == 1:
    return next(iter(regions.values()))
  slabs = {}
  for start, region in regions.items():
    slabs.setdefault(start[axis], {})[start] = region
  return jnp.concatenate(
      [_concatenate_grid(slabs[s], axis + 1) for s in sorted(slabs)],
      axis=2 * axis + 2)


def merge_dims(shape: Shape, limit: int) -> tuple[Shape, tuple[Shape, ...]]:
  """Drops unit dims and merges adjacent dims while the product is <= limit.

  Merging never takes the rank below 2, so a matrix stays a matrix.

  Returns:
    The merged shape, and for each merged axis the axes of ``shape`` it
    holds (unit dims belong to no merged axis).
  """
  axes = [a for a, d in enumerate(shape) if d != 1]
  if len(axes) < 2:
    return tuple(shape[a] for a in axes), tuple((a,) for a in axes)
  merged, groups = [shape[axes[0]]], [[axes[0]]]
  for i, a in enumerate(axes[1:], start=1):
    rank_if_merged = len(merged) + len(axes) - i - 1
    if merged[-1] * shape[a] <= limit and rank_if_merged >= 2:
      merged[-1] *= shape[a]
      groups[-1].append(a)
    else:
      merged.append(shape[a])
      groups.append([a])
  return tuple(merged), tuple(tuple(g) for g in groups)


def _pieces(shape: Shape, sides: Shape, cuts: Shape) -> tuple[Piece, ...]:
  # Per axis: the run of full blocks and the remainder block of each span.
  parts = []
  for dim, side, c in zip(shape, sides, cuts):
    full, rest = divmod(dim // c, side)
    parts.append(([(0, c * full, side)] if full else [])
                 + ([(full * side, c, rest)] if rest else []))
  return tuple(
      Piece(*(tuple(part[i] for part in combo) for i in range(3)), cuts)
      for combo in itertools.product(*parts))


def exponent_of(override, factored_axes: int) -> int:
  """The root exponent ``p`` of a block with ``factored_axes`` factors.

  ``override``: ``None`` (``p = 2k`` for ``k`` factors), an int for every
  block, or ``((k, p), ...)`` pairs, ``2k`` for the orders not listed.
  """
  default = 2 * factored_axes
  if override is None or isinstance(override, int):
    return override or default
  return dict(override).get(factored_axes, default)


def _cuts(merged: Shape, merged_from: tuple[Shape, ...], shards: Shape,
          block_size: int) -> Shape:
  """How many spans each merged axis is cut into (see `make_plan`)."""
  cuts = []
  for dim, group in zip(merged, merged_from):
    k = shards[group[0]]
    misaligned = (dim // k) % block_size != 0
    cuts.append(k if k > 1 and dim % k == 0 and misaligned
                and all(shards[a] == 1 for a in group[1:]) else 1)
  return tuple(cuts)


@functools.lru_cache(maxsize=64)
def make_plan(
    shapes: tuple[Shape, ...],
    layer_axes: tuple[Shape, ...],
    block_size: int,
    max_precondition_dim: int,
    exponent_override: int | tuple[tuple[int, int], ...] | None = None,
    shards: tuple[Shape, ...] | None = None,
    preconditioned: tuple[bool, ...] | None = None,
) -> Plan:
  """Builds the static plan for leaves of the given shapes.

  Args:
    shapes: the shape of every leaf, in flattened order.
    layer_axes: for every leaf, its (sorted, non-negative) layer axes.
    block_size: largest block side.
    max_precondition_dim: largest factor side: an axis whose blocks'
      side ``min(dim, block_size)`` is above this gets no factor (and is not
      cut); a unit with no factored axis is diagonal.
    exponent_override: root exponent ``p`` of the factors (``X^(-1/p)``),
      see `exponent_of`; by default ``p = 2k`` for ``k`` factored axes.
    shards: for every leaf, the number of shards of each of its axes, to cut
      blocks at the shard boundaries; ``None``: cut nowhere. A merged axis
      whose major leaf axis has ``k > 1`` shards (its minor ones none) that
      blocks of ``block_size`` would straddle is cut into ``k`` spans, each
      blocked on its own: e.g. 768 rows in 8 shards, block 128, become 8
      blocks of 96 (not 6 of 128).
    preconditioned: for every leaf, whether it may get matrices (``False``:
      diagonal whatever its shape); ``None``: every leaf may.

  Returns:
    The `Plan`.
  """
  merge_limit = min(block_size, max_precondition_dim)
  keys, members, family_of_leaf = [], {}, []
  for leaf, (shape, axes) in enumerate(zip(shapes, layer_axes)):
    unit_axes = tuple(a for a in range(len(shape)) if a not in axes)
    unit_shape = tuple(shape[a] for a in unit_axes)
    merged, groups = merge_dims(unit_shape, merge_limit)
    merged_from = tuple(tuple(unit_axes[a] for a in g) for g in groups)
    factored = tuple(min(d, block_size) <= max_precondition_dim
                     for d in merged)
    diagonal = (len(merged) < 2 or math.prod(merged) == 0
                or not any(factored)
                or (preconditioned is not None and not preconditioned[leaf]))
    if diagonal:
      key = ("diagonal", unit_shape, None, None)
    else:
      key = ("shampoo", merged, _cuts(
          merged, merged_from,
          shards[leaf] if shards else (1,) * len(shape), block_size), factored)
    if key not in members:
      keys.append(key)
      members[key] = []
    offset = sum(m.units for m in members[key])
    members[key].append(Member(leaf, tuple(axes), offset,
                               math.prod(shape[a] for a in axes), merged_from))
    family_of_leaf.append(keys.index(key))

  families, factors = [], []
  for index, key in enumerate(keys):
    kind, shape, cuts, factored = key
    if kind == "diagonal":
      families.append(Family(shape, tuple(members[key]), (), 0))
      continue
    p = exponent_of(exponent_override, sum(factored))
    # An axis without a factor is one block per span.
    sides = tuple(block_size if f else d // c
                  for d, c, f in zip(shape, cuts, factored))
    family = Family(shape, tuple(members[key]),
                    _pieces(shape, sides, cuts), p)
    families.append(family)
    for piece_index, piece in enumerate(family.pieces):
      for axis, dim in enumerate(piece.block):
        if not factored[axis]:
          continue
        factors.append(Factor(index, piece_index, axis, dim, p,
                              (family.units,) + piece.grid))
  return Plan(tuple(shapes), tuple(families), tuple(factors),
              tuple(family_of_leaf))
