# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
r"""The staggered refresh: which rows of which factors each step recomputes.

A preconditioner recomputes per-block matrices (Shampoo's inverse roots,
SOAP's bases) from the statistics. Recomputing all of them on one step in
``num_phases`` stalls that step; staggered, step ``k`` of every window of
``num_phases`` steps recomputes the rows of phase ``k mod num_phases``, and

* every row of every factor is recomputed **exactly once per window**;
* each phase costs about the same: a ``d x d`` matrix costs :math:`d^3`, and
  the phases are balanced over all sizes at once, not size by size.

Rows are each device's own (every device holds as many rows of a factor, so
one schedule serves all devices). The factors whose matrices have the same
side and exponent form a *bucket*, computed by one batched call: its rows
are those of its members one after the other. A bucket's rows are cut into
equal *chunks* of ``m`` rows (at most one per phase), plus, when ``m`` does
not divide them, one shorter remainder chunk; the chunks are placed on
phases largest cost first, each on the least loaded phase it may take (LPT).

Everything here is static (Python, from shapes), but `gather` and `scatter`,
which move a chunk's rows in and out of the members' arrays inside the
update, at a start known only at run time.

``refresh="drift"`` keeps the per-step budget (``ceil(rows /
num_phases)`` of each factor's rows) but spends it on the rows whose
matrices drifted most from their statistics (`most_drifted`), rather than
in turn; `put` writes their new values back.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Slot:
  """Chunks of one size in a bucket, at most one per phase.

  Attributes:
    size: rows per chunk.
    starts: per phase, the first row of its chunk (in the bucket's rows),
      or -1 where the phase has none.
  """

  size: int
  starts: tuple[int, ...]

  @property
  def single(self) -> int | None:
    """The start of the slot's only chunk (a start known when tracing), or
    None when it has several."""
    used = [s for s in self.starts if s >= 0]
    return used[0] if len(used) == 1 else None


@dataclasses.dataclass(frozen=True)
class Bucket:
  """Factors whose matrices share their side and exponent, and their chunks.

  Attributes:
    key: ``(dim, exponent)``.
    members: the factors' indices.
    rows: each member's rows (on one device).
    slots: the chunks, by size.
  """

  key: tuple[int, int]
  members: tuple[int, ...]
  rows: tuple[int, ...]
  slots: tuple[Slot, ...]

  @property
  def offsets(self) -> tuple[int, ...]:
    return tuple(np.cumsum((0,) + self.rows[:-1]).tolist())


def _chunk_size(rows: int, num_phases: int) -> int:
  """Rows per chunk: about ``rows / num_phases``, a divisor when one is
  close (then there is no remainder chunk to compile)."""
  size = -(-rows // num_phases)
  for exact in range(size, int(size * 1.25) + 1):
    if rows % exact == 0:
      return exact
  return size


def schedule(keys, rows, num_phases: int) -> tuple[Bucket, ...]:
  """The buckets and their chunks' phases.

  Args:
    keys: per factor, ``(dim, exponent)``.
    rows: per factor, its rows on one device.
    num_phases: phases of a window (1: everything at once).

  Returns:
    The buckets, in order of their first factor.
  """
  members = {}
  for index, key in enumerate(keys):
    if rows[index]:
      members.setdefault(key, []).append(index)
  chunks = []  # (cost, bucket, slot, start)
  sizes = {}
  for b, (key, indices) in enumerate(members.items()):
    total = sum(rows[i] for i in indices)
    size = _chunk_size(total, num_phases)
    full, rest = divmod(total, size)
    sizes[b] = [size] + ([rest] if rest else [])
    chunks += [(size * key[0]**3, b, 0, c * size) for c in range(full)]
    if rest:
      chunks.append((rest * key[0]**3, b, 1, full * size))
  load = [0.0] * num_phases
  starts = {(b, s): [-1] * num_phases for b in sizes
            for s in range(len(sizes[b]))}
  for cost, b, s, start in sorted(chunks, key=lambda c: -c[0]):
    free = [k for k in range(num_phases) if starts[(b, s)][k] < 0]
    phase = min(free, key=lambda k: (load[k], k))
    starts[(b, s)][phase] = start
    load[phase] += cost
  return tuple(
      Bucket(key, tuple(indices), tuple(rows[i] for i in indices),
             tuple(Slot(size, tuple(starts[(b, s)]))
                   for s, size in enumerate(sizes[b])))
      for b, (key, indices) in enumerate(members.items()))


def phase_costs(buckets, num_phases: int) -> list[float]:
  """Per phase, the sum of ``d^3`` over the rows it recomputes."""
  costs = [0.0] * num_phases
  for bucket in buckets:
    for slot in bucket.slots:
      for k, start in enumerate(slot.starts):
        if start >= 0:
          costs[k] += slot.size * bucket.key[0]**3
  return costs


def _chunk_start(slot: Slot, phase):
  """The chunk's start at ``phase`` (traced), and whether it has one."""
  start = jnp.asarray(np.asarray(slot.starts, np.int32))[phase]
  return jnp.maximum(start, 0), start >= 0


def gather(bucket: Bucket, slot: Slot, arrays, phase):
  """The rows ``[start, start + size)`` of the bucket, at ``phase``.

  ``arrays`` holds one ``[rows, ...]`` array per member. Returns the rows
  ``[size, ...]`` and whether the phase has a chunk of this slot.
  """
  if slot.single is not None:  # Static: plain slices.
    start, end = slot.single, slot.single + slot.size
    parts = [x[max(start - o, 0):max(min(end - o, n), 0)]
             for x, o, n in zip(arrays, bucket.offsets, bucket.rows)]
    return (jnp.concatenate([p for p in parts if p.shape[0]]),
            jnp.asarray(slot.starts, np.int32)[phase] >= 0)
  start, active = _chunk_start(slot, phase)
  rows = start + jnp.arange(slot.size)
  out = None
  for x, offset, n in zip(arrays, bucket.offsets, bucket.rows):
    local = rows - offset
    own = (local >= 0) & (local < n)
    taken = jnp.take(x, jnp.clip(local, 0, n - 1), axis=0)
    own = own.reshape((-1,) + (1,) * (x.ndim - 1))
    out = taken if out is None else jnp.where(own, taken, out)
  return out, active


def scatter(bucket: Bucket, slot: Slot, arrays, values, phase):
  """Writes ``values`` (from `gather`'s rows) into the members' arrays.

  A no-op at a phase without a chunk of this slot.
  """
  if slot.single is not None:
    start, end = slot.single, slot.single + slot.size
    active = jnp.asarray(slot.starts, np.int32)[phase] >= 0
    out = []
    for x, offset, n in zip(arrays, bucket.offsets, bucket.rows):
      lo, hi = max(start - offset, 0), max(min(end - offset, n), 0)
      if hi > lo:
        part = values[offset + lo - start:offset + hi - start]
        x = x.at[lo:hi].set(jnp.where(active, part.astype(x.dtype), x[lo:hi]))
      out.append(x)
    return out
  start, active = _chunk_start(slot, phase)
  rows = start + jnp.arange(slot.size)
  out = []
  for x, offset, n in zip(arrays, bucket.offsets, bucket.rows):
    local = rows - offset
    local = jnp.where(active & (local >= 0) & (local < n), local, n)
    out.append(x.at[local].set(values.astype(x.dtype), mode="drop"))  # n: out.
  return out


def most_drifted(scores, num_phases: int, tolerance, active):
  """The rows to recompute now, by drift, within the per-step budget.

  Args:
    scores: ``[rows]`` drift of each row's matrix from its statistics
      (``-inf`` for rows never to recompute, e.g. padding).
    num_phases: the budget is ``ceil(rows / num_phases)`` rows.
    tolerance: only rows scoring above it are recomputed.
    active: whether anything is recomputed at this step.

  Returns:
    ``(index, chosen)``: the budget's rows, highest scores first, and which
    of them to recompute.
  """
  top, index = jax.lax.top_k(scores, -(-scores.shape[0] // num_phases))
  return index, active & (top > tolerance)


def put(array, index, chosen, values):
  """``array`` with ``values`` at the rows ``index`` where ``chosen``."""
  mask = chosen.reshape(chosen.shape + (1,) * (array.ndim - 1))
  return array.at[index].set(
      jnp.where(mask, values.astype(array.dtype), array[index]))
