# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The shared stages of `_stages`, each on its own, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numerics import assert_close
from numerics import mode_product
from numerics import unfold_gram
import shampoo_optax
from shampoo_optax import _stages
from shampoo_optax import _symmetric

TREE = {"a": np.zeros((10, 7)), "b": np.zeros(7), "c": np.zeros((3, 10, 7)),
        "d": np.zeros((5, 4, 6))}


def layout_of(tree, block_size=4, layer_axes=None):
  plan, paths, leaves, treedef = _stages.plan_of(
      tree, transform="test", layer_axes=layer_axes, block_size=block_size,
      max_precondition_dim=4096)
  specs = [(None,) * len(f.batch_shape) for f in plan.factors]
  return _stages.Layout(plan, specs, None, treedef), leaves, paths, treedef


def random_leaves(leaves, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
          for x in leaves]


def test_plan_of_stacks_the_layers_of_a_leaf_with_its_twins():
  layout, _, paths, _ = layout_of(TREE, layer_axes={
      "a": None, "b": None, "c": 0, "d": None})
  plan = layout.plan
  assert [jax.tree_util.keystr(p) for p in paths] == [
      "['a']", "['b']", "['c']", "['d']"]
  # "a" and each of the 3 layers of "c" are 10 x 7 units: one family of 4.
  assert plan.family_of_leaf[0] == plan.family_of_leaf[2]
  assert plan.families[plan.family_of_leaf[0]].units == 4


def test_plan_of_names_a_leaf_that_is_not_floating():
  with pytest.raises(TypeError, match=r"test: update \['n'\] has dtype int32"):
    _stages.plan_of({"n": jnp.zeros(3, jnp.int32)}, transform="test",
                    layer_axes=None, block_size=4, max_precondition_dim=8)


def test_gradient_blocks_are_the_numpy_tiles_and_families_of_inverts_them():
  layout, leaves, _, _ = layout_of(TREE)
  grads = _stages.gradients(layout, random_leaves(leaves), None, True)
  plan = layout.plan
  for (f, p), blocks in grads.blocks.items():
    piece = plan.families[f].pieces[p]
    stacked = np.asarray(grads.stacked[f])
    for n in range(stacked.shape[0]):
      for cell in np.ndindex(*piece.grid):
        tile = stacked[(n,) + tuple(
            slice(s + c * b, s + (c + 1) * b)
            for s, c, b in zip(piece.start, cell, piece.block))]
        np.testing.assert_array_equal(np.asarray(blocks)[(n,) + cell], tile)
  back = _stages.families_of(layout, grads.blocks)
  for f, family in back.items():
    np.testing.assert_array_equal(family, grads.stacked[f])


@pytest.mark.parametrize("b2", [1.0, 0.9])
def test_update_statistics_against_numpy(b2):
  layout, leaves, _, _ = layout_of({"w": np.zeros((10, 7))})
  stats = [jnp.ones(f.shape, jnp.float32) for f in layout.plan.factors]
  grads = _stages.gradients(layout, random_leaves(leaves, 1), None, True)
  new = _stages.update_statistics(layout, grads.blocks, stats, True, b2)
  skipped = _stages.update_statistics(layout, grads.blocks, stats, False, b2)
  for factor, s, old, kept in zip(layout.plan.factors, new, stats, skipped):
    blocks = np.asarray(grads.blocks[(factor.family, factor.piece)], np.float64)
    for cell in np.ndindex(*factor.batch_shape):
      gram = unfold_gram(blocks[cell], factor.axis)
      ones = np.ones_like(gram)
      expected = ones + gram if b2 == 1.0 else b2 * ones + (1 - b2) * gram
      assert_close(_symmetric.unpack(s[cell], factor.dim), expected, 1e-6)
    np.testing.assert_array_equal(kept, old)


def test_multiplied_is_the_mode_product_on_every_axis():
  layout, leaves, _, _ = layout_of({"w": np.zeros((8, 12))})
  grads = _stages.gradients(layout, random_leaves(leaves, 2), None, True)
  rng = np.random.default_rng(3)
  matrices = [jnp.asarray(rng.standard_normal(f.batch_shape + (f.dim,) * 2),
                          jnp.float32) for f in layout.plan.factors]
  for key, block in grads.blocks.items():
    out = np.asarray(_stages.multiplied(layout, key, block,
                                        lambda i: matrices[i]))
    for cell in np.ndindex(*block.shape[:3]):
      expected = np.asarray(block[cell], np.float64)
      for index, factor in layout.plan.factors_of(*key):
        expected = mode_product(expected, np.asarray(matrices[index][cell]),
                                factor.axis)
      assert_close(out[cell], expected, 1e-6)


@pytest.mark.parametrize("count", [1, 5, 7, 12])
def test_in_batches_equals_one_call(monkeypatch, count):
  # At most 5 rows at once: 7 rows run as one batch of 5 and a rest of 2.
  monkeypatch.setattr(_stages, "BATCH_BYTES", 5 * 16)
  x = jnp.arange(count * 4.0).reshape(count, 2, 2)
  calls = []

  def fn(a, b):
    calls.append(a.shape[0])
    return {"sum": a + b, "norm": jnp.sum(a * a, axis=(1, 2))}

  out = _stages.in_batches(fn, x, 2 * x, row_bytes=16)
  np.testing.assert_array_equal(out["sum"], 3 * x)
  np.testing.assert_array_equal(out["norm"], jnp.sum(x * x, axis=(1, 2)))
  assert max(calls) <= 5


def test_all_finite_catches_nan_inf_and_overflowing_squares():
  ok = [jnp.ones(3), jnp.full((2, 2), 1e18)]
  assert bool(_stages.all_finite(ok))
  for bad in (jnp.nan, jnp.inf, 2e19):
    assert not bool(_stages.all_finite(ok + [jnp.array([bad])]))


def test_kept_where_and_count_true():
  new, old = [jnp.ones(2)], [jnp.zeros(2, jnp.bfloat16)]
  kept = _stages.kept_where(jnp.array(False), new, old)
  assert kept[0].dtype == jnp.bfloat16 and not kept[0].any()
  assert _stages.kept_where(jnp.array(True), new, old)[0].all()
  assert int(_stages.count_true([jnp.array([True, False]),
                                 jnp.ones((2, 2), bool)])) == 5


def test_to_leaves_restores_shapes_dtypes_and_zeroes_a_skipped_step():
  tree = {"a": np.zeros((10, 7), np.float32), "b": np.zeros((3, 10, 7),
                                                              jnp.bfloat16)}
  layout, leaves, _, _ = layout_of(tree, layer_axes={"a": None, "b": 0})
  leaves = [x.astype(t.dtype) for x, t in zip(random_leaves(leaves),
                                              jax.tree.leaves(tree))]
  state = _stages.leaf_zeros(leaves, jnp.float32)
  for finite in (True, False):
    grads = _stages.gradients(layout, leaves, None, True)._replace(
        finite=jnp.array(finite))
    twice = [2 * x for x in grads.stacked]
    out, (new_state, none) = _stages.to_leaves(
        layout, grads, jnp.zeros([], jnp.int32), grads.stacked, leaves,
        (twice, state), (twice, None))
    assert none is None
    for x, y, s in zip(out, leaves, new_state):
      assert x.shape == y.shape and x.dtype == y.dtype
      np.testing.assert_array_equal(x, y if finite else jnp.zeros_like(y))
      assert s.dtype == jnp.float32
      np.testing.assert_array_equal(s, 2 * y.astype(jnp.float32))
    # And back: the per-leaf state stacks as the gradients do.
    for a, b in zip(_stages.stacked_state(layout, new_state), twice):
      np.testing.assert_array_equal(a, b)


def test_per_factor_fields_of_a_tree_without_leaves_are_a_leaf():
  """So that `optax.tree.map_params` (whose init sees an empty placeholder)
  finds a prefix of the real state."""
  layout, _, _, _ = layout_of({})
  assert _stages.per_factor(layout.plan, ()).shape == (0,)
  layout, _, _, _ = layout_of(TREE)
  assert _stages.per_factor(layout.plan, [1, 2]) == (1, 2)


def test_check_per_leaf_and_layout_name_the_mismatch():
  layout, leaves, paths, _ = layout_of({"w": np.zeros((10, 7), np.float32)})
  other, _, _, _ = layout_of({"w": np.zeros((12, 7), np.float32)})
  with pytest.raises(ValueError, match=r"updates do not match.*\['w'\]"):
    _stages.check_per_leaf("t", layout, paths, leaves,
                           [{"w": jnp.zeros((12, 7))}])
  with pytest.raises(ValueError, match="updates do not match"):
    _stages.check_per_leaf("t", layout, paths, leaves, [{"v": jnp.zeros(1)}])
  stats = [jnp.zeros(f.shape) for f in other.plan.factors]
  with pytest.raises(ValueError, match="statistics have shapes"):
    _stages.check_layout("t", layout, stats)


def test_per_leaf_options_take_prefixes_and_callables_over_lists():
  """A prefix entry covers its subtree, also where the params hold lists
  (which are pytree nodes, not entries)."""
  tree = {"blocks": [jnp.zeros((2, 4, 4)), jnp.zeros((2, 4, 4))],
          "head": jnp.zeros((4, 8))}
  paths, leaves, _ = _stages.as_leaves(tree, "update", "test")
  assert _stages.resolve_layer_axes(
      {"blocks": 0, "head": None}, tree, paths, leaves) == ((0,), (0,), ())
  assert _stages.resolve_layer_axes(
      lambda t: {"blocks": [0, (0,)], "head": None}, tree, paths,
      leaves) == ((0,), (0,), ())
  assert _stages.resolve_precondition(
      {"blocks": True, "head": False}, tree, paths) == (True, True, False)
  assert _stages.resolve_precondition(None, tree, paths) is None
  with pytest.raises(ValueError, match=r"precondition of \['head'\]"):
    _stages.resolve_precondition({"blocks": True, "head": 0}, tree, paths)


def test_check_dtypes_names_the_option():
  field = {"a": jnp.zeros(3, jnp.bfloat16)}
  _stages.check_dtypes("t", [("mu_dtype", jnp.bfloat16, field),
                             ("mu_dtype", None, field),
                             ("basis_dtype", jnp.float32, None)])
  with pytest.raises(ValueError, match=r"t: .*another mu_dtype.*bfloat16"):
    _stages.check_dtypes("t", [("mu_dtype", jnp.float32, field)])


def test_with_weight_decay_is_adamw_shaped_and_skips_whole_steps():
  params = {"w": jnp.ones((4, 4))}
  tx = _stages.with_weight_decay(
      shampoo_optax.scale_by_shampoo(), optax.linear_schedule(1.0, 0.0, 10),
      0.5, None, skip_nonfinite=True)
  state = tx.init(params)
  zero = {"w": jnp.zeros((4, 4))}
  updates, state = tx.update(zero, state, params)
  assert_close(updates["w"], -0.5 * params["w"])  # -lr (0 + wd w)
  updates, new_state = tx.update({"w": jnp.full((4, 4), jnp.nan)}, state,
                                 params)
  assert not np.asarray(updates["w"]).any()
  assert jax.tree.leaves(new_state[1:]) == jax.tree.leaves(state[1:])
