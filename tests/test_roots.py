"""Tests for shampoo_optax._roots.

The reference is a float64 NumPy eigendecomposition of the same float32 input
with the same relative ridge. Float32 eigenvalues carry absolute errors of
about eps * lambda_max, i.e. relative errors of about eps * cond in the
smallest ones, which the power -1/p divides by p; so the root is compared with
relative Frobenius tolerance ``1e-5 + 2 eps cond / p`` (cond of the
regularized matrix). Measured errors stay below 1.3 eps cond / p for eigh and
0.5 eps cond / p for Newton up to n = 256.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from numerics import assert_close
from numerics import np_drift
from shampoo_optax import _roots

EPS32 = float(np.finfo(np.float32).eps)
METHODS = ("eigh", "newton")
RIDGE = 1e-6
# An error above this marks a failed root (see benchmarks/roots_bench.py):
# accurate float32 roots of condition-1e6 matrices stay below 0.3.
ERROR_THRESHOLD = 0.5

# Root exponents tried per size; every p in 1..8 at n = 32.
SIZES_AND_PS = {
    1: (1, 8),
    2: (2, 3),
    7: (3, 5, 6, 7),
    32: (1, 2, 3, 4, 5, 6, 7, 8),
    128: (1, 4, 8),
    256: (2, 4),
}


def _spd(rng, n, cond=1.0, rank=None, top=10.0):
  """``Q diag(eigs) Q^T`` in float32, eigs log-spaced from top to top / cond.

  ``top != 1`` makes roots of different ``p`` differ even at ``cond = 1``.
  Eigenvalues past ``rank`` are zero.
  """
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  eigs = top * np.logspace(0.0, -np.log10(cond), n)
  if rank is not None:
    eigs[rank:] = 0.0
  return ((q * eigs) @ q.T).astype(np.float32)


def _eigh64(matrix):
  a = np.asarray(matrix, np.float64)
  return np.linalg.eigh((a + np.swapaxes(a, -1, -2)) / 2)


def _root64(eigenvalues, eigenvectors, p, ridge_epsilon=RIDGE):
  """Float64 ``(A + ridge I)^(-1/p)`` and the condition of ``A + ridge I``."""
  ridge = ridge_epsilon * eigenvalues[..., -1:]
  shifted = np.maximum(eigenvalues, 0) + ridge
  with np.errstate(divide="ignore"):
    scaled = eigenvectors * shifted[..., None, :] ** (-1.0 / p)
    return (scaled @ np.swapaxes(eigenvectors, -1, -2),
            shifted[..., -1] / shifted[..., 0])


def _reference(matrix, p, ridge_epsilon=RIDGE):
  return _root64(*_eigh64(matrix), p, ridge_epsilon)


@functools.lru_cache(maxsize=None)
def _cases(n):
  """Named test matrices of size n with their float64 eigendecompositions.

  Condition numbers 1 to 1e6, rank-1 and rank-deficient; only the two
  hardest at n = 256, for speed.
  """
  rng = np.random.default_rng(n)
  if n == 1:
    cases = {"scalar": _spd(rng, 1)}
  else:
    cases = {f"cond{c:.0e}": _spd(rng, n, c) for c in (1.0, 1e2, 1e4, 1e6)}
    cases["rank1"] = _spd(rng, n, rank=1)
    if n > 2:
      cases["rank_half"] = _spd(rng, n, 1e3, rank=n // 2)
    if n >= 256:
      cases = {k: cases[k] for k in ("cond1e+06", "rank_half")}
  return {name: (matrix, _eigh64(matrix)) for name, matrix in cases.items()}


def _tolerance(cond, p):
  return 1e-5 + 2 * EPS32 * cond / p


def _relative_error(root, reference):
  root = np.asarray(root, np.float64)
  return np.linalg.norm(root - reference) / np.linalg.norm(reference)


@functools.lru_cache(maxsize=None)
def _jit_root(method, p, **kwargs):
  return jax.jit(functools.partial(
      _roots.inverse_pth_root, p=p, method=method, **kwargs))


@functools.lru_cache(maxsize=None)
def _grid(method, n):
  """Roots of all cases of size n for all its p, in one compiled call."""
  cases = _cases(n)
  stacked = np.stack([matrix for matrix, _ in cases.values()])
  ps = SIZES_AND_PS[n]
  results = jax.jit(lambda x: [
      _roots.inverse_pth_root(x, p, method=method) for p in ps])(stacked)
  return cases, dict(zip(ps, jax.device_get(results)))


GRID = [(n, p) for n, ps in SIZES_AND_PS.items() for p in ps]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,p", GRID)
def test_matches_float64_reference(method, n, p):
  cases, results = _grid(method, n)
  result = results[p]
  assert result.root.dtype == np.float32 and result.error.dtype == np.float32
  for i, (name, (_, eigh)) in enumerate(cases.items()):
    reference, cond = _root64(*eigh, p)
    error = _relative_error(result.root[i], reference)
    assert error <= _tolerance(cond, p), (name, error, _tolerance(cond, p))
    np.testing.assert_array_equal(result.root[i], result.root[i].T)
    assert 0 <= result.error[i] < ERROR_THRESHOLD, (name, result.error[i])


@pytest.mark.parametrize("n,p", GRID)
def test_tolerance_rejects_wrong_exponent_and_missing_ridge(n, p):
  """The accuracy test would catch a root of the wrong p or without ridge."""
  for name, (_, eigh) in _cases(n).items():
    reference, cond = _root64(*eigh, p)
    wrong_p, _ = _root64(*eigh, p + 1)
    assert _relative_error(wrong_p, reference) > _tolerance(cond, p), name
    if cond >= 1e5:
      with np.errstate(invalid="ignore"):
        no_ridge = _relative_error(_root64(*eigh, p, 0.0)[0], reference)
      assert not no_ridge <= _tolerance(cond, p), name


@pytest.mark.parametrize("method", METHODS)
def test_zero_and_numerically_zero_matrices_give_identity(method):
  rng = np.random.default_rng(0)
  batch = np.stack([np.zeros((4, 4)), 1e-35 * _spd(rng, 4), _spd(rng, 4),
                    -np.eye(4)]).astype(np.float32)
  result = _jit_root(method, 2)(batch)
  for i in (0, 1):
    np.testing.assert_array_equal(result.root[i], np.eye(4))
    assert result.error[i] == 0
  reference, cond = _reference(batch[2], 2)
  assert _relative_error(result.root[2], reference) <= _tolerance(cond, 2)
  if method == "eigh":  # lambda_max <= 0: left unpreconditioned.
    np.testing.assert_array_equal(result.root[3], np.eye(4))
  else:  # Newton cannot tell; its error rejects the root.
    assert result.error[3] > ERROR_THRESHOLD


@pytest.mark.parametrize("method", METHODS)
def test_extreme_scales_are_finite_and_accurate(method):
  rng = np.random.default_rng(1)
  base = [_spd(rng, 7, 1e2), _spd(rng, 7, rank=1), _spd(rng, 7, 1e6)]
  scales = (1e-20, 1e-10, 1e10, 1e20)
  batch = np.stack([np.float32(s) * m for s in scales for m in base])
  assert np.all(np.isfinite(batch))
  result = _jit_root(method, 4)(batch)
  assert np.all(np.isfinite(result.root))
  for i, matrix in enumerate(batch):
    reference, cond = _reference(matrix, 4)
    assert _relative_error(result.root[i], reference) <= _tolerance(cond, 4)
    assert result.error[i] < ERROR_THRESHOLD


@pytest.mark.parametrize("method", METHODS)
def test_batched_calls_equal_per_matrix_calls(method):
  rng = np.random.default_rng(2)
  matrices = np.stack(
      [_spd(rng, 5, c) for c in (1.0, 1e2, 1e4, 1e6, 1.0, 1e3)])
  single = [_jit_root(method, 3)(m) for m in matrices]
  batched = _jit_root(method, 3)(matrices)
  batched_2d = _jit_root(method, 3)(matrices.reshape(2, 3, 5, 5))
  for i, one in enumerate(single):
    # Newton runs the batch until its slowest member converges, but a
    # converged matrix is frozen, so results agree to float32 rounding.
    assert_close(batched.root[i], one.root, rtol=1e-5)
    assert_close(batched_2d.root.reshape(6, 5, 5)[i], one.root, rtol=1e-5)
  assert batched_2d.error.shape == (2, 3)


@pytest.mark.parametrize("method", METHODS)
def test_padding_leaves_the_valid_block_unchanged(method):
  rng = np.random.default_rng(3)
  a = _spd(rng, 6, 1e3)  # lambda_max = 10 >= 1: padding keeps the ridge.
  padded = np.stack([scipy.linalg.block_diag(a, np.zeros((3, 3))),
                     scipy.linalg.block_diag(a, np.eye(3))]).astype(np.float32)
  result = _jit_root(method, 4)(padded)
  reference, cond = _reference(a, 4)
  for root in result.root:
    assert _relative_error(root[:6, :6], reference) <= _tolerance(cond, 4)
    assert np.abs(root[:6, 6:]).max() <= 1e-5 * np.abs(root).max()
  ridge = RIDGE * 10.0
  np.testing.assert_allclose(result.root[1, 6:, 6:],
                             np.eye(3) * (1 + ridge) ** -0.25, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_low_precision_input_gives_float32(method):
  matrix = jnp.asarray(_spd(np.random.default_rng(4), 4, 10.0), jnp.bfloat16)
  result = _jit_root(method, 2)(matrix)
  assert result.root.dtype == jnp.float32 and result.error.dtype == jnp.float32
  reference, cond = _reference(np.asarray(matrix.astype(jnp.float32)), 2)
  assert _relative_error(result.root, reference) <= _tolerance(cond, 2)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_input_is_flagged(method):
  rng = np.random.default_rng(5)
  batch = np.stack([_spd(rng, 4) for _ in range(3)])
  batch[0, 1, 2] = np.nan
  batch[1, 3, 3] = np.inf
  result = _jit_root(method, 2)(batch)
  assert result.error[0] == np.inf and result.error[1] == np.inf
  assert not np.any(np.isfinite(result.root[:2]))
  assert np.all(np.isfinite(result.root[2])) and result.error[2] < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_vmap_and_traced_ridge(method):
  rng = np.random.default_rng(6)
  matrices = np.stack([_spd(rng, 5, 1e4) for _ in range(3)])
  ridges = jnp.array([1e-6, 1e-3, 1e-1], jnp.float32)
  vmapped = jax.jit(jax.vmap(lambda m, r: _roots.inverse_pth_root(
      m, 2, method=method, ridge_epsilon=r)))(matrices, ridges)
  for i, matrix in enumerate(matrices):
    reference, cond = _reference(matrix, 2, float(ridges[i]))
    assert _relative_error(vmapped.root[i], reference) <= _tolerance(cond, 2)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_program_does_not_grow_with_batch(method):
  def ops(batch):
    text = jax.jit(functools.partial(
        _roots.inverse_pth_root, p=4, method=method)).lower(
            jnp.ones((batch, 16, 16), jnp.float32)).as_text()
    return (text.count("stablehlo.while"), text.count("lapack_ssyevd"),
            text.count("stablehlo.dot_general"), len(text.splitlines()))
  assert ops(4) == ops(32)
  whiles, eighs, _, _ = ops(4)
  assert (whiles, eighs) == ((0, 1) if method == "eigh" else (2, 0))


def test_unconverged_newton_root_is_flagged():
  matrix = _spd(np.random.default_rng(9), 8, 1e6)
  result = _roots.inverse_pth_root(matrix, 4, method="newton",
                                   max_iterations=3)
  assert np.all(np.isfinite(result.root))
  assert result.error > ERROR_THRESHOLD


def test_root_error():
  rng = np.random.default_rng(7)
  a = _spd(rng, 6, 1e2)
  for p in (1, 2, 3, 4):
    exact, _ = _reference(a, p, 0.0)
    assert _roots.root_error(a, exact.astype(np.float32), p) < 1e-5
    wrong, _ = _reference(a, p + 1, 0.0)
    assert _roots.root_error(a, wrong.astype(np.float32), p) > 0.1
    # The error is scale-free: the root of s * A is s^(-1/p) root(A).
    scaled = _roots.root_error(np.float32(1e20) * a,
                               (1e-20 ** (1 / p) * exact).astype(np.float32), p)
    assert scaled < 1e-5
  batch = np.stack([a, np.full_like(a, np.nan)])
  errors = _roots.root_error(batch, np.stack([exact, exact]), 4)
  assert errors.shape == (2,) and errors[1] == np.inf


@pytest.mark.parametrize("method", METHODS)
def test_reported_error_is_root_error(method):
  a = _spd(np.random.default_rng(8), 6, 1e2)
  result = _roots.inverse_pth_root(a, 4, method=method)
  lambda_max = np.linalg.eigvalsh(a.astype(np.float64))[-1]
  regularized = (a + RIDGE * lambda_max * np.eye(6)).astype(np.float32)
  np.testing.assert_allclose(
      result.error, _roots.root_error(regularized, result.root, 4), atol=2e-5)


@pytest.mark.parametrize("method", METHODS)
@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_finite_psd_input_gives_finite_root(method, data):
  """Any finite PSD input, any rank, entries 1e-20..1e20: a finite root."""
  rank = data.draw(st.integers(1, 8), label="rank")
  log_scale = data.draw(st.floats(-20, 20), label="log10 scale")
  seed = data.draw(st.integers(0, 2**31), label="seed")
  g = np.random.default_rng(seed).standard_normal((8, rank))
  matrix = (10.0 ** log_scale * (g @ g.T)).astype(np.float32)
  result = _jit_root(method, 4)(matrix)
  assert np.all(np.isfinite(result.root))
  assert result.error < ERROR_THRESHOLD


def test_default_root_method():
  assert _roots.default_root_method("cpu") == "eigh"
  assert _roots.default_root_method("gpu") == "eigh"
  assert _roots.default_root_method("tpu") == "newton"
  assert _roots.default_root_method() == _roots.default_root_method(
      jax.default_backend())
  assert set(_roots.ROOT_METHODS) == {"auto", "eigh", "newton"}


@pytest.mark.parametrize(
    "kwargs,argument",
    [(dict(method="cholesky"), "method"), (dict(p=0), "p"), (dict(p=2.0), "p"),
     (dict(p=True), "p"), (dict(ridge_epsilon=-1e-6), "ridge_epsilon"),
     (dict(max_iterations=0), "max_iterations"),
     (dict(tolerance=-1.0), "tolerance"),
     (dict(regularization="ridge"), "regularization"),
     (dict(regularization="pseudo_inverse", method="newton"), "eigh"),
     (dict(matrix=np.ones((3, 4), np.float32)), "matrix"),
     (dict(matrix=np.ones((3,), np.float32)), "matrix")])
def test_bad_arguments_raise_value_error(kwargs, argument):
  kwargs = dict(dict(matrix=np.eye(3, dtype=np.float32), p=2), **kwargs)
  with pytest.raises(ValueError, match=argument):
    _roots.inverse_pth_root(kwargs.pop("matrix"), kwargs.pop("p"), **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e8])
@pytest.mark.parametrize("p", [2, 4])
def test_absolute_ridge_matches_float64_reference(method, scale, p):
  # The ridge does not scale with the matrix: 1e-3 against eigenvalues
  # from 1e-4 * scale to 10 * scale.
  matrix = scale * _spd(np.random.default_rng(11), 16, cond=1e5)
  result = _roots.inverse_pth_root(matrix, p, method=method,
                                   ridge_epsilon=1e-3,
                                   regularization="absolute")
  w, v = _eigh64(matrix)
  reference = (v * (np.maximum(w, 0) + 1e-3) ** (-1.0 / p)) @ v.T
  assert _relative_error(result.root, reference) < 1e-3
  assert 0 <= result.error < ERROR_THRESHOLD
  relative, _ = _reference(matrix, p, 1e-3)
  assert _relative_error(result.root, relative) > 1e-2 or scale == 1.0


@pytest.mark.parametrize("p", [1, 2, 4])
def test_pseudo_inverse_root_drops_the_null_space(p):
  # Rank 5 of 12, kept eigenvalues down to 0.08 of the top: the root is
  # zero on the null space and exact elsewhere, and its error (measured
  # against the projector) is small although the matrix is singular.
  matrix = _spd(np.random.default_rng(12), 12, cond=1e3, rank=5)
  result = _roots.inverse_pth_root(matrix, p, ridge_epsilon=1e-6,
                                   regularization="pseudo_inverse")
  w, v = _eigh64(matrix)
  kept = w > 1e-6 * w.max()
  assert kept.sum() == 5
  reference = (v[:, kept] * w[kept] ** (-1.0 / p)) @ v[:, kept].T
  assert _relative_error(result.root, reference) < 1e-3
  assert 0 <= result.error < ERROR_THRESHOLD
  # A ridge instead puts (eps lambda_max)^(-1/p) on the null space.
  with_ridge = _roots.inverse_pth_root(matrix, p, method="eigh",
                                       ridge_epsilon=1e-6)
  assert _relative_error(with_ridge.root, reference) > 1.0
  # A threshold above the smallest kept eigenvalue drops it too.
  coarse = _roots.inverse_pth_root(matrix, p, ridge_epsilon=0.1,
                                   regularization="pseudo_inverse")
  assert _relative_error(coarse.root, reference) > 0.1


def test_root_error_bad_arguments():
  eye = np.eye(3, dtype=np.float32)
  with pytest.raises(ValueError, match="p"):
    _roots.root_error(eye, eye, 0)
  with pytest.raises(ValueError, match="regularized_matrix"):
    _roots.root_error(eye[0], eye, 2)
  with pytest.raises(TypeError, match="root"):
    _roots.root_error(eye, np.eye(3, dtype=np.int32), 2)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_non_float_input_raises_type_error(dtype):
  with pytest.raises(TypeError, match="matrix"):
    _roots.inverse_pth_root(np.eye(3, dtype=dtype), 2)


@pytest.mark.parametrize("p", [2, 4, 6])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_drift_error_matches_float64_reference(p, mode):
  """A root of old statistics scored against new ones: the error of
  `root_error` up to scale, with the ridge the new statistics get (relative
  to their power-iteration lambda_max estimate, within float32 rounding of
  the exact one for well-separated top eigenvalues)."""
  rng = np.random.default_rng(p)
  eps = 1e-3
  old = _spd(rng, 12, 1e3)
  g = rng.standard_normal((12, 12)).astype(np.float32)
  new = (0.8 * old + 0.2 * g @ g.T).astype(np.float32)
  w, v = np.linalg.eigh(old.astype(np.float64))
  ridge = eps * (w[-1] if mode == "relative" else 1.0)
  stale = ((v * (w + ridge) ** (-1.0 / p)) @ v.T).astype(np.float32)
  drift = functools.partial(_roots.drift_error, p=p, ridge_epsilon=eps,
                            regularization=mode)
  expected = np_drift(new, stale, p, eps, mode)
  assert expected > 0.1  # The statistics moved.
  np.testing.assert_allclose(drift(new, stale), expected, rtol=1e-3)
  # A fresh root scores its float32 error; the wrong exponent is far off.
  assert drift(old, stale) < 1e-3
  if mode == "relative":  # Statistics that only grew: no drift.
    assert drift(np.float32(3.0) * old, stale) < 1e-3
  # The wrong exponent, or no scale normalization, is 10x the tolerance off.
  wrong = _roots.drift_error(new, stale, p + 2, ridge_epsilon=eps,
                             regularization=mode)
  unnormalized = _roots.root_error(
      new + ridge * np.eye(12, dtype=np.float32), stale, p)
  for value in (wrong, unnormalized):
    assert abs(float(value) - expected) > 1e-2 * expected
  # The relative score is scale-free in the statistics and in the root.
  if mode == "relative":
    scaled = drift(np.float32(1e12) * new, np.float32(1e-5) * stale)
    np.testing.assert_allclose(scaled, expected, rtol=1e-3)


def test_drift_error_special_cases():
  eye = np.eye(4, dtype=np.float32)
  batch = np.stack([np.zeros((4, 4), np.float32), np.full((4, 4), np.nan,
                                                          np.float32), eye])
  roots = np.stack([eye, eye, np.full((4, 4), np.inf, np.float32)])
  scores = _roots.drift_error(batch, roots, 4, ridge_epsilon=1e-6)
  np.testing.assert_array_equal(scores, [0.0, np.inf, np.inf])
  with pytest.raises(ValueError, match="regularization.*'relative'"):
    _roots.drift_error(eye, eye, 4, ridge_epsilon=0.0,
                       regularization="pseudo_inverse")
