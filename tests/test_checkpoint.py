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

  shapes = []
  for spec in ("1", "8", "2x4"):
    mesh = example.make_mesh(spec)
    params = jax.tree.map(
        lambda x, s, mesh=mesh: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        example.init_params(), example.param_specs(mesh))
    state = shampoo_optax.abstract_state(example.make_optimizer(mesh), params,
                                         mesh)
    shapes.append(jax.tree.map(lambda x: (x.shape, x.dtype), state))
  assert shapes[0] == shapes[1] == shapes[2]


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
