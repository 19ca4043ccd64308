# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The optimizer state as a whole on a mesh, for `jax.jit` and Orbax.

Its shardings (`state_shardings`), its abstract form (`abstract_state`), and
its checkpoint layout: the factors that `_sharding` stores as padded rows,
without their padding, so that what is saved does not depend on the mesh
(`unpad_state`, `pad_state`).
"""

import contextlib

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from shampoo_optax import _sharding

def _param_sharding(leaf, mesh) -> NamedSharding:
  """The sharding of a parameter (array, ShapeDtypeStruct, spec, sharding)."""
  if isinstance(leaf, PartitionSpec):
    return NamedSharding(mesh, leaf)
  if isinstance(leaf, NamedSharding):
    return NamedSharding(mesh, leaf.spec)
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding):
    return NamedSharding(mesh, sharding.spec)
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(tx, params, mesh, param_shardings=None):
  """The `NamedSharding` of every leaf of ``tx.init(params)`` on ``mesh``.

  Use it for ``out_shardings`` of ``jax.jit(tx.init)`` and of the train step
  (and its ``in_shardings``), and to build the abstract target of an Orbax
  restore. ``tx`` may be `shampoo_optax.shampoo`, `scale_by_shampoo` or any
  optax chain or wrapper containing them:

  * Shampoo factors ``[n, *grid, *packed]`` are split as `_sharding`
    says: following the parameters' shardings when ``mesh`` has
    explicit axes (on an ``Auto`` mesh the update cannot see them, so there
    only ``shard_axes`` split them), then over ``shard_axes``;
  * per-parameter state (grafting accumulators, momentum, and the state of
    other optax transforms built with ``zeros_like``) gets its parameter's
    sharding;
  * scalars (counts, diagnostics, schedule states) are replicated.

  It traces ``tx.init`` abstractly on an explicit-axes copy of ``mesh`` and
  reads every leaf's sharding from its type, so it agrees with what
  ``jax.jit(tx.init)(params)`` produces under `jax.set_mesh`.

  Args:
    tx: an ``optax.GradientTransformation``.
    params: the parameters, as arrays or `jax.ShapeDtypeStruct`s (only
      shapes, dtypes and, when ``param_shardings`` is ``None``, shardings are
      read).
    mesh: a `jax.sharding.Mesh` (any axis types) with the ``shard_axes``.
    param_shardings: a pytree like ``params`` of `NamedSharding` or
      `PartitionSpec` (each dim's axes must divide it evenly); ``None`` takes
      each parameter's own ``.sharding`` when it is a `NamedSharding`, else
      replicated.

  Returns:
    A pytree of `NamedSharding` with the structure of ``tx.init(params)``
    (``None`` fields stay ``None``).
  """
  return _traced_init(tx, params, mesh, param_shardings)[1]


def abstract_state(tx, params, mesh=None, param_shardings=None, *,
                   padded: bool = True):
  """``tx.init(params)`` as `jax.ShapeDtypeStruct`s with their shardings.

  With ``padded=False``, the checkpoint layout: the state as `unpad_state`
  gives it, whose shapes do not depend on the mesh. That is the target of
  a strict Orbax restore onto ``mesh`` (then `pad_state`), whatever the mesh
  the checkpoint was written on. Its factors that are padded rows in memory
  are split along their last axis the mesh axes divide, if any, so that
  saving and restoring do not gather them. Without a mesh it is
  ``jax.eval_shape(tx.init, params)``.

  Args:
    tx: an ``optax.GradientTransformation``.
    params: the parameters, as arrays or `jax.ShapeDtypeStruct`s.
    mesh: a `jax.sharding.Mesh`, or ``None``.
    param_shardings: as for `state_shardings`.
    padded: the layout in memory (``True``) or the checkpoint layout.

  Returns:
    A pytree of `jax.ShapeDtypeStruct` with the structure of
    ``tx.init(params)``.
  """
  with contextlib.nullcontext() if padded else _sharding.tracing("unpadded"):
    if mesh is None:
      return jax.eval_shape(tx.init, params)
    shapes, shardings = _traced_init(tx, params, mesh, param_shardings)
  if not padded:
    in_memory, memory_shardings = _traced_init(tx, params, mesh,
                                               param_shardings)
    shardings = jax.tree.map(
        lambda x, s, m, ms: s if x.shape == m.shape else NamedSharding(
            mesh, _split_last_divisible(x.shape, ms.spec[0], mesh)),
        shapes, shardings, in_memory, memory_shardings)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shardings)


def _split_last_divisible(shape, entry: _sharding.AxisEntry,
                          mesh) -> PartitionSpec:
  """``entry`` on the last axis of ``shape`` it divides (none: replicated)."""
  k = _sharding.entry_size(entry, mesh)
  for axis in reversed(range(len(shape))):
    if shape[axis] % k == 0:
      return PartitionSpec(*(None,) * axis, entry)
  return PartitionSpec()


def _conform(x: jax.Array, shape) -> jax.Array:
  """``x`` moved between a factor's own layout and its padded rows."""
  if tuple(x.shape) == tuple(shape):
    return x
  if x.ndim > len(shape):  # Into rows ``[rows, *rest]``.
    return _sharding.to_layout(x, x.shape[:x.ndim - len(shape) + 1], shape[:1])
  return _sharding.from_layout(x, shape[:len(shape) - x.ndim + 1], x.shape[:1])


def _relaid(state, target, source, mesh, what: str):
  """``state`` (whose shapes must be ``source``'s) in ``target``'s layout."""
  paths = jax.tree_util.tree_flatten_with_path(state)[0]
  flat_source = jax.tree.leaves(source)
  if len(paths) != len(flat_source):
    raise ValueError(
        f"{what}: the state has {len(paths)} arrays, but tx.init(params)"
        f" makes {len(flat_source)}: it is the state of another"
        " transformation or of other parameters.")
  for (path, x), s in zip(paths, flat_source):
    if tuple(x.shape) != tuple(s.shape):
      raise ValueError(
          f"{what}: state{jax.tree_util.keystr(path)} has shape"
          f" {tuple(x.shape)}, expected {tuple(s.shape)}: the state was made"
          " with other options, for other parameters, (unpad_state) for"
          " another mesh, or (pad_state) with cut_at_shards for parameters"
          " split into other shard counts.")
  shapes = [t.shape for t in jax.tree.leaves(target)]
  treedef = jax.tree.structure(state)

  def relay(state):
    return jax.tree.unflatten(treedef, [
        _conform(x, shape) for x, shape in zip(jax.tree.leaves(state), shapes)])

  if mesh is None:
    return jax.jit(relay)(state)
  # On Auto axes: a slice or pad of a split axis is not even, which explicit
  # sharding rejects; the partitioner moves the rows instead.
  auto_mesh = _all_axes(mesh, AxisType.Auto)
  auto = lambda s: NamedSharding(auto_mesh, s.spec)
  as_auto = lambda x: jax.device_put(x, auto(x.sharding)) if isinstance(
      getattr(x, "sharding", None), NamedSharding) else x
  with jax.set_mesh(auto_mesh):
    out = jax.jit(relay, out_shardings=jax.tree.map(
        lambda t: auto(t.sharding), target))(jax.tree.map(as_auto, state))
  return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), out, target)


def _all_axes(mesh, axis_type: AxisType):
  """``mesh`` with every axis of type ``axis_type``."""
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(axis_type,) * len(mesh.axis_names))


def unpad_state(tx, params, state):
  """The state in the checkpoint layout: no padding rows, mesh-independent.

  On a mesh some factors are stored as padded rows (see `_sharding`); call
  this on the training state before saving it, and `pad_state` after
  restoring it (onto any mesh, through ``abstract_state(...,
  padded=False)``). Without padding rows it returns the state as it is. The
  arrays stay split over the state's mesh.

  Args:
    tx: the ``optax.GradientTransformation`` the state belongs to.
    params: the parameters (arrays or `jax.ShapeDtypeStruct`s, with their
      shardings as in training).
    state: ``tx``'s state, as the train step returns it.

  Returns:
    The state with the shapes of ``abstract_state(tx, params, mesh,
    padded=False)``.
  """
  mesh = next((x.sharding.mesh for x in jax.tree.leaves(state)
               if isinstance(getattr(x, "sharding", None), NamedSharding)),
              None)
  return _relaid(
      state, abstract_state(tx, params, mesh, padded=False),
      abstract_state(tx, params, mesh), mesh, "unpad_state")


def pad_state(tx, params, state, mesh=None, param_shardings=None):
  """A state in the checkpoint layout (`unpad_state`), laid out for ``mesh``.

  Args:
    tx: the ``optax.GradientTransformation`` the state belongs to.
    params: the parameters, as arrays or `jax.ShapeDtypeStruct`s.
    state: a state with the shapes of ``abstract_state(tx, params, mesh,
      padded=False)``, e.g. restored from a checkpoint.
    mesh: the `jax.sharding.Mesh` to train on, or ``None`` for one device.
    param_shardings: as for `state_shardings`.

  Returns:
    The state with the shapes and shardings of ``abstract_state(tx, params,
    mesh, param_shardings)``, ready for the train step.
  """
  return _relaid(
      state, abstract_state(tx, params, mesh, param_shardings),
      abstract_state(tx, params, mesh, param_shardings, padded=False), mesh,
      "pad_state")


def _traced_init(tx, params, mesh, param_shardings):
  """The abstract ``tx.init(params)`` on ``mesh`` and its shardings."""
  if param_shardings is None:
    param_shardings = params
  is_spec = lambda x: isinstance(x, (PartitionSpec, NamedSharding))
  param_shardings = jax.tree.map(
      lambda leaf: _param_sharding(leaf, mesh), param_shardings,
      is_leaf=is_spec,
  )
  if jax.tree.structure(param_shardings, is_leaf=is_spec) != (
      jax.tree.structure(params)
  ):
    raise ValueError(
        "state_shardings: param_shardings must have the structure of params;"
        f" got {jax.tree.structure(param_shardings, is_leaf=is_spec)} and"
        f" {jax.tree.structure(params)}."
    )
  explicit = _all_axes(mesh, AxisType.Explicit)
  abstract_params = jax.tree.map(
      lambda p, s: jax.ShapeDtypeStruct(
          p.shape, p.dtype, sharding=NamedSharding(explicit, s.spec)
      ),
      params,
      param_shardings,
      is_leaf=is_spec,
  )
  specs = []

  def init_specs(p):
    state = tx.init(p)
    specs.append(jax.tree.map(_sharding.spec_of, state))
    return state

  auto = any(t == AxisType.Auto for t in mesh.axis_types)
  with jax.set_mesh(explicit), (_sharding.tracing("parameters unseen")
                                if auto else contextlib.nullcontext()):
    shapes = jax.eval_shape(init_specs, abstract_params)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        shapes)
  return shapes, jax.tree.map(
      lambda spec: NamedSharding(mesh, spec), specs[0],
      is_leaf=lambda x: isinstance(x, PartitionSpec),
  )
