# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests of `scale_by_shampoo` and `shampoo` against a NumPy Shampoo."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numerics import assert_close
from numerics import np_inv_root
from numerics import NumpyShampoo
from numerics import run_updates as run
import shampoo_optax
from shampoo_optax import _blocks
from shampoo_optax import _stages
from shampoo_optax import _symmetric

# The plain Shampoo of the paper: sums, no momentum, no grafting, roots of the
# current statistics at every step.
PAPER = dict(
    graft="none",
    b1=0.0,
    b2=1.0,
    precondition_every=1,
    start_preconditioning_step=0,
)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def random_grads(shape, steps, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
          for _ in range(steps)]


def test_paper_formula_matrix():
  """One update is L_t^(-1/4) G_t R_t^(-1/4), L_t including G_t."""
  grads = random_grads((6, 9), steps=4)
  ours, _ = run(shampoo_optax.scale_by_shampoo(block_size=16, **PAPER), grads)
  ref = NumpyShampoo((16, 16))
  for g, u in zip(grads, ours):
    expected = ref.update(np.asarray(g))
    assert rel_err(u, expected) < 2e-5
  # A wrong exponent (-1/2 per side) is far outside that tolerance.
  g = np.asarray(grads[-1], np.float64)
  wrong = np_inv_root(ref.stats[((0, 6), (0, 9))][0], 2, 1e-6) @ g
  wrong = wrong @ np_inv_root(ref.stats[((0, 6), (0, 9))][1], 2, 1e-6)
  assert rel_err(ours[-1], wrong) > 0.1


@pytest.mark.parametrize(
    "shape,block_size",
    [
        ((10, 7), 4),        # blocks with remainders on both axes
        ((12, 8), 4),        # exact blocks
        ((3, 4, 5), 8),      # rank 3, no merge (12 > 8): p = 6
        ((3, 4, 5), 20),     # merged to (12, 5): p = 4
        ((2, 1, 3, 5), 64),  # unit dim dropped, merged to (6, 5)
    ],
)
@pytest.mark.parametrize("b2", [1.0, 0.9])
def test_blocked_and_merged_against_numpy(shape, block_size, b2):
  grads = random_grads(shape, steps=3, seed=1)
  tx = shampoo_optax.scale_by_shampoo(
      block_size=block_size, **{**PAPER, "b2": b2})
  ours, _ = run(tx, grads)
  merged, _ = _blocks.merge_dims(shape, block_size)
  ref = NumpyShampoo((block_size,) * len(merged), b2=b2)
  for g, u in zip(grads, ours):
    expected = ref.update(np.asarray(g).reshape(merged)).reshape(shape)
    assert rel_err(u, expected) < 5e-5


def test_roots_computed_in_batches_against_numpy(monkeypatch):
  # Batches of 3 matrices of 4 x 4: the 40 roots of the 5 x 4 blocks of a
  # 20 x 16 matrix (a left and a right factor each) go in 13 full batches and
  # a remainder of 1, one after the other.
  monkeypatch.setattr(_stages, "BATCH_BYTES", 3 * 4 * 4 * 4)
  grads = random_grads((20, 16), steps=3, seed=2)
  ours, state = run(shampoo_optax.scale_by_shampoo(block_size=4, **PAPER),
                    grads)
  assert [s.shape[:-2] for s in state.stats] == [(1, 5, 4)] * 2
  ref = NumpyShampoo((4, 4))
  for g, u in zip(grads, ours):
    assert rel_err(u, ref.update(np.asarray(g))) < 5e-5


def test_exponent_override():
  grads = random_grads((5, 6), steps=2, seed=2)
  ours, _ = run(shampoo_optax.scale_by_shampoo(
      block_size=8, exponent_override=2, **PAPER), grads)
  ref = NumpyShampoo((8, 8), p=2)
  for g, u in zip(grads, ours):
    # R is singular at the first step; p = 2 amplifies float32 round-off in
    # its null space by eps^(-1/2) = 1e3, hence the looser tolerance.
    assert rel_err(u, ref.update(np.asarray(g))) < 1e-3


@pytest.mark.parametrize("shape,block_size,factored", [
    ((40, 6), 64, (False, True)),           # a matrix: one side, p = 2
    ((3, 40, 5), 64, (True, False, True)),  # rank 3, middle unfactored: p = 4
    ((40, 100), 30, (False, False)),        # every side above 16: diagonal
])
def test_dims_above_max_precondition_dim_get_no_factor(shape, block_size,
                                                       factored):
  # max_precondition_dim=16 applies to the blocks' sides min(dim, block):
  # with block_size 30 > 16 every side of (40, 100) is above it (diagonal),
  # while with block 64 only the sides of 40 are.
  grads = random_grads(shape, steps=3, seed=4)
  tx = shampoo_optax.scale_by_shampoo(block_size=block_size,
                                      max_precondition_dim=16, **PAPER)
  ours, state = run(tx, grads)
  if block_size == 30:
    assert not state.stats  # no side is factored: the plain gradient
    for g, u in zip(grads, ours):
      assert_close(u, g, rtol=1e-6)
    return
  assert len(state.stats) == sum(factored)
  ref = NumpyShampoo((block_size,) * len(shape), factored=factored)
  for g, u in zip(grads, ours):
    assert rel_err(u, ref.update(np.asarray(g))) < 5e-5
  # The two-sided p = 2k of the old rule would be far off.
  two_sided = NumpyShampoo((block_size,) * len(shape), factored=factored,
                           p=2 * len(shape))
  for g in grads:
    wrong = two_sided.update(np.asarray(g))
  assert rel_err(ours[-1], wrong) > 0.1


def test_large_dims_are_blocked_when_blocks_fit():
  # A 300-long dim above max_precondition_dim=64 is cut into blocks of 32:
  # both sides factored (the rule used to leave the whole leaf diagonal).
  grads = random_grads((300, 8), steps=2, seed=5)
  ours, state = run(shampoo_optax.scale_by_shampoo(
      block_size=32, max_precondition_dim=64, **PAPER), grads)
  assert len(state.stats) == 4  # two pieces (full and remainder), two sides
  ref = NumpyShampoo((32, 32))
  for g, u in zip(grads, ours):
    assert rel_err(u, ref.update(np.asarray(g))) < 5e-5


def test_exponent_by_number_of_factored_axes():
  # {2: 2}: -1/2 per side of matrices; a rank-3 tensor keeps p = 6.
  rng = np.random.default_rng(6)
  shapes = {"m": (6, 9), "t": (3, 4, 5)}
  grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()} for _ in range(3)]
  ours, state = run(shampoo_optax.scale_by_shampoo(
      block_size=8, exponent_override={2: 2}, **{**PAPER, "b2": 0.9}), grads)
  refs = {"m": NumpyShampoo((8, 8), b2=0.9, p={2: 2}),
          "t": NumpyShampoo((8, 8, 8), b2=0.9, p={2: 2})}
  for g, u in zip(grads, ours):
    for k, ref in refs.items():
      # p = 2 amplifies round-off in the singular first statistics (see
      # test_exponent_override).
      assert rel_err(u[k], ref.update(np.asarray(g[k]))) < 1e-3, k
  assert rel_err(ours[-1]["m"], NumpyShampoo((8, 8), b2=0.9).update(
      np.asarray(grads[-1]["m"]))) > 0.1


@pytest.mark.parametrize("mode,eps", [("absolute", 1e-3),
                                      ("pseudo_inverse", 1e-4),
                                      ("relative", 1e-3)])
def test_matrix_eps_modes_against_numpy(mode, eps):
  # The first gradient has rank 2, so the roots computed from it (kept for
  # the next step, precondition_every=2) are regularized on a null space
  # that the second gradient then has components in.
  rng = np.random.default_rng(7)
  grads = [jnp.asarray(rng.standard_normal((6, 2)) @ rng.standard_normal(
      (2, 9)), jnp.float32)] + random_grads((6, 9), steps=3, seed=8)
  ours, state = run(shampoo_optax.scale_by_shampoo(
      block_size=16, matrix_eps=eps, matrix_eps_mode=mode,
      **{**PAPER, "precondition_every": 2}), grads)
  assert int(state.diagnostics.root_failures) == 0
  refs = {m: NumpyShampoo((16, 16), eps=eps, eps_mode=m)
          for m in ("absolute", "pseudo_inverse", "relative")}
  for t, (g, u) in enumerate(zip(grads, ours)):
    expected = {m: r.update(np.asarray(g), refresh=t % 2 == 0)
                for m, r in refs.items()}
    assert rel_err(u, expected[mode]) < 1e-3, t
    if t == 1:  # Each mode is far from the others on the stale roots.
      for m in refs:
        assert m == mode or rel_err(u, expected[m]) > 0.05, m


def test_tree_with_vectors_and_multiple_layers():
  """Every leaf is handled; vectors get the grafted direction alone."""
  rng = np.random.default_rng(3)
  shapes = {"w1": (6, 6), "b1": (6,), "w2": (6, 6)}
  # Well-conditioned (square, diagonally dominant) gradients, so that float32
  # round-off of the first, one-gradient statistics stays small.
  well_conditioned = lambda s: rng.standard_normal(s) + 4 * (
      np.eye(*s) if len(s) == 2 else 0)
  grads = [
      {k: jnp.asarray(well_conditioned(s), jnp.float32)
       for k, s in shapes.items()} | {"none": None}
      for _ in range(3)
  ]
  tx = shampoo_optax.scale_by_shampoo(block_size=16, **{**PAPER, "graft": "sgd"})
  ours, state = run(tx, grads)
  refs = {k: NumpyShampoo((16, 16)) for k in ("w1", "w2")}
  for g, u in zip(grads, ours):
    assert u["none"] is None
    assert_close(u["b1"], g["b1"], rtol=1e-6)
    for k, ref in refs.items():
      d = ref.update(np.asarray(g[k]))
      expected = d * np.linalg.norm(g[k]) / np.linalg.norm(d)
      assert rel_err(u[k], expected) < 5e-5
  # Two equal-shaped layers are one family of 2 units: 2 factors of 2 packed
  # 6 x 6 matrices (7 x 3 each).
  assert [s.shape for s in state.stats] == [(2, 1, 1, 7, 3)] * 2


def test_graft_adam_norm_and_start_step():
  """Before the start step the update is Adam's; after, it has Adam's norm."""
  grads = random_grads((7, 5), steps=6, seed=4)
  tx = shampoo_optax.scale_by_shampoo(
      block_size=8, b1=0.0, b2=0.99, graft="adam", graft_eps=1e-8,
      start_preconditioning_step=3, precondition_every=1)
  ours, _ = run(tx, grads)
  adam, _ = run(optax.scale_by_adam(b1=0.0, b2=0.99, eps=1e-8), grads)
  ref = NumpyShampoo((8, 8), b2=0.99)
  for t, (g, u, a) in enumerate(zip(grads, ours, adam)):
    d = ref.update(np.asarray(g))
    if t < 3:
      assert_close(u, a, rtol=1e-5)
    else:
      expected = d * np.linalg.norm(a) / np.linalg.norm(d)
      assert rel_err(u, expected) < 5e-5


@pytest.mark.parametrize("graft", ["adagrad", "rmsprop", "sgd_normalized",
                                   "rmsprop_normalized"])
def test_graft_directions(graft):
  """Diagonal leaves follow the grafted optimizer exactly (NumPy reference)."""
  grads = random_grads((11,), steps=4, seed=5)
  ours, _ = run(shampoo_optax.scale_by_shampoo(
      b1=0.0, b2=0.9, graft=graft, graft_eps=1e-3), grads)
  v = np.zeros(11)
  for g, u in zip(grads, ours):
    g = np.asarray(g, np.float64)
    if graft.endswith("normalized"):
      g = g / np.linalg.norm(g)
    if graft.startswith("adagrad"):
      v += g * g
    elif graft.startswith("rmsprop"):
      v = 0.9 * v + 0.1 * g * g
    expected = g if graft.startswith("sgd") else g / (np.sqrt(v) + 1e-3)
    assert_close(u, expected, rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_ema_momentum_is_bias_corrected(nesterov):
  grads = random_grads((9,), steps=5, seed=6)
  ours, _ = run(shampoo_optax.scale_by_shampoo(
      b1=0.8, graft="sgd", nesterov=nesterov), grads)
  m = np.zeros(9)
  for t, (g, u) in enumerate(zip(grads, ours), start=1):
    g = np.asarray(g, np.float64)
    m = 0.8 * m + 0.2 * g
    if nesterov:
      expected = (0.8 * m + 0.2 * g) / (1 - 0.8 ** (t + 1))
    else:
      expected = m / (1 - 0.8**t)
    assert_close(u, expected, rtol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_heavy_ball_matches_optax_trace(nesterov):
  grads = random_grads((4, 3), steps=5, seed=7)
  ours, _ = run(shampoo_optax.scale_by_shampoo(
      b1=0.7, graft="sgd", heavy_ball=True, nesterov=nesterov,
      start_preconditioning_step=100), grads)
  trace, _ = run(optax.trace(decay=0.7, nesterov=nesterov), grads)
  for u, r in zip(ours, trace):
    assert_close(u, r, rtol=1e-5)


def test_weight_decay_and_schedule_in_alias():
  """update = -lr_t * (direction + wd * w), with lr_t from the schedule."""
  rng = np.random.default_rng(8)
  params = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((4,)), jnp.float32)}
  grads = [jax.tree.map(lambda p, i=i: p * (0.5 + i), params) for i in range(4)]
  schedule = optax.linear_schedule(1e-2, 1e-3, 4)
  mask = {"w": True, "b": False}
  kwargs = dict(block_size=8, precondition_every=2)
  alias, _ = run(shampoo_optax.shampoo(
      schedule, weight_decay=0.1, mask=mask, **kwargs), grads, params)
  direction, _ = run(shampoo_optax.scale_by_shampoo(**kwargs), grads, params)
  for t, (a, d) in enumerate(zip(alias, direction)):
    lr = schedule(t)
    assert_close(a["w"], -lr * (d["w"] + 0.1 * params["w"]), rtol=1e-5)
    assert_close(a["b"], -lr * d["b"], rtol=1e-5)


def test_precondition_every_uses_roots_of_refresh_step():
  grads = random_grads((5, 4), steps=7, seed=9)
  # The first roots come from rank-1 statistics; a larger ridge keeps their
  # null-space part above float32 round-off.
  ours, state = run(shampoo_optax.scale_by_shampoo(
      block_size=8, matrix_eps=1e-3, **{**PAPER, "precondition_every": 3}),
      grads)
  stats = [np.zeros((5, 5)), np.zeros((4, 4))]
  roots = None
  for t, (g, u) in enumerate(zip(grads, ours)):
    g = np.asarray(g, np.float64)
    stats = [stats[0] + g @ g.T, stats[1] + g.T @ g]
    if t % 3 == 0:
      roots = [np_inv_root(s, 4, 1e-3) for s in stats]
    assert rel_err(u, roots[0] @ g @ roots[1]) < 5e-5
  assert int(state.diagnostics.last_refresh_step) == 6


def test_statistics_every():
  grads = random_grads((4, 4), steps=4, seed=10)
  _, state = run(shampoo_optax.scale_by_shampoo(
      block_size=8, statistics_every=2, **PAPER), grads)
  expected = sum(np.asarray(g) @ np.asarray(g).T for g in grads[::2])
  assert_close(_symmetric.unpack(state.stats[0][0, 0, 0], 4), expected,
               rtol=1e-5)


def test_failed_root_keeps_previous_root():
  grads = random_grads((4, 3), steps=3, seed=11)
  tx = shampoo_optax.scale_by_shampoo(
      block_size=8, skip_nonfinite=False, **PAPER)
  _, state = run(tx, grads)
  # Statistics overflow to inf: the new roots fail and the old ones stay.
  _, bad_state = jax.jit(tx.update)(grads[0] * 1e30, state)
  for old, new in zip(state.preconditioners, bad_state.preconditioners):
    np.testing.assert_array_equal(old, new)
  assert int(bad_state.diagnostics.root_failures) == 2


def test_rejected_first_root_is_identity():
  grads = random_grads((4, 3), steps=2, seed=12)
  ours, state = run(shampoo_optax.scale_by_shampoo(
      block_size=8, max_root_error=0.0, **PAPER), grads)
  # Every root is rejected: identity preconditioners, the raw gradient.
  for g, u in zip(grads, ours):
    assert_close(u, g, rtol=1e-6)
  assert int(state.diagnostics.root_failures) == 4
  assert float(state.diagnostics.max_root_error) > 0


def test_nonfinite_gradient_skips_step():
  grads = random_grads((5, 4), steps=3, seed=13)
  tx = shampoo_optax.scale_by_shampoo(block_size=8)
  update = jax.jit(tx.update)
  state = tx.init(grads[0])
  _, state = update(grads[0], state)
  for bad in (jnp.nan, jnp.inf):
    u, new_state = update(grads[1].at[0, 0].set(bad), state)
    np.testing.assert_array_equal(u, jnp.zeros_like(u))
    assert int(new_state.diagnostics.nonfinite_steps) == 1
    assert int(new_state.count) == int(state.count)
    chex_equal = jax.tree.map(
        lambda a, b: np.array_equal(a, b), new_state.stats, state.stats)
    assert all(jax.tree.leaves(chex_equal))
  u, state = update(grads[2], new_state)
  assert np.all(np.isfinite(u))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params(dtype):
  grads32 = random_grads((6, 5), steps=3, seed=14)
  grads = [g.astype(dtype) for g in grads32]
  ours, state = run(shampoo_optax.scale_by_shampoo(block_size=8), grads)
  ref, _ = run(shampoo_optax.scale_by_shampoo(block_size=8),
               [g.astype(jnp.float32) for g in grads])
  for u, r in zip(ours, ref):
    assert u.dtype == dtype
    assert_close(u.astype(jnp.float32), r, rtol=2e-2)
  assert all(s.dtype == jnp.float32 for s in state.stats)
  assert jax.tree.leaves(state.mu)[0].dtype == dtype


def test_state_types_stable_and_jittable():
  params = {"w": jnp.ones((5, 300)), "k": jnp.ones((3, 3, 4, 8)),
            "b": jnp.ones((8,))}
  tx = shampoo_optax.shampoo(1e-3, block_size=64)
  state = jax.jit(tx.init)(params)
  grads = jax.tree.map(lambda p: p * 0.1, params)
  _, new_state = jax.jit(tx.update)(grads, state, params)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
      lambda x: (x.shape, x.dtype), new_state)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(b1=1.5), "b1"),
        (dict(b2=-0.1), "b2"),
        (dict(matrix_eps=-1e-6), "matrix_eps"),
        (dict(graft_eps=-1.0), "graft_eps"),
        (dict(graft="lion"), "graft"),
        (dict(root_method="svd"), "root_method"),
        (dict(precondition_every=0), "precondition_every"),
        (dict(statistics_every=0), "statistics_every"),
        (dict(start_preconditioning_step=-1), "start_preconditioning_step"),
        (dict(exponent_override=0), "exponent_override"),
        (dict(exponent_override={2: 0}), "exponent_override[2]"),
        (dict(exponent_override={0: 2}), "exponent_override key"),
        (dict(matrix_eps_mode="ridge"), "matrix_eps_mode"),
        (dict(matrix_eps_mode="pseudo_inverse", root_method="newton"),
         "root_method='eigh'"),
        (dict(nesterov="yes"), "nesterov"),
        (dict(cut_at_shards="rows"), "cut_at_shards must be True or False"),
        (dict(max_root_error=-1.0), "max_root_error"),
        (dict(refresh="lazy"), "refresh must be one of"),
        (dict(drift_tolerance=-0.1), "drift_tolerance"),
        (dict(refresh="drift", matrix_eps_mode="pseudo_inverse"),
         "matrix_eps_mode 'relative' or 'absolute'"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, message):
  with pytest.raises((ValueError, TypeError), match=re.escape(message)):
    shampoo_optax.shampoo(1e-3, **kwargs)


def test_invalid_weight_decay():
  with pytest.raises(ValueError, match="weight_decay"):
    shampoo_optax.shampoo(1e-3, weight_decay=-0.1)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_non_float_params_rejected(dtype):
  tx = shampoo_optax.scale_by_shampoo()
  with pytest.raises(TypeError, match=r"\['w'\].*floating-point"):
    tx.init({"w": jnp.zeros((3, 3), dtype)})


def test_mismatched_update_tree():
  tx = shampoo_optax.scale_by_shampoo()
  state = tx.init({"w": jnp.zeros((4, 3))})
  with pytest.raises(ValueError, match="do not match the tree given to init"):
    tx.update({"w": jnp.zeros((3, 4))}, state)
  with pytest.raises(ValueError, match="do not match the tree given to init"):
    tx.update({"v": jnp.zeros((4, 3)), "w": jnp.zeros((2,))}, state)


def count_ops(hlo: str, names) -> int:
  return sum(len(re.findall(name, hlo)) for name in names)


def test_compiled_ops_do_not_grow_with_layers():
  """Equal-shaped layers share one batched root computation."""
  tx = shampoo_optax.scale_by_shampoo(block_size=32, precondition_every=1)

  def lowered_ops(layers):
    params = {f"layer{i}": jnp.ones((32, 32)) for i in range(layers)}
    state = tx.init(params)
    text = jax.jit(tx.update).lower(params, state).as_text()
    return {name: count_ops(text, [name])
            for name in ("eigh|syevd|Eigh", r"stablehlo\.while", "dot_general")}

  few, many = lowered_ops(4), lowered_ops(32)
  assert few == many
  assert few["dot_general"] > 0


# ---------------------------------------------------------------- refresh


def test_staggered_refresh_computes_every_root_once_per_window():
  """All roots at the start, then each exactly once per window of k steps,
  with the steps' shares of the work (d^3 per root) balanced."""
  k, start = 4, 2
  # Roots of sides 8 and 4 (the remainder block of "c"), from 1 to 6 rows a
  # factor: fewer rows than steps in a window for some.
  tree = {"a": (24, 16), "b": (3, 8, 8), "c": (8, 44)}
  rng = np.random.default_rng(0)
  tx = shampoo_optax.scale_by_shampoo(
      block_size=8, precondition_every=k, start_preconditioning_step=start,
      refresh="staggered", layer_axes={"a": None, "b": 0, "c": None})
  state = tx.init({n: jnp.zeros(s) for n, s in tree.items()})
  sides = [f.dim for f in _blocks.make_plan(
      tuple(tree.values()), ((), (0,), ()), 8, 4096).factors]
  update = jax.jit(tx.update)
  windows = 3
  refreshed = [np.zeros(r.size, int) for r in state.refreshed_at]
  costs = []
  for step in range(start + 1 + windows * k):
    grads = {n: jnp.asarray(rng.standard_normal(s), jnp.float32)
             for n, s in tree.items()}
    _, state = update(grads, state)
    at = [np.asarray(r).ravel() for r in state.refreshed_at]
    if step < start:
      assert all(np.all(a == -1) for a in at)
    elif step == start:  # Every root at the first refresh.
      assert all(np.all(a == start) for a in at)
    else:
      assert all(np.all(step - a < k) for a in at)
      now = [a == step for a in at]
      costs.append(sum(d**3 * n.sum() for d, n in zip(sides, now)))
      for count, n in zip(refreshed, now):
        count += n
      if (step - start) % k == 0:  # A window ends: every root once.
        assert all(np.all(c == 1) for c in refreshed), refreshed
        refreshed = [np.zeros_like(c) for c in refreshed]
  assert max(costs) <= 1.25 * np.mean(costs), costs
  assert int(state.diagnostics.last_refresh_step) == start + windows * k
  assert int(state.diagnostics.root_failures) == 0


def test_staggered_refresh_every_step_equals_all():
  grads = random_grads((12, 10), steps=5, seed=3)
  options = dict(block_size=8, precondition_every=1)
  staggered, _ = run(shampoo_optax.scale_by_shampoo(
      refresh="staggered", **options), grads)
  every, _ = run(shampoo_optax.scale_by_shampoo(**options), grads)
  for s, e in zip(staggered, every):
    assert_close(s, e, rtol=1e-6)


def _steady_and_moving_grads(steps, seed=5):
  """[16, 8] gradients: rows 0-7 the same every step (their statistics only
  grow), rows 8-15 new every step."""
  rng = np.random.default_rng(seed)
  steady = rng.standard_normal((8, 8))
  return [jnp.asarray(np.concatenate([steady, rng.standard_normal((8, 8))]),
                      jnp.float32) for _ in range(steps)]


@pytest.mark.parametrize("precondition_every", [1, 2])
def test_drift_refresh_against_numpy(precondition_every):
  """Block 8, so two blocks of two factors each. The steady block's roots
  score ~0 (its statistics are t G G^T: only their scale moves) and are
  never recomputed after the first step; the moving block's score 0.2-3
  and are recomputed every step, also when the budget is one of each
  factor's two rows (precondition_every=2). The directions match a NumPy
  Shampoo that recomputes a root exactly where its float64 drift exceeds
  the tolerance."""
  grads = _steady_and_moving_grads(6)
  tolerance = 0.05
  tx = shampoo_optax.scale_by_shampoo(
      block_size=8, refresh="drift", drift_tolerance=tolerance,
      **{**PAPER, "precondition_every": precondition_every})
  ref = NumpyShampoo((8, 8))
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  for step, g in enumerate(grads):
    u, state = update(g, state)
    expected = ref.update(np.asarray(g), drift_tolerance=tolerance)
    assert rel_err(u, expected) < 1e-4, step
    at = [np.asarray(r).reshape(-1) for r in state.refreshed_at]
    assert all(a[0] == 0 and a[1] == step for a in at), (step, at)
  # 4 roots at step 0, then the moving block's 2 at each later step.
  assert int(state.diagnostics.roots_refreshed) == 4 + 2 * (len(grads) - 1)
  assert int(state.diagnostics.last_refresh_step) == len(grads) - 1
  assert int(state.diagnostics.root_failures) == 0


def test_drift_refresh_at_tolerance_zero_equals_refreshing_all():
  """With a budget of every row (precondition_every=1) and tolerance 0,
  every root is recomputed every step: refresh="all"'s directions, on
  stacked layers, a remainder block and two buckets of sides."""
  tree = {"a": (24, 16), "b": (3, 8, 8), "c": (8, 44)}
  rng = np.random.default_rng(0)
  grads = [{n: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for n, s in tree.items()} for _ in range(4)]
  options = dict(block_size=8, precondition_every=1,
                 layer_axes={"a": None, "b": 0, "c": None})
  drift, state = run(shampoo_optax.scale_by_shampoo(
      refresh="drift", drift_tolerance=0.0, **options), grads)
  every, every_state = run(shampoo_optax.scale_by_shampoo(**options), grads)
  assert_close(drift, every, rtol=1e-5)
  assert (int(state.diagnostics.roots_refreshed)
          == int(every_state.diagnostics.roots_refreshed)
          == 3 * sum(r.size for r in state.refreshed_at))


def test_drift_refresh_above_every_score_keeps_the_first_roots():
  grads = random_grads((12, 10), steps=5, seed=3)
  options = dict(block_size=8, precondition_every=2)
  drift, state = run(shampoo_optax.scale_by_shampoo(
      refresh="drift", drift_tolerance=1e9, **options), grads)
  # Roots from step 1 (the first preconditioned step) on, never again.
  once, _ = run(shampoo_optax.scale_by_shampoo(
      **{**options, "precondition_every": 1000}), grads)
  assert_close(drift, once, rtol=1e-6)
  assert all(np.all(np.asarray(r) == 1) for r in state.refreshed_at)
  assert int(state.diagnostics.last_refresh_step) == 1


def test_bfloat16_roots_stay_close_to_float32():
  grads = random_grads((24, 20), steps=6, seed=4)
  options = dict(block_size=8, precondition_every=2)
  low, state = run(shampoo_optax.scale_by_shampoo(
      preconditioner_dtype=jnp.bfloat16, **options), grads)
  full, _ = run(shampoo_optax.scale_by_shampoo(**options), grads)
  assert {r.dtype for r in state.preconditioners} == {jnp.dtype(jnp.bfloat16)}
  assert {s.dtype for s in state.stats} == {jnp.dtype(jnp.float32)}
  # bfloat16 keeps 8 bits: the direction moves by about 2^-8 relative (step
  # 0 is the grafted step alone).
  for a, b in zip(low[1:], full[1:]):
    assert 1e-5 < rel_err(a, b) < 2e-2


def _reachable_outside_conditionals(hlo: str) -> set[str]:
  """Computations the entry reaches without entering a conditional's branch."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(1)
      bodies[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None:
      bodies[name].append(line)
  seen, stack = set(), [entry]
  while stack:
    comp = stack.pop()
    if comp in seen:
      continue
    seen.add(comp)
    for line in bodies[comp]:
      if " conditional(" in line:
        continue
      stack += re.findall(
          r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
  return seen


@pytest.mark.parametrize("refresh", ["all", "staggered", "drift"])
def test_roots_run_only_on_refresh_phases(refresh):
  """No inverse root outside its conditional: a normal step computes none.

  With one phase per refresh the roots do not depend on the loop variable,
  and XLA hoisted them out of the refresh loop, computing them every step.
  """
  tx = shampoo_optax.scale_by_shampoo(block_size=8, refresh=refresh,
                                      root_method="eigh")
  params = {"w": jnp.zeros((16, 12))}
  hlo = jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text()
  outside = _reachable_outside_conditionals(hlo)
  blocks = hlo.split("\n\n")
  eigh_in = {re.match(r"^(?:ENTRY )?%?([\w.\-]+)", b.strip()).group(1)
             for b in blocks if "syevd" in b}
  assert eigh_in and not eigh_in & outside, (eigh_in, outside)


def _distinct_kernels(hlo: str) -> int:
  """Fused computations that differ in more than their names (XLA compiles
  one kernel per distinct computation)."""
  bodies = re.findall(r"\n%?fused_computation[^\n]*\{\n(.*?)\n\}", hlo, re.S)
  assert bodies
  return len({re.sub(r"%[\w.\-]+", "%x",
                     re.sub(r", metadata=\{[^}]*\}", "", b)) for b in bodies})


@pytest.mark.parametrize("make", [
    lambda: shampoo_optax.shampoo(1e-3, weight_decay=1e-4),
    lambda: shampoo_optax.soap(1e-3),
], ids=["shampoo", "soap"])
def test_kernels_do_not_grow_with_layers(make):
  """Like AdamW's, the compiled update has as many distinct kernels for 16
  layers as for 4: the leaves' slices of a family share one per shape.

  At constant offsets each slice was a kernel of its own, and compile time
  grew by ~10 ms per leaf (`benchmarks/compile_bench.py`).
  """
  counts = []
  for layers in (4, 16):
    params = {f"l{i}": {"w": jnp.zeros((32, 32)), "b": jnp.zeros(32)}
              for i in range(layers)}
    tx = make()
    state = jax.eval_shape(tx.init, params)
    counts.append(_distinct_kernels(
        jax.jit(tx.update).lower(params, state, params).compile().as_text()))
  assert counts[1] <= counts[0], counts
