# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests of `scale_by_soap` and `soap` against a NumPy SOAP."""

import itertools
import re

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
import numpy as np
import optax
import pytest

from numerics import assert_close
from numerics import run_updates as run
import shampoo_optax
from shampoo_optax import _blocks
from shampoo_optax import _stages
from shampoo_optax import _soap

OPTIONS = dict(b1=0.9, b2=0.95, eps=1e-8, shampoo_beta=0.9)


def rotate(x, matrix, axis):
  """Multiplies axis ``axis`` of ``x`` by ``matrix``."""
  return np.moveaxis(np.tensordot(matrix, x, axes=([1], [axis])), 0, axis)


def gram(x, axis):
  rest = [i for i in range(x.ndim) if i != axis]
  return np.tensordot(x, x, axes=(rest, rest))


def block_slices(shape, block_size, factored=None):
  """Blocks of ``block_size``; an axis without a factor is not cut."""
  sides = [block_size if f else d
           for d, f in zip(shape, factored or (True,) * len(shape))]
  ranges = [[slice(s, min(s + b, d)) for s in range(0, d, b)]
            for d, b in zip(shape, sides)]
  return list(itertools.product(*ranges))


def key_of(index):
  return tuple((s.start, s.stop) for s in index)


class NumpySoap:
  """SOAP (arXiv 2409.11321, Algorithm 3) on one tensor, in float64.

  Step 0 only sets the bases, as the authors' implementation does; then Adam
  runs in the bases, refreshed by a sorted power-iteration step every
  ``every`` steps (with ``drift_tolerance``: every step, each basis whose
  `np_basis_drift` exceeds it). An axis that ``factored`` marks False keeps
  the coordinate basis (one-sided).
  """

  def __init__(self, block_size, every, b1, b2, eps, shampoo_beta,
               initial_bases=None, factored=None, drift_tolerance=None):
    self.block_size, self.every = block_size, every
    self.drift_tolerance = drift_tolerance
    self.factored = factored
    self.b1, self.b2, self.eps, self.beta = b1, b2, eps, shampoo_beta
    self.initial_bases = initial_bases
    self.t = 0
    self.blocks = {}

  def update(self, g):
    g = np.asarray(g, np.float64)
    out = np.zeros_like(g)
    t = self.t
    factored = self.factored or (True,) * g.ndim
    for index in block_slices(g.shape, self.block_size, factored):
      x = g[index]
      key = key_of(index)
      b = self.blocks.setdefault(key, dict(
          S=[np.zeros((d, d)) for d in x.shape], M=np.zeros_like(x),
          V=np.zeros_like(x)))
      b["S"] = [self.beta * s + (1 - self.beta) * gram(x, i)
                for i, s in enumerate(b["S"])]
      if t == 0:
        if self.initial_bases is not None:
          b["Q"] = self.initial_bases[key]
        else:
          b["Q"] = [np.linalg.eigh(s)[1][:, ::-1] if f else np.eye(len(s))
                    for s, f in zip(b["S"], factored)]
        continue
      into = lambda y: rotate_all(y, [q.T for q in b["Q"]])
      b["M"] = self.b1 * b["M"] + (1 - self.b1) * x
      b["V"] = self.b2 * b["V"] + (1 - self.b2) * into(x) ** 2
      m_hat = into(b["M"]) / (1 - self.b1**t)
      v_hat = b["V"] / (1 - self.b2**t)
      out[index] = rotate_all(m_hat / (np.sqrt(v_hat) + self.eps),
                                    b["Q"])
      for i, (s, q) in enumerate(zip(b["S"], b["Q"])):
        if not factored[i]:
          continue
        if (t % self.every == 0 if self.drift_tolerance is None
            else np_basis_drift(s, q) > self.drift_tolerance):
          order = np.argsort(-np.diag(q.T @ s @ q), kind="stable")
          b["V"] = np.take(b["V"], order, axis=i)
          b["Q"][i] = np.linalg.qr(s @ q[:, order])[0]
    self.t += 1
    return out


def np_basis_drift(s, q):
  """The off-diagonal share ``|offdiag(Q^T S Q)|_F / |S|_F``, in float64."""
  m = q.T @ s @ q
  return np.linalg.norm(m - np.diag(np.diag(m))) / np.linalg.norm(s)


def rotate_all(x, matrices):
  for axis, m in enumerate(matrices):
    x = rotate(x, m, axis)
  return x


def random_grads(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), jnp.float32)
          for _ in range(steps)]


@pytest.mark.parametrize("shape,block_size", [
    ((12, 8), 4),     # 4 x 4 blocks
    ((4, 4, 4), 4),   # rank 3, not merged
])
@pytest.mark.parametrize("batched", [False, True])
def test_square_blocks_against_numpy(shape, block_size, batched,
                                     monkeypatch):
  # Each block's first statistics are full rank with distinct eigenvalues,
  # so float32 and float64 eigenbases agree up to signs (which SOAP ignores).
  if batched:  # Bases of 4 blocks at a time: a full batch and a remainder.
    monkeypatch.setattr(_stages, "BATCH_BYTES", 4 * 4 * 4 * 4)
  grads = random_grads(shape, steps=8, seed=1)
  tx = _soap.scale_by_soap(block_size=block_size, precondition_every=3,
                           **OPTIONS)
  ours, state = run(tx, grads)
  ref = NumpySoap(block_size, every=3, **OPTIONS)
  for t, (g, u) in enumerate(zip(grads, ours)):
    assert_close(u, ref.update(g), rtol=2e-4, err_msg=f"step {t}")
  assert not np.any(ours[0])  # Step 0 only computes the bases.
  assert int(state.diagnostics.last_refresh_step) == 6
  # Without the sort and power step (bases kept from step 0) it differs.
  frozen = _soap.scale_by_soap(block_size=block_size, precondition_every=100,
                               **OPTIONS)
  stale, _ = run(frozen, grads)
  assert np.abs(np.asarray(stale[-1]) - ours[-1]).max() > 1e-2


def test_basis_drift_against_numpy():
  rng = np.random.default_rng(3)
  g = rng.standard_normal((3, 6, 6)).astype(np.float32)
  s = g @ np.swapaxes(g, -1, -2)
  q = np.linalg.eigh(s.astype(np.float64))[1]
  turned = np.linalg.qr(q + 0.3 * rng.standard_normal(q.shape))[0]
  for basis in (q, turned):
    expected = [np_basis_drift(a.astype(np.float64), b)
                for a, b in zip(s, basis)]
    np.testing.assert_allclose(
        shampoo_optax.basis_drift(s, basis.astype(np.float32)), expected,
        atol=1e-5 * max(expected) + 1e-6)
  assert max(np_basis_drift(a, b) for a, b in zip(s, q)) < 1e-12
  assert min(np_basis_drift(a, b) for a, b in zip(s, turned)) > 0.05
  np.testing.assert_array_equal(
      shampoo_optax.basis_drift(np.zeros((2, 2), np.float32),
                        np.eye(2, dtype=np.float32)), 0.0)


@pytest.mark.parametrize("precondition_every", [1, 2])
def test_drift_refresh_against_numpy(precondition_every):
  """Two 8 x 8 blocks: the steady one (one gradient plus 10% noise) keeps
  its step-0 eigenbasis (its off-diagonal share stays below 0.092), the
  moving one (new gradients) takes a power-iteration step every step (its
  share is above 0.12), also when the budget is one of each factor's two
  blocks. Matches a NumPy SOAP that refreshes exactly the bases whose
  float64 share exceeds the tolerance. (Without the noise, the steady
  block's rotated gradient is diagonal, and Adam's first step takes the
  signs of its float32 round-off.)"""
  rng = np.random.default_rng(5)
  steady = rng.standard_normal((8, 8))
  grads = [jnp.asarray(np.concatenate([
      steady + 0.1 * rng.standard_normal((8, 8)),
      rng.standard_normal((8, 8))]), jnp.float32) for _ in range(6)]
  tx = _soap.scale_by_soap(block_size=8, precondition_every=precondition_every,
                           refresh="drift", drift_tolerance=0.1, **OPTIONS)
  ours, state = run(tx, grads)
  ref = NumpySoap(8, every=precondition_every, drift_tolerance=0.1,
                  **OPTIONS)
  for t, (g, u) in enumerate(zip(grads, ours)):
    assert_close(u, ref.update(g), rtol=2e-4, err_msg=f"step {t}")
  # 4 bases at step 0, then the moving block's 2 at every later step.
  assert int(state.diagnostics.bases_refreshed) == 4 + 2 * 5
  assert int(state.diagnostics.last_refresh_step) == 5
  # Refreshing every basis every step instead differs.
  every, _ = run(_soap.scale_by_soap(block_size=8, precondition_every=1,
                                     **OPTIONS), grads)
  assert np.abs(np.asarray(every[-1]) - ours[-1]).max() > 1e-3


def test_drift_refresh_at_tolerance_zero_equals_refreshing_all():
  grads = random_grads((12, 10), steps=5, seed=3)
  options = dict(block_size=4, precondition_every=1, **OPTIONS)
  drift, state = run(_soap.scale_by_soap(refresh="drift",
                                         drift_tolerance=0.0, **options), grads)
  every, every_state = run(_soap.scale_by_soap(**options), grads)
  assert_close(drift, every, rtol=1e-5)
  assert (int(state.diagnostics.bases_refreshed)
          == int(every_state.diagnostics.bases_refreshed) == 5 * 2 * 9)


def bases_by_block(state, shape, block_size):
  """The state's bases as ``{block key: [Q_axis, ...]}`` in float64."""
  plan = _blocks.make_plan((shape,), ((),), block_size, 4096)
  out = {}
  for index, factor in enumerate(plan.factors):
    piece = plan.families[0].pieces[factor.piece]
    for cell in np.ndindex(*piece.grid):
      key = tuple((s + c * b, s + (c + 1) * b)
                  for s, c, b in zip(piece.start, cell, piece.block))
      out.setdefault(key, [None] * len(piece.block))[factor.axis] = (
          np.asarray(state.bases[index][(0,) + cell], np.float64))
  return out


@pytest.mark.parametrize("shape,block_size,merged", [
    ((10, 7), 4, (10, 7)),      # remainder blocks: rank-deficient factors
    ((3, 4, 5), 20, (12, 5)),   # merged to a matrix
])
def test_blocked_and_merged_against_numpy(shape, block_size, merged):
  grads = random_grads(shape, steps=9, seed=2)
  tx = _soap.scale_by_soap(block_size=block_size, precondition_every=4,
                           **OPTIONS)
  ours, state0 = run(tx, grads[:1])
  # A rank-deficient statistic has no unique eigenbasis on its null space:
  # check that the one computed is an eigenbasis, then give it to NumPy.
  bases = bases_by_block(state0, merged, block_size)
  g0 = np.asarray(grads[0], np.float64).reshape(merged)
  for index in block_slices(merged, block_size):
    for axis, q in enumerate(bases[key_of(index)]):
      s = (1 - OPTIONS["shampoo_beta"]) * gram(g0[index], axis)
      np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-5)
      eigenvalues = np.diag(q.T @ s @ q)
      assert np.all(np.diff(eigenvalues) <= 1e-5 * eigenvalues[0])
      np.testing.assert_allclose(s @ q, q * eigenvalues,
                                 atol=1e-5 * eigenvalues[0])
  more, _ = run(tx, grads[1:], state=state0)
  ref = NumpySoap(block_size, every=4, initial_bases=bases, **OPTIONS)
  for t, (g, u) in enumerate(zip(grads, ours + more)):
    expected = ref.update(np.asarray(g).reshape(merged)).reshape(shape)
    assert_close(u, expected, rtol=2e-4, err_msg=f"step {t}")


def test_sides_above_max_precondition_dim_keep_the_coordinate_basis():
  # (40, 6), blocks of 64, max 16: only the 6-side gets a basis.
  grads = random_grads((40, 6), steps=7, seed=3)
  tx = _soap.scale_by_soap(block_size=64, precondition_every=3,
                           max_precondition_dim=16, **OPTIONS)
  ours, state = run(tx, grads)
  assert [b.shape[-2:] for b in state.bases] == [(6, 6)]
  ref = NumpySoap(64, every=3, factored=(False, True), **OPTIONS)
  two_sided = NumpySoap(64, every=3, **OPTIONS)
  for t, (g, u) in enumerate(zip(grads, ours)):
    assert_close(u, ref.update(g), rtol=2e-4, err_msg=f"step {t}")
    wrong = two_sided.update(g)
  assert np.abs(np.asarray(ours[-1]) - wrong).max() > 1e-2


def test_vectors_scalars_and_large_dims_get_plain_adam():
  # Both sides of "wide" are above max_precondition_dim.
  params = {"b": jnp.zeros(7), "s": jnp.zeros([]),
            "wide": jnp.zeros((30, 40))}
  rng = np.random.default_rng(3)
  grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape), jnp.float32), params) for _ in range(5)]
  tx = _soap.scale_by_soap(max_precondition_dim=16, **OPTIONS)
  adam = optax.scale_by_adam(b1=OPTIONS["b1"], b2=OPTIONS["b2"],
                             eps=OPTIONS["eps"])
  ours, state = run(tx, grads)
  expected, _ = run(adam, grads)
  assert not state.stats
  for u, e in zip(ours, expected):
    assert_close(u, e, rtol=1e-6)


# Square blocks: a rank-deficient first statistic has no unique eigenbasis
# on its null space, so there the update after step 0 would depend on the
# gradient's last bits (e.g. on how MultiSteps averages it).
PARAMS = {"w": jnp.zeros((8, 12)), "b": jnp.zeros(7)}
SMALL = dict(block_size=4, precondition_every=2)
# One reference optimizer and one compiled update, shared by the tests.
REF = _soap.soap(1e-2, **SMALL)
REF_UPDATE = jax.jit(REF.update)


def tree_grads(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(
      scale * rng.standard_normal(p.shape), jnp.float32), PARAMS)


def test_soap_is_scale_by_soap_with_weight_decay_and_learning_rate():
  params = tree_grads(10)
  grads = [tree_grads(s) for s in range(3)]
  tx = _soap.soap(0.1, weight_decay=0.01, **SMALL)
  inner = _soap.scale_by_soap(**SMALL)
  state, inner_state = tx.init(params), inner.init(params)
  for g in grads:
    u, state = jax.jit(tx.update)(g, state, params)
    d, inner_state = jax.jit(inner.update)(g, inner_state)
    assert_close(u, jax.tree.map(lambda d, p: -0.1 * (d + 0.01 * p), d,
                                 params), rtol=1e-6)


def test_chain_with_clipping_and_stable_jitted_types():
  grads = [tree_grads(s, scale=10.0) for s in range(4)]
  tx = optax.chain(optax.clip_by_global_norm(1.0), _soap.soap(1e-2, **SMALL))
  state, ref_state = tx.init(PARAMS), REF.init(PARAMS)
  update = jax.jit(tx.update)
  types = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  for g in grads:
    new_state = update(g, state, PARAMS)[1]
    assert types(new_state) == types(state)
    u, state = update(g, state, PARAMS)
    clipped = jax.tree.map(lambda x: x / optax.tree.norm(g), g)
    r, ref_state = REF_UPDATE(clipped, ref_state, PARAMS)
    assert_close(u, r, rtol=1e-4)
  assert update._cache_size() == 1


@pytest.mark.parametrize("kwargs", [dict(skip_nonfinite="no"),
                                    dict(cut_at_shards=None)])
def test_flags_must_be_booleans(kwargs):
  name = next(iter(kwargs))
  with pytest.raises(TypeError, match=f"{name} must be True or False"):
    _soap.scale_by_soap(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(refresh="every"), "refresh must be one of 'all', 'drift'"),
    (dict(drift_tolerance=-1.0), "drift_tolerance"),
])
def test_refresh_options_are_checked(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _soap.soap(1e-3, **kwargs)


def test_inject_hyperparams():
  floats = dict(learning_rate=1e-2, b1=0.9, b2=0.95, eps=1e-8,
                shampoo_beta=0.9, weight_decay=1e-3)
  tx = optax.inject_hyperparams(
      _soap.soap, static_args=_soap.SOAP_STATIC_OPTIONS)(**floats, **SMALL)
  ref = _soap.soap(**floats, **SMALL)
  state, ref_state = tx.init(PARAMS), ref.init(PARAMS)
  ref_update = jax.jit(ref.update)
  update = jax.jit(tx.update)
  for seed in range(3):
    g = tree_grads(seed)
    u, state = update(g, state, PARAMS)
    r, ref_state = ref_update(g, ref_state, PARAMS)
    assert_close(u, r, rtol=1e-5)
  # A changed float reaches the update without recompiling.
  halved = state._replace(hyperparams={
      **state.hyperparams, "learning_rate": jnp.float32(5e-3)})
  u, _ = update(tree_grads(5), state, PARAMS)
  half, _ = update(tree_grads(5), halved, PARAMS)
  assert_close(half, jax.tree.map(lambda x: x / 2, u), rtol=1e-6)
  assert update._cache_size() == 1


def test_multisteps_equals_one_step_with_mean_gradient():
  k = 2
  micro = [tree_grads(s) for s in range(3 * k)]
  tx = optax.MultiSteps(_soap.soap(1e-2, **SMALL), every_k_schedule=k)
  state, ref_state = tx.init(PARAMS), REF.init(PARAMS)
  update = jax.jit(tx.update)
  for big in range(3):
    chunk = micro[big * k:(big + 1) * k]
    for g in chunk:
      u, state = update(g, state, PARAMS)
    mean = jax.tree.map(lambda *xs: sum(xs) / k, *chunk)
    r, ref_state = REF_UPDATE(mean, ref_state, PARAMS)
    assert_close(u, r, rtol=1e-5)


def test_nonfinite_gradient_skips_the_step():
  update = REF_UPDATE
  state = REF.init(PARAMS)
  for seed in range(3):
    _, state = update(tree_grads(seed), state, PARAMS)
  bad = tree_grads(7)
  bad["w"] = bad["w"].at[2, 3].set(jnp.nan)
  u, new_state = update(bad, state, PARAMS)
  assert all(not np.any(x) for x in jax.tree.leaves(u))
  assert int(new_state[0].diagnostics.nonfinite_steps) == 1
  unchanged = new_state[0]._replace(diagnostics=state[0].diagnostics)
  jax.tree.map(np.testing.assert_array_equal, (unchanged,) + new_state[1:],
               state)
  # The next finite step is the one that would have come.
  g = tree_grads(8)
  assert_close(update(g, new_state, PARAMS)[0], update(g, state, PARAMS)[0],
               rtol=0)


@pytest.mark.multidevice
def test_sharded_equals_unsharded():
  # "odd" is 3 x 5 blocks: its factors are stored as 15 rows padded to 16.
  shapes = {"w": (32, 16), "layers": (8, 12, 12), "b": (16,), "odd": (12, 20)}
  options = dict(block_size=4, precondition_every=2,
                 layer_axes={"w": None, "layers": 0, "b": None, "odd": None})
  rng = np.random.default_rng(4)
  grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()} for _ in range(5)]
  expected, _ = run(_soap.scale_by_soap(**options), grads)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  tx = _soap.scale_by_soap(shard_axes="data", **options)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(grads[0])
    assert not any(s.sharding.is_fully_replicated for s in state.bases)
    assert (16, 4, 4) in [s.shape for s in state.bases]
    ours, _ = run(tx, grads, state=state)
  for t, (u, e) in enumerate(zip(ours, expected)):
    assert_close(u, e, rtol=1e-5, err_msg=f"step {t}")
