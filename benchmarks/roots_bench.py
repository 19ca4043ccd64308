"""Inverse p-th roots: eigh vs coupled Newton, speed and accuracy.

Run as ``python -m benchmarks.roots_bench [--output PATH]``. Prints two
tables and writes ``benchmarks/results/roots_<backend>.json`` by default.

On CPU, jax's eigh calls LAPACK from scipy's OpenBLAS, whose worker threads
spin; on a loaded machine this made eigh 10x-100x slower than with
``OPENBLAS_NUM_THREADS=1`` (set before Python starts). The setting in force is
recorded in the results.

* Speed: jitted ``inverse_pth_root(p=4)`` of condition-1e6 matrices, timed
  after a warm-up, eigh and Newton interleaved, median of the runs.
* Accuracy: relative Frobenius error of the root against a float64 NumPy
  reference of the same regularized matrix, and the reported ``error``; the
  last column is the ``root_error`` of the float64 root for ``p + 1``, i.e.
  what a wrong root scores, for choosing the rejection threshold.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from shampoo_optax import _roots

RIDGE = 1e-6
TIMING_SHAPES = ((128,), (256,), (512,), (1024,), (16, 128))
TIMING_RUNS = 7
ACCURACY_SIZES = (256, 1024)
ACCURACY_PS = (2, 4, 8)


def _spd(rng, n, cond, rank=None):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  eigs = np.logspace(0.0, -np.log10(cond), n)
  if rank is not None:
    eigs[rank:] = 0.0
  return ((q * eigs) @ q.T).astype(np.float32)


def _reference(matrix, p):
  """Float64 root of ``A + ridge I`` and that regularized matrix."""
  a = matrix.astype(np.float64)
  w, v = np.linalg.eigh(a)
  regularized = a + RIDGE * w[-1] * np.eye(len(a))
  shifted = np.maximum(w, 0) + RIDGE * w[-1]
  return (v * shifted ** (-1.0 / p)) @ v.T, regularized


def _timing():
  rng = np.random.default_rng(0)
  rows = []
  for shape in TIMING_SHAPES:
    n = shape[-1]
    count = int(np.prod(shape[:-1]))
    matrices = np.stack([_spd(rng, n, 1e6) for _ in range(count)])
    matrices = matrices.reshape(shape[:-1] + (n, n))
    fns = {m: jax.jit(lambda x, m=m: _roots.inverse_pth_root(x, 4, method=m))
           for m in ("eigh", "newton")}
    for fn in fns.values():
      jax.block_until_ready(fn(matrices))  # compile and warm up
    times = {m: [] for m in fns}
    for _ in range(TIMING_RUNS):
      for m, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(matrices))
        times[m].append(time.perf_counter() - start)
    eigh, newton = (statistics.median(times[m]) for m in ("eigh", "newton"))
    rows.append(dict(shape="x".join(map(str, shape[:-1] + (n, n))),
                     eigh_s=eigh, newton_s=newton,
                     newton_over_eigh=newton / eigh))
  return rows


def _accuracy():
  rng = np.random.default_rng(1)
  rows = []
  for n in ACCURACY_SIZES:
    cases = {"cond1e2": _spd(rng, n, 1e2), "cond1e4": _spd(rng, n, 1e4),
             "cond1e6": _spd(rng, n, 1e6),
             "rank_half": _spd(rng, n, 1e3, rank=n // 2)}
    stacked = np.stack(list(cases.values()))
    for p in ACCURACY_PS:
      references = [_reference(m, p) for m in stacked]
      wrong_p = [_reference(m, p + 1)[0] for m in stacked]
      wrong_error = _roots.root_error(
          np.stack([r for _, r in references]).astype(np.float32),
          np.stack(wrong_p).astype(np.float32), p)
      results = {m: jax.device_get(_roots.inverse_pth_root(
          stacked, p, method=m)) for m in ("eigh", "newton")}
      for i, name in enumerate(cases):
        root, _ = references[i]
        for method, result in results.items():
          relative = (np.linalg.norm(result.root[i] - root) /
                      np.linalg.norm(root))
          rows.append(dict(n=n, case=name, p=p, method=method,
                           relative_error=float(relative),
                           error=float(result.error[i]),
                           wrong_p_error=float(wrong_error[i])))
  return rows


def main():
  backend = jax.default_backend()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", type=pathlib.Path, default=(
      pathlib.Path(__file__).parent / "results" / f"roots_{backend}.json"))
  out = parser.parse_args().output
  timing = _timing()
  print(f"\ninverse_pth_root(p=4), cond 1e6, {backend}, median of "
        f"{TIMING_RUNS} runs")
  print(f"{'shape':>14} {'eigh s':>9} {'newton s':>9} {'newton/eigh':>11}")
  for r in timing:
    print(f"{r['shape']:>14} {r['eigh_s']:9.4f} {r['newton_s']:9.4f} "
          f"{r['newton_over_eigh']:11.2f}")

  accuracy = _accuracy()
  print("\nrelative Frobenius error of the root / reported error "
        "(wrong-p root's error)")
  print(f"{'n':>5} {'case':>10} {'p':>2} {'eigh':>19} {'newton':>19} "
        f"{'wrong p':>8}")
  for eigh, newton in zip(accuracy[0::2], accuracy[1::2]):
    n, case, p = eigh["n"], eigh["case"], eigh["p"]
    cells = (eigh, newton)
    text = " ".join(f"{c['relative_error']:9.1e}/{c['error']:9.1e}"
                    for c in cells)
    print(f"{n:5d} {case:>10} {p:2d} {text} {cells[0]['wrong_p_error']:8.2f}")

  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(
      backend=backend, jax=jax.__version__, machine=platform.machine(),
      cpu_count=os.cpu_count(), load_average=os.getloadavg(),
      openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
      ridge_epsilon=RIDGE,
      timing=timing, accuracy=accuracy), indent=1) + "\n")
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
