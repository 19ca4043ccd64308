# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
r"""The stages every Kronecker-factored preconditioner shares.

A gradient's path through a preconditioner (Shampoo, SOAP, ...):

1. **leaves -> units -> families** (`plan_of`, `gradients`): the static plan
   (`_blocks`) cuts each leaf into units (its stacked layers) and stacks the
   units of equal shape from every leaf into one float32 array per family,
   pinned to the family's split (`_sharding.family_pins`); the step is
   checked for NaN/Inf (`all_finite`).
2. **families -> blocks** (`gradient_blocks`): each family's pieces are cut
   into blocks ``[n, *grid, *block]``, laid out and split as their factors.
3. **blocks -> statistics** (`update_statistics`): per factor,
   :math:`S \leftarrow \beta S + (1 - \beta) G_{(i)} G_{(i)}^\top`.
4. **statistics -> roots or bases**: the preconditioner's own math, on each
   device's rows (`_sharding.map_blocks`), a bounded batch at a time
   (`in_batches`).
5. **preconditioned blocks -> families** (`multiplied`, `families_of`).
6. **families -> leaves** (`to_leaves`): the directions (zero on a skipped
   step) and the per-leaf state back in each leaf's shape and dtype.

Per-parameter state (momentum, accumulators) is stored per leaf, shaped and
split as its parameter (`leaf_zeros`), and stacked like the gradients when
used (`stacked_state`).

Around them: the update shell (`make_update`: state check, splits, explicit
sharding), the kept state of a skipped step (`kept_where`), counters
(`count_true`), the init helpers (`factor_placement`, `leaf_zeros`,
`per_factor`), the state checks (`check_layout`, `check_per_leaf`,
`check_dtypes`), the per-leaf options (`resolve_layer_axes`,
`resolve_precondition`) and the optax alias with weight decay
(`with_weight_decay`). A preconditioner module holds only its math and its
transform, and calls these.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shampoo_optax import _blocks
from shampoo_optax import _grafting
from shampoo_optax import _sharding
from shampoo_optax import _symmetric

HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = "abcdefghijklmnopqrstuvw"

# Rows of matrices computed at once (roots, bases): unpacked, a batch of them
# takes at most this many bytes (a few such temporaries live meanwhile).
BATCH_BYTES = 32 * 2**20


# ---------------------------------------------------------------------------
# The plan of a tree.


def as_leaves(tree, what: str, transform: str):
  """Flattens ``tree``; Python and NumPy scalars become arrays."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = []
  for path, leaf in with_paths:
    if not hasattr(leaf, "dtype"):
      leaf = jnp.asarray(leaf)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
          f"{transform}: {what} {jax.tree_util.keystr(path)} has dtype"
          f" {leaf.dtype}; it needs real floating-point {what}s"
          " (float32, bfloat16, float16, float64). Exclude it with"
          " optax.masked or optax.partition.")
    leaves.append(leaf)
  return [p for p, _ in with_paths], leaves, treedef


def _is_axes(x) -> bool:
  """A ``layer_axes`` entry: None, an int or a tuple of ints."""
  return x is None or isinstance(x, (int, np.integer)) or (
      isinstance(x, tuple) and all(isinstance(a, (int, np.integer))
                                   for a in x))


@dataclasses.dataclass(frozen=True)
class _Repeated:
  """An entry of a prefix and how many leaves it covers (not a pytree)."""

  entry: Any
  count: int


def _per_leaf(option: str, value, tree, is_entry, accepted: str) -> list:
  """``value`` (or what it returns for ``tree``), a prefix of ``tree``, as
  one entry per leaf: an entry applies to every leaf below it. The leaves
  optax masks out (``optax.masked``, ``optax.partition``) take nothing."""
  spec = value(tree) if callable(value) else value
  try:
    # Each entry's leaves in an object that is not a pytree node (a list
    # would be confused with the params' own lists).
    groups = jax.tree.leaves(jax.tree.map(
        lambda entry, sub: _Repeated(entry, len(jax.tree.leaves(sub))),
        spec, tree, is_leaf=is_entry))
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{option} must be {accepted}, a pytree prefix of the params with"
        " such entries, or a callable of the params returning one; got"
        f" {spec!r} ({e}).") from None
  return [g.entry for g in groups for _ in range(g.count)]


def resolve_layer_axes(layer_axes, tree, paths, leaves):
  """``layer_axes`` as one sorted tuple of non-negative axes per leaf.

  ``layer_axes`` (or what it returns for ``tree``) is a prefix of ``tree``
  (`_per_leaf`), so ``0`` stacks every leaf on its first axis and
  ``{"layers": 0, "embed": None}`` a whole subtree.
  """
  if layer_axes is None:
    return ((),) * len(leaves)
  per_leaf = _per_leaf("layer_axes", layer_axes, tree, _is_axes,
                       "None, an int, a tuple of ints")
  resolved = []
  for path, leaf, axes in zip(paths, leaves, per_leaf):
    axes = () if axes is None else (axes,) if isinstance(
        axes, (int, np.integer)) else axes
    name = jax.tree_util.keystr(path)
    if not isinstance(axes, (tuple, list)) or not all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool)
        and -leaf.ndim <= a < leaf.ndim for a in axes):
      raise ValueError(
          f"layer_axes of {name} (shape {tuple(leaf.shape)}) must be None, an"
          f" int or a tuple of ints in [-{leaf.ndim}, {leaf.ndim}), got"
          f" {axes!r}.")
    axes = tuple(sorted(int(a) % leaf.ndim for a in axes))
    if len(set(axes)) != len(axes):
      raise ValueError(f"layer_axes of {name} repeats an axis: {axes!r}.")
    resolved.append(axes)
  return tuple(resolved)


def resolve_precondition(precondition, tree, paths) -> tuple[bool, ...] | None:
  """``precondition`` as one bool per leaf (``None``: every leaf may get
  matrices); a prefix of ``tree`` or a callable, like an optax mask."""
  if precondition is None:
    return None
  per_leaf = _per_leaf(
      "precondition", precondition, tree,
      lambda x: isinstance(x, (bool, np.bool_)), "None, a bool")
  for path, entry in zip(paths, per_leaf):
    if not isinstance(entry, (bool, np.bool_)):
      raise ValueError(
          f"precondition of {jax.tree_util.keystr(path)} must be a bool,"
          f" got {entry!r}.")
  return tuple(bool(e) for e in per_leaf)


def plan_of(tree, *, transform: str, layer_axes, block_size: int,
            max_precondition_dim: int, exponent_override=None,
            cut_at_shards: bool = False, precondition=None):
  """The plan of a tree of updates or params, and its flattened leaves.

  Returns ``(plan, paths, leaves, treedef)``.
  """
  paths, leaves, treedef = as_leaves(tree, "update", transform)
  axes = resolve_layer_axes(layer_axes, tree, paths, leaves)
  plan = _blocks.make_plan(
      tuple(tuple(x.shape) for x in leaves), axes, block_size,
      max_precondition_dim, exponent_override,
      _sharding.shard_counts(leaves) if cut_at_shards else None,
      resolve_precondition(precondition, tree, paths))
  return plan, paths, leaves, treedef


# ---------------------------------------------------------------------------
# The update shell.


def make_init(plan_for, build):
  """A transform's ``init``: ``build(plan, leaves, treedef)`` for the params.

  The state varies over the axes the parameters vary over (inside a
  `jax.shard_map`, see `_sharding.vary_like`).
  """

  def init_fn(params):
    plan, _, leaves, treedef = plan_for(params)
    return _sharding.vary_like(build(plan, leaves, treedef), leaves)

  return init_fn


class Layout(NamedTuple):
  """The static plan, and the splits read when the update is traced.

  Attributes:
    plan: the `_blocks.Plan`.
    specs: per factor, the split of its batch axes (`_sharding`).
    family_specs: per family, the split of its ``[units, *shape]`` arrays;
      ``None`` where the parameters' splits are not visible (``Auto`` axes).
    treedef: the structure of the updates (and of per-leaf state).
  """

  plan: _blocks.Plan
  specs: list
  family_specs: list | None
  treedef: jax.tree_util.PyTreeDef


def make_update(transform: str, state_type, plan_for, check_state,
                update_core, shard_axes, floats):
  """A transform's ``update`` around its arithmetic ``update_core``.

  Checks the state's type, builds the plan of the updates and reads the
  splits (`Layout`), checks the state against them (``check_state(layout,
  paths, leaves, state)``) and runs ``update_core(leaves, state, floats,
  layout)`` under `_sharding.in_auto_mode`. The float options are
  arguments, not closed over: under explicit sharding they must cross into
  ``in_auto_mode`` like every traced value.
  """

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, state_type):
      raise TypeError(
          f"{transform}: expected the {state_type.__name__} made by this"
          f" transformation's init, got {type(state).__name__}.")
    plan, paths, leaves, treedef = plan_for(updates)
    if not leaves:  # Nothing to precondition (see `per_factor`).
      return updates, state._replace(count=optax.safe_increment(state.count))
    layout = Layout(plan, *_sharding.update_specs(plan, state.stats, leaves,
                                                  shard_axes), treedef)
    check_state(layout, paths, leaves, state)
    core = functools.partial(update_core, layout=layout)
    new_leaves, new_state = _sharding.in_auto_mode(core)(leaves, state, floats)
    return jax.tree.unflatten(treedef, new_leaves), new_state

  return update_fn


class Gradients(NamedTuple):
  """A step's gradients, as every preconditioner starts from them.

  Attributes:
    stacked: float32 ``[units, *shape]`` per family, pinned to its split.
    blocks: ``{(family, piece): blocks}`` of every preconditioned family,
      laid out and split as the piece's factors (`gradient_blocks`).
    finite: whether the step is finite (a constant True without the check).
    pin: ``pin(x, family)`` pins a family's ``[units, *shape]`` array.
  """

  stacked: list[jax.Array]
  blocks: dict
  finite: jax.Array
  pin: Callable[[jax.Array, int], jax.Array]


def gradients(layout: Layout, leaves, alike, skip_nonfinite: bool
              ) -> Gradients:
  """Stacks, checks and cuts the gradients (stages 1 and 2).

  ``alike``: a per-family array (one ``[units, *shape]`` per family, e.g.
  the stacked momentum) whose split the stacked families follow where
  theirs is not visible.
  """
  plan = layout.plan
  pin = _sharding.family_pins(layout.family_specs, alike)
  stacked = [pin(plan.stack([g.astype(jnp.float32) for g in leaves], f), f)
             for f in range(len(plan.families))]
  finite = all_finite(stacked) if skip_nonfinite else jnp.array(True)
  # Non-finite values reach only results that are discarded (`kept_where`).
  return Gradients(stacked, gradient_blocks(layout, stacked), finite, pin)


def all_finite(stacked) -> jax.Array:
  """Whether every gradient is finite and its squares do not overflow."""
  # A finite sum of squares bounds every entry of G G^T and of g^2, so the
  # statistics and accumulators cannot overflow either. The sqrt changes no
  # answer; XLA deems it expensive and computes it once, where it would copy
  # a chain of cheap scalar adds into every fusion that selects on it.
  total = sum((jnp.sum(jnp.square(x)) for x in stacked),
              jnp.zeros([], jnp.float32))
  return jnp.isfinite(jnp.sqrt(total))


def to_leaves(layout: Layout, grads: Gradients, count, directions, leaves,
              *states):
  """Per-family arrays back to the parameters' leaves (stage 6).

  Returns the updates, from one direction per family (zero on a skipped
  step), in the shapes and dtypes of ``leaves``; and for each of
  ``states``, a pair ``(families, like)`` of a per-leaf state (one array or
  None per family; one array or None per leaf, whose shape and dtype the
  result takes), its new list of leaves (``None`` when ``like`` is).
  ``count`` (any int32 computed at run time) hides the members' offsets
  from XLA (`_blocks.Plan.member_starts`).
  """
  plan = layout.plan
  outputs = [([jnp.where(grads.finite, d, 0.0) for d in directions], leaves)]
  outputs += [state for state in states if state[1] is not None]
  # The per-leaf work is only this: a slice of each family, cast. The
  # barrier makes XLA compute the families once instead of copying their
  # whole elementwise expression into every leaf's slice (compile time).
  flat = iter(jax.lax.optimization_barrier(
      [None if x is None else grads.pin(x, f) for families, _ in outputs
       for f, x in enumerate(families)]))
  starts = plan.member_starts(count, _sharding.units_whole(
      layout.family_specs, len(plan.families)))
  out = iter([None if x is None else x.astype(g.dtype) for x, g in zip(
      plan.unstack_tree([next(flat) for _ in plan.families], starts), like)]
             for _, like in outputs)
  updates = next(out)
  return updates, [None if like is None else next(out) for _, like in states]


# ---------------------------------------------------------------------------
# Per-leaf state: arrays shaped and split as the parameters.


def leaf_zeros(leaves, dtype) -> list[jax.Array]:
  """Zeros shaped and split as each leaf, in ``dtype`` (``None``: the leaf's).
  """
  return [_sharding.constrain(jnp.zeros(x.shape, dtype or x.dtype),
                              _sharding.leaf_spec(x)) for x in leaves]


def leaves_of(layout: Layout, tree) -> list[jax.Array] | None:
  """A per-leaf state's leaves, in the updates' order (``None`` stays)."""
  return None if tree is None else layout.treedef.flatten_up_to(tree)


def tree_of(layout: Layout, leaves) -> Any:
  """Inverse of `leaves_of`."""
  return None if leaves is None else layout.treedef.unflatten(leaves)


def stacked_state(layout: Layout, leaves) -> list[jax.Array] | None:
  """Per-leaf arrays as one float32 ``[units, *shape]`` array per family.

  ``None`` stays ``None``, and so does a family whose leaves are None.
  """
  if leaves is None:
    return None
  return [None if leaves[fam.members[0].leaf] is None else layout.plan.stack(
      [x if x is None else x.astype(jnp.float32) for x in leaves], f)
          for f, fam in enumerate(layout.plan.families)]


def per_factor(plan, arrays):
  """A per-factor field of the state: the tuple of ``arrays``.

  A tree without leaves (e.g. optax's placeholder in ``tree_map_params``)
  gets a zero-size array instead: a leaf, so that the state made for it is
  a prefix of every state, as ``tree_map_params`` needs.
  """
  if not plan.shapes:
    return jnp.zeros([0], jnp.float32)
  return tuple(arrays)


# ---------------------------------------------------------------------------
# Blocks and statistics.


def gradient_blocks(layout: Layout, stacked) -> dict:
  """``{(family, piece): blocks}`` of every preconditioned family.

  Each piece's blocks ``[n, *grid, *block]`` are laid out as its factors
  (`_sharding.to_layout`: padded rows where they are stored so) and pinned
  to their split. A family is cut from its `_sharding.cut_spec` split (or
  moved into its rows by all-to-alls, `_sharding.rows_route`).
  """
  plan, specs = layout.plan, layout.specs
  out = {}
  for index, factor in enumerate(plan.factors):
    key = (factor.family, factor.piece)
    if key in out:
      continue
    piece = plan.families[factor.family].pieces[factor.piece]
    route = _sharding.rows_route(plan, factor.family, specs,
                                 layout.family_specs)
    if route is None:
      whole = _sharding.pin(stacked[factor.family],
                            _sharding.cut_spec(plan, factor, specs[index]))
      blocks = _sharding.to_layout(
          _blocks.blocks_of(whole, piece), factor.batch_shape,
          _sharding.layout_batch_shape(factor, specs[index]))
    else:
      blocks = _sharding.to_rows(stacked[factor.family], piece, route)
    out[key] = _sharding.constrain(blocks, specs[index])
  return out


def families_of(layout: Layout, blocks) -> dict:
  """Inverse of `gradient_blocks`: ``{family: [units, *shape]}``."""
  plan, specs = layout.plan, layout.specs
  out = {}
  for f, fam in enumerate(plan.families):
    if not fam.preconditioned:
      continue
    route = _sharding.rows_route(plan, f, specs, layout.family_specs)
    if route is not None:
      out[f] = _sharding.from_rows(blocks[(f, 0)], fam.pieces[0], fam.shape,
                                   route)
      continue
    pieces = []
    for p in range(len(fam.pieces)):
      index, factor = plan.factors_of(f, p)[0]
      x = blocks[(f, p)]
      if _sharding.is_rows(factor, specs[index]):
        x = _sharding.pin(x, (None,) * x.ndim)
      x = _sharding.from_layout(
          x, factor.batch_shape,
          _sharding.layout_batch_shape(factor, specs[index]))
      cut = _sharding.cut_spec(plan, factor, specs[index])
      pieces.append(_sharding.pin(x, cut + (None,) * len(fam.shape)))
    out[f] = _blocks.assemble(pieces, fam.pieces)
  return out


def _gram(block: jax.Array, axis: int, nbatch: int) -> jax.Array:
  """Packed ``G_(axis) G_(axis)^T`` of every block ``[*batch, *block]``."""
  x = jnp.moveaxis(block, nbatch + axis, nbatch)
  x = x.reshape(x.shape[:nbatch + 1] + (math.prod(x.shape[nbatch + 1:]),))
  return _symmetric.packed_gram(x, precision=HIGHEST)


def update_statistics(layout: Layout, blocks, stats, update_now, b2
                      ) -> list[jax.Array]:
  """``S <- b2 S + (1 - b2) G G^T`` for every factor, where ``update_now``."""
  plan, specs = layout.plan, layout.specs

  def contributions(blocks):
    return [
        _sharding.constrain(
            _gram(blocks[(f.family, f.piece)], f.axis, len(spec)), spec)
        for f, spec in zip(plan.factors, specs)
    ]

  # The cond yields zeros when not updating and the selection happens
  # outside: a cond branch that passes a large operand through is a slow
  # copy on CPU, an elementwise select is not.
  grams = jax.lax.cond(update_now, contributions,
                       lambda _: [jnp.zeros_like(s) for s in stats], blocks)
  return [jnp.where(update_now, _grafting.ema(old, new, b2), old)
          for old, new in zip(stats, grams)]


def mode_product(block: jax.Array, matrix: jax.Array, axis: int,
                 nbatch: int) -> jax.Array:
  """Axis ``axis`` of every block ``[*batch, *block]`` times ``matrix``.

  ``matrix`` ``[*batch, d, d]``: ``y[.., i, ..] = sum_j matrix[i, j] x[.., j,
  ..]``.
  """
  batch = _LETTERS[:nbatch]
  dims = _LETTERS[nbatch:block.ndim]
  out = dims.replace(dims[axis], "z")
  return jnp.einsum(f"{batch}z{dims[axis]},{batch}{dims}->{batch}{out}",
                    matrix, block, precision=HIGHEST)


def multiplied(layout: Layout, key, block, matrices) -> jax.Array:
  """Axis ``i`` of every block of piece ``key`` times ``matrices(index)``.

  ``block`` is laid out as the piece's factors, ``index`` runs over them.
  """
  for index, factor in layout.plan.factors_of(*key):
    spec = layout.specs[index]
    block = _sharding.constrain(
        mode_product(block, matrices(index), factor.axis, len(spec)), spec)
  return block


def width_scale(family, base_width) -> float:
  """``base_width / width`` of a preconditioned family's units.

  A unit's width is the square root of its number of entries: the geometric
  mean of its fan-in and fan-out, ``d`` for a ``d x d`` matrix, ``2d`` for a
  ``[d, 4d]`` MLP kernel, ``d`` for Flax's ``[d, heads, head_dim]``
  attention kernels however their axes are split (stacked layers' axes are
  not part of a unit).
  """
  return base_width / math.sqrt(math.prod(family.shape))


def width_normalized(layout: Layout, key, block, base_width) -> jax.Array:
  r"""Every block of piece ``key`` at RMS ``base_width / width``.

  .. math:: D_b \leftarrow \frac{b}{n} \frac{D_b}{\mathrm{rms}(D_b)}

  per block :math:`D_b` (zero stays zero), with :math:`b` = ``base_width``
  and :math:`n` the unit's width (`width_scale`). Hidden weights then move
  by ``1 / width`` per entry, as muP prescribes for Adam-like updates
  (arXiv 2310.17813), enforced per block as arXiv 2512.05620 finds
  necessary for Shampoo and SOAP to keep their best learning rate as width
  grows (their explicit normalization; a block's shape does not grow with
  width, so its RMS fixes its spectral norm up to a constant).
  """
  nbatch = len(layout.specs[layout.plan.factors_of(*key)[0][0]])
  rms = jnp.sqrt(jnp.mean(jnp.square(block), axis=tuple(
      range(nbatch, block.ndim)), keepdims=True))
  scale = width_scale(layout.plan.families[key[0]], base_width)
  return block * jnp.where(rms > 0, scale / jnp.where(rms > 0, rms, 1.0),
                           0.0)


# ---------------------------------------------------------------------------
# Rows: the batch of matrices a device computes on.


def rows(array: jax.Array, nbatch: int) -> jax.Array:
  """``array`` with its ``nbatch`` leading axes flattened into one."""
  batch = array.shape[:nbatch]
  return array.reshape((math.prod(batch),) + array.shape[nbatch:])


def in_batches(fn, *arrays, row_bytes: int):
  """``fn(*arrays)`` computed on batches of rows, one after the other.

  ``fn`` maps arrays ``[m, ...]`` to a pytree of arrays ``[m, ...]``, each
  row on its own; it is called on at most ``BATCH_BYTES // row_bytes`` rows
  at a time, so that what it unpacks is not held for all rows at once.
  """
  size = max(1, BATCH_BYTES // row_bytes)
  count = arrays[0].shape[0]
  if count <= size:
    return fn(*arrays)
  full_batches, rest = divmod(count, size)
  full = full_batches * size
  out = jax.lax.map(lambda xs: fn(*xs), tuple(
      x[:full].reshape((full_batches, size) + x.shape[1:]) for x in arrays))
  out = jax.tree.map(lambda x: x.reshape((full,) + x.shape[2:]), out)
  if not rest:
    return out
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out,
                      fn(*(x[full:] for x in arrays)))


# ---------------------------------------------------------------------------
# The state of a skipped step, and counters.


def kept_where(finite, new, old) -> tuple[jax.Array, ...]:
  """``new`` where ``finite``, else ``old``, in ``old``'s dtypes."""
  return tuple(jnp.where(finite, n, o).astype(o.dtype)
               for n, o in zip(new, old))


def count_true(masks) -> jax.Array:
  """The number of true entries over a list of boolean arrays, int32."""
  return sum((jnp.sum(m, dtype=jnp.int32) for m in masks),
             jnp.zeros([], jnp.int32))


# ---------------------------------------------------------------------------
# Init and the state's checks.


def factor_placement(plan, leaves, shard_axes):
  """For ``init``: per-factor arrays ``[*batch, ...]`` laid out and split.

  Returns ``place(arrays, indices=None, fill=0)``: one array per factor of
  ``indices`` (default all; each in the factor's own batch shape) in the
  factor's layout (padding rows are ``fill``), pinned to its split
  (`_sharding.factor_batch_specs`).
  """
  specs = _sharding.factor_batch_specs(
      plan, [_sharding.leaf_spec(x) for x in leaves], shard_axes)

  def place(arrays, indices=None, fill=0):
    factors = enumerate(plan.factors) if indices is None else (
        (i, plan.factors[i]) for i in indices)
    return tuple(
        _sharding.constrain(_sharding.to_layout(
            x, f.batch_shape, _sharding.layout_batch_shape(f, specs[i]),
            fill), specs[i])
        for x, (i, f) in zip(arrays, factors))

  return place


def check_layout(transform: str, layout: Layout, stats) -> None:
  """Raises unless the statistics have the shapes the plan and split need."""
  expected = [_sharding.layout_batch_shape(f, spec)
              + f.shape[len(f.batch_shape):]
              for f, spec in zip(layout.plan.factors, layout.specs)]
  got = [tuple(s.shape) for s in stats]
  if got == expected:
    return
  if got == [f.shape for f in layout.plan.factors]:
    raise ValueError(
        f"{transform}: the state is in the checkpoint layout (unpadded), but"
        " on this mesh some statistics are stored as padded rows"
        f" ({expected}). After restoring a checkpoint call"
        " shampoo_optax.pad_state(tx, params, state, mesh).")
  raise ValueError(
      f"{transform}: the state's statistics have shapes {got}, but these"
      f" options, updates and mesh need {expected}: the state was made with"
      " other options (block_size, max_precondition_dim, exponent_override,"
      " layer_axes, cut_at_shards), for other parameters or for another mesh"
      " (with cut_at_shards, parameters split into other shard counts). Call"
      " init with this transformation, or build it with the options the state"
      " was made with; a checkpoint moves between meshes with"
      " shampoo_optax.unpad_state and shampoo_optax.pad_state.")


def check_per_leaf(transform: str, layout: Layout, paths, leaves,
                   fields) -> None:
  """Raises unless each per-leaf field (or None) is shaped as the updates."""
  shapes = [tuple(x.shape) for x in leaves]
  for field in fields:
    if field is None:
      continue
    try:
      got = [tuple(x.shape) for x in layout.treedef.flatten_up_to(field)]
    except (ValueError, TypeError):
      got = None
    if got != shapes:
      raise ValueError(
          f"{transform}: the updates do not match the tree given to init:"
          f" the state holds {jax.tree.map(lambda x: tuple(x.shape), field)},"
          " the updates "
          f"{[(jax.tree_util.keystr(k), s) for k, s in zip(paths, shapes)]}."
          " Call init with these parameters.")


def check_dtypes(transform: str, fields) -> None:
  """Raises unless each ``(option, dtype, field)``'s arrays are ``dtype``.

  Same-shape options that only change a dtype (e.g. ``mu_dtype``) are told
  apart by the state's dtypes; ``dtype=None`` (follow the parameters) is
  not checked.
  """
  for option, dtype, field in fields:
    if dtype is None or field is None:
      continue
    got = sorted({str(x.dtype) for x in jax.tree.leaves(field)})
    if got and got != [str(jnp.dtype(dtype))]:
      raise ValueError(
          f"{transform}: the state was made with another {option}: its"
          f" arrays are {got}, this transformation has {option}="
          f"{jnp.dtype(dtype)}. Call init again with this transformation.")


# ---------------------------------------------------------------------------
# The optax alias.


def width_decay_scales(base_width, **plan_options):
  """Params -> per-leaf weight-decay factors: `width_scale` on matrices.

  ``plan_options``: those of `plan_of` that shape the families.
  """
  if base_width is None:
    return None

  def scales(params):
    plan, _, _, treedef = plan_of(params, **plan_options)
    return treedef.unflatten([
        width_scale(fam, base_width) if fam.preconditioned else 1.0
        for fam in (plan.families[f] for f in plan.family_of_leaf)])

  return scales


def _add_scaled_decay(weight_decay, scales,
                      mask) -> optax.GradientTransformation:
  """``u + weight_decay * scale * w`` where ``mask``; ``scale`` per leaf.

  Like ``optax.add_decayed_weights(weight_decay, mask)`` (``mask`` a tree
  of bools with the params' structure or a prefix of it, or a callable of
  the params), with the factors of ``scales(params)`` (computed on all the
  params, so that masked-out leaves do not change the plan).
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("weight decay needs the params: call"
                       " update(updates, state, params).")
    factors = scales(params)
    if mask is not None:
      where = mask(params) if callable(mask) else mask
      factors = jax.tree.map(
          lambda m, sub: jax.tree.map(lambda f: f if m else 0.0, sub),
          where, factors)
    return jax.tree.map(lambda u, f, w: u + weight_decay * f * w, updates,
                        factors, params), state

  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), update_fn)


def with_weight_decay(tx, learning_rate, weight_decay, mask,
                      skip_nonfinite: bool,
                      decay_scales=None) -> optax.GradientTransformation:
  r"""``w <- w - lr_t (D_t + weight_decay w)`` from ``tx``'s direction D.

  ``decay_scales``: a callable of the params returning a factor per leaf
  for ``weight_decay`` (`width_decay_scales`), or ``None``. With
  ``skip_nonfinite``, a step ``tx`` skipped (its state's
  ``diagnostics.nonfinite_steps`` moved) is a no-op for the whole chain: no
  weight decay, and the learning-rate schedule does not advance.
  """
  if decay_scales is None:
    decay = optax.add_decayed_weights(weight_decay, mask)
  else:
    decay = _add_scaled_decay(weight_decay, decay_scales, mask)
  chain = optax.chain(tx, decay, optax.scale_by_learning_rate(learning_rate))
  if not skip_nonfinite:
    return chain

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = chain.update(updates, state, params, **extra_args)
    skipped = (new_state[0].diagnostics.nonfinite_steps
               != state[0].diagnostics.nonfinite_steps)
    new_state = (new_state[0],) + tuple(jax.tree.map(
        lambda new, old: jnp.where(skipped, old, new), new_state[1:],
        state[1:]))
    new_updates = jax.tree.map(
        lambda u: jnp.where(skipped, jnp.zeros_like(u), u), new_updates)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)

