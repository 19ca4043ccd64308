# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Distributed Shampoo on 8 simulated CPU devices.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (``make test``
does); every test is marked ``multidevice`` and skipped on fewer devices.
"""

import functools
import re

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from numerics import assert_close
import shampoo_optax

pytestmark = pytest.mark.multidevice

# Block 8: group (8, 8) has 15 blocks (w1: 8, w2: 4, w3: 3) and group (8, 4)
# one (w4), so bucket (8, 4) holds 2 * 15 + 1 = 31 factors, padded to 32 on 8
# devices (4 per device), and bucket (4, 4) one, padded to 8. b is diagonal.
SHAPES = {"w1": (32, 16), "w2": (16, 16), "w3": (24, 8), "w4": (8, 4),
          "b": (16,)}
OPTIONS = dict(block_size=8, precondition_every=2, start_preconditioning_step=1)


def make_params(seed=0):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {name: 0.3 * jax.random.normal(key, shape)
          for key, (name, shape) in zip(keys, sorted(SHAPES.items()))}


def make_grads(step):
  return make_params(seed=100 + step)


def mesh_of(count, axis_type=AxisType.Explicit, names=("data",), shape=None):
  return jax.make_mesh(shape or (count,), names,
                       axis_types=(axis_type,) * len(names),
                       devices=jax.devices()[:count])


def fsdp_spec(shape):
  return P("data", None) if len(shape) == 2 and shape[0] % 8 == 0 else P()


def run_steps(tx, params, steps, state=None):
  """Jitted updates on the gradients of `make_grads`; returns all updates."""
  update = jax.jit(tx.update)
  if state is None:
    state = jax.jit(tx.init)(params)
  outs = []
  for step in range(steps):
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), make_grads(step),
                         params)
    grads = jax.tree.map(
        lambda g, p: jax.device_put(g, p.sharding), grads, params)
    updates, state = update(grads, state, params)
    outs.append(updates)
  return outs, state


def single_device_updates(steps, root_method="auto"):
  """The reference: no mesh, no shard_axes."""
  return _single_device_updates(root_method)[:steps]


@functools.lru_cache
def _single_device_updates(root_method, steps=4):
  tx = shampoo_optax.shampoo(1.0, root_method=root_method, **OPTIONS)
  return run_steps(tx, make_params(), steps)[0]


def assert_updates_close(actual, expected):
  for a, e in zip(actual, expected):
    for name in SHAPES:
      assert_close(np.asarray(a[name]), np.asarray(e[name]), rtol=2e-5, err_msg=name)


def same(a, b, ndim):
  return a.mesh == b.mesh and a.is_equivalent_to(b, ndim)


def shard_shapes(x):
  return {tuple(s.data.shape) for s in x.addressable_shards}


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_explicit_sharding_types_stable_and_split(layout):
  tx = shampoo_optax.shampoo(1.0, shard_axes="data", **OPTIONS)
  mesh = mesh_of(8)
  with jax.set_mesh(mesh):
    params = {
        k: jax.sharding.reshard(v, fsdp_spec(v.shape) if layout == "fsdp"
                                else P())
        for k, v in make_params().items()
    }
    state = jax.jit(tx.init)(params)
    assert jax.tree.map(jax.typeof, state) == jax.tree.map(
        jax.typeof, tx.init(params))
    types = jax.tree.map(jax.typeof, state)
    updates, new_state = jax.jit(tx.update)(params, state, params)
    assert jax.tree.map(jax.typeof, new_state) == types
  shampoo_state = state[0]
  assert [s.shape for s in shampoo_state.stats] == [(32, 8, 8), (8, 4, 4)]
  for stack in shampoo_state.stats + shampoo_state.preconditioners:
    assert jax.typeof(stack).sharding.spec == P("data", None, None)
    n, d, _ = stack.shape
    assert shard_shapes(stack) == {(n // 8, d, d)}
  for tree in (shampoo_state.graft, shampoo_state.mu, updates):
    for name, leaf in tree.items():
      assert leaf.sharding.spec == params[name].sharding.spec, name


def test_no_mesh_is_single_device_and_missing_axes_are_named():
  # shard_axes=None without a mesh: the plain single-device program.
  tx = shampoo_optax.scale_by_shampoo(**OPTIONS)
  state = tx.init(make_params())
  assert [s.shape for s in state.stats] == [(31, 8, 8), (1, 4, 4)]
  with pytest.raises(ValueError, match=r"no mesh is set.*jax.set_mesh"):
    shampoo_optax.scale_by_shampoo(shard_axes="data").init(make_params())
  with jax.set_mesh(mesh_of(8)):
    with pytest.raises(ValueError, match=r"\['model'\].*\('data',\)"):
      shampoo_optax.scale_by_shampoo(shard_axes="model").init(make_params())
  with pytest.raises(ValueError, match=r"\['model'\]"):
    shampoo_optax.state_shardings(
        shampoo_optax.shampoo(1.0, shard_axes="model"), make_params(),
        mesh_of(8))


def test_pjit_way_with_state_shardings_in_a_chain():
  """jax.jit with in/out shardings on an auto mesh, Shampoo inside a chain."""
  tx = optax.chain(
      optax.clip_by_global_norm(10.0),
      shampoo_optax.shampoo(1.0, shard_axes="data", **OPTIONS),
  )
  mesh = mesh_of(8, AxisType.Auto)
  param_specs = {k: fsdp_spec(s) for k, s in SHAPES.items()}
  param_sh = {k: NamedSharding(mesh, s) for k, s in param_specs.items()}
  params = jax.device_put(make_params(), param_sh)
  state_sh = shampoo_optax.state_shardings(tx, params, mesh)
  shampoo_sh = state_sh[1][0]
  for sharding in shampoo_sh.stats + shampoo_sh.preconditioners:
    assert same(sharding, NamedSharding(mesh, P("data")), 3)
  for tree in (shampoo_sh.mu, shampoo_sh.graft):
    for name, sharding in tree.items():
      assert same(sharding, param_sh[name], len(SHAPES[name])), name
  assert same(shampoo_sh.count, NamedSharding(mesh, P()), 0)
  # The same with shardings given as PartitionSpecs and abstract params.
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                          params)
  assert shampoo_optax.state_shardings(
      tx, abstract, mesh, param_specs) == state_sh

  with jax.set_mesh(mesh):
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    step = jax.jit(tx.update, in_shardings=(param_sh, state_sh, param_sh),
                   out_shardings=(param_sh, state_sh))
    outs, state = run_steps(optax.GradientTransformation(tx.init, step),
                            params, 3, state)
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
    assert same(leaf.sharding, sharding, leaf.ndim)
  assert same(outs[-1]["w1"].sharding, param_sh["w1"], 2)
  reference = run_steps(
      optax.chain(optax.clip_by_global_norm(10.0),
                  shampoo_optax.shampoo(1.0, **OPTIONS)),
      make_params(), 3)[0]
  assert_updates_close(outs, reference)


@pytest.mark.parametrize("root_method,counts",
                         [("eigh", (1, 2, 4, 8)), ("newton", (8,))])
def test_numerics_do_not_depend_on_device_count(root_method, counts):
  # Step 0 grafts only; step 1 refreshes the roots and preconditions.
  expected = single_device_updates(2, root_method)
  tx = shampoo_optax.shampoo(1.0, shard_axes="data", root_method=root_method,
                             **OPTIONS)
  for count in counts:
    with jax.set_mesh(mesh_of(count)):
      params = make_params()
      outs, state = run_steps(tx, params, 2)
    assert state[0].stats[0].shape[0] == -(-31 // count) * count
    assert_updates_close(outs, expected)


@pytest.mark.parametrize("shard_axes", [("data", "model"), "model"])
def test_two_dimensional_mesh(shard_axes):
  mesh = mesh_of(8, names=("data", "model"), shape=(4, 2))
  tx = shampoo_optax.shampoo(1.0, shard_axes=shard_axes, **OPTIONS)
  with jax.set_mesh(mesh):
    params = {k: jax.sharding.reshard(
        v, P("data", "model") if k in ("w1", "w2") else P())
              for k, v in make_params().items()}
    outs, state = run_steps(tx, params, 2)
  assert outs[-1]["w1"].sharding.spec == P("data", "model")
  shards = 8 if isinstance(shard_axes, tuple) else 2
  stack = state[0].stats[0]
  assert shard_shapes(stack) == {(stack.shape[0] // shards, 8, 8)}
  assert_updates_close(outs, single_device_updates(2))


def _compiled_step(root_method):
  tx = shampoo_optax.scale_by_shampoo(
      block_size=8, precondition_every=1, start_preconditioning_step=0,
      root_method=root_method, shard_axes="data")
  mesh = mesh_of(8, AxisType.Auto)
  params = jax.device_put(make_params(), NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    return jax.jit(tx.update).lower(params, state).compile().as_text()


def _collectives(hlo):
  """(op, [shapes]) of every collective in a compiled HLO module."""
  pattern = (r"= (.*?) (all-gather|all-reduce|all-to-all|"
             r"collective-permute|reduce-scatter)(?:-start)?\(")
  return [(op, re.findall(r"\w+\[[\d,]*\]", shapes))
          for shapes, op in re.findall(pattern, hlo)]


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_compiled_refresh_inverts_only_local_rows(root_method):
  """The bucket [32, 8, 8] is never whole on a device: roots run on [4, 8, 8]."""
  hlo = _compiled_step(root_method)
  assert "f32[32,8,8]" not in hlo  # No device ever holds a whole stack.
  if root_method == "eigh":
    # CPU LAPACK: one matrix at a time, looping over the device's 4 rows (see
    # _sharding._one_row_at_a_time); never a batch of the whole stack.
    eighs = re.findall(r"= \(f32\[([\d,]*)\].*lapack_ssyevd", hlo)
    assert eighs and set(eighs) <= {"8,8", "4,4"}, eighs
    loops = [line for line in hlo.splitlines() if " while(" in line]
    assert any("f32[4,8,8]" in line for line in loops)
  else:
    newton = re.findall(r"f32\[(\d+),8,8\]\{[\d,]*\} dot\(", hlo)
    assert "4" in newton and "32" not in newton
  # Owner computes: roots move to block owners (collective-permute), the
  # preconditioned blocks are all-gathered, scalars reduced; the statistics
  # are never gathered.
  collectives = _collectives(hlo)
  assert {op for op, _ in collectives} <= {
      "all-gather", "collective-permute", "all-reduce"}, collectives
  gathered = [s for op, shapes in collectives if op == "all-gather"
              for s in shapes]
  # The preconditioned blocks of group (8, 8): 15, as 8 shards of 2.
  assert gathered == ["f32[16,8,8]"], gathered
  reduced = {s for op, shapes in collectives if op == "all-reduce"
             for s in shapes}
  # Scalars (diagnostics, norms), and the one block of group (8, 4), which
  # only its owner computes: XLA broadcasts it with an all-reduce.
  assert reduced <= {"f32[]", "s32[]", "f32[1,8,4]"}, reduced


def test_orbax_restore_onto_other_device_counts(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = shampoo_optax.shampoo(1.0, shard_axes="data", **OPTIONS)
  expected = single_device_updates(4)

  def restore(path, count):
    mesh = mesh_of(count)
    params = jax.device_put(make_params(), NamedSharding(mesh, P()))
    shardings = shampoo_optax.state_shardings(tx, params, mesh)
    with jax.set_mesh(mesh):
      shapes = jax.eval_shape(tx.init, params)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, shardings)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      # strict=False: the stacks' inert padding rows differ between device
      # counts (zeros are appended or dropped at the end).
      state = checkpointer.restore(
          path, args=ocp.args.StandardRestore(target, strict=False))
    with jax.set_mesh(mesh):
      return run_steps_from(params, state, 2)

  def run_steps_from(params, state, start):
    update = jax.jit(tx.update)
    outs = []
    for step in range(start, 4):
      updates, state = update(make_grads(step), state, params)
      outs.append(updates)
    return outs

  for saved, restored in ((8, 1), (1, 8)):
    with jax.set_mesh(mesh_of(saved)):
      params = make_params()
      outs, state = run_steps(tx, params, 2)
    path = tmp_path / f"from_{saved}"
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      checkpointer.save(path, args=ocp.args.StandardSave(state))
    assert_updates_close(outs + restore(path, restored), expected)


def test_flax_training_under_three_usage_patterns(capsys):
  """examples/sharded_training.py: explicit, FSDP and pjit-style training."""
  pytest.importorskip("flax")
  from examples import sharded_training  # pylint: disable=g-import-not-at-top

  results = sharded_training.main(["--steps", "6"])
  assert "pjit" in capsys.readouterr().out
  for pattern, (losses, params, state) in results.items():
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], pattern
    kernel = params["params"]["Dense_1"]["kernel"]
    expected = P("data", None) if pattern == "fsdp" else P()
    assert same(kernel.sharding, NamedSharding(kernel.sharding.mesh,
                                               expected), 2), pattern
    mu = state[0].mu["params"]["Dense_1"]["kernel"]
    assert same(mu.sharding, kernel.sharding, 2), pattern
    for stack in state[0].stats + state[0].preconditioners:
      n, d, _ = stack.shape
      assert shard_shapes(stack) == {(n // 8, d, d)}, pattern
  # Same data, same initialization: the three patterns agree.
  assert_close(results["fsdp"][0], results["explicit"][0], rtol=1e-5)
  assert_close(results["pjit"][0], results["explicit"][0], rtol=1e-5)
