# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Distributed Shampoo on 8 simulated CPU devices.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (``make test``
does); every test is marked ``multidevice`` and skipped on fewer devices.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from numerics import assert_close
from numerics import NumpyShampoo
from numerics import run_updates
import shampoo_optax

pytestmark = pytest.mark.multidevice

# Block 8. "layers" is 8 stacked 16 x 16 layers (2 x 2 blocks each), "w1" is
# 8 x 2 blocks, "w2" 3 x 2 blocks; "b" is diagonal. On 8 devices the factors
# of "layers" split along their units, those of "w1" along its block rows
# (as FSDP splits w1 itself), and those of "w2" (no axis 8 divides) are
# stored as its 6 blocks' rows padded to 8, one per device.
SHAPES = {"layers": (8, 16, 16), "w1": (64, 16), "w2": (24, 16), "b": (16,)}
LAYER_AXES = {"layers": 0, "w1": None, "w2": None, "b": None}
OPTIONS = dict(block_size=8, precondition_every=2, start_preconditioning_step=1,
               layer_axes=LAYER_AXES)
# The split of each factor's batch axes on 8 devices, in the order of the
# state: layers (2 factors), w1 (2), w2 (2, as rows).
SPLIT_8 = [("data", None, None)] * 2 + [(None, "data", None)] * 2 + [
    ("data",)] * 2
BATCH_8 = [(8, 2, 2)] * 2 + [(1, 8, 2)] * 2 + [(8,)] * 2


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
  return P("data") if len(shape) >= 2 and shape[0] % 8 == 0 else P()


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


def single_device_state():
  return shampoo_optax.scale_by_shampoo(**OPTIONS).init(make_params())


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
  assert [s.shape for s in shampoo_state.stats] == [
      b + (9, 4) for b in BATCH_8]
  for i, split in enumerate(SPLIT_8):
    for stack in (shampoo_state.stats[i], shampoo_state.preconditioners[i],
                  shampoo_state.refreshed_at[i]):
      spec = tuple(jax.typeof(stack).sharding.spec)
      assert (spec + (None,) * 3)[:len(split)] == split
      local = tuple(n // (8 if a else 1) for n, a in zip(stack.shape, split))
      assert shard_shapes(stack) == {local + stack.shape[len(split):]}
  for name, leaf in updates.items():
    assert leaf.sharding.spec == params[name].sharding.spec, name
  # Grafting and momentum: one array per leaf, split like the leaf.
  for tree in (shampoo_state.graft, shampoo_state.mu):
    for name, x in tree.items():
      assert jax.typeof(x).sharding.spec == params[name].sharding.spec, name


def test_no_mesh_is_single_device_and_missing_axes_are_named():
  # shard_axes=None without a mesh: the plain single-device program.
  tx = shampoo_optax.scale_by_shampoo(**OPTIONS)
  state = tx.init(make_params())
  assert len(state.stats) == len(SPLIT_8)
  with pytest.raises(ValueError, match=r"no mesh is set.*jax.set_mesh"):
    shampoo_optax.scale_by_shampoo(shard_axes="data").init(make_params())
  with jax.set_mesh(mesh_of(8)):
    with pytest.raises(ValueError, match=r"\['model'\].*\('data',\)"):
      shampoo_optax.scale_by_shampoo(shard_axes="model").init(make_params())
  with pytest.raises(ValueError, match=r"\['model'\]"):
    shampoo_optax.state_shardings(
        shampoo_optax.shampoo(1.0, shard_axes="model"), make_params(),
        mesh_of(8))


@pytest.mark.parametrize("make", [shampoo_optax.shampoo, shampoo_optax.soap])
def test_explicit_parameters_outside_their_mesh_get_a_clear_error(make):
  """Explicitly sharded parameters used after the ``with jax.set_mesh``
  block: an error that says what to do, not a KeyError on the axis."""
  with jax.set_mesh(mesh_of(8)):
    params = {"w": jax.sharding.reshard(jnp.ones((64, 16)), P("data"))}
  tx = make(1e-3, block_size=8)
  with pytest.raises(ValueError, match=r"\['data'\].*no mesh is set.*set_mesh"):
    tx.init(params)
  with jax.set_mesh(mesh_of(8)):
    state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['data'\].*no mesh is set"):
    tx.update(params, state, params)


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
  # On an Auto mesh the update cannot see the parameters' shardings: the
  # factors split over shard_axes alone, here alike.
  for i, split in enumerate(SPLIT_8):
    for sharding in (shampoo_sh.stats[i], shampoo_sh.preconditioners[i]):
      assert same(sharding, NamedSharding(mesh, P(*split)), len(split) + 2)
  # Per-leaf state follows the parameters (layers, w1 and w2 split by
  # rows).
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
    # Without its padding rows, the state does not depend on the mesh.
    with jax.set_mesh(mesh_of(count)):
      unpadded = shampoo_optax.unpad_state(tx, params, state)
    for a, e in zip(unpadded[0].stats, single_device_state().stats):
      assert a.shape == e.shape
    assert_updates_close(outs, expected)


@pytest.mark.parametrize("shard_axes", [("data", "model"), "model"])
def test_two_dimensional_mesh(shard_axes):
  mesh = mesh_of(8, names=("data", "model"), shape=(4, 2))
  tx = shampoo_optax.shampoo(1.0, shard_axes=shard_axes, **OPTIONS)
  with jax.set_mesh(mesh):
    params = {k: jax.sharding.reshard(v, P("data", "model") if k == "w1"
                                      else P())
              for k, v in make_params().items()}
    outs, state = run_steps(tx, params, 2)
  assert outs[-1]["w1"].sharding.spec == P("data", "model")
  # w1's factors follow its split: block rows over "data" (2 of 8 per
  # device), block columns over "model" (1 of 2); the unsplit layers' factors
  # split their units over shard_axes.
  specs = [tuple(jax.typeof(s).sharding.spec)[:3] for s in state[0].stats]
  assert specs[2] == (None, "data", "model")
  assert specs[0] == (shard_axes, None, None)
  assert_updates_close(outs, single_device_updates(2))


def _compiled_step(root_method, fsdp=False):
  """The compiled update on 8 devices: data parallel, or FSDP (explicit)."""
  tx = shampoo_optax.scale_by_shampoo(
      **{**OPTIONS, "precondition_every": 1, "start_preconditioning_step": 0},
      root_method=root_method, shard_axes="data")
  if not fsdp:
    mesh = mesh_of(8, AxisType.Auto)
    params = jax.device_put(make_params(), NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
      state = jax.jit(tx.init)(params)
      return jax.jit(tx.update).lower(params, state).compile()
  with jax.set_mesh(mesh_of(8)):
    params = {k: jax.sharding.reshard(v, fsdp_spec(v.shape))
              for k, v in make_params().items()}
    state = jax.jit(tx.init)(params)
    return jax.jit(tx.update).lower(params, state).compile()


def _collectives(hlo):
  """(op, bytes) of every collective in a compiled HLO module."""
  pattern = (r"= (.*?) (all-gather|all-reduce|all-to-all|"
             r"collective-permute|reduce-scatter)(?:-start)?\(")
  size = lambda shape: 4 * int(np.prod([int(d) for d in shape.split(",") if d]))
  return [(op, sum(size(d) for d in re.findall(r"f32\[([\d,]*)\]", shapes)))
          for shapes, op in re.findall(pattern, hlo)]


def _param_bytes(names):
  return sum(4 * int(np.prod(SHAPES[n])) for n in names)


# w2's blocks as padded rows: 8 blocks of 8 x 8.
_W2_PADDED = 4 * 8 * 8 * 8


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_data_parallel_step_inverts_local_rows_and_moves_no_roots(
    root_method):
  hlo = _compiled_step(root_method).as_text()
  # No device holds a whole factor: layers' [8, 2, 2, 9, 4] is
  # [1, 2, 2, 9, 4] per device, w1's [1, 8, 2, 9, 4] is [1, 1, 2, 9, 4],
  # w2's [1, 3, 2, 9, 4] is 6 rows, padded to [8, 9, 4]: [1, 9, 4].
  for whole in ("8,2,2,9,4", "1,8,2,9,4", "1,3,2,9,4", "8,9,4"):
    assert f"f32[{whole}]" not in hlo, whole
  assert "f32[1,2,2,9,4]" in hlo and "f32[1,1,2,9,4]" in hlo
  assert "f32[1,9,4]" in hlo
  # Every 8 x 8 root of a device's share is one batch: layers 2 x 4, w1
  # 2 x 2, and w2 2 x 1 matrices.
  if root_method == "eigh":
    # CPU LAPACK, one matrix at a time, looping over the 14 rows.
    eighs = re.findall(r"= \(f32\[([\d,]*)\].*lapack_ssyevd", hlo)
    assert eighs and set(eighs) <= {"8,8"}, eighs
    assert any("f32[14,8,8]" in line for line in hlo.splitlines()
               if " while(" in line)
  else:
    newton = {int(n) for n in re.findall(r"f32\[(\d+),8,8\]\{[\d,]*\} dot\(",
                                         hlo)}
    assert max(newton) == 14, newton
  # Roots never move; the one large collective is the all-gather of the
  # update (the preconditioned blocks, w2's padding rows included), the rest
  # are scalars and per-unit norms.
  collectives = _collectives(hlo)
  assert {op for op, _ in collectives} <= {"all-gather", "all-reduce"}
  gathered = sum(b for op, b in collectives if op == "all-gather")
  assert gathered <= _param_bytes(("layers", "w1")) + _W2_PADDED, collectives
  assert all(b <= 4 * 8 for op, b in collectives if op == "all-reduce")


def test_fsdp_step_gathers_no_gradient():
  """FSDP: statistics, roots and preconditioning stay on the shard."""
  compiled = _compiled_step("eigh", fsdp=True)
  collectives = _collectives(compiled.as_text())
  # w2 (split 3 rows per device, not whole blocks) is gathered, cut into
  # blocks of which each device preconditions its own (padded) row, and
  # gathered back; nothing of "layers" or "w1" crosses devices but scalars
  # and per-unit norms.
  moved = sum(b for op, b in collectives if op != "all-reduce")
  assert moved <= _param_bytes(("w2",)) + _W2_PADDED, collectives
  assert all(b <= 4 * 8 for op, b in collectives if op == "all-reduce"), (
      collectives)


def test_orbax_restore_onto_other_device_counts(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = shampoo_optax.shampoo(1.0, shard_axes="data", **OPTIONS)
  expected = single_device_updates(4)

  def restore(path, count):
    mesh = mesh_of(count)
    params = jax.device_put(make_params(), NamedSharding(mesh, P()))
    target = shampoo_optax.abstract_state(tx, params, mesh, padded=False)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      # Strict: the checkpoint layout does not depend on the mesh.
      state = checkpointer.restore(path,
                                   args=ocp.args.StandardRestore(target))
    state = shampoo_optax.pad_state(tx, params, state, mesh)
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
      checkpointer.save(path, args=ocp.args.StandardSave(
          shampoo_optax.unpad_state(tx, params, state)))
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
    # Dense_1's 8 x 8 blocks: a row of 8 blocks per device.
    for stack in state[0].stats[2:4] + state[0].preconditioners[2:4]:
      assert shard_shapes(stack) == {(1, 1, 8, 9, 4)}, pattern
  # Same data, same initialization: the three patterns agree.
  assert_close(results["fsdp"][0], results["explicit"][0], rtol=1e-5)
  assert_close(results["pjit"][0], results["explicit"][0], rtol=1e-5)


def test_explicit_data_parallel_gathers_only_the_update():
  tx = shampoo_optax.scale_by_shampoo(**OPTIONS, shard_axes="data")
  with jax.set_mesh(mesh_of(8)):
    params = {k: jax.sharding.reshard(v, P()) for k, v in make_params().items()}
    state = jax.jit(tx.init)(params)
    hlo = jax.jit(tx.update).lower(params, state).compile().as_text()
  collectives = _collectives(hlo)
  # Every block is preconditioned where its factors live, then gathered
  # once (w2's with its padding rows).
  assert {op for op, _ in collectives} <= {"all-gather", "all-reduce"}
  assert sum(b for op, b in collectives if op == "all-gather") <= (
      _param_bytes(("layers", "w1")) + _W2_PADDED), collectives
  assert all(b <= 4 * 8 for op, b in collectives if op == "all-reduce")


@pytest.mark.parametrize("transform", ["shampoo", "soap"])
def test_pjit_way_data_parallel_gathers_the_update_once(transform):
  """Auto mesh, jit with in/out shardings: the per-family state guides the
  partitioner (`_sharding.family_pins`), so the stacked gradient is not
  reshuffled and only the update is gathered (SOAP keeps its second moment
  per block, where the block's factors live)."""
  make = (shampoo_optax.scale_by_shampoo if transform == "shampoo"
          else shampoo_optax.scale_by_soap)
  tx = make(block_size=8, precondition_every=10**9, shard_axes="data",
            layer_axes={"layers": 0})
  mesh = mesh_of(8, AxisType.Auto)
  replicated = NamedSharding(mesh, P())
  params = {"layers": jax.ShapeDtypeStruct((16, 32, 32), np.float32,
                                           sharding=replicated)}
  state_sh = shampoo_optax.state_shardings(tx, params, mesh)
  with jax.set_mesh(mesh):
    hlo = jax.jit(tx.update, out_shardings=(replicated, state_sh)).lower(
        params, shampoo_optax.abstract_state(tx, params, mesh)
    ).compile().as_text()
  collectives = _collectives(hlo)
  assert {op for op, _ in collectives} <= {"all-gather", "all-reduce"}, (
      collectives)
  assert sum(b for op, b in collectives if op == "all-gather") <= (
      4 * 16 * 32 * 32), collectives


@pytest.mark.parametrize("mesh_shape,spec,spans,batch,local", [
    # 8-row shards, block 16: 8 x 16 blocks, split by block rows.
    ((8,), P("data", None), (8, 1), (1, 8, 3), (1, 1, 3)),
    # 2 x 4 mesh: 32-row shards hold whole blocks (no cut), 12-column
    # shards are cut: 16 x 12 blocks, split both ways.
    ((2, 4), P("data", "model"), (1, 4), (1, 4, 4), (1, 2, 1)),
])
def test_fsdp_blocks_cut_at_shards_stay_local_and_match_numpy(
    mesh_shape, spec, spans, batch, local):
  """``cut_at_shards``: a [64, 48] kernel, block 16, is blocked per shard
  (no block straddles two devices), so the update moves no gradient, and it
  is Shampoo on those blocks (a float64 NumPy Shampoo cut alike)."""
  names = ("data", "model")[:len(mesh_shape)]
  tx = shampoo_optax.scale_by_shampoo(
      block_size=16, graft="none", b1=0.0, b2=1.0, precondition_every=1,
      start_preconditioning_step=0, shard_axes=names, cut_at_shards=True)
  grads = [0.3 * jax.random.normal(jax.random.key(i), (64, 48))
           for i in range(3)]
  with jax.set_mesh(mesh_of(8, names=names, shape=mesh_shape)):
    sharded = [jax.sharding.reshard(g, spec) for g in grads]
    state = jax.jit(tx.init)(sharded[0])
    assert {s.shape[:3] for s in state.stats} == {batch}
    assert {shard_shapes(s).pop()[:3] for s in state.stats} == {local}
    update = jax.jit(tx.update)
    collectives = _collectives(
        update.lower(sharded[0], state).compile().as_text())
    assert all(op == "all-reduce" and b <= 4 * 8 for op, b in collectives), (
        collectives)
    ours = []
    for g in sharded:
      u, state = update(g, state)
      assert jax.typeof(u).sharding.spec == spec
      ours.append(np.asarray(u))
  ref = NumpyShampoo((16, 16), spans=spans)
  uncut = NumpyShampoo((16, 16))
  for g, u in zip(grads, ours):
    expected = ref.update(np.asarray(g, np.float64))
    # The first statistics of an 8-row block are singular (rank 8, 16
    # wide): their ridged roots amplify float32 rounding to ~2e-4.
    assert_close(u, expected, rtol=1e-3)
    # Blocks straddling the shards give another update, far outside that.
    assert np.abs(u - uncut.update(np.asarray(g))).max() > 0.05 * np.abs(
        expected).max()


def test_soap_blocks_cut_at_shards_are_per_shard_blocks():
  """SOAP cut at 8-row shards is SOAP on the shards as stacked layers."""
  options = dict(block_size=16, precondition_every=2)
  grads = [0.3 * jax.random.normal(jax.random.key(i), (64, 24))
           for i in range(4)]
  with jax.set_mesh(mesh_of(8)):
    tx = shampoo_optax.scale_by_soap(**options, shard_axes="data",
                                     cut_at_shards=True)
    sharded = [jax.sharding.reshard(g, P("data")) for g in grads]
    ours, _ = run_updates(tx, sharded)
  layered = shampoo_optax.scale_by_soap(**options, layer_axes=0)
  expected, _ = run_updates(layered, [g.reshape(8, 8, 24) for g in grads])
  for u, e in zip(ours, expected):
    assert_close(np.asarray(u), np.asarray(e).reshape(64, 24), rtol=1e-4)


def test_cut_at_shards_checkpoint_restores_at_the_same_shard_count_only():
  tx = shampoo_optax.scale_by_shampoo(block_size=16, shard_axes="data",
                                      cut_at_shards=True)
  params = {"w": jax.random.normal(jax.random.key(0), (64, 24))}
  with jax.set_mesh(mesh_of(8)):
    params8 = {"w": jax.sharding.reshard(params["w"], P("data"))}
    state = jax.jit(tx.init)(params8)
    _, state = jax.jit(tx.update)(params8, state)
  saved = shampoo_optax.unpad_state(tx, params8, state)
  same = shampoo_optax.pad_state(tx, params8, saved, mesh_of(8))
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  mesh4 = mesh_of(4)
  params4 = {"w": jax.device_put(params["w"], NamedSharding(mesh4, P("data")))}
  with pytest.raises(ValueError, match=r"pad_state: state.* has shape \(1, 8,"
                     r".*cut_at_shards"):
    shampoo_optax.pad_state(tx, params4, saved, mesh4)


@pytest.mark.parametrize("transform", ["shampoo", "soap"])
@pytest.mark.parametrize("spec", [P(None, None, "data"), P(None, "data", None)])
def test_fsdp_rows_are_reached_by_all_to_alls(transform, spec):
  """A stacked [12, 48, 32] leaf split 8 ways along a dim that its 8 x 8
  blocks straddle: its 12 x 6 x 4 blocks divide 8 nowhere, so its factors
  are rows (288 of them, 36 per device). The split moves to those rows by
  all-to-alls (`_sharding.to_rows`), never by gathering the family, and the
  updates equal the single-device ones."""
  make = (shampoo_optax.scale_by_shampoo if transform == "shampoo"
          else shampoo_optax.scale_by_soap)
  options = dict(block_size=8, precondition_every=2, layer_axes=0)
  grads = [0.3 * jax.random.normal(jax.random.key(i), (12, 48, 32))
           for i in range(4)]
  expected, _ = run_updates(make(**options), grads)
  tx = make(**options, shard_axes="data")
  with jax.set_mesh(mesh_of(8)):
    sharded = [jax.sharding.reshard(g, spec) for g in grads]
    state = jax.jit(tx.init)(sharded[0])
    assert {shard_shapes(s).pop()[0] for s in state.stats} == {36}
    hlo = jax.jit(tx.update).lower(sharded[0], state).compile().as_text()
    ours, _ = run_updates(tx, sharded)
  collectives = _collectives(hlo)
  local = 4 * 12 * 48 * 32 // 8
  assert {op for op, _ in collectives} <= {"all-to-all", "all-reduce"}, (
      collectives)
  moved = sum(b for op, b in collectives if op == "all-to-all")
  assert moved <= (4 if transform == "shampoo" else 6) * local, collectives
  for u, e in zip(ours, expected):
    assert_close(np.asarray(u), np.asarray(e), rtol=2e-5)


# Layouts whose update once segfaulted XLA's SPMD partitioner (a windowed
# reshard of the reshape that cut a row-split kernel into padded rows of
# blocks, when its other dim leaves a remainder block): found by
# `benchmarks.layout_sweep`.
CRASHED = [((48, 40), 16, "8", "rows"), ((384, 320), 128, "2x4", "both"),
           ((640, 320), 128, "4", "rows"), ((1536, 1000), 512, "2x4", "rows")]


def test_layouts_that_crashed_the_partitioner_compile(tmp_path):
  """Each compiles, in a worker process a crash cannot take pytest down, for
  Shampoo and SOAP, explicit and Auto axes, without XLA's "involuntary full
  rematerialization" (every change of split is a reshard we chose)."""
  from benchmarks import layout_sweep  # pylint: disable=g-import-not-at-top

  cases = []
  for (shape, block, mesh, split), (tx, mode) in itertools.product(
      CRASHED, [("shampoo", "explicit"), ("soap", "explicit"),
                ("shampoo", "auto"), ("soap", "auto")]):
    names = layout_sweep.MESHES[mesh][1]
    cases.append(dict(
        shape=list(shape), layer_axes=None, block=block, mesh=mesh,
        split=split, spec=layout_sweep.splits(2, None, mesh)[split],
        tx=tx, mode=mode,
        shard_axes=names[0] if len(names) == 1 else list(names),
        cut_at_shards=False))
  rows = layout_sweep.run(cases, tmp_path, timeout=1200)
  bad = [r for r in rows if r["status"] != "ok" or r["warnings"]]
  assert not bad, layout_sweep.summary(bad)


@pytest.mark.parametrize("transform", ["shampoo", "soap"])
def test_stacked_rows_straddled_by_blocks_need_no_rematerialization(
    transform, tmp_path):
  """A scanned [2, 256, 64] kernel split 8 ways by rows (32 a device) in
  blocks of 64, and a [2, 64, 4, 16] attention kernel in blocks of 16: its
  factors are padded rows, reached without XLA gathering the gradient
  ("involuntary full rematerialization" once did), and the updates equal
  the single-device ones."""
  from benchmarks import layout_sweep  # pylint: disable=g-import-not-at-top

  layouts = [((2, 256, 64), 64), ((2, 64, 4, 16), 16)]
  rows = layout_sweep.run([dict(
      shape=list(shape), layer_axes=0, block=block, mesh="8", split="rows",
      spec=[None, "data"] + [None] * (len(shape) - 2), tx=transform,
      mode="explicit", shard_axes="data", cut_at_shards=False)
                           for shape, block in layouts], tmp_path, timeout=600)
  bad = [r for r in rows if r["status"] != "ok" or r["warnings"]
         or r["collectives"].get("all-gather")]
  assert not bad, layout_sweep.summary(bad)
  make = (shampoo_optax.scale_by_shampoo if transform == "shampoo"
          else shampoo_optax.scale_by_soap)
  options = dict(block_size=64, precondition_every=2, layer_axes=0)
  grads = [0.3 * jax.random.normal(jax.random.key(i), (2, 256, 64))
           for i in range(3)]
  expected, _ = run_updates(make(**options), grads)
  with jax.set_mesh(mesh_of(8)):
    ours, _ = run_updates(make(**options, shard_axes="data"), [
        jax.sharding.reshard(g, P(None, "data")) for g in grads])
  for u, e in zip(ours, expected):
    assert_close(np.asarray(u), np.asarray(e), rtol=2e-5)


@pytest.mark.parametrize("transform", ["shampoo", "soap"])
@pytest.mark.parametrize("mesh_shape,spec", [
    ((8,), P("data", None)), ((2, 4), P("data", "model"))])
def test_layouts_that_crashed_the_partitioner_match_one_device(
    transform, mesh_shape, spec):
  """A [48, 40] kernel, block 16, split by rows (and columns): 6-row shards
  that its 16-row blocks straddle, a remainder block of 8 columns, factors
  stored as padded rows. Its updates equal the single-device ones."""
  make = (shampoo_optax.scale_by_shampoo if transform == "shampoo"
          else shampoo_optax.scale_by_soap)
  options = dict(block_size=16, precondition_every=2)
  grads = [0.3 * jax.random.normal(jax.random.key(i), (48, 40))
           for i in range(4)]
  expected, _ = run_updates(make(**options), grads)
  names = ("data", "model")[:len(mesh_shape)]
  tx = make(**options, shard_axes=names)
  with jax.set_mesh(mesh_of(8, names=names, shape=mesh_shape)):
    ours, _ = run_updates(tx, [jax.sharding.reshard(g, spec) for g in grads])
  for u, e in zip(ours, expected):
    assert_close(np.asarray(u), np.asarray(e), rtol=2e-5)


@pytest.mark.parametrize("transform", ["shampoo", "soap"])
def test_fsdp_state_of_rank_3_and_4_kernels_follows_the_parameters(transform):
  """Stacked attention kernels as ``nnx.MultiHeadAttention`` under
  ``nnx.scan`` makes them, split over d_model (FSDP): the query kernel
  [L, d, heads, head_dim] and the output kernel [L, heads, head_dim, d]
  both merge to d x d units, one family, split on different axes. Every
  state array is split like its parameter (or its blocks' factors): the
  state per device is its total / 8."""
  make = (shampoo_optax.scale_by_shampoo if transform == "shampoo"
          else shampoo_optax.scale_by_soap)
  shapes = {"query": ((4, 64, 4, 16), P(None, "data", None, None)),
            "out": ((4, 4, 16, 64), P(None, None, None, "data")),
            "mlp": ((4, 64, 256), P(None, "data", None)),
            "scale": ((4, 64), P(None, "data"))}
  tx = make(layer_axes=0, shard_axes="data")
  mesh = mesh_of(8)
  with jax.set_mesh(mesh):
    params = {k: jax.sharding.reshard(jnp.ones(s), spec)
              for k, (s, spec) in shapes.items()}
    state = jax.jit(tx.init)(params)
    per_leaf = [state.mu] + ([state.graft] if transform == "shampoo" else [])
    for tree in per_leaf:
      for name, x in tree.items():
        assert jax.typeof(x).sharding.spec == shapes[name][1], name
    report = shampoo_optax.state_report(tx, params, mesh)
    assert report.per_device() <= 1.001 * report.total() / 8, str(report)
    _, new_state = jax.jit(tx.update)(params, state, params)
    assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof,
                                                               state)


@pytest.mark.parametrize("transform,options", [
    ("shampoo", {}), ("shampoo", {"refresh": "staggered"}),
    ("shampoo", {"refresh": "drift", "drift_tolerance": 0.05}),
    ("shampoo", {"root_method": "newton"}), ("soap", {}),
    ("soap", {"refresh": "drift", "drift_tolerance": 0.05})])
def test_inside_shard_map_each_device_runs_its_own_optimizer(transform,
                                                             options):
  """``jax.shard_map`` with its default ``check_vma=True``: init and update
  inside, each device on its own shard; the same as the optimizer run on
  each shard alone, and the state's types are stable."""
  make = shampoo_optax.shampoo if transform == "shampoo" else (
      shampoo_optax.soap)
  tx = make(1e-2, block_size=8, precondition_every=2, **options)
  params = {"w": 0.3 * jax.random.normal(jax.random.key(0), (8 * 16, 12)),
            "b": jnp.ones(8 * 3)}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params)
           for i in range(3)]

  def run(params, *grads):
    state = tx.init(params)
    types = jax.tree.map(jax.typeof, state)
    for g in grads:
      updates, state = tx.update(g, state, params)
      assert jax.tree.map(jax.typeof, state) == types
    return updates

  mesh = mesh_of(8, AxisType.Auto)
  spec = {"w": P("data"), "b": P("data")}
  ours = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 4,
                               out_specs=spec))(params, *grads)
  for d in range(8):
    shard = lambda t, d=d: jax.tree.map(
        lambda x: x.reshape((8, -1) + x.shape[1:])[d], t)
    expected = jax.jit(run)(shard(params), *map(shard, grads))
    assert_close(shard(ours), expected, rtol=1e-5)


@pytest.mark.parametrize("transform", ["shampoo", "soap"])
def test_drift_refresh_on_8_devices_matches_one_device(transform):
  """The drift's budget is per device: under FSDP (factors split by rows,
  "w2" stored as 6 rows padded to 8) with tolerance 0 and a budget of all
  rows, every root or basis is recomputed every step, as refresh="all"
  does on the same mesh; padding rows are never picked."""
  make = shampoo_optax.shampoo if transform == "shampoo" else (
      shampoo_optax.soap)
  options = {**OPTIONS, "precondition_every": 1, "shard_axes": "data"}
  if transform == "soap":
    del options["start_preconditioning_step"]
  with jax.set_mesh(mesh_of(8)):
    params = {name: jax.sharding.reshard(x, fsdp_spec(x.shape))
              for name, x in make_params().items()}
    expected, _ = run_steps(make(1.0, **options), params, 4)
    outs, state = run_steps(make(1.0, refresh="drift", drift_tolerance=0.0,
                                 **options), params, 4)
  assert_updates_close(outs, expected)
  if transform == "shampoo":
    at = [np.asarray(r).reshape(-1) for r in state[0].refreshed_at]
    assert all(np.all(a == 3) for a in at[:4]), at
    assert all(np.all(a[:6] == 3) and np.all(a[6:] == -1) for a in at[4:])


def test_staggered_refresh_on_one_row_per_device_computes_each_root_once():
  """8 stacked layers split over 8 devices: each device holds one row of
  each factor, fewer than the steps of a window. Every root is recomputed
  once per window all the same, and the padding rows (those of "w2",
  stored as 6 rows padded to 8) stay at -1."""
  k, start = 4, 1
  tx = shampoo_optax.scale_by_shampoo(
      **{**OPTIONS, "precondition_every": k,
         "start_preconditioning_step": start},
      refresh="staggered", shard_axes="data")
  with jax.set_mesh(mesh_of(8)):
    params = {name: jax.sharding.reshard(x, fsdp_spec(x.shape))
              for name, x in make_params().items()}
    state = jax.jit(tx.init)(params)
    padding = [np.asarray(r).reshape(-1)[6:] for r in state.refreshed_at[4:]]
    assert all(np.all(p == -1) for p in padding)
    update = jax.jit(tx.update)
    refreshed = [np.zeros(r.size, int) for r in state.refreshed_at]
    for step in range(start + 1 + 2 * k):
      _, state = update(make_grads(step), state, params)
      at = [np.asarray(r).reshape(-1) for r in state.refreshed_at]
      if step <= start:
        continue
      for count, a in zip(refreshed, at):
        count += a == step
      if (step - start) % k == 0:  # A window ends.
        for i, count in enumerate(refreshed):
          own = count[:6] if i >= 4 else count
          assert np.all(own == 1), (i, count)
        refreshed = [np.zeros_like(c) for c in refreshed]
  padding = [a[6:] for a in at[4:]]
  assert all(np.all(p == -1) for p in padding), padding
