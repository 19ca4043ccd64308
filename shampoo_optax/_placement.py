# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The optimizer state as a whole on a mesh, for `jax.jit` and Orbax.

Its shardings (`state_shardings`), its abstract form (`abstract_state`), and
its checkpoint layout: the factors that `_sharding` stores as padded rows,
without their padding, so that what is saved does not depend on the mesh
(`unpad_state`, `pad_state`).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from jax.sharding import SingleDeviceSharding

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


def _default_device() -> jax.Device:
  """The device JAX puts an array on when nothing says where.

  ``jax.config.jax_default_device`` (a device or a platform name, also set
  by ``jax.default_device``), else this process's first device.
  """
  device = jax.config.jax_default_device
  if isinstance(device, str):
    return jax.local_devices(backend=device)[0]
  return device if device is not None else jax.local_devices()[0]


def _on_default_device(tree):
  """``tree`` (of arrays or shapes) as ShapeDtypeStructs on one device."""
  sharding = SingleDeviceSharding(_default_device())
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


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
    (``None`` fields stay ``None``); with ``mesh=None``, of the default
    device's `SingleDeviceSharding` (``jax.config.jax_default_device`` if
    set, else the first device).
  """
  if mesh is None:
    return jax.tree.map(lambda x: x.sharding,
                        _on_default_device(jax.eval_shape(tx.init, params)))
  return _traced_init(tx, params, mesh, param_shardings)[1]


def abstract_state(tx, params, mesh=None, param_shardings=None, *,
                   padded: bool = True):
  """``tx.init(params)`` as `jax.ShapeDtypeStruct`s with their shardings.

  With ``padded=False``, the checkpoint layout: the state as `unpad_state`
  gives it, whose shapes do not depend on the mesh. That is the target of
  a strict Orbax restore onto ``mesh`` (then `pad_state`), whatever the mesh
  the checkpoint was written on. Its factors that are padded rows in memory
  are split along their last axis the mesh axes divide, if any, so that
  saving and restoring do not gather them. Without a mesh both layouts are
  ``jax.eval_shape(tx.init, params)`` on the default device
  (``jax.config.jax_default_device`` if set, else the first device): a
  restore onto them lands on that device, whatever mesh the checkpoint was
  written from.

  Args:
    tx: an ``optax.GradientTransformation``.
    params: the parameters, as arrays or `jax.ShapeDtypeStruct`s.
    mesh: a `jax.sharding.Mesh`, or ``None`` for one device.
    param_shardings: as for `state_shardings`.
    padded: the layout in memory (``True``) or the checkpoint layout.

  Returns:
    A pytree of `jax.ShapeDtypeStruct` with the structure of
    ``tx.init(params)``.
  """
  if mesh is None:
    layout = (contextlib.nullcontext() if padded
              else _sharding.tracing("unpadded"))
    with layout:
      return _on_default_device(jax.eval_shape(tx.init, params))
  in_memory, saved = _layouts(tx, params, mesh, param_shardings,
                              saved=not padded)
  return in_memory if padded else saved


def _layouts(tx, params, mesh, param_shardings, saved: bool = True):
  """`abstract_state` on ``mesh`` in memory and (if ``saved``) saved.

  The checkpoint layout's shardings come from the one in memory, so asking
  for both traces ``tx.init`` twice, not three times.
  """
  structs = lambda shapes, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shardings)
  in_memory, memory_shardings = _traced_init(tx, params, mesh,
                                             param_shardings)
  if not saved:
    return structs(in_memory, memory_shardings), None
  with _sharding.tracing("unpadded"):
    shapes, shardings = _traced_init(tx, params, mesh, param_shardings)
  shardings = jax.tree.map(
      lambda x, s, m, ms: s if x.shape == m.shape else NamedSharding(
          mesh, _split_last_divisible(x.shape, ms.spec[0], mesh)),
      shapes, shardings, in_memory, memory_shardings)
  return (structs(in_memory, memory_shardings),
          structs(shapes, shardings))


def _split_last_divisible(shape, entry: _sharding.AxisEntry,
                          mesh) -> PartitionSpec:
  """``entry`` on the last axis of ``shape`` it divides (none: replicated)."""
  k = _sharding.entry_size(entry, mesh)
  for axis in reversed(range(len(shape))):
    if shape[axis] % k == 0:
      return PartitionSpec(*(None,) * axis, entry)
  return PartitionSpec()


def _conform(x, shape, xp=jnp):
  """``x`` moved between a factor's own layout and its padded rows.

  ``xp`` is `jax.numpy`, or `numpy` for an array on the host.
  """
  if tuple(x.shape) == tuple(shape):
    return x
  if x.ndim > len(shape):  # Into rows ``[rows, *rest]``.
    # The padding rows hold what init puts there: -1 in the int32 steps
    # (``refreshed_at``: never), zeros in the floating factors.
    fill = -1 if xp.issubdtype(x.dtype, xp.integer) else 0
    return _sharding.to_layout(x, x.shape[:x.ndim - len(shape) + 1],
                               shape[:1], fill, xp)
  return _sharding.from_layout(x, shape[:len(shape) - x.ndim + 1],
                               x.shape[:1])


def _check(state, source, what: str):
  """Raises unless ``state`` has the shapes of ``source``."""
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


@functools.lru_cache(maxsize=256)
def _relayout(shape, sharding):
  """A jitted move of one array into ``shape``, split as ``sharding``.

  Cached (and jit caches by input type), so a checkpoint compiles it once
  per distinct factor, not on every save and restore.
  """
  return jax.jit(lambda x: _conform(x, shape), out_shardings=sharding)


def _relaid(state, target, mesh):
  """``state`` in ``target``'s shapes and shardings.

  Only the arrays whose shape changes are computed on, the others are at
  most moved. When this process holds the whole of such an array, it is
  reshaped on the host: a copy costs less than compiling a program for it
  (which a run's first checkpoint would pay once per factor shape).
  """
  leaves = jax.tree.leaves(state)
  targets = jax.tree.leaves(target)
  if mesh is None:
    # Onto the one device first: a restore may have put the state elsewhere.
    leaves = jax.device_put(leaves, [t.sharding for t in targets])
  out = list(leaves)
  for i, (x, t) in enumerate(zip(leaves, targets)):
    if tuple(x.shape) == tuple(t.shape):
      continue
    if getattr(x, "is_fully_addressable", True) and (
        t.sharding.is_fully_addressable):
      host = _conform(np.asarray(x), t.shape, np)
      out[i] = jax.make_array_from_callback(t.shape, t.sharding,
                                            lambda index, h=host: h[index])
    else:
      out[i] = _relaid_on_devices(x, t, mesh)
  out = jax.device_put(out, [t.sharding for t in targets])
  return jax.tree.unflatten(jax.tree.structure(state), out)


def _relaid_on_devices(x, target, mesh):
  """`_conform` of ``x`` into ``target`` by a compiled (cached) program."""
  # On Auto axes: a slice or pad of a split axis is not even, which
  # explicit sharding rejects; the partitioner moves the rows instead.
  auto_mesh = _all_axes(mesh, AxisType.Auto)
  auto = lambda s: NamedSharding(auto_mesh, s.spec)
  with jax.set_mesh(auto_mesh):
    return _relayout(tuple(target.shape), auto(target.sharding))(
        jax.device_put(x, auto(x.sharding)))


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
  if mesh is None:  # One device: nothing is padded, nothing moves.
    _check(state, abstract_state(tx, params), "unpad_state")
    return state
  in_memory, saved = _layouts(tx, params, mesh, None)
  _check(state, in_memory, "unpad_state")
  return _relaid(state, saved, mesh)


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
    mesh, param_shardings)``, ready for the train step: without a mesh, on
    the default device.
  """
  if mesh is None:
    in_memory = abstract_state(tx, params)
    saved = abstract_state(tx, params, padded=False)
  else:
    in_memory, saved = _layouts(tx, params, mesh, param_shardings)
  _check(state, saved, "pad_state")
  return _relaid(state, in_memory, mesh)


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
