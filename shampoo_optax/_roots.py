"""Inverse p-th roots of symmetric positive semi-definite matrices.

Shampoo preconditions a gradient block with ``L^(-1/p)`` and ``R^(-1/p)``
where ``L`` and ``R`` are accumulated Gram matrices. This module computes

  ``X = (A + ridge * I)^(-1/p)``,  ``ridge = ridge_epsilon * lambda_max(A)``,

(or, by ``regularization``, an absolute ridge ``ridge_epsilon``, or the
pseudo-inverse root that drops the eigenvalues below
``ridge_epsilon * lambda_max(A)``) for a stack of matrices ``A`` of shape
``[..., n, n]`` in float32, together with the dimensionless error
``max_ij |X^p (A + ridge * I) - I|_ij`` (evaluated in a balanced form, see
``root_error``) that the optimizer uses to reject a bad root and keep the
previous one.

Two methods are provided:

* ``"eigh"``: an eigendecomposition, ``V diag((lambda_i + ridge)^(-1/p)) V^T``.
  Fastest on CPU and GPU.
* ``"newton"``: the coupled Newton iteration of Guo & Higham (2006), built
  from matrix products only, which is what TPUs are fast at.

Both scale each matrix by its max-abs entry before computing (the root of
``s * A`` is ``s^(-1/p) * root(A)``), so entries from 1e-20 to 1e20 neither
overflow nor underflow in float32.
"""

import ctypes
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ROOT_METHODS = ("auto", "eigh", "newton")
REGULARIZATIONS = ("relative", "absolute", "pseudo_inverse")

# A matrix whose max-abs entry is at most this is treated as the zero matrix
# (for a PSD matrix max|A_ij| = max_i A_ii <= lambda_max <= n max_i A_ii):
# a block that never saw a gradient is left unpreconditioned.
_ZERO_SCALE = 1e-30

# Squarings used to bound lambda_max from above for Newton's starting point,
# and matrix-vector power iterations used to estimate it for the ridge.
_NUM_SQUARINGS = 3
_NUM_POWER_ITERATIONS = 16

_HIGHEST = jax.lax.Precision.HIGHEST


class InverseRootResult(NamedTuple):
  """An inverse p-th root and its error.

  Attributes:
    root: ``[..., n, n]`` float32, symmetric, ``(A + ridge * I)^(-1/p)``.
    error: ``[...]`` float32, ``root_error(A + ridge * I, root, p)``;
      ``+inf`` when the input or the root has a non-finite entry.
  """

  root: jax.Array
  error: jax.Array


def default_root_method(backend: str | None = None) -> str:
  """The root method that is fastest on ``backend``.

  On a 2-core CPU (``benchmarks/roots_bench.py``, p = 4, n = 128..1024)
  Newton took 2.4x to 5.7x as long as ``eigh``, with OpenBLAS single-threaded
  (``OPENBLAS_NUM_THREADS=1``): CPU ``eigh`` is LAPACK from scipy's OpenBLAS,
  whose spinning worker threads made it up to 20x slower than Newton on a
  loaded machine. On TPUs, Newton's matrix products win. Backends other than
  CPU, GPU and TPU get ``"newton"``, which needs only matrix products and so
  runs wherever JAX does.

  Args:
    backend: a JAX platform name (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"rocm"``,
      ``"tpu"``, ...); ``None`` means ``jax.default_backend()``.

  Returns:
    ``"eigh"`` or ``"newton"``.
  """
  if backend is None:
    backend = jax.default_backend()
  if backend.lower() in ("cpu", "gpu", "cuda", "rocm"):
    return "eigh"
  return "newton"


def _check_p(p) -> None:
  if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
    raise ValueError(f"p must be an integer >= 1, got {p!r}.")


def _as_float32_square(matrix, name: str) -> jax.Array:
  """Casts ``matrix`` [..., n, n] of any float dtype to float32."""
  matrix = jnp.asarray(matrix)
  if not jnp.issubdtype(matrix.dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating-point dtype, got {matrix.dtype}.")
  if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
    raise ValueError(
        f"{name} must have shape [..., n, n] (rank >= 2, square), got "
        f"{matrix.shape}.")
  return matrix.astype(jnp.float32)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32 products: TPUs otherwise multiply float32 in bfloat16 passes.
  return jnp.matmul(a, b, precision=_HIGHEST)


def _symmetrize(a: jax.Array) -> jax.Array:
  # Halve before adding so that entries near the float32 maximum stay finite.
  return 0.5 * a + 0.5 * jnp.swapaxes(a, -1, -2)


def _max_abs(a: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(a), axis=(-2, -1))


def _matrix_power(a: jax.Array, p: int) -> jax.Array:
  """``a^p`` for a static integer ``p >= 1`` by binary exponentiation."""
  result = None
  while True:
    if p & 1:
      result = a if result is None else _matmul(result, a)
    p >>= 1
    if not p:
      return result
    a = _matmul(a, a)


def _balanced(regularized_matrix: jax.Array, root: jax.Array,
              p: int) -> jax.Array:
  """``X^(p-h) A X^h``, ``h = p // 2`` (see `root_error`)."""
  h = p // 2
  if not h:
    return _matmul(root, regularized_matrix)
  half = _matrix_power(root, h)
  left = half if p % 2 == 0 else _matmul(half, root)
  return _matmul(_matmul(left, regularized_matrix), half)


def _residual(regularized_matrix: jax.Array, root: jax.Array, p: int,
              target: jax.Array | None = None) -> jax.Array:
  """``max|X^(p-h) A X^h - T|``, ``h = p // 2``; +inf if not finite.

  ``T`` is ``target`` (the projector onto the kept eigenvectors of a
  pseudo-inverse root) or ``I``.
  """
  product = _balanced(regularized_matrix, root, p)
  if target is None:
    target = jnp.eye(root.shape[-1], dtype=root.dtype)
  error = _max_abs(product - target)
  return jnp.where(jnp.isfinite(error), error, jnp.inf)


def root_error(regularized_matrix, root, p: int) -> jax.Array:
  """The error of an inverse p-th root ``X`` of ``A``.

  ``error = max_ij |X^(p-h) A X^h - I|_ij`` with ``h = floor(p / 2)``,
  dimensionless, 0 for an exact root. An exact root commutes with ``A``, so
  there this is ``max|X^p A - I|``; for any ``X`` the matrix is similar to
  ``X^p A - I`` (same eigenvalues: how far the preconditioned spectrum is from
  1). The balanced product is used because ``X^p A`` amplifies float32
  rounding in ``X`` by up to ``cond(A)`` (errors above 1 for accurate roots
  of condition-1e6 matrices at ``p = 8``), the balanced one only by about
  ``sqrt(cond(A))``.

  It is evaluated on the scaled problem ``(s^(1/p) X, A / s)`` with
  ``s = max|A_ij|``, which has the same value in exact arithmetic and stays
  within float32 range for any scale of ``A``.

  Args:
    regularized_matrix: ``A``, ``[..., n, n]``, the matrix whose root it is
      (already including any ridge).
    root: ``X``, ``[..., n, n]``, the candidate ``A^(-1/p)``.
    p: the integer root, ``>= 1``.

  Returns:
    ``[...]`` float32 errors, ``+inf`` where an entry is not finite.
  """
  _check_p(p)
  a = _as_float32_square(regularized_matrix, "regularized_matrix")
  x = _as_float32_square(root, "root")
  scale = _max_abs(a)
  scale = jnp.where(scale > 0, scale, 1.0)[..., None, None]
  return _residual(a / scale, x * scale ** (1.0 / p), p)


def _ridge(regularization: str, ridge_epsilon, lambda_max, scale):
  """The ridge added to ``a = A / scale``: relative, absolute, or none."""
  if regularization == "relative":
    return ridge_epsilon * lambda_max
  if regularization == "absolute":
    return ridge_epsilon / scale
  return jnp.zeros_like(lambda_max)


def _eigh_root(a: jax.Array, ridge_epsilon: jax.Array, p: int,
               regularization: str, scale: jax.Array):
  """Root of the scaled, symmetric ``a`` [..., n, n] by eigendecomposition.

  Returns the root, the regularized matrix, the target of the residual
  (``None`` for ``I``) and the largest eigenvalue.
  """
  eigenvalues, eigenvectors = jnp.linalg.eigh(a, symmetrize_input=False)
  lambda_max = eigenvalues[..., -1]
  ridge = _ridge(regularization, ridge_epsilon, lambda_max, scale)
  # Roundoff makes the eigenvalues of a singular PSD matrix slightly negative.
  shifted = jnp.maximum(eigenvalues, 0.0) + ridge[..., None]
  # A zero ridge leaves zeros here: they get a zero (pseudo-inverse) root.
  # Without regularization="pseudo_inverse" the error then reports >= 1.
  kept = shifted > 0
  if regularization == "pseudo_inverse":
    kept = shifted > (ridge_epsilon * lambda_max)[..., None]
  safe = jnp.where(kept, shifted, 1.0)
  inv_root_eigenvalues = jnp.where(kept, safe ** (-1.0 / p), 0.0)
  transposed = jnp.swapaxes(eigenvectors, -1, -2)
  root = _matmul(eigenvectors * inv_root_eigenvalues[..., None, :],
                 transposed)
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  regularized = a + ridge[..., None, None] * eye
  target = None
  if regularization == "pseudo_inverse":
    target = _symmetrize(_matmul(
        eigenvectors * kept[..., None, :].astype(a.dtype), transposed))
  return _symmetrize(root), regularized, target, lambda_max


def _lambda_max_bounds(a: jax.Array):
  """Bounds ``lower <= lambda_max(a) <= upper`` for symmetric ``a``.

  Upper: ``||a^m||_F^(1/m) >= lambda_max`` for ``m = 2^k``, by ``k`` repeated
  squarings (normalized each time); it overestimates by at most
  ``rank^(1/(2m))`` (1.54x for n = 1024 with ``k = 3``), a guaranteed bound at
  the cost of ``k`` matrix products. Lower: the Rayleigh quotient after power
  iteration started from the column of ``a^m`` with the largest diagonal
  entry, never below ``upper * n^(-1/(2m))``.

  Args:
    a: ``[..., n, n]`` symmetric, no zero matrix.

  Returns:
    ``(lower, upper)``, each ``[...]``.
  """
  n = a.shape[-1]
  norm = jnp.linalg.norm(a, axis=(-2, -1))
  b = a / norm[..., None, None]
  log_upper = jnp.log(norm)
  for k in range(_NUM_SQUARINGS):
    # ||a^(2m)||_F = ||a^m||_F^2 ||b^2||_F for b = a^m / ||a^m||_F.
    b = _matmul(b, b)
    norm = jnp.linalg.norm(b, axis=(-2, -1))
    b = b / norm[..., None, None]
    log_upper = log_upper + jnp.log(norm) / 2 ** (k + 1)
  upper = jnp.exp(log_upper)

  guaranteed = upper * float(n) ** (-1.0 / 2 ** (_NUM_SQUARINGS + 1))
  return jnp.maximum(_power_estimate(a, b), guaranteed), upper


def _power_estimate(a: jax.Array, b: jax.Array) -> jax.Array:
  """The Rayleigh quotient of ``a`` after power iteration started from the
  column of ``b`` with the largest diagonal entry (a lower bound on
  ``lambda_max(a)``); matrix-vector products only."""
  start = jnp.argmax(jnp.diagonal(b, axis1=-2, axis2=-1), axis=-1)
  v = jnp.take_along_axis(b, start[..., None, None], axis=-1)[..., 0]

  def power_step(_, v):
    v = jnp.einsum("...ij,...j->...i", a, v, precision=_HIGHEST)
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)

  v = jax.lax.fori_loop(0, _NUM_POWER_ITERATIONS, power_step,
                        v / jnp.linalg.norm(v, axis=-1, keepdims=True))
  return jnp.einsum("...i,...ij,...j->...", v, a, v, precision=_HIGHEST)


def _newton_root(a: jax.Array, ridge_epsilon: jax.Array, p: int,
                 max_iterations: int, tolerance: jax.Array,
                 regularization: str, scale: jax.Array):
  """Root of the scaled, symmetric, non-zero ``a`` by coupled Newton.

  With ``T_k = ((p + 1) I - M_k) / p`` the iteration is

    ``X_{k+1} = X_k T_k``,  ``M_{k+1} = T_k^p M_k``,

  from ``X_0 = z^(1/p) I``, ``M_0 = z A_reg``, which keeps
  ``M_k = X_k^p A_reg``; ``X_k -> A_reg^(-1/p)`` as ``M_k -> I``. Every
  eigenvalue ``mu`` of ``M`` follows ``mu <- mu ((p + 1 - mu) / p)^p``, which
  converges to 1 from anywhere in ``(0, p + 1)``; ``z = (p + 1) / (2 u)`` with
  ``u >= lambda_max(A_reg)`` puts the spectrum in ``(0, (p + 1) / 2]``.

  After the first step every eigenvalue of ``M`` lies in ``(0, 1]`` and
  rises monotonically, so ``max|M - I|`` (then the largest ``1 - M_ii``)
  decreases until float32 rounding dominates. One ``lax.while_loop`` runs over
  the whole batch; a matrix stops when ``max|M - I| <= tolerance``, when its
  error stops decreasing, or when it is not finite, and keeps its best iterate.

  Returns the root and the regularized matrix.
  """
  lower, upper = _lambda_max_bounds(a)
  ridge = _ridge(regularization, ridge_epsilon, lower, scale)
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  regularized = a + ridge[..., None, None] * eye
  z = (p + 1) / (2 * (upper + ridge))
  x = z[..., None, None] ** (1.0 / p) * eye
  m = z[..., None, None] * regularized
  # Built from ``a``, so that they carry its type (e.g. varying over the
  # axes of a `jax.shard_map`) as the loop's results do.
  init = (0, x, m, jnp.full_like(a[..., 0, 0], jnp.inf),
          jnp.ones_like(a[..., 0, 0], bool))

  def cond(state):
    iteration, *_, active = state
    return (iteration < max_iterations) & jnp.any(active)

  def body(state):
    iteration, x, m, error, active = state
    t = ((p + 1) * eye - m) / p
    new_m = _symmetrize(_matmul(_matrix_power(t, p), m))
    new_x = _symmetrize(_matmul(x, t))
    new_error = _max_abs(new_m - eye)
    # False for NaN: a diverging matrix stops too. Only improving steps are
    # kept, so each matrix ends on its best iterate.
    improved = active & (new_error < error)
    keep = improved[..., None, None]
    x = jnp.where(keep, new_x, x)
    m = jnp.where(keep, new_m, m)
    error = jnp.where(improved, new_error, error)
    return iteration + 1, x, m, error, improved & (error > tolerance)

  return jax.lax.while_loop(cond, body, init)[1], regularized


def _scaled(matrix):
  """``(a, unit, zero, finite)``: the symmetric ``a = matrix / unit``.

  ``unit`` is ``max|matrix_ij|`` (the unit of an absolute ridge in ``a``);
  zero and non-finite matrices (``zero``, ``~finite``) are replaced by
  ``I`` (``unit`` 1) so that what is computed from ``a`` stays finite; the
  callers overwrite their results.
  """
  a = _as_float32_square(matrix, "matrix")
  eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
  finite = jnp.all(jnp.isfinite(a), axis=(-2, -1))
  a = jnp.where(finite[..., None, None], a, 0.0)
  scale = _max_abs(a)
  zero = scale <= _ZERO_SCALE
  unit = jnp.where(zero, 1.0, scale)
  a = jnp.where(zero[..., None, None], eye, a / unit[..., None, None])
  return _symmetrize(a), unit, zero, finite


def drift_error(matrix, root, p: int, *, ridge_epsilon,
                regularization: str = "relative") -> jax.Array:
  r"""How far ``root`` is from an inverse p-th root of ``matrix``, up to scale.

  With :math:`\hat A` the statistics ``matrix`` regularized as
  `inverse_pth_root` would regularize them now (the relative ridge from a
  power-iteration estimate of :math:`\lambda_{max}`),
  :math:`h = \lfloor p/2 \rfloor` and
  :math:`M = X^{p-h} \hat A X^h`,

  .. math::

    \text{drift} = \max_{ij} \left| \frac{M}{\operatorname{tr}(M) / n}
    - I \right|_{ij},

  `root_error` up to the scalar factor :math:`\operatorname{tr}(M) / n`:
  statistics that only grew or shrank (e.g. plain sums, ``b2 = 1``) score 0,
  as the grafted step's norm absorbs a scalar. A root computed from
  ``matrix`` scores about its own float32 error (below 0.08, see
  `inverse_pth_root`); one computed from earlier statistics scores how far
  the preconditioned spectrum is from flat, e.g. about 0.2 once one of many
  directions' curvature grew by 20%. Shampoo's ``refresh="drift"``
  recomputes the roots that score highest.

  Args:
    matrix: ``[..., n, n]`` symmetric PSD statistics.
    root: ``[..., n, n]``, an inverse p-th root of earlier statistics.
    p: the integer root, ``>= 1`` (static).
    ridge_epsilon: as in `inverse_pth_root`.
    regularization: ``"relative"`` or ``"absolute"`` (a pseudo-inverse root
      is blind to the directions it dropped, so it cannot score them).

  Returns:
    ``[...]`` float32: 0 for a zero ``matrix``, ``+inf`` where ``matrix`` or
    ``root`` has a non-finite entry.
  """
  _check_p(p)
  if regularization not in ("relative", "absolute"):
    raise ValueError("drift_error's regularization must be 'relative' or"
                     f" 'absolute', got {regularization!r}.")
  a, unit, zero, finite = _scaled(matrix)
  x = _as_float32_square(root, "root")
  n = a.shape[-1]
  # No squarings: the ridge only needs lambda_max roughly (their bound is
  # for Newton's start), and scoring runs on every step.
  ridge = _ridge(regularization, jnp.asarray(ridge_epsilon, jnp.float32),
                 _power_estimate(a, a), unit)
  regularized = a + ridge[..., None, None] * jnp.eye(n, dtype=a.dtype)
  # The product's own trace is the scale: the root's scale drops out.
  product = _balanced(regularized, x, p)
  mean = jnp.trace(product, axis1=-2, axis2=-1) / n
  error = _max_abs(product / mean[..., None, None] - jnp.eye(n, dtype=a.dtype))
  error = jnp.where(jnp.isfinite(error) & (mean > 0), error, jnp.inf)
  return jnp.where(finite, jnp.where(zero, 0.0, error), jnp.inf)


def inverse_pth_root(matrix,
                     p: int,
                     *,
                     method: str = "auto",
                     ridge_epsilon: float = 1e-6,
                     max_iterations: int = 100,
                     tolerance: float = 1e-6,
                     regularization: str = "relative") -> InverseRootResult:
  r"""Inverse p-th roots of symmetric PSD matrices with a relative ridge.

  Computes, per matrix of the batch, in float32,

    ``root = (A + ridge I)^(-1/p)``,  ``ridge = ridge_epsilon lambda_max(A)``,
    ``error = root_error(A + ridge I, root, p)``,

  where ``A = (matrix + matrix^T) / 2``. With ``regularization="absolute"``
  the ridge is ``ridge_epsilon`` itself. With ``"pseudo_inverse"`` there is
  no ridge: with ``A = sum_i lambda_i v_i v_i^T``,

    ``root = sum_{lambda_i > ridge_epsilon lambda_max} lambda_i^(-1/p)
    v_i v_i^T``,

  zero on the directions a rank-deficient ``A`` has not seen (instead of
  the ``ridge^(-1/p)`` a ridge gives them), and the error measures
  ``X^(p-h) A X^h`` against the projector ``P`` onto the kept ``v_i``
  instead of ``I`` (see `root_error`). ``"eigh"`` uses the exact top
  eigenvalue for the ridge; ``"newton"`` uses a power-iteration estimate (see
  ``_lambda_max_bounds``), low by at most about 2% (measured, when the top
  eigenvalues cluster) and exact to float32 rounding otherwise.

  Special cases, per matrix:

  * ``max|A_ij| <= 1e-30`` or ``lambda_max(A) <= 0``: the root is the
    identity and the error 0 (a block that never saw a gradient is left
    unpreconditioned).
  * a non-finite entry in ``matrix``: the root is NaN and the error ``+inf``.
  * ``ridge_epsilon = 0`` with a singular ``A``: the error is ``>= 1``.

  Use ``error`` to reject a root. Measured (``benchmarks/roots_bench.py``):
  accurate float32 roots of matrices of condition up to 1e6 (the most a 1e-6
  ridge allows) score below 0.08 for ``p >= 2`` and ``n <= 1024``, below 0.3
  for ``p = 1``; unconverged, stalled or diverged roots score about 1 or more,
  non-finite ones ``+inf``. A threshold of 0.5 separates them.

  Args:
    matrix: ``[..., n, n]`` symmetric positive semi-definite, any float dtype,
      any number of leading batch axes.
    p: the integer root, ``>= 1`` (static).
    method: one of ``ROOT_METHODS``; ``"auto"`` is
      ``default_root_method()`` at trace time (static).
    ridge_epsilon: ``>= 0``, relative to ``lambda_max`` (absolute with
      ``regularization="absolute"``); may be traced. Relative ridges below
      about 1e-7 (float32 roundoff) are not resolved in float32.
    max_iterations: Newton's iteration limit, ``>= 1`` (static).
    tolerance: Newton stops a matrix once ``max|M - I|`` is at most this; may
      be traced.
    regularization: one of ``REGULARIZATIONS`` (static);
      ``"pseudo_inverse"`` needs ``method`` ``"eigh"`` or ``"auto"`` (which
      then picks ``"eigh"``).

  Returns:
    An ``InverseRootResult`` with ``root`` ``[..., n, n]`` and ``error``
    ``[...]``, both float32.
  """
  if not isinstance(method, str) or method not in ROOT_METHODS:
    raise ValueError(f"method must be one of {ROOT_METHODS}, got {method!r}.")
  method = resolved_method(method, regularization)
  _check_p(p)
  if isinstance(ridge_epsilon, (int, float)) and not ridge_epsilon >= 0:
    raise ValueError(
        f"ridge_epsilon must be >= 0, got {ridge_epsilon!r}.")
  if (isinstance(max_iterations, bool) or
      not isinstance(max_iterations, (int, np.integer)) or max_iterations < 1):
    raise ValueError(
        f"max_iterations must be an integer >= 1, got {max_iterations!r}.")
  if isinstance(tolerance, (int, float)) and not tolerance >= 0:
    raise ValueError(f"tolerance must be >= 0, got {tolerance!r}.")
  a, unit, zero, finite = _scaled(matrix)
  eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
  ridge_epsilon = jnp.asarray(ridge_epsilon, jnp.float32)
  target = None
  if method == "eigh":
    root, regularized, target, lambda_max = _eigh_root(
        a, ridge_epsilon, p, regularization, unit)
    # Only eigh sees a non-positive lambda_max (of a non-PSD input); Newton
    # fails to converge on one, and its error says so.
    zero = zero | (lambda_max <= 0)
  else:
    root, regularized = _newton_root(a, ridge_epsilon, p, max_iterations,
                                     jnp.asarray(tolerance, jnp.float32),
                                     regularization, unit)
  error = _residual(regularized, root, p, target)

  root = root * unit[..., None, None] ** (-1.0 / p)
  root = jnp.where(zero[..., None, None], eye, root)
  error = jnp.where(zero, 0.0, error)
  # A root that left float32 range is as unusable as one from bad input.
  error = jnp.where(jnp.all(jnp.isfinite(root), axis=(-2, -1)), error, jnp.inf)
  root = jnp.where(finite[..., None, None], root, jnp.nan)
  error = jnp.where(finite, error, jnp.inf)
  return InverseRootResult(root=root, error=error)


def lapack_safe_map(fn, *stacks):
  """``fn`` over stacks ``[m, ...]``: one row at a time on CPU.

  For functions that call LAPACK (``eigh``, ``qr``): on CPU, batched calls
  can deadlock (see `_single_threaded_openblas`), so the rows are mapped
  one at a time with OpenBLAS limited to one thread; the numbers are those
  of the batched call. Elsewhere ``fn`` runs on the whole batch.
  """
  if jax.default_backend() != "cpu":
    return fn(*stacks)
  _single_threaded_openblas()
  return jax.lax.map(lambda rows: fn(*rows), stacks)


def resolved_method(method: str, regularization: str = "relative") -> str:
  """The root method ``method`` stands for with this ``regularization``."""
  if (not isinstance(regularization, str)
      or regularization not in REGULARIZATIONS):
    raise ValueError(f"regularization must be one of {REGULARIZATIONS},"
                     f" got {regularization!r}.")
  if regularization == "pseudo_inverse":
    if method == "newton":
      raise ValueError(
          "regularization='pseudo_inverse' needs the eigenvalues: use"
          " method (root_method) 'eigh' or 'auto', not 'newton'.")
    return "eigh"
  return default_root_method() if method == "auto" else method


def stacked_inverse_pth_root(matrices: jax.Array, p: int, *, method: str,
                             ridge_epsilon,
                             regularization: str = "relative"
                             ) -> InverseRootResult:
  """`inverse_pth_root` of a ``[m, n, n]`` stack, safe on every backend."""
  method = resolved_method(method, regularization)
  root = lambda a: inverse_pth_root(a, p, method=method,
                                    ridge_epsilon=ridge_epsilon,
                                    regularization=regularization)
  if method != "eigh":
    return root(matrices)
  return lapack_safe_map(root, matrices)


# CPU programs (one device, or several simulated ones with
# --xla_force_host_platform_device_count) run on one intra-op thread pool.
# Two parts of the CPU LAPACK path (jaxlib's eigh, via scipy's OpenBLAS) then
# deadlock intermittently (observed with jax 0.10.2 on 1 and 8 devices): a
# batched eigh fans out over the intra-op pool and blocks a pool thread
# waiting for its chunks, and OpenBLAS's own threads wait on each other when
# several devices call it at once. So on CPU the eigh roots are computed one
# matrix at a time (a batch of one runs inline) and OpenBLAS is limited to
# one thread, process-wide, the first time such a root is traced.
_OPENBLAS_LIMITED = []


def _single_threaded_openblas() -> None:
  """Sets every loaded OpenBLAS (jaxlib's LAPACK provider) to one thread."""
  if _OPENBLAS_LIMITED:
    return
  _OPENBLAS_LIMITED.append(True)
  try:
    import scipy.linalg.cython_lapack  # pylint: disable=g-import-not-at-top,unused-import

    with open("/proc/self/maps") as maps:
      paths = {
          line.split()[-1] for line in maps
          if "openblas" in line and line.split()[-1].startswith("/")
      }
    for path in sorted(paths):
      lib = ctypes.CDLL(path)
      for name in ("scipy_openblas_set_num_threads",
                   "scipy_openblas_set_num_threads64_",
                   "openblas_set_num_threads",
                   "openblas_set_num_threads64_"):
        if hasattr(lib, name):
          getattr(lib, name)(1)
          break
  except (ImportError, OSError):  # Not Linux, or no OpenBLAS: nothing to do.
    pass
