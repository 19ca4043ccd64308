# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Checkpoints move between meshes: strict Orbax restores, same updates."""

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding
import numpy as np
import pytest

import shampoo_optax
from shampoo_optax import _placement

ocp = pytest.importorskip("orbax.checkpoint")


@pytest.mark.multidevice
@pytest.mark.parametrize("save,restore", [
    ("8", "1"), ("1", "8"), ("2", "4"), ("4", "2x4"), ("2x4", "2")])
def test_resume_on_another_mesh(save, restore, capsys):
  from examples import resume_on_other_mesh  # pylint: disable=g-import-not-at-top

  status = resume_on_other_mesh.main(
      ["--save-devices", save, "--restore-devices", restore, "--steps", "3"])
  assert status == 0, capsys.readouterr().out


@pytest.mark.multidevice
def test_the_saved_state_does_not_depend_on_the_mesh():
  from examples import resume_on_other_mesh as example  # pylint: disable=g-import-not-at-top

  saved, in_memory = [], []
  for spec in ("1", "2", "4", "8", "2x4"):
    mesh = example.make_mesh(spec)
    params = jax.tree.map(
        lambda x, s, mesh=mesh: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        example.init_params(), example.param_specs(mesh))
    tx = example.make_optimizer(mesh)
    for padded, shapes in ((False, saved), (True, in_memory)):
      state = shampoo_optax.abstract_state(tx, params, mesh, padded=padded)
      shapes.append(jax.tree.map(lambda x: (x.shape, x.dtype), state))
  assert all(s == saved[0] for s in saved)
  # In memory, some factors are padded rows on some meshes: the example
  # exercises both layouts.
  assert in_memory[0] == saved[0]
  assert in_memory[3] != saved[0]


# Orbax leaves the aborted reads' futures unawaited; that is its business.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_of_another_model_is_refused(tmp_path):
  small = {"w": np.zeros((32, 16), np.float32)}
  large = {"w": np.zeros((40, 16), np.float32)}
  tx = shampoo_optax.shampoo(1e-3, block_size=8)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "small", {"params": small,
                                           "opt_state": tx.init(small)})
  target = {"params": jax.eval_shape(lambda: large),
            "opt_state": shampoo_optax.abstract_state(tx, large)}
  with ocp.StandardCheckpointer() as checkpointer:
    with pytest.raises(ValueError, match="not compatible with the stored shape"):
      checkpointer.restore(tmp_path / "small", target)


@pytest.mark.multidevice
def test_padding_rows_stay_out_of_the_checkpoint_layout():
  # 24 x 16 in blocks of 8: 3 x 2 blocks, no axis 8 divides, so on 8 devices
  # each factor is 6 rows padded to 8.
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  tx = shampoo_optax.shampoo(1.0, block_size=8, precondition_every=1,
                             shard_axes="data")
  params = {"w": np.ones((24, 16), np.float32)}
  shardings = shampoo_optax.state_shardings(tx, params, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    update = jax.jit(tx.update, out_shardings=(None, shardings))
    for step in range(3):  # Statistics and two refreshes.
      grads = {"w": np.random.default_rng(step).standard_normal(
          (24, 16)).astype(np.float32)}
      _, state = update(grads, state, params)
  assert state[0].stats[0].shape == (8, 9, 4)
  assert int(state[0].diagnostics.root_failures) == 0

  saved = shampoo_optax.unpad_state(tx, params, state)
  assert saved[0].stats[0].shape == (1, 3, 2, 9, 4)
  np.testing.assert_array_equal(
      np.asarray(saved[0].stats[0]).reshape(6, 9, 4),
      np.asarray(state[0].stats[0])[:6])
  # The padding rows hold what init put there, so the round trip is exact.
  back = shampoo_optax.pad_state(tx, params, saved, mesh)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  # Arrays this process does not hold whole (several hosts) are moved by a
  # compiled program instead of on the host: the same result.
  for x, target in ((state[0].stats[0], saved[0].stats[0]),
                    (saved[0].stats[0], state[0].stats[0]),
                    (saved[0].refreshed_at[0], state[0].refreshed_at[0])):
    moved = _placement._relaid_on_devices(x, target, mesh)
    np.testing.assert_array_equal(np.asarray(moved), np.asarray(target))
    assert moved.sharding.is_equivalent_to(target.sharding, moved.ndim)

  with jax.set_mesh(mesh), pytest.raises(ValueError, match="pad_state"):
    update(grads, saved, params)
  with pytest.raises(ValueError, match=r"pad_state: state.*\(1, 3, 2, 9, 4\)"
                     r".*expected \(1, 4, 2, 9, 4\)"):
    shampoo_optax.pad_state(tx, {"w": np.ones((32, 16), np.float32)}, saved,
                            mesh)


def _grads(step):
  rng = np.random.default_rng(step)
  return {"w": rng.standard_normal((24, 16)).astype(np.float32),
          "b": rng.standard_normal(16).astype(np.float32)}


@pytest.mark.multidevice
@pytest.mark.parametrize("make", [shampoo_optax.shampoo, shampoo_optax.soap])
def test_a_checkpoint_from_a_mesh_resumes_on_one_device(make, tmp_path):
  # The README's recipe with mesh None: the restore target must put every
  # array on one device, not on the mesh the checkpoint was written from.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  options = dict(learning_rate=0.1, block_size=8, precondition_every=2)
  tx = make(shard_axes="data", **options)
  params = {"w": np.ones((24, 16), np.float32),
            "b": np.zeros(16, np.float32)}
  specs = {"w": P("data", None), "b": P()}
  on_mesh = lambda tree: jax.device_put(tree, jax.tree.map(
      lambda s: NamedSharding(mesh, s), specs))
  with jax.set_mesh(mesh):
    sharded = on_mesh(params)
    state = jax.jit(tx.init)(sharded)
    update = jax.jit(tx.update)
    for step in range(3):  # Statistics and a refresh.
      _, state = update(on_mesh(_grads(step)), state, sharded)
    expected, _ = update(on_mesh(_grads(3)), state, sharded)
  assert any(x.shape != y.shape for x, y in zip(
      jax.tree.leaves(shampoo_optax.abstract_state(tx, sharded, mesh)),
      jax.tree.leaves(shampoo_optax.abstract_state(tx, sharded, mesh,
                                                   padded=False))))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {
        "params": sharded,
        "opt_state": shampoo_optax.unpad_state(tx, sharded, state)})

  one = make(**options)
  params = jax.device_put(params)
  target = {"params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      params),
            "opt_state": shampoo_optax.abstract_state(one, params, None,
                                                      padded=False)}
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", target)
  state = shampoo_optax.pad_state(one, params, restored["opt_state"])
  updates, _ = jax.jit(one.update)(_grads(3), state, params)
  device = {jax.devices()[0]}
  assert all(x.sharding.device_set == device for x in jax.tree.leaves(state))
  for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    assert x.sharding.device_set == device
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=0,
                               atol=1e-5 * np.abs(y).max())


def test_without_a_mesh_the_state_is_on_the_default_device():
  tx = shampoo_optax.shampoo(0.1, block_size=8)
  params = {"w": np.ones((24, 16), np.float32)}
  state = jax.jit(tx.init)(params)
  assert shampoo_optax.unpad_state(tx, params, state) is state
  for device in (jax.devices()[0], jax.devices()[-1]):
    with jax.default_device(device):
      on_device = SingleDeviceSharding(device)
      for padded in (True, False):
        assert all(
            x.sharding == on_device for x in jax.tree.leaves(
                shampoo_optax.abstract_state(tx, params, padded=padded)))
      assert all(s == on_device for s in jax.tree.leaves(
          shampoo_optax.state_shardings(tx, params, None)))
      moved = shampoo_optax.pad_state(tx, params, state)
    for x, y in zip(jax.tree.leaves(moved), jax.tree.leaves(state)):
      assert x.sharding == on_device
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
