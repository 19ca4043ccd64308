# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The optimizer state's memory bill, read from shapes alone."""

import dataclasses
import math

import jax
import numpy as np

from shampoo_optax import _placement
from shampoo_optax import _shampoo
from shampoo_optax import _soap

KINDS = ("statistics", "roots", "bases", "grafting", "momentum",
         "second moments", "other")
# The kind of each field of a preconditioner's state; fields of per-factor
# matrices are reported by factor size. Any other field is "other".
_FIELDS = {
    _shampoo.ShampooState: {"stats": "statistics", "preconditioners": "roots",
                            "graft": "grafting", "mu": "momentum"},
    _soap.SoapState: {"stats": "statistics", "bases": "bases",
                      "mu": "momentum", "nu": "second moments"},
}
_MATRICES = ("statistics", "roots", "bases")


def _packed_side(shape) -> int:
  """``n`` from the trailing packed shape of an ``n x n`` matrix."""
  rows, cols = shape[-2:]
  return 2 * cols if rows == 2 * cols + 1 else rows


@dataclasses.dataclass(frozen=True)
class StateReport:
  """Bytes of an optimizer state, by kind and by factor size.

  Attributes:
    param_bytes: bytes of the parameters.
    rows: ``(kind, bucket, matrices, bytes, bytes_per_device)`` per row;
      ``bucket`` is ``"d x d"`` for statistics and roots (``matrices`` of
      them), ``""`` for the rest.
    devices: devices of the mesh (1 without one).
  """

  param_bytes: int
  rows: tuple[tuple[str, str, int, int, int], ...]
  devices: int

  def total(self, kind: str | None = None) -> int:
    """Bytes of the whole state, or of one of `KINDS` (e.g. "momentum")."""
    return sum(r[3] for r in self.rows if kind in (None, r[0]))

  def per_device(self, kind: str | None = None) -> int:
    """Bytes on the fullest device (every array's largest shard), in all or
    of one of `KINDS`."""
    return sum(r[4] for r in self.rows if kind in (None, r[0]))

  @property
  def bytes_per_param_byte(self) -> float:
    return self.total() / max(self.param_bytes, 1)

  def __str__(self) -> str:
    mib = lambda b: f"{b / 2**20:,.2f}"
    lines = [
        f"optimizer state: {mib(self.total())} MiB"
        f" ({self.bytes_per_param_byte:.2f}x the parameters'"
        f" {mib(self.param_bytes)} MiB), {mib(self.per_device())} MiB per"
        f" device on {self.devices}",
        f"{'kind':<14} {'bucket':>11} {'matrices':>9} {'MiB':>11}"
        f" {'MiB/device':>11}",
    ]
    for kind, bucket, count, size, local in self.rows:
      lines.append(f"{kind:<14} {bucket:>11} {count or '':>9} {mib(size):>11}"
                   f" {mib(local):>11}")
    for kind in KINDS:
      if any(r[0] == kind for r in self.rows):
        lines.append(f"{kind + ' (all)':<26} {'':>9}"
                     f" {mib(self.total(kind)):>11}"
                     f" {mib(self.per_device(kind)):>11}")
    return "\n".join(lines)


def state_report(tx, params, mesh=None, param_shardings=None) -> StateReport:
  """The bytes ``tx.init(params)`` would take, without allocating them.

  Statistics, roots (Shampoo) and bases (SOAP) are reported per factor size
  (``d x d``); grafting accumulators, momentum and second moments as such;
  everything else (counts, diagnostics, other transforms' state) as
  ``other``. With a mesh,
  each array's per-device bytes are those of its largest shard under
  `shampoo_optax.state_shardings` (so call it under the same conditions as
  the training: ``param_shardings`` or the parameters' own shardings).

  Args:
    tx: an optax transformation (anything containing Shampoo, or not).
    params: the parameters, arrays or `jax.ShapeDtypeStruct`.
    mesh: a `jax.sharding.Mesh`, or ``None`` for one device.
    param_shardings: as for `shampoo_optax.state_shardings`.

  Returns:
    A `StateReport`; ``print`` it for a table.
  """
  shapes = _placement.abstract_state(tx, params, mesh, param_shardings)
  devices = 1 if mesh is None else mesh.size
  is_state = lambda x: type(x) in _FIELDS
  rows = {}

  def add(kind, bucket, matrices, x):
    size = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    local = size if mesh is None else (
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize)
    old = rows.get((kind, bucket), (0, 0, 0))
    rows[(kind, bucket)] = (old[0] + matrices, old[1] + size, old[2] + local)

  def visit(state):
    if not is_state(state):
      add("other", "", 0, state)
      return
    kinds = _FIELDS[type(state)]
    for name in state._fields:
      kind = kinds.get(name, "other")
      for x in jax.tree.leaves(getattr(state, name)):
        if kind in _MATRICES:
          d = x.shape[-1] if kind == "bases" else _packed_side(x.shape)
          add(kind, f"{d} x {d}", math.prod(x.shape[:-2]), x)
        else:
          add(kind, "", 0, x)

  for state in jax.tree.leaves(shapes, is_leaf=is_state):
    visit(state)
  order = lambda key: (KINDS.index(key[0]),
                       -int(key[1].split(" ")[0]) if key[1] else 0)
  param_bytes = sum(math.prod(np.shape(p)) * np.dtype(p.dtype).itemsize
                    for p in jax.tree.leaves(params))
  return StateReport(
      param_bytes=param_bytes,
      rows=tuple((k, b, *rows[(k, b)]) for k, b in sorted(rows, key=order)),
      devices=devices)
