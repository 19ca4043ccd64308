# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The staggered refresh's schedule (`_refresh`), on its own."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shampoo_optax import _refresh


def covered(buckets, num_phases):
  """Per bucket, how many times each of its rows is in some phase's chunk."""
  out = []
  for bucket in buckets:
    count = np.zeros(sum(bucket.rows), int)
    for slot, k in itertools.product(bucket.slots, range(num_phases)):
      if slot.starts[k] >= 0:
        count[slot.starts[k]:slot.starts[k] + slot.size] += 1
    out.append(count)
  return out


@pytest.mark.parametrize("keys,rows,num_phases", [
    ([(128, 4)] * 3 + [(16, 4), (10, 4)], [44, 44, 8, 4, 4], 20),  # MLP-like
    ([(8, 4)] * 8, [1] * 8, 20),           # one row each: fewer than phases
    ([(128, 4), (64, 4), (32, 2)], [97, 13, 200], 7),  # primes, remainders
    ([(128, 4), (16, 4)], [40, 5], 1),     # "all": one phase
    ([(128, 4), (8, 4)], [0, 6], 4),       # a factor without rows
])
def test_every_row_once_and_phases_balanced(keys, rows, num_phases):
  buckets = _refresh.schedule(keys, rows, num_phases)
  assert sorted(i for b in buckets for i in b.members) == [
      i for i, r in enumerate(rows) if r]
  for count in covered(buckets, num_phases):
    np.testing.assert_array_equal(count, 1)
  costs = _refresh.phase_costs(buckets, num_phases)
  assert sum(costs) == sum(r * k[0]**3 for k, r in zip(keys, rows))
  # LPT's bound: the busiest phase exceeds the mean by at most the largest
  # chunk.
  largest = max(s.size * b.key[0]**3 for b in buckets for s in b.slots)
  assert max(costs) <= np.mean(costs) + largest
  for bucket in buckets:  # At most a chunk per slot and phase.
    for slot in bucket.slots:
      assert len(slot.starts) == num_phases


def test_large_buckets_spread_evenly():
  """Many rows: every phase within 5% of the mean."""
  buckets = _refresh.schedule([(128, 4)] * 4 + [(64, 4)] * 2,
                              [300, 300, 288, 12, 500, 40], 20)
  costs = _refresh.phase_costs(buckets, 20)
  assert max(costs) <= 1.05 * np.mean(costs)


@pytest.mark.parametrize("rows,num_phases", [([3, 5, 1], 4), ([9, 9], 3),
                                             ([7], 1)])
def test_gather_and_scatter_at_a_traced_phase(rows, num_phases):
  """Chunks straddle members; moved in and out at phases known at run time
  they are the NumPy rows of the concatenated members."""
  (bucket,) = _refresh.schedule([(4, 2)] * len(rows), rows, num_phases)
  arrays = [jnp.arange(n * 2.0).reshape(n, 2) + 100 * i
            for i, n in enumerate(rows)]
  whole = np.concatenate([np.asarray(x) for x in arrays])

  @jax.jit
  def roundtrip(arrays, phase):
    out = list(arrays)
    gathered = []
    for slot in bucket.slots:
      rows_, active = _refresh.gather(bucket, slot, out, phase)
      gathered.append((rows_, active))
      out = _refresh.scatter(bucket, slot, out, -rows_, phase)
    return gathered, out

  seen = np.zeros(len(whole), int)
  for k in range(num_phases):
    gathered, out = roundtrip(arrays, jnp.asarray(k))
    result = np.concatenate([np.asarray(x) for x in out])
    for slot, (got, active) in zip(bucket.slots, gathered):
      start = slot.starts[k]
      assert bool(active) == (start >= 0)
      if start >= 0:
        np.testing.assert_array_equal(got, whole[start:start + slot.size])
        seen[start:start + slot.size] += 1
    changed = np.any(result != whole, axis=1)
    np.testing.assert_array_equal(result[changed], -whole[changed])
    assert changed.sum() == sum(s.size for s in bucket.slots
                                if s.starts[k] >= 0)
  np.testing.assert_array_equal(seen, 1)
