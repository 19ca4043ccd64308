# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Bad input and numerical faults: nothing is silently corrupted.

Policy under test (``skip_nonfinite=True``, the default): a step whose
gradients contain NaN/Inf, or whose statistics or accumulators would overflow
float32, returns a zero update and leaves the state unchanged (counted in
``diagnostics.nonfinite_steps``); a root that fails keeps the previous one
(counted in ``diagnostics.root_failures``).
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numerics import assert_close
import shampoo_optax
from shampoo_optax import _blocks

SHAPES = {"w": (6, 5), "k": (2, 3, 4), "b": (5,)}
TX = shampoo_optax.scale_by_shampoo(block_size=8, precondition_every=1)
UPDATE = jax.jit(TX.update)  # compiled once per input tree / dtype


@functools.cache
def compiled(**kwargs):
  tx = shampoo_optax.scale_by_shampoo(**kwargs)
  return tx, jax.jit(tx.update)


def grads_of(shapes, seed, scale=1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32).astype(
      dtype) for k, s in shapes.items()}


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def shapes_and_dtypes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def run(update, state, grads_list, params=None):
  outs = []
  for g in grads_list:
    u, state = update(g, state, params)
    outs.append(u)
  return outs, state


# ------------------------------------------------------------ NaN / Inf


@pytest.mark.parametrize("leaf,bad,at_step", [
    ("w", np.nan, 0), ("b", np.inf, 0), ("k", -np.inf, 2), ("w", np.inf, 3),
    ("b", np.nan, 3),
])
def test_nonfinite_gradient_is_a_noop_and_training_continues(leaf, bad, at_step):
  state = TX.init(grads_of(SHAPES, 0))
  _, state = run(UPDATE, state, [grads_of(SHAPES, s) for s in range(at_step)])
  g = grads_of(SHAPES, 50)
  g[leaf] = g[leaf].reshape(-1).at[-1].set(bad).reshape(SHAPES[leaf])
  u, bad_state = UPDATE(g, state)
  assert all(not np.any(x) for x in jax.tree.leaves(u))
  assert_trees_equal(bad_state._replace(diagnostics=None),
                     state._replace(diagnostics=None))
  assert int(bad_state.diagnostics.nonfinite_steps) == 1
  outs, state = run(UPDATE, bad_state, [grads_of(SHAPES, 60 + s)
                                        for s in range(2)])
  assert all_finite((outs, state))
  assert all(np.any(x) for x in jax.tree.leaves(outs[-1]))
  assert int(state.count) == at_step + 2


def test_alias_skipped_step_leaves_params_and_schedule_alone():
  """With weight decay and a schedule, a NaN step is still a no-op."""
  params = grads_of(SHAPES, 1)
  tx = shampoo_optax.shampoo(optax.linear_schedule(1e-2, 1e-3, 10),
                             weight_decay=0.1, block_size=8)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(grads_of(SHAPES, 2), state, params)
  g = grads_of(SHAPES, 3)
  g["w"] = g["w"].at[0, 0].set(np.nan)
  u, new_state = update(g, state, params)
  assert all(not np.any(x) for x in jax.tree.leaves(u))
  assert_trees_equal(new_state[1:], state[1:])  # e.g. the schedule's count
  assert_trees_equal(new_state[0]._replace(diagnostics=None),
                     state[0]._replace(diagnostics=None))
  assert int(new_state[0].diagnostics.nonfinite_steps) == 1


def test_skip_nonfinite_false_defers_to_the_user():
  """Without the skip, NaN flows into the update (use apply_if_finite)."""
  tx = shampoo_optax.scale_by_shampoo(block_size=8, skip_nonfinite=False)
  g = grads_of(SHAPES, 0)
  g["b"] = g["b"].at[0].set(np.nan)
  u, state = jax.jit(tx.update)(g, tx.init(g))
  assert not np.all(np.isfinite(u["b"]))
  assert int(state.diagnostics.nonfinite_steps) == 0


def test_nonfinite_check_keeps_the_program_linear_in_leaves():
  """The all-leaves flag is computed once, not copied into each leaf's code.

  Copying it made the compiled program (and compile time) quadratic in the
  number of leaves: 4x the leaves gave 7x the HLO.
  """

  def hlo_lines(layers):
    params = [{"w": jnp.zeros((8, 8)), "b": jnp.zeros((8,))}
              for _ in range(layers)]
    tx = shampoo_optax.scale_by_shampoo()
    compiled = jax.jit(tx.update).lower(params, tx.init(params)).compile()
    return len(compiled.as_text().splitlines())

  assert hlo_lines(24) < 4.5 * hlo_lines(6)


# ------------------------------------------------- singular statistics


def singular_grads(kind, step, rng):
  g = grads_of(SHAPES, 100 + step)
  if kind == "dead_units":  # rows 0-2 of w, one slice of k never get signal
    g["w"] = g["w"].at[:3].set(0.0)
    g["k"] = g["k"].at[:, 1].set(0.0)
  elif kind == "zero_then_live":  # all gradients zero for 6 steps
    if step < 6:
      g = jax.tree.map(jnp.zeros_like, g)
  elif kind == "zero_layer":  # one layer is zero throughout
    g["w"] = jnp.zeros_like(g["w"])
  elif kind == "rank_one":  # the same rank-1 direction, varying scale
    u, v = np.arange(1.0, 7.0), np.linspace(-1.0, 1.0, 5)
    g["w"] = jnp.asarray((1 + step) * np.outer(u, v), jnp.float32)
    g["k"] = jnp.asarray(rng.standard_normal() * np.ones((2, 3, 4)),
                         jnp.float32)
  return g


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
@pytest.mark.parametrize(
    "kind", ["dead_units", "zero_then_live", "zero_layer", "rank_one"])
def test_singular_zero_and_rank_one_statistics(kind, root_method):
  tx, update = compiled(block_size=8, precondition_every=1,
                        root_method=root_method)
  rng = np.random.default_rng(0)
  state = tx.init(grads_of(SHAPES, 0))
  for step in range(9):
    g = singular_grads(kind, step, rng)
    u, state = update(g, state)
    assert all_finite((u, state)), (kind, step)
    for name, x in g.items():  # zero gradient -> exactly zero update
      if not np.any(x):
        assert not np.any(u[name]), (kind, step, name)
    if kind == "dead_units":
      live = float(jnp.max(jnp.abs(u["w"][3:])))
      assert float(jnp.max(jnp.abs(u["w"][:3]))) <= 1e-3 * live
  d = state.diagnostics
  assert int(d.nonfinite_steps) == 0
  assert int(d.root_failures) == 0, (kind, root_method, d)
  if kind == "zero_then_live":  # the zero steps counted; roots came later
    assert int(state.count) == 9


# ------------------------------------------------------ gradient scales


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "scale", [1e-20, 1e-10, 1e-3, 1e3, 1e10, 1e15, 1e20])
def test_gradient_scales(scale, dtype):
  """Finite updates and state at any scale; Adam-like scale invariance."""
  tx, update = TX, UPDATE
  unit = [grads_of(SHAPES, s, dtype=dtype) for s in range(3)]
  scaled = [jax.tree.map(lambda x: (x * scale).astype(dtype), g) for g in unit]
  ref, _ = run(update, tx.init(unit[0]), unit)
  outs, state = run(update, tx.init(scaled[0]), scaled)
  assert all_finite((outs, state))
  assert shapes_and_dtypes(outs[-1]) == shapes_and_dtypes(unit[-1])
  assert all(x.dtype == jnp.float32 for x in state.stats)
  if 1e-3 <= scale <= 1e15:  # graft_eps and float32 range play no role
    for u, r in zip(outs, ref):
      for name in SHAPES:
        a = np.asarray(u[name], np.float64)
        b = np.asarray(r[name], np.float64)
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-3
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), name
  if scale >= 1e20:  # G G^T overflows float32: the step is skipped
    assert int(state.diagnostics.nonfinite_steps) == 3
  # Back to unit-scale gradients: training continues.
  more, state = run(update, state, unit)
  assert all_finite((more, state))
  assert all(np.any(np.asarray(x, np.float32)) for x in
             jax.tree.leaves(more[-1]))


# ------------------------------------------------------------- shapes


def test_unit_dims_are_dropped():
  shapes = {"a": (1,), "b": (1, 1), "c": (1, 7), "d": (7, 1),
            "e": (1, 5, 1, 3), "f": (1, 1, 1)}
  squeezed = {k: tuple(d for d in s if d != 1) for k, s in shapes.items()}
  tx = TX
  g_list = [grads_of(shapes, s) for s in range(3)]
  outs, state = run(UPDATE, tx.init(g_list[0]), g_list)
  ref, _ = run(UPDATE,
               tx.init({k: v.reshape(squeezed[k])
                        for k, v in g_list[0].items()}),
               [{k: v.reshape(squeezed[k]) for k, v in g.items()}
                for g in g_list])
  for u, r in zip(outs, ref):
    for k in shapes:
      assert u[k].shape == shapes[k]
      assert_close(u[k].reshape(squeezed[k]), r[k], rtol=1e-6)
  # Only "e" ([5, 3] after squeezing) is preconditioned.
  assert [s.shape for s in state.stats] == [(1, 1, 1, 5, 3), (1, 1, 1, 3, 2)]


def test_empty_leaves():
  empty = {"e0": (0,), "e1": (0, 5), "e2": (3, 0, 4), "e3": (0, 0)}
  g_list = [grads_of({**SHAPES, **empty}, s) for s in range(2)]
  outs, state = run(UPDATE, TX.init(g_list[0]), g_list)
  ref, _ = run(UPDATE, TX.init(grads_of(SHAPES, 0)),
               [{k: g[k] for k in SHAPES} for g in g_list])
  for u, r in zip(outs, ref):
    assert {k: v.shape for k, v in u.items()} == {**SHAPES, **empty}
    for k in SHAPES:
      np.testing.assert_array_equal(u[k], r[k])
  assert all_finite(state)
  # Only empty leaves, and no leaves at all.
  tx = shampoo_optax.shampoo(1e-2, weight_decay=0.1)
  for tree in ({"e": jnp.zeros((0, 3)), "f": jnp.zeros((2, 0))}, {}):
    u, _ = jax.jit(tx.update)(tree, tx.init(tree), tree)
    assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, tree)


@pytest.mark.parametrize("make", [shampoo_optax.shampoo, shampoo_optax.soap])
def test_stacked_leaf_with_zero_layers(make):
  """A scanned kernel of zero layers ([0, 8, 8], layer axis 0) beside a
  live leaf: an empty update, and the live leaf as without it."""
  tx = make(1e-2, layer_axes={"w": 0, "v": None}, precondition_every=1)
  alone = make(1e-2, precondition_every=1)
  g_list = [grads_of({"w": (0, 8, 8), "v": (4, 8)}, s) for s in range(3)]
  params = g_list[0]
  outs, state = run(jax.jit(tx.update), tx.init(params), g_list, params)
  ref, _ = run(jax.jit(alone.update), alone.init({"v": params["v"]}),
               [{"v": g["v"]} for g in g_list], {"v": params["v"]})
  for u, r in zip(outs, ref):
    assert u["w"].shape == (0, 8, 8)
    np.testing.assert_array_equal(u["v"], r["v"])
  assert all_finite(state)


def np_paper_update(g, block, p):
  """First update of plain Shampoo (sums, no grafting) on a blocked tensor."""
  out = np.zeros(g.shape)
  ranges = [range(0, d, block) for d in g.shape]
  for starts in itertools.product(*ranges):
    idx = tuple(slice(s, s + block) for s in starts)
    b = g[idx].astype(np.float64)
    d = b
    for axis in range(b.ndim):
      rest = [i for i in range(b.ndim) if i != axis]
      stat = np.tensordot(b, b, axes=(rest, rest))
      w, v = np.linalg.eigh(stat)
      w = np.maximum(w, 0) + 1e-6 * w.max()
      root = (v * w ** (-1.0 / p)) @ v.T
      d = np.moveaxis(np.tensordot(root, d, axes=([1], [axis])), 0, axis)
    out[idx] = d
  return out


def test_rank5_leaves():
  """A rank-5 block (no dims merged at block_size 4): five factors, p = 10."""
  shape, block = (2, 4, 2, 4, 3), 4
  tx = shampoo_optax.scale_by_shampoo(
      block_size=block, graft="none", b1=0.0, b2=1.0, precondition_every=1,
      start_preconditioning_step=0)
  g = grads_of({"x": shape}, 0)
  u, state = jax.jit(tx.update)(g, tx.init(g))
  merged, _ = _blocks.merge_dims(shape, block)
  assert merged == shape
  expected = np_paper_update(np.asarray(g["x"]).reshape(merged), block,
                             2 * len(merged)).reshape(shape)
  rel = np.linalg.norm(u["x"] - expected) / np.linalg.norm(expected)
  assert rel < 1e-3, rel
  assert all_finite(state)


def test_none_leaves_and_masked_nodes():
  live = grads_of(SHAPES, 0)
  tree = {**live, "none": None, "masked": optax.MaskedNode(),
          "nested": {"x": None, "y": optax.MaskedNode()}}
  u, state = UPDATE(tree, TX.init(tree))
  r, _ = UPDATE(live, TX.init(live))
  assert u["none"] is None and u["nested"]["x"] is None
  assert isinstance(u["masked"], optax.MaskedNode)
  assert isinstance(u["nested"]["y"], optax.MaskedNode)
  # The per-leaf state holds the live leaves only.
  assert sum(x.size for x in jax.tree.leaves(state.graft)) == sum(
      x.size for x in jax.tree.leaves(live))
  for k in SHAPES:
    np.testing.assert_array_equal(u[k], r[k])


# ------------------------------------------- invalid configuration / trees


@pytest.mark.parametrize("kwargs,message", [
    (dict(mu_dtype="not-a-dtype"), "mu_dtype"),
    (dict(b1="0.9"), "b1"),
    (dict(graft_b2=1.5), "graft_b2"),
    (dict(b2=float("nan")), "b2"),
    (dict(block_size=True), "block_size"),
    (dict(max_precondition_dim=0), "max_precondition_dim"),
    (dict(exponent_override=True), "exponent_override"),
    (dict(graft=None), "graft"),
    (dict(root_method="Eigh"), "root_method"),
    (dict(heavy_ball=None), "heavy_ball"),
    (dict(skip_nonfinite="no"), "skip_nonfinite"),
])
def test_invalid_configuration_names_the_option(kwargs, message):
  with pytest.raises((TypeError, ValueError), match=re.escape(message)):
    shampoo_optax.scale_by_shampoo(**kwargs)


def test_shard_axes_without_mesh_names_the_option():
  tx = shampoo_optax.scale_by_shampoo(shard_axes="data")
  with pytest.raises(ValueError, match="shard_axes"):
    tx.init({"w": jnp.zeros((4, 4))})


@pytest.mark.parametrize("graft,b1", [("adam", 0.9), ("sgd", 0.9),
                                      ("adam", 0.0)])
# The state holds the leaves' shapes in order, not their names: a renamed
# tree with the same shapes in the same places is the same problem.
@pytest.mark.parametrize("case", ["vector_shape", "reordered", "extra_leaf",
                                  "missing_leaf"])
def test_mismatched_update_tree_names_the_cause(graft, b1, case):
  init_tree = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
  updates = {
      "vector_shape": {"w": jnp.zeros((4, 3)), "b": jnp.zeros((5,))},
      "reordered": {"w": jnp.zeros((4, 3)), "x": jnp.zeros((3,))},
      "extra_leaf": {**init_tree, "c": jnp.zeros((2,))},
      "missing_leaf": {"w": jnp.zeros((4, 3))},
  }[case]
  tx = shampoo_optax.scale_by_shampoo(graft=graft, b1=b1)
  with pytest.raises(ValueError, match="do not match the tree given to init"):
    tx.update(updates, tx.init(init_tree))


def test_wrong_state_and_dtype_name_the_cause():
  tx = shampoo_optax.scale_by_shampoo()
  params = {"w": jnp.zeros((4, 3))}
  with pytest.raises(TypeError, match="ShampooState"):
    tx.update(params, optax.adam(1e-3).init(params))
  with pytest.raises(TypeError, match=r"\['w'\].*floating-point"):
    tx.update({"w": jnp.zeros((4, 3), jnp.int32)}, tx.init(params))


@pytest.mark.parametrize("make,option,made,used", [
    (shampoo_optax.scale_by_shampoo, "preconditioner_dtype", jnp.bfloat16,
     jnp.float32),
    (shampoo_optax.scale_by_shampoo, "mu_dtype", jnp.bfloat16, jnp.float32),
    (shampoo_optax.scale_by_soap, "basis_dtype", jnp.float32, jnp.bfloat16)])
def test_state_made_with_another_dtype_option_names_it(make, option, made,
                                                       used):
  """Same shapes, other dtypes: refused rather than silently cast."""
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}
  state = make(**{option: made}).init(params)
  with pytest.raises(ValueError, match=rf"another {option}.*bfloat16"):
    make(**{option: used}).update(params, state, params)
