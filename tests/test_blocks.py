# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests of the static plan: merging, routing, units, families, blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shampoo_optax import _blocks
from shampoo_optax import _symmetric


def plan_of(shapes, block_size=128, max_dim=4096, layer_axes=None, p=None):
  layer_axes = layer_axes or ((),) * len(shapes)
  return _blocks.make_plan(tuple(shapes), tuple(layer_axes), block_size,
                           max_dim, p)


@pytest.mark.parametrize(
    "shape,limit,expected,groups",
    [
        ((3, 3, 64, 128), 128, (9, 64, 128), ((0, 1), (2,), (3,))),  # conv
        ((128, 4, 32), 128, (128, 128), ((0,), (1, 2))),  # attention kernel
        ((4, 4, 4), 128, (16, 4), ((0, 1), (2,))),  # never below rank 2
        ((5, 7), 1024, (5, 7), ((0,), (1,))),  # a matrix stays a matrix
        ((1, 5), 128, (5,), ((1,),)),  # unit dims dropped
        ((2, 1, 3, 1, 4, 5, 6), 128, (120, 6), ((0, 2, 4, 5), (6,))),
        ((300, 200, 7), 128, (300, 200, 7), ((0,), (1,), (2,))),
        ((), 128, (), ()),
    ],
)
def test_merge_dims(shape, limit, expected, groups):
  assert _blocks.merge_dims(shape, limit) == (expected, groups)


def test_routing_and_families():
  shapes = ((784, 512), (512,), (), (5, 1, 1), (0, 4), (10000, 8),
            (3, 3, 2, 4), (784, 512), (512,))
  plan = plan_of(shapes)
  kinds = [plan.families[f].preconditioned for f in plan.family_of_leaf]
  # (10000, 8): above max_dim, but its blocks of 128 are not.
  assert kinds == [True, False, False, False, False, True, True, True, False]
  # Equal (merged) unit shapes share a family, in order of their first leaf.
  assert plan.family_of_leaf[0] == plan.family_of_leaf[7]
  assert plan.family_of_leaf[1] == plan.family_of_leaf[8]
  family = plan.families[plan.family_of_leaf[7]]
  assert family.units == 2 and [m.offset for m in family.members] == [0, 1]


def test_merging_never_exceeds_max_precondition_dim():
  # block 256 > max dim 64: merging (4, 32) into 128 would make it diagonal.
  plan = plan_of(((16, 4, 32),), block_size=256, max_dim=64)
  family = plan.families[0]
  assert family.preconditioned and family.shape == (64, 32)


def test_sides_above_max_precondition_dim_get_no_factor():
  # Blocks of 8192 > max dim 4096: a vocabulary-sized side is neither cut
  # nor factored (one-sided, p = 2); with both sides above, diagonal.
  plan = plan_of(((50000, 768), (768, 3072), (5000, 6000)), block_size=8192)
  one_sided, two_sided, diagonal = (plan.families[f]
                                    for f in plan.family_of_leaf)
  assert [p.block for p in one_sided.pieces] == [(50000, 768)]
  assert [(f.axis, f.dim, f.exponent) for _, f in plan.factors_of(0)] == [
      (1, 768, 2)]
  assert [(f.axis, f.exponent) for _, f in plan.factors_of(1)] == [
      (0, 4), (1, 4)]
  assert not diagonal.preconditioned
  # The default blocks of 128 factor every side of every one of them.
  plan = plan_of(((50000, 768), (5000, 6000)))
  assert all(f.preconditioned for f in plan.families)
  assert {f.exponent for f in plan.factors} == {4}


def test_exponent_of():
  assert _blocks.exponent_of(None, 2) == 4
  assert _blocks.exponent_of(3, 2) == 3
  assert _blocks.exponent_of(((2, 2),), 2) == 2
  assert _blocks.exponent_of(((2, 2),), 3) == 6


def test_pieces_and_factors():
  plan = plan_of(((300, 200), (128, 128)))
  # 300 = 2*128 + 44 and 200 = 128 + 72.
  big = plan.families[0]
  assert [(p.grid, p.block) for p in big.pieces] == [
      ((2, 1), (128, 128)), ((2, 1), (128, 72)), ((1, 1), (44, 128)),
      ((1, 1), (44, 72))]
  shapes = [(f.dim, f.batch_shape, f.shape) for f in plan.factors_of(0)
            for f in [f[1]]]
  assert shapes[:2] == [(128, (1, 2, 1), (1, 2, 1, 129, 64)),
                        (128, (1, 2, 1), (1, 2, 1, 129, 64))]
  assert all(f.exponent == 4 for f in plan.factors)
  assert _blocks.make_plan(((6, 6, 6),), ((),), 4, 4096, 3).factors[0].exponent == 3


def test_layer_axes_make_units():
  plan = plan_of(((8, 64, 32), (64, 8, 32), (2, 3, 64, 32)),
                 layer_axes=((0,), (1,), (0, 1)))
  assert len(plan.families) == 1
  family = plan.families[0]
  assert family.shape == (64, 32) and family.units == 8 + 8 + 6
  assert [m.merged_from for m in family.members] == [((1,), (2,)),
                                                      ((0,), (2,)),
                                                      ((2,), (3,))]


@pytest.mark.parametrize(
    "shapes,layer_axes,block_size",
    [
        (((300, 200), (7,), (3, 3, 5, 6), (2, 3, 4, 5, 6)), None, 16),
        (((64, 64), (64, 64), (10, 3)), None, 32),
        (((9, 9, 9),), None, 4),
        (((5, 12, 10), (12, 4, 10)), ((0,), (1,)), 4),
    ],
)
def test_stack_blocks_round_trip(shapes, layer_axes, block_size):
  rng = np.random.default_rng(0)
  leaves = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  plan = plan_of(shapes, block_size, layer_axes=layer_axes)
  stacked = [plan.stack(leaves, f) for f in range(len(plan.families))]
  for f, family in enumerate(plan.families):
    assert stacked[f].shape == (family.units,) + family.shape
    if family.preconditioned:
      blocks = [_blocks.blocks_of(stacked[f], p) for p in family.pieces]
      for b, p in zip(blocks, family.pieces):
        assert b.shape == (family.units,) + p.grid + p.block
        assert all(d <= block_size for d in p.block)
      np.testing.assert_array_equal(_blocks.assemble(blocks, family.pieces),
                                    stacked[f])
  for leaf, back in zip(leaves, plan.unstack_tree(stacked)):
    np.testing.assert_array_equal(back, leaf)
  # At offsets hidden from XLA (traced), the same leaves come back.
  hidden = jax.jit(lambda s, anchor: plan.unstack_tree(
      s, plan.member_starts(anchor, range(len(plan.families)))))
  for leaf, back in zip(leaves, hidden(stacked, jnp.int32(7))):
    np.testing.assert_array_equal(back, leaf)


def test_block_contents_are_the_matrix_tiles():
  matrix = np.arange(10 * 7, dtype=np.float32).reshape(10, 7)
  plan = plan_of(((10, 7),), 4)
  stacked = plan.stack([matrix], 0)
  pieces = {p.block: _blocks.blocks_of(stacked, p)
            for p in plan.families[0].pieces}
  np.testing.assert_array_equal(pieces[(4, 4)][0, 1, 0], matrix[4:8, 0:4])
  np.testing.assert_array_equal(pieces[(4, 3)][0, 1, 0], matrix[4:8, 4:7])
  np.testing.assert_array_equal(pieces[(2, 4)][0, 0, 0], matrix[8:10, 0:4])
  np.testing.assert_array_equal(pieces[(2, 3)][0, 0, 0], matrix[8:10, 4:7])


@pytest.mark.parametrize(
    "shape,layer_axes,shards,block_size,cuts",
    [
        ((768, 256), (), (8, 1), 128, (8, 1)),  # 96-row shards: 8 x 96 rows
        ((400, 64), (), (2, 1), 128, (2, 1)),  # 200-row shards: 128 + 72
        ((3, 48, 40), (0,), (1, 1, 4), 16, (1, 4)),  # stacked: a unit axis
        ((1024, 64), (), (8, 1), 128, (1, 1)),  # shards of whole blocks
        ((12, 4, 32), (), (1, 2, 1), 64, (1, 1)),  # 48 x 32, minor axis split
        ((6, 4, 32), (), (3, 1, 1), 64, (3, 1)),  # 24 x 32, major axis split
    ],
)
def test_blocks_cut_at_shards_are_the_shards_tiles(shape, layer_axes, shards,
                                                   block_size, cuts):
  """Each span (a shard) is blocked on its own; where shards hold whole
  blocks, or a merged axis is split on a minor leaf axis, nothing is cut."""
  plan = _blocks.make_plan((shape,), (layer_axes,), block_size, 4096, None,
                           (shards,))
  family = plan.families[0]
  assert {p.cuts for p in family.pieces} == {cuts}
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  stacked = plan.stack([x], 0)
  tiles = {}
  for piece in family.pieces:
    blocks = np.asarray(_blocks.blocks_of(stacked, piece))
    assert blocks.shape == (family.units,) + piece.grid + piece.block
    for index in np.ndindex(*piece.grid):
      # Block ``index`` of the piece: within span ``i // (grid / cuts)``.
      start = [i // (g // c) * (d // c) + s + i % (g // c) * b
               for i, g, c, d, s, b in zip(index, piece.grid, piece.cuts,
                                           family.shape, piece.start,
                                           piece.block)]
      tiles[tuple(start)] = piece.block
      region = tuple(slice(a, a + b) for a, b in zip(start, piece.block))
      np.testing.assert_array_equal(blocks[(slice(None),) + index],
                                    np.asarray(stacked)[(slice(None),)
                                                        + region])
  # The blocks tile the unit, none straddles a span boundary.
  assert sum(np.prod(b) for b in tiles.values()) == np.prod(family.shape)
  for start, block in tiles.items():
    for a, (s, b, c) in enumerate(zip(start, block, cuts)):
      span = family.shape[a] // c
      assert s // span == (s + b - 1) // span
  np.testing.assert_array_equal(
      _blocks.assemble([_blocks.blocks_of(stacked, p) for p in family.pieces],
                       family.pieces), stacked)
  uncut = _blocks.make_plan((shape,), (layer_axes,), block_size, 4096)
  assert (plan == uncut) == (cuts == (1,) * len(cuts))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 17, 44, 128])
def test_packed_triangles(n):
  rng = np.random.default_rng(n)
  x = rng.standard_normal((2, 3, n, n + 3)).astype(np.float32)
  a = x @ np.swapaxes(x, -1, -2)
  lower = np.tril(np.ones((n, n), bool))
  symmetric = np.where(lower, a, np.swapaxes(a, -1, -2))
  packed = np.asarray(_symmetric.pack(a))
  assert packed.shape == (2, 3) + _symmetric.packed_shape(n)
  assert packed.size // 6 == n * (n + 1) // 2
  # Every free entry is stored exactly once.
  assert sorted(packed[0, 0].ravel().tolist()) == sorted(
      symmetric[0, 0][lower].tolist())
  np.testing.assert_array_equal(_symmetric.unpack(packed, n), symmetric)
  gram = np.asarray(_symmetric.packed_gram(x))
  np.testing.assert_allclose(gram, packed, rtol=0,
                             atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("devices,spec,layout", [
    # [24, 16] in blocks of 8: batch (1, 3, 2). 1 divides the units axis, 2
    # the last grid axis; 4 and 8 divide none, so the 6 blocks become rows
    # padded to 8.
    (1, ("data", None, None), (1, 3, 2)), (2, (None, None, "data"), (1, 3, 2)),
    (4, ("data",), (8,)), (8, ("data",), (8,)),
])
def test_factors_that_no_axis_divides_are_padded_rows(devices, spec, layout):
  from shampoo_optax import _sharding  # pylint: disable=g-import-not-at-top

  plan = plan_of([(24, 16)], block_size=8)
  mesh = jax.sharding.AbstractMesh((devices,), ("data",))
  with jax.sharding.use_abstract_mesh(mesh):
    specs = _sharding.factor_batch_specs(plan, [(None, None)], "data")
    layouts = [_sharding.layout_batch_shape(f, s)
               for f, s in zip(plan.factors, specs)]
    with _sharding.tracing("unpadded"):
      unpadded = _sharding.factor_batch_specs(plan, [(None, None)], "data")
  assert specs == [spec] * 2 and layouts == [layout] * 2
  assert all(len(s) == 3 for s in unpadded)  # Never rows.

  # The layout round trip, and which rows are padding.
  factor = plan.factors[0]
  x = jnp.arange(6 * 5, dtype=jnp.float32).reshape((1, 3, 2, 5))
  laid = _sharding.to_layout(x, factor.batch_shape, layout)
  assert laid.shape == layout + (5,)
  if layout != factor.batch_shape:
    np.testing.assert_array_equal(laid[:6], x.reshape(6, 5))
    np.testing.assert_array_equal(laid[6:], 0)
  np.testing.assert_array_equal(
      _sharding.from_layout(laid, factor.batch_shape, layout), x)
  valid = _sharding.valid_rows(factor, layout)
  assert valid.shape == layout and int(valid.sum()) == 6
