# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Other optimizers for ``benchmarks.run``: Muon, PSGD Kron and PRO.

* ``muon``: ``optax.contrib.muon`` (in optax itself), with
  ``consistent_rms=0.2``: Muon's update is rescaled to AdamW's typical RMS,
  so it shares AdamW's learning rate and weight decay (Liu et al. 2025,
  "Muon is Scalable for LLM Training"; the value its docstring recommends),
  and the same learning rate drives its AdamW part.
  ``muon_dimension_numbers`` says which leaves are matrices.
* ``kron``, ``pro``: ``distributed_kron.kron`` and ``distributed_kron.pro``
  from the PyPI package ``distributed-kron`` (``pip install -e .[peers]``),
  imported through ``import_distributed_kron``.

``make(name, learning_rate, weight_decay, options)`` builds any of them; the
benchmark's decoupled weight decay goes to every leaf, as for AdamW.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

PEERS = ("muon", "kron", "pro")


def import_distributed_kron():
  """Imports ``distributed_kron`` (2.0.0) on a jax where it does not import.

  Its signatures annotate ``PartitionSpec[str, str]``, evaluated when the
  module is imported, and recent jax's ``jax.sharding.PartitionSpec``
  (``jax.P``, jax 0.10 here) is not subscriptable: the import raises
  ``TypeError``. The annotation is never used at run time, so subscripting
  is allowed for the duration of the import only, then ``PartitionSpec`` is
  restored as it was.
  """
  spec = jax.sharding.PartitionSpec
  patched = "__class_getitem__" not in vars(spec)
  if patched:
    spec.__class_getitem__ = classmethod(lambda cls, _: cls)
  try:
    import distributed_kron  # pylint: disable=import-outside-toplevel
  finally:
    if patched:
      del spec.__class_getitem__
  return distributed_kron


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def muon_dimension_numbers(params):
  """Muon's matrix view of each leaf of a Flax (linen) parameter tree.

  As a Muon user would set it up: every hidden weight is a matrix, with its
  input axes as reduction axes and its output axes as output axes: dense
  kernels (in, out), attention query/key/value kernels (in, heads, head_dim)
  and output kernels (heads, head_dim, out), conv kernels (h, w, in, out).
  The output layer (the last top-level ``Dense``), embeddings, biases and
  norm scales get ``None``: they are trained by Muon's AdamW part.
  """
  md = optax.contrib.MuonDimensionNumbers
  top_dense = [k for k in params if k.startswith("Dense_")]
  head = max(top_dense, key=lambda k: int(k.split("_")[1]), default=None)

  def rule(path, x):
    names = _names(path)
    if names[-1] != "kernel" or names == (head, "kernel"):
      return None
    if x.ndim == 2:
      return md(0, 1)
    if x.ndim == 3 and names[-2] in ("query", "key", "value"):
      return md(0, (1, 2))
    if x.ndim == 3 and names[-2] == "out":
      return md((0, 1), 2)
    if x.ndim == 4:
      return md((0, 1, 2), 3)
    return None

  return jax.tree_util.tree_map_with_path(rule, params)


def make(name: str, learning_rate, weight_decay: float,
         options: dict[str, Any]) -> optax.GradientTransformation:
  """The peer ``name`` with the benchmark's schedule and weight decay."""
  if name == "muon":
    kw = dict(consistent_rms=0.2,
              muon_weight_dimension_numbers=muon_dimension_numbers)
    kw.update(options)
    return optax.contrib.muon(learning_rate, weight_decay=weight_decay,
                              adam_weight_decay=weight_decay, **kw)
  if name in ("kron", "pro"):
    fn = getattr(import_distributed_kron(), name)
    return fn(learning_rate, weight_decay=weight_decay, **options)
  raise ValueError(name)
