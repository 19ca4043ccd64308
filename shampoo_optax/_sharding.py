# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Where the preconditioner state lives on a device mesh.

A factor ``[n, *grid, *packed]`` (see `_blocks`) holds one matrix per block;
its leading *batch* axes are the blocks' own. Each batch axis is split over
mesh axes chosen once, from shapes and the parameters' shardings:

1. **Follow the parameter** (FSDP, tensor parallel). When a family has one
   leaf whose dim is split over mesh axes ``A`` (explicit sharding: read
   from the type), the block-grid axis cut from that dim is split over
   ``A`` too, provided every device's shard is a whole number of blocks (the
   grid is divisible by ``|A|`` and the dim has no remainder block). A
   sharded layer axis likewise splits the units axis. The blocks a device
   owns are then cut from its own shard of the gradient: statistics, roots
   and preconditioning need no communication, and the update keeps the
   parameter's sharding.
2. **Split what is left over ``shard_axes``** (data parallel): the
   ``shard_axes`` not used by step 1 split the first batch axis that is
   still whole and divisible by their size. The update is then gathered
   once (the only collective a data-parallel update needs).
3. **Pad what divides nowhere** (`jax.jit` needs even shards): when no
   batch axis is divisible and step 1 split none, the factor is stored as
   *rows*, its batch axes flattened into one, ``[rows, *packed]``, padded
   with zero rows to a multiple of the ``shard_axes``' size and split along
   them (e.g. ``[12, 6, 18, ...]`` on 8 devices: 1,296 rows, none of
   padding, where any one axis would need 33%). The update pads the
   gradient blocks alike and drops the padding rows' results; they never
   count as failures. A family split like its parameters is moved into its
   rows by all-to-alls where its shape allows (`rows_route`), else XLA
   gathers it.

A factor's shapes depend on the mesh only in the padded case (3);
`_placement` keeps the padding out of checkpoints. Within the jitted update
every factor is pinned to its split, the roots of each device's blocks are
computed under `jax.shard_map` (owner computes: a custom call such as
LAPACK's ``eigh`` would otherwise be free to be replicated), and no root
ever moves.

The mesh comes from ``jax.set_mesh(mesh)`` at trace time. With explicit axes
the parameters' shardings are in their types and the Shampoo arithmetic runs
inside `jax.sharding.auto_axes`, with the caller's types as output
shardings; with ``Auto`` axes (the "pjit way", `jax.jit` with
``in_shardings``/``out_shardings``) the parameters' shardings are not visible
while tracing, so only steps 2 and 3 apply, and the per-family arrays are
split alike the per-family state (`family_pins`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.experimental.shard_alike import shard_alike
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from shampoo_optax import _blocks

ShardAxes = str | tuple[str, ...] | None
# One entry of a PartitionSpec: None, a mesh axis name, or a tuple of names.
AxisEntry = str | tuple[str, ...] | None


def check_shard_axes(shard_axes: Any) -> ShardAxes:
  """Validates the ``shard_axes`` option (no mesh needed)."""
  names = (shard_axes,) if isinstance(shard_axes, str) else shard_axes
  if shard_axes is not None and not (
      isinstance(names, tuple) and names
      and all(isinstance(a, str) for a in names)
      and len(set(names)) == len(names)):
    raise TypeError(
        "shard_axes must be None, a mesh axis name (str) or a non-empty tuple"
        f" of distinct names, got {shard_axes!r}.")
  return shard_axes


def axis_names(shard_axes: ShardAxes) -> tuple[str, ...]:
  """``shard_axes`` as a tuple of mesh axis names."""
  if shard_axes is None:
    return ()
  return (shard_axes,) if isinstance(shard_axes, str) else tuple(shard_axes)


def context_mesh(shard_axes: ShardAxes):
  """The (abstract) mesh set by `jax.set_mesh`; raises if it lacks an axis."""
  mesh = jax.sharding.get_abstract_mesh()
  missing = [a for a in axis_names(shard_axes) if a not in mesh.axis_names]
  if missing:
    if not mesh.axis_names:
      hint = (
          "no mesh is set. Trace init and update under `with"
          " jax.set_mesh(mesh):` (explicit sharding, or around the calls of"
          " a jax.jit with in/out_shardings), or pass shard_axes=None on a"
          " single device.")
    else:
      hint = (f"the current mesh has axes {tuple(mesh.axis_names)}; name axes"
              " of that mesh.")
    raise ValueError(
        f"shard_axes={shard_axes!r}: mesh axes {missing} not found: {hint}")
  return mesh


def _check_leaf_axes(leaf_specs, mesh) -> None:
  """Raises unless the mesh set has every axis the parameters are split on
  (explicitly sharded parameters used outside `jax.set_mesh`)."""
  used = {a for spec in leaf_specs for e in spec for a in names_of(e)}
  missing = sorted(used - set(mesh.axis_names))
  if missing:
    have = (f"the mesh set has axes {tuple(mesh.axis_names)}"
            if mesh.axis_names else "no mesh is set")
    raise ValueError(
        f"the parameters are split over mesh axes {missing} (explicit"
        f" sharding), but {have}: call init and update (or trace them) under"
        " `with jax.set_mesh(mesh):` with the parameters' mesh.")


def names_of(entry: AxisEntry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def entry_size(entry: AxisEntry, mesh=None) -> int:
  """How many devices the mesh axes ``entry`` span (default: the mesh set
  by `jax.set_mesh`)."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return math.prod(sizes[a] for a in names_of(entry))


def _entry(names: Sequence[str]) -> AxisEntry:
  return None if not names else names[0] if len(names) == 1 else tuple(names)


# Switches for tracing ``init`` abstractly, set while they apply:
# "parameters unseen": parameters count as unsharded when choosing the
# factors' split (`state_shardings` for an Auto mesh, whose update cannot see
# them; the per-family state still follows them: the update does not pin it);
# "unpadded": no factor is padded (step 3), the checkpoint layout.
_TRACING = []


@contextlib.contextmanager
def tracing(switch: str):
  _TRACING.append(switch)
  try:
    yield
  finally:
    _TRACING.remove(switch)


def leaf_spec(x) -> tuple[AxisEntry, ...]:
  """A leaf's sharding, one entry per dim (all ``None`` when not explicit)."""
  entries = ()
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = set(getattr(mesh, "explicit_axes", ()) or ())
  if spec is not None:
    entries = tuple(
        _entry([a for a in names_of(e) if a in explicit]) for e in spec)
  return entries + (None,) * (x.ndim - len(entries))


def shard_counts(leaves) -> tuple[tuple[int, ...], ...]:
  """For every leaf, into how many shards each axis is split.

  Read from the types (explicit sharding); all 1 where the parameters'
  shardings are not visible, as on an ``Auto`` mesh.
  """
  def counts(x):
    spec = leaf_spec(x)
    if "parameters unseen" in _TRACING or not any(spec):
      return (1,) * x.ndim
    return tuple(entry_size(e, jax.typeof(x).sharding.mesh) for e in spec)

  return tuple(counts(x) for x in leaves)


def factor_batch_specs(plan, leaf_specs, shard_axes) -> list[tuple]:
  """The split of every factor's batch axes (see module docstring).

  Args:
    plan: the `_blocks.Plan`.
    leaf_specs: `leaf_spec` of every leaf.
    shard_axes: the ``shard_axes`` option.

  Returns:
    For each factor of ``plan``, one `AxisEntry` per batch axis.
  """
  unpadded = "unpadded" in _TRACING
  shapes_only = unpadded and not jax.sharding.get_abstract_mesh().axis_names
  if shapes_only:  # The checkpoint layout's shapes (`unpad_state`).
    shard_axes = None
  if shapes_only or "parameters unseen" in _TRACING:
    leaf_specs = [(None,) * len(s) for s in leaf_specs]
  mesh = None
  if shard_axes is not None or any(any(s) for s in leaf_specs):
    mesh = context_mesh(shard_axes)
    _check_leaf_axes(leaf_specs, mesh)
  size = lambda names: entry_size(tuple(names), mesh)
  specs = []
  for factor in plan.factors:
    family = plan.families[factor.family]
    piece = family.pieces[factor.piece]
    # Each member's wish for every batch axis; an axis follows the members
    # only where they all agree (the units of several leaves never do).
    wishes = []
    for member in family.members:
      spec = leaf_specs[member.leaf]
      layer = [spec[a] for a in member.layer_axes]
      wish = [layer[0] if len(family.members) == 1 and layer
              and not any(layer[1:]) else None]
      for axis, leaf_axes in enumerate(member.merged_from):
        entry = spec[leaf_axes[0]]
        k = size(names_of(entry))
        # Each device's shard is whole blocks: the piece spans the axis, or
        # it was cut at the shards (`_blocks.make_plan`).
        whole = (piece.grid[axis] * piece.block[axis] == family.shape[axis]
                 or piece.cuts[axis] % k == 0)
        aligned = (entry is not None and whole
                   and not any(spec[a] for a in leaf_axes[1:])
                   and piece.grid[axis] % k == 0)
        wish.append(entry if aligned else None)
      wishes.append(wish)
    batch = [w if all(other[i] == w for other in wishes) else None
             for i, w in enumerate(wishes[0])]
    used = {a for e in batch for a in names_of(e)}
    rest = [a for a in axis_names(shard_axes) if a not in used]
    if rest:
      for axis, n in enumerate(factor.batch_shape):
        if batch[axis] is None and n % size(rest) == 0:
          batch[axis] = _entry(rest)
          break
      else:
        if not unpadded and not any(batch) and factor.count > 1:
          batch = [_entry(rest)]  # Rows, padded (step 3).
    specs.append(tuple(batch))
  return specs


def is_rows(factor, batch_spec) -> bool:
  """Whether a factor split as ``batch_spec`` is stored as padded rows."""
  return len(batch_spec) != len(factor.batch_shape)


def layout_batch_shape(factor, batch_spec) -> tuple[int, ...]:
  """The factor's batch shape in memory: its own, or its padded rows."""
  if not is_rows(factor, batch_spec):
    return factor.batch_shape
  k = entry_size(batch_spec[0])
  return (-(-factor.count // k) * k,)


def to_layout(x: jax.Array, batch_shape, layout_batch, fill=0,
              xp=jnp) -> jax.Array:
  """``[*batch_shape, ...]`` in the layout ``layout_batch`` (see `is_rows`).

  Rows are the batch axes flattened, then rows of ``fill`` up to
  ``layout_batch[0]``. ``xp``: `jax.numpy`, or `numpy` for a host array.
  """
  if tuple(layout_batch) == tuple(batch_shape):
    return x
  rows = x.reshape((-1,) + x.shape[len(batch_shape):])
  return xp.pad(rows, [(0, layout_batch[0] - rows.shape[0])]
                 + [(0, 0)] * (rows.ndim - 1), constant_values=fill)


def from_layout(x: jax.Array, batch_shape, layout_batch) -> jax.Array:
  """Inverse of `to_layout`: the first rows, in ``batch_shape``."""
  if tuple(layout_batch) == tuple(batch_shape):
    return x
  rows = x[:math.prod(batch_shape)]
  return rows.reshape(tuple(batch_shape) + x.shape[len(layout_batch):])


def cut_spec(plan, factor, batch_spec) -> tuple[AxisEntry, ...]:
  """The split of a family ``[units, *shape]`` that its piece is cut from.

  Cutting blocks (`_blocks.blocks_of`) and assembling them reshape, slice
  and concatenate the family's axes. XLA's SPMD partitioner handles such an
  op on a split axis only when the split falls on whole blocks; given one
  whose split straddles them it may replicate the array, or crash the
  process (a segfault in its windowed resharding of a reshape, e.g. a
  ``[48, 40]`` kernel split by rows on 8 devices, block 16). So the family
  is first pinned to this split, which keeps an axis split only where the
  piece's factor splits its block grid likewise and the piece spans the
  axis in whole blocks (or is cut at its shards): every reshape is then
  local, and every change of split a same-shape reshard (an all-to-all or
  a gather). A factor stored as padded rows keeps nothing split.
  """
  fam = plan.families[factor.family]
  if is_rows(factor, batch_spec):
    return (None,) * (1 + len(fam.shape))
  piece = fam.pieces[factor.piece]
  dims = []
  for entry, grid, block, dim, cuts in zip(batch_spec[1:], piece.grid,
                                           piece.block, fam.shape, piece.cuts):
    spans = (cuts == 1 and grid * block == dim) or (
        cuts % entry_size(entry) == 0)
    dims.append(entry if entry is not None and spans else None)
  return (batch_spec[0], *dims)


def rows_route(plan, family: int, specs, family_specs) -> AxisEntry:
  """The mesh axes over which a split family is moved into its rows, or None.

  A family split like its parameters (FSDP) along a dim that its blocks
  straddle, and stored as padded rows (step 3), would be gathered whole by
  XLA to be cut into rows. When the family is one piece of whole blocks and
  its units times its first grid axis divide by the rows' split ``k`` (and
  so does its last axis), all-to-alls reach the rows instead (`to_rows`).
  """
  if family_specs is None or not any(family_specs[family][1:]):
    return None
  fam = plan.families[family]
  if len(fam.pieces) != 1:
    return None
  piece = fam.pieces[0]
  index, factor = plan.factors_of(family)[0]
  if not is_rows(factor, specs[index]) or any(
      g * b != d for g, b, d in zip(piece.grid, piece.block, fam.shape)):
    return None
  entry = specs[index][0]
  k = entry_size(entry)
  if (fam.units * piece.grid[0]) % k or fam.shape[-1] % k:
    return None
  return entry


def _merged_piece(piece):
  """The piece on ``[units * grid[0], block[0], ...]``: one block row."""
  return dataclasses.replace(piece, grid=(1,) + piece.grid[1:])


def to_rows(stacked: jax.Array, piece, entry: AxisEntry) -> jax.Array:
  """The rows ``[count, *block]`` of a family on `rows_route` ``entry``.

  First the split moves to the family's last axis, then to the first axis
  of its view ``[units * grid[0], block[0], *shape[1:]]`` (two all-to-alls);
  that view's blocks are then each device's own rows, in row order.
  """
  n = stacked.shape[0]
  last = (None,) * (stacked.ndim - 1) + (entry,)
  x = pin(stacked, last)
  # The reshape is pinned to the last-axis split, where it is local: pinned
  # to the first axis only, the partitioner would need the split over units
  # and block rows at once for it, and gather the family instead.
  x = pin(x.reshape((n * piece.grid[0], piece.block[0]) + x.shape[2:]), last)
  x = pin(x, (entry,))
  return _blocks.blocks_of(x, _merged_piece(piece)).reshape(
      (-1,) + piece.block)


def from_rows(rows: jax.Array, piece, shape, entry: AxisEntry) -> jax.Array:
  """Inverse of `to_rows`: the family ``[units, *shape]`` from its rows."""
  merged = _merged_piece(piece)
  x = rows.reshape((-1,) + merged.grid + piece.block)
  x = pin(_blocks.assemble([x], [merged]), (entry,))
  x = x.reshape((-1,) + tuple(shape))
  return pin(x, (None,) * (x.ndim - 1) + (entry,))


def valid_rows(factor, layout_batch) -> jax.Array:
  """True on the factor's own rows, False on padding rows."""
  count = math.prod(layout_batch)
  return (jnp.arange(count) < factor.count).reshape(layout_batch)


def family_spec(plan, family: int, leaf_specs) -> tuple[AxisEntry, ...]:
  """The split of a family's ``[units, *shape]`` arrays, from its leaves'.

  A family axis follows its leaves' split when every member splits it
  alike: the units axis as the (first) layer axis, a merged axis as its
  major leaf axis (the minor ones whole). Otherwise it is whole.
  """
  fam = plan.families[family]
  per_member = []
  for m in fam.members:
    spec = leaf_specs[m.leaf]
    layer = [spec[a] for a in m.layer_axes]
    units = layer[0] if layer and not any(layer[1:]) else None
    axes = [spec[a[0]] if a and not any(spec[b] for b in a[1:]) else None
            for a in m.merged_from]
    if not fam.preconditioned:  # Unmerged: the unit axes themselves.
      axes = [spec[a] for a in range(len(spec)) if a not in m.layer_axes]
    per_member.append((units if len(fam.members) == 1 else None, *axes))
  first = per_member[0]
  return tuple(e if all(p[i] == e for p in per_member) else None
               for i, e in enumerate(first))


def update_specs(plan, stats, leaves, shard_axes):
  """The factors' and the families' splits, when an update is traced.

  Under explicit sharding the factors' split chosen at init is read from the
  state's types, and the families' from their leaves'. Otherwise the
  parameters' split is not visible: the factors split over ``shard_axes``
  alone and the families are not pinned (``None``).
  """
  leaf_specs = [leaf_spec(x) for x in leaves]
  _check_leaf_axes(leaf_specs, jax.sharding.get_abstract_mesh())
  if not explicit_axes_in_context():
    return factor_batch_specs(plan, [(None,) * x.ndim for x in leaves],
                              shard_axes), None
  specs = [leaf_spec(s)[:s.ndim - 2] for s in stats]
  return specs, [family_spec(plan, f, leaf_specs)
                 for f in range(len(plan.families))]


def family_pins(family_specs, alike) -> Callable[[jax.Array, int], jax.Array]:
  """``pin(x, family)``: pins a ``[units, *shape]`` array of a family.

  Under explicit sharding to the family's split (`family_spec`, like its
  leaves). Otherwise the leaves' split is not visible while tracing, but the
  per-family state's is set by the caller (``in_shardings``): ``x`` is then
  split alike ``alike[family]`` (`shard_alike`; ``alike`` is e.g. the
  momentum, ``None`` to leave ``x`` to the partitioner). Pinned so, only the
  preconditioned blocks move: a data-parallel update is gathered once.
  """
  if family_specs is not None:
    return lambda x, f: pin(x, family_specs[f])
  if alike is None or not jax.sharding.get_abstract_mesh().axis_names:
    return lambda x, f: x
  return lambda x, f: shard_alike(x, alike[f])[0]


def units_whole(family_specs, num_families: int) -> list[int]:
  """The families whose units axis is whole (all when they are unpinned).

  Their members may be sliced at offsets hidden from XLA
  (`_blocks.Plan.member_starts`); such a slice of a split axis would gather.
  """
  return [f for f in range(num_families)
          if family_specs is None or family_specs[f][0] is None]


def pin(x: jax.Array, spec: Sequence[AxisEntry]) -> jax.Array:
  """Pins ``x`` to ``spec`` inside the update, whole axes included.

  A no-op without a mesh (one device).
  """
  if not jax.sharding.get_abstract_mesh().axis_names:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def is_sharded(batch_specs) -> bool:
  return any(e is not None for spec in batch_specs for e in spec)


def constrain(x: jax.Array, batch_spec: Sequence[AxisEntry]) -> jax.Array:
  """Pins ``x``'s leading axes to ``batch_spec`` (a no-op when all None).

  Called inside the update (all mesh axes auto) or in ``init``.
  """
  if all(e is None for e in batch_spec):
    return x
  spec = PartitionSpec(*batch_spec)
  mesh = jax.sharding.get_abstract_mesh()
  if set(mesh.explicit_axes) & {a for e in batch_spec for a in names_of(e)}:
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def map_blocks(fn: Callable[..., Any], batch_specs, sharded_args, replicated,
               num_outputs: int):
  """``fn(sharded_args, replicated)`` on each device's blocks.

  ``sharded_args`` is a tuple of lists whose ``i``-th arrays have their batch
  axes split as ``batch_specs[i]``; ``fn`` must treat batch rows
  independently and return ``num_outputs`` such lists. With any split it
  runs under `jax.shard_map`, so each device computes only its own rows;
  otherwise it is ``fn`` itself. ``replicated`` is passed whole.
  """
  if not is_sharded(batch_specs):
    return fn(sharded_args, replicated)
  specs = [PartitionSpec(*b) for b in batch_specs]
  used = {a for b in batch_specs for e in b for a in names_of(e)}
  return jax.shard_map(
      fn, mesh=jax.sharding.get_abstract_mesh(),
      in_specs=((specs,) * len(sharded_args),
                jax.tree.map(lambda _: PartitionSpec(), replicated)),
      out_specs=(specs,) * num_outputs,
      axis_names=frozenset(used),
      # Rows are independent; loops start from unsharded constants (e.g.
      # Newton's carry), so nothing varies across devices unexpectedly.
      check_vma=False,
  )(sharded_args, replicated)


def _varying(x) -> frozenset:
  """The `jax.shard_map` axes over which ``x`` varies (its type says)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  return frozenset(manual.varying if manual is not None
                   else getattr(aval, "vma", ()))


def vary_like(tree, leaves):
  """``tree``'s arrays varying over every axis some leaf varies over.

  Inside a `jax.shard_map` (each device its own optimizer) values computed
  from the parameters vary over its axes; constants do not. A state built
  from constants is made to vary alike, so that the update returns the types
  it was given. Elsewhere it returns ``tree`` as it is.
  """
  axes = set().union(*(_varying(x) for x in leaves))
  if not axes:
    return tree

  def vary(x):
    missing = tuple(sorted(axes - _varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(vary, tree)


def explicit_axes_in_context() -> tuple[str, ...]:
  """The ``Explicit`` axes of the mesh set by `jax.set_mesh` (may be empty)."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(mesh.explicit_axes) if mesh.axis_names else ()


def spec_of(x) -> PartitionSpec:
  return jax.typeof(x).sharding.spec


def in_auto_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Runs ``fn(updates, state, *args)`` with the explicit axes made auto.

  Under explicit sharding, cutting a sharded parameter into blocks may be
  ambiguous (JAX then raises); inside `jax.sharding.auto_axes` the SPMD
  partitioner chooses instead, guided by `constrain`. The outputs
  ``(updates, state)`` get back the inputs' shardings, so the types are the
  same before and after ``update`` and each update has its gradient's
  sharding. Every traced value ``fn`` reads must be an argument (closed-over
  tracers would keep their explicit types). Without explicit axes in the
  context, ``fn`` is called directly.
  """

  def wrapped(updates, state, *args):
    axes = explicit_axes_in_context()
    if not axes:
      return fn(updates, state, *args)
    specs = (jax.tree.map(spec_of, updates), jax.tree.map(spec_of, state))
    return jax.sharding.auto_axes(fn, axes=axes, out_sharding=specs)(
        updates, state, *args)

  return wrapped
