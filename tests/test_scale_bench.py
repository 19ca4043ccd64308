# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Smoke test of benchmarks/scale_bench.py on a tiny decoder (compile only).

Marked ``multidevice``: the benchmark needs 8 devices. It is imported inside
the tests, because importing it sets ``XLA_FLAGS`` for 8 devices when no flag
is set, which must not leak into single-device sessions.
"""

import math

import jax
import pytest

pytestmark = pytest.mark.multidevice

# A while loop of 3 trips holding an all-gather; the refresh loop (a while
# without a trip count, op name ".../shard_map/while", whose body computes an
# eigh and all-reduces); an eigh hoisted out of it; a plain conditional.
_HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %ag = f32[64]{0} all-gather(%x), dimensions={0}, metadata={op_name="jit(step)/gather"}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
}

%phase (a: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %e = (f32[4,4]{0,1}, f32[4]{0}, s32[]) custom-call(%a), custom_call_target="lapack_ssyevd_ffi"
  %ar = (f32[16]{0}, s32[]) all-reduce(%b, %c), to_apply=%add
}

%add (a: f32[], b: f32[]) -> f32[] {
  %s = f32[] add(%a, %b)
}

%keep (a: f32[4,4]) -> f32[16] {
  %z = f32[16]{0} broadcast(%k)
}

%apply (a: f32[4,4]) -> f32[16] {
  %cp = bf16[2,2]{1,0} collective-permute(%z), source_target_pairs={{0,1}}
}

ENTRY %main (x: f32[8]) -> f32[2,2] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %h = (f32[4,4]{0,1}, f32[4]{0}, s32[]) custom-call(%a), custom_call_target="lapack_ssyevd_ffi"
  %r = (s32[], f32[4,4]) while(%u), condition=%cond, body=%phase, metadata={op_name="jit(step)/shard_map/while"}
  %d = f32[16]{0} conditional(%pred, %x, %y), branch_computations={%keep, %apply}
  ROOT %q = f32[2,2]{1,0} collective-permute(%z), source_target_pairs={{0,1}}
}
"""


def test_collective_bytes_trip_counts_and_refresh_loop():
  from benchmarks import scale_bench  # pylint: disable=g-import-not-at-top

  for phases in (0, 1):
    out = scale_bench.collective_bytes(_HLO, normal_phases=phases)
    normal, refresh = out["normal_step"], out["refresh_step"]
    assert normal["by_kind"]["all-gather"] == 3 * 64 * 4
    assert normal["by_kind"]["collective-permute"] == 16 + 8
    assert normal["by_kind"]["all-reduce"] == phases * (16 * 4 + 4)
    assert refresh["by_kind"]["all-reduce"] == 16 * 4 + 4
    assert refresh["total"] == normal["total"] + (1 - phases) * 68
    assert out["refresh_phase"]["total"] == 68
    assert normal["largest"][0] == dict(kind="all-gather", op_name="gather",
                                        bytes=768)
    assert out["refresh_loops"] == 1
    assert out["eigh_outside_refresh_loop"] == 1
    assert out["unknown_trip_counts"] == 0


def _shard_bytes(x) -> int:
  # Scalars come without a sharding: replicated.
  shape = x.sharding.shard_shape(x.shape) if x.sharding else x.shape
  return math.prod(shape) * x.dtype.itemsize


def test_tiny_decoder_measurement():
  from benchmarks import scale_bench  # pylint: disable=g-import-not-at-top
  import shampoo_optax  # pylint: disable=g-import-not-at-top

  config = scale_bench.CONFIGS["tiny"]
  # One Shampoo variant keeps the test short; "all" differs only in the
  # refresh phases a normal step runs (the test above).
  r = scale_bench.measure(config, log=lambda _: None,
                          variants=("shampoo_staggered",))
  adamw, shampoo = r["adamw"], r["shampoo_staggered"]
  assert r["variants"] == ["shampoo_staggered"]

  # The abstract state's own types (explicit mesh), independent of
  # abstract_state: the per-device bytes are the sum of the leaves' shards.
  mesh = jax.make_mesh((8,), ("fsdp",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  params = scale_bench.abstract_params(config, mesh)
  options, _ = scale_bench.shampoo_options(params, refresh="staggered")
  with jax.set_mesh(mesh):
    state = jax.eval_shape(
        shampoo_optax.shampoo(1e-3, **options).init, params)
  assert shampoo["state_bytes_per_device"] == sum(
      _shard_bytes(x) for x in jax.tree.leaves(state)) > 0
  assert sum(shampoo["state_report_per_device"].values()) == (
      shampoo["state_bytes_per_device"])
  # Every tiny parameter is split 8 ways; AdamW keeps mu and nu (+ a count).
  assert adamw["state_bytes_per_device"] - adamw["state_scalar_bytes"] == (
      2 * r["param_bytes"] // 8)
  assert adamw["memory"]["argument"] >= r["param_bytes"] // 8

  (inner,) = scale_bench._shampoo_states(state)  # pylint: disable=protected-access
  assert shampoo["roots_per_device"] == sum(
      math.prod(x.sharding.shard_shape(x.shape)[:-2])
      for x in inner.stats) > 0
  # Each device's rows of every factor, cut into precondition_every shares.
  assert shampoo["roots_per_phase"] == sum(
      -(-math.prod(x.sharding.shard_shape(x.shape)[:-2]) // 20)
      for x in inner.stats) > 0
  assert shampoo["refresh_share_bytes"] > 0
  assert r["model_matches_measured"]
  assert [m["devices"] for m in r["model"]] == [8, 64, 256] * 2

  for m in (adamw, shampoo):
    assert m["memory"]["peak"] >= m["memory"]["temp"] > 0
    assert m["update_memory"]["argument"] > 0
    assert m["total_seconds"] > 0
    col = m["collectives"]
    assert col["unknown_trip_counts"] == 0
    assert col["normal_step"]["total"] > 0
    assert col["refresh_step"]["total"] >= col["normal_step"]["total"]
    assert sum(col["normal_step"]["by_kind"].values()) == (
        col["normal_step"]["total"])
  assert shampoo["collectives"]["refresh_loops"] == 1
  assert shampoo["collectives"]["normal_phases"] == 1
  assert adamw["collectives"]["refresh_loops"] == 0
  # Staggered: every step runs one phase.
  assert shampoo["collectives"]["refresh_step"] == (
      shampoo["collectives"]["normal_step"])
  # Gathering weights forward and (rematerialised) backward: at least twice
  # the layer parameters for either optimizer.
  assert adamw["collectives"]["normal_step"]["by_kind"]["all-gather"] >= (
      2 * 4 * 12 * config.layers * config.d_model**2)
  assert set(r["targets"]) == {"shampoo_staggered"}
  assert set(r["targets"]["shampoo_staggered"]) == {
      "state", "collectives", "peak_memory", "compile"}
  assert all(isinstance(t["passed"], bool)
             for t in r["targets"]["shampoo_staggered"].values())
  assert 0 < r["preconditioned_param_fraction"] <= 1
  text = scale_bench.markdown([r], dict(
      git=dict(commit="x"), machine=dict(jax_version=jax.__version__)))
  assert "| tiny (" in text and "| tiny | per layer |" in text
  assert "shampoo (staggered)" in text


def test_fsdp_update_at_125m_stays_within_the_memory_targets():
  """The 125M decoder's update, FSDP over 8 devices, compiled on abstract
  parameters: the state is total / 8 per device (its 12 layers' 6 x 18 and
  6 x 6 block grids are stored as padded rows), and the update's temporaries
  are at most twice that state."""
  from benchmarks import scale_bench  # pylint: disable=g-import-not-at-top
  import shampoo_optax  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), (scale_bench.AXIS,),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  params = scale_bench.abstract_params(scale_bench.CONFIGS["125m"], mesh)
  options, _ = scale_bench.shampoo_options(params)
  tx = shampoo_optax.shampoo(1e-3, **options)
  with jax.set_mesh(mesh):
    state = jax.eval_shape(tx.init, params)
  per_device = sum(_shard_bytes(x) for x in jax.tree.leaves(state))
  total = shampoo_optax.state_report(
      shampoo_optax.shampoo(1e-3, **{**options, "shard_axes": None}),
      jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                   params)).total()
  assert per_device <= 1.01 * total / 8, (per_device, total / 8)
  temp = scale_bench.update_memory(tx, params, state, mesh)["temp"]
  assert temp <= 2 * per_device, (temp, per_device)
