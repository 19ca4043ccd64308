"""Benchmarks for shampoo_optax (see benchmarks/README.md).

On CPU, jaxlib's ``eigh`` is LAPACK from scipy's OpenBLAS, whose own worker
threads fight XLA's thread pool: with more than one OpenBLAS thread a batched
``eigh`` can spin or deadlock. Every entry point under ``benchmarks`` runs
single-threaded OpenBLAS unless the user set ``OPENBLAS_NUM_THREADS``; this
must happen before numpy or jax is imported, hence here.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
