# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests of the static plan: merging, routing, blocking, stacking."""

import numpy as np
import pytest

from shampoo_optax import _blocks


@pytest.mark.parametrize(
    "shape,block_size,expected",
    [
        ((3, 3, 64, 128), 128, (9, 64, 128)),  # conv kernel
        ((128, 4, 32), 128, (128, 128)),       # attention kernel
        ((4, 4, 4), 128, (16, 4)),             # never below rank 2
        ((5, 7), 1024, (5, 7)),                # a matrix stays a matrix
        ((1, 5), 128, (5,)),                   # unit dims dropped
        ((2, 1, 3, 1, 4, 5, 6), 128, (120, 6)),
        ((300, 200, 7), 128, (300, 200, 7)),
        ((), 128, ()),
    ],
)
def test_merge_dims(shape, block_size, expected):
  assert _blocks.merge_dims(shape, block_size) == expected


def test_routing():
  shapes = ((784, 512), (512,), (), (5, 1, 1), (0, 4), (10000, 8), (3, 3, 2, 4))
  plan = _blocks.make_plan(shapes, 128, 4096)
  assert [plan.is_preconditioned(i) for i in range(len(shapes))] == [
      True, False, False, False, False, False, True]


def test_blocks_groups_and_buckets():
  plan = _blocks.make_plan(((300, 200), (128, 128)), 128, 4096)
  # 300 = 2*128 + 44 and 200 = 128 + 72.
  assert plan.groups == {(128, 128): 3, (128, 72): 2, (44, 128): 1,
                         (44, 72): 1}
  assert plan.buckets == {(128, 4): 3 * 2 + 2 + 1, (72, 4): 3, (44, 4): 2}
  padded = _blocks.make_plan(((300, 200), (128, 128)), 128, 4096, None, 4)
  assert padded.buckets == {(128, 4): 12, (72, 4): 4, (44, 4): 4}
  # 6 = 4 + 2 on each of 3 axes: 8 blocks, 12 factors of each size.
  assert _blocks.make_plan(((6, 6, 6),), 4, 4096, 3).buckets == {(4, 3): 12,
                                                                 (2, 3): 12}


@pytest.mark.parametrize(
    "shapes,block_size",
    [
        (((300, 200), (7,), (3, 3, 5, 6), (2, 3, 4, 5, 6)), 16),
        (((64, 64), (64, 64), (10, 3)), 32),
        (((9, 9, 9),), 4),
    ],
)
def test_stack_unstack_round_trip(shapes, block_size):
  rng = np.random.default_rng(0)
  leaves = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  plan = _blocks.make_plan(shapes, block_size, 4096)
  blocks = plan.stack(leaves)
  for group, count in plan.groups.items():
    assert blocks[group].shape == (count,) + group
    assert all(b <= block_size for b in group)
  for leaf, back in zip(leaves, plan.unstack(blocks)):
    if back is None:
      continue
    np.testing.assert_array_equal(back, leaf)


def test_block_contents_are_the_matrix_tiles():
  matrix = np.arange(10 * 7, dtype=np.float32).reshape(10, 7)
  plan = _blocks.make_plan(((10, 7),), 4, 4096)
  blocks = plan.stack([matrix])
  np.testing.assert_array_equal(blocks[(4, 4)][1], matrix[4:8, 0:4])
  np.testing.assert_array_equal(blocks[(4, 3)][1], matrix[4:8, 4:7])
  np.testing.assert_array_equal(blocks[(2, 4)][0], matrix[8:10, 0:4])
  np.testing.assert_array_equal(blocks[(2, 3)][0], matrix[8:10, 4:7])
