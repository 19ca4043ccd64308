# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Checkpoints move between meshes: strict Orbax restores, same updates."""

import jax
from jax.sharding import NamedSharding
import numpy as np
import pytest

import shampoo_optax

pytestmark = pytest.mark.multidevice
ocp = pytest.importorskip("orbax.checkpoint")


@pytest.mark.parametrize("save,restore", [
    ("8", "1"), ("1", "8"), ("2", "4"), ("4", "2x4"), ("2x4", "2")])
def test_resume_on_another_mesh(save, restore, capsys):
  from examples import resume_on_other_mesh  # pylint: disable=g-import-not-at-top

  status = resume_on_other_mesh.main(
      ["--save-devices", save, "--restore-devices", restore, "--steps", "3"])
  assert status == 0, capsys.readouterr().out


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
  # The padding rows hold zeros only, so the round trip is exact.
  back = shampoo_optax.pad_state(tx, params, saved, mesh)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)

  with jax.set_mesh(mesh), pytest.raises(ValueError, match="pad_state"):
    update(grads, saved, params)
  with pytest.raises(ValueError, match=r"pad_state: state.*\(1, 3, 2, 9, 4\)"
                     r".*expected \(1, 4, 2, 9, 4\)"):
    shampoo_optax.pad_state(tx, {"w": np.ones((32, 16), np.float32)}, saved,
                            mesh)
