# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Property-based tests (hypothesis) of `scale_by_shampoo`.

Random trees of leaves of rank 0-5 and dims 0-40, random block sizes and
option combinations: updates are finite, keep each leaf's shape and dtype,
and the state keeps its types; and blocking or stacking does not change the
result where it should not.

Each example compiles one update, so the example counts are small; set
``HYPOTHESIS_PROFILE=thorough`` for a longer, randomised run.
"""

import os

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from numerics import assert_close
import shampoo_optax
from shampoo_optax import _blocks

hypothesis.settings.register_profile(
    "ci", deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.register_profile(
    "thorough", deadline=None, max_examples=200, print_blob=True,
    suppress_health_check=list(hypothesis.HealthCheck))
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def examples(n):
  """``n`` examples in CI, the profile's count otherwise."""
  if PROFILE == "ci":
    return hypothesis.settings(hypothesis.settings.get_profile("ci"),
                               max_examples=n)
  return hypothesis.settings.get_profile(PROFILE)


@st.composite
def shapes(draw, min_rank=0, max_rank=5, max_dim=40, max_size=1500):
  rank = draw(st.integers(min_rank, max_rank))
  dims, size = [], 1
  for _ in range(rank):
    dim = draw(st.integers(0, max(1, min(max_dim, max_size // max(size, 1)))))
    dims.append(dim)
    size *= max(dim, 1)
  return tuple(dims)


OPTIONS = st.fixed_dictionaries({
    "graft": st.sampled_from(["adam", "rmsprop", "adagrad", "sgd",
                              "adam_normalized", "sgd_normalized", "none"]),
    "b1": st.sampled_from([0.0, 0.9]),
    "b2": st.sampled_from([0.9, 0.999, 1.0]),
    "nesterov": st.booleans(),
    "heavy_ball": st.booleans(),
    "precondition_every": st.sampled_from([1, 2]),
    "statistics_every": st.sampled_from([1, 2]),
    "start_preconditioning_step": st.sampled_from([0, 1]),
    "exponent_override": st.sampled_from([None, 2, 4, {2: 2}]),
    "root_method": st.sampled_from(["eigh", "newton"]),
    "matrix_eps_mode": st.sampled_from(["relative", "absolute",
                                        "pseudo_inverse"]),
    "max_precondition_dim": st.sampled_from([12, 4096]),
    "base_width": st.sampled_from([None, 8]),
    "refresh": st.sampled_from(["all", "staggered", "drift"]),
    "drift_tolerance": st.sampled_from([0.0, 0.1]),
}).map(lambda o: {**o, "root_method": "eigh", "refresh": "staggered"}
       if o["matrix_eps_mode"] == "pseudo_inverse" else o)
BLOCK_SIZES = st.integers(1, 40)
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16])


def assume_small_plan(leaf_shapes, block_size, max_precondition_dim=4096):
  """Keeps compile time small: few distinct block shapes per example.

  A rank-k leaf whose dims all leave a remainder is cut into 2^k pieces
  (32 for rank 5), each with its own blocks and factors; that is correct but
  takes tens of seconds to compile.
  """
  plan = _blocks.make_plan(tuple(leaf_shapes), ((),) * len(leaf_shapes),
                           block_size, max_precondition_dim)
  hypothesis.assume(sum(len(f.pieces) for f in plan.families) <= 6)


def random_tree(shapes_and_dtypes, seed):
  rng = np.random.default_rng(seed)
  return {f"leaf{i}": jnp.asarray(rng.standard_normal(s), jnp.float32)
          .astype(d) for i, (s, d) in enumerate(shapes_and_dtypes)}


def types_of(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def run(tx, grads_list):
  update = jax.jit(tx.update)
  state = tx.init(grads_list[0])
  outs = []
  for g in grads_list:
    u, state = update(g, state)
    outs.append(u)
  return outs, state


@examples(8)
@hypothesis.given(
    leaves=st.lists(st.tuples(shapes(), DTYPES), min_size=1, max_size=3),
    block_size=BLOCK_SIZES, options=OPTIONS, seed=st.integers(0, 2**16))
def test_finite_updates_shapes_dtypes_and_stable_state(
    leaves, block_size, options, seed):
  assume_small_plan([s for s, _ in leaves], block_size,
                    options["max_precondition_dim"])
  tx = shampoo_optax.scale_by_shampoo(block_size=block_size, **options)
  grads = [random_tree(leaves, seed + i) for i in range(3)]
  state = tx.init(grads[0])
  init_types = types_of(state)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state)
    assert types_of(u) == types_of(g)
    assert types_of(state) == init_types
    for x in jax.tree.leaves((u, state)):
      assert np.all(np.isfinite(np.asarray(x, np.float32)))
  assert int(state.count) == 3
  assert int(state.diagnostics.nonfinite_steps) == 0


@examples(3)
@hypothesis.given(
    rows=st.integers(2, 40), cols=st.integers(2, 40), block_size=BLOCK_SIZES,
    options=OPTIONS, seed=st.integers(0, 2**16))
def test_blocks_equal_separate_leaves(rows, cols, block_size, options, seed):
  """A blocked matrix = each of its blocks as its own, unblocked leaf.

  Without grafting (a per-leaf norm) every remaining step is per block or
  elementwise, so cutting one leaf into blocks must equal presenting the
  blocks as separate leaves with a block size that does not cut them.
  """
  # A block with a side of 1 is a matrix inside the blocked leaf but a
  # vector (diagonal route) as a leaf of its own: exclude that case.
  hypothesis.assume(block_size >= 2 and rows % block_size != 1
                    and cols % block_size != 1)
  hypothesis.assume(-(-rows // block_size) * -(-cols // block_size) <= 6)
  # base_width scales by the leaf's width, which splitting changes.
  options = {**options, "graft": "none", "max_precondition_dim": 4096,
             "base_width": None}
  grads = [random_tree([((rows, cols), jnp.float32)], seed + i)["leaf0"]
           for i in range(2)]
  starts = lambda n: range(0, n, block_size)
  split = lambda g: {f"{i:02d}_{j:02d}": g[i:i + block_size, j:j + block_size]
                     for i in starts(rows) for j in starts(cols)}
  whole, _ = run(shampoo_optax.scale_by_shampoo(
      block_size=block_size, **options), [{"m": g} for g in grads])
  parts, _ = run(shampoo_optax.scale_by_shampoo(block_size=40, **options),
                 [split(g) for g in grads])
  for w, p in zip(whole, parts):
    for key, block in split(w["m"]).items():
      assert_close(block, p[key], rtol=2e-5)


@examples(5)
@hypothesis.given(
    leaf=shapes(min_rank=1), others=st.lists(shapes(), max_size=3),
    block_size=BLOCK_SIZES, options=OPTIONS, seed=st.integers(0, 2**16))
def test_leaf_alone_equals_leaf_in_tree(leaf, others, block_size, options,
                                        seed):
  """Stacking a leaf's blocks with other leaves' blocks changes nothing."""
  assume_small_plan([leaf] + others, block_size,
                    options["max_precondition_dim"])
  tree_shapes = [(s, jnp.float32) for s in [leaf] + others]
  grads = [random_tree(tree_shapes, seed + i) for i in range(3)]
  if options["refresh"] != "all":
    # Staggered phases and drift budgets are shared by all the rows of a
    # factor's bucket (other leaves' blocks too); with one phase, by none.
    options = {**options, "precondition_every": 1}
  tx = shampoo_optax.scale_by_shampoo(block_size=block_size, **options)
  in_tree, _ = run(tx, grads)
  alone, _ = run(tx, [{"leaf0": g["leaf0"]} for g in grads])
  for t, a in zip(in_tree, alone):
    assert_close(t["leaf0"], a["leaf0"], rtol=2e-5)


@examples(3)
@hypothesis.given(
    rows=st.integers(1, 12), cols=st.integers(1, 12),
    small=st.integers(12, 20), extra=st.integers(1, 20), options=OPTIONS,
    seed=st.integers(0, 2**16))
def test_block_size_above_the_matrix_does_not_matter(rows, cols, small, extra,
                                                     options, seed):
  grads = [random_tree([((rows, cols), jnp.float32)], seed + i)
           for i in range(3)]
  a, state_a = run(shampoo_optax.scale_by_shampoo(block_size=small, **options),
                   grads)
  b, state_b = run(shampoo_optax.scale_by_shampoo(
      block_size=small + extra, **options), grads)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["leaf0"], y["leaf0"])
  assert types_of(state_a) == types_of(state_b)
