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

# A while loop of 3 trips holding an all-gather, a refresh conditional (one
# branch computes an eigh and all-reduces) and a plain conditional.
_HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %ag = f32[64]{0} all-gather(%x), dimensions={0}, metadata={op_name="jit(step)/gather"}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
}

%roots (a: f32[4,4]) -> f32[16] {
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
  %c = f32[16]{0} conditional(%pred, %x, %y), branch_computations={%keep, %roots}
  %d = f32[16]{0} conditional(%pred, %x, %y), branch_computations={%keep, %apply}
  ROOT %r = f32[2,2]{1,0} collective-permute(%z), source_target_pairs={{0,1}}
}
"""


def test_collective_bytes_trip_counts_and_refresh_branch():
  from benchmarks import scale_bench  # pylint: disable=g-import-not-at-top

  out = scale_bench.collective_bytes(_HLO)
  normal, refresh = out["normal_step"], out["refresh_step"]
  assert normal["by_kind"]["all-gather"] == 3 * 64 * 4
  assert normal["by_kind"]["collective-permute"] == 16 + 8
  assert normal["by_kind"]["all-reduce"] == 0
  assert refresh["by_kind"]["all-reduce"] == 16 * 4 + 4
  assert refresh["total"] == normal["total"] + 68
  assert normal["largest"][0] == dict(kind="all-gather", op_name="gather",
                                      bytes=768)
  assert out["refresh_conditionals"] == 1
  assert out["unknown_trip_counts"] == 0


def _shard_bytes(x) -> int:
  # Scalars come without a sharding: replicated.
  shape = x.sharding.shard_shape(x.shape) if x.sharding else x.shape
  return math.prod(shape) * x.dtype.itemsize


def test_tiny_decoder_measurement():
  from benchmarks import scale_bench  # pylint: disable=g-import-not-at-top
  import shampoo_optax  # pylint: disable=g-import-not-at-top

  config = scale_bench.CONFIGS["tiny"]
  r = scale_bench.measure(config, log=lambda _: None)
  adamw, shampoo = r["adamw"], r["shampoo"]

  # The abstract state's own types (explicit mesh), independent of
  # state_shardings: the per-device bytes are the sum of the leaves' shards.
  mesh = jax.make_mesh((8,), ("fsdp",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  params = scale_bench.abstract_params(config, mesh)
  options, _ = scale_bench.shampoo_options(params)
  with jax.set_mesh(mesh):
    state = jax.eval_shape(
        shampoo_optax.shampoo(1e-3, **options).init, params)
  assert shampoo["state_bytes_per_device"] == sum(
      _shard_bytes(x) for x in jax.tree.leaves(state)) > 0
  # Every tiny parameter is split 8 ways; AdamW keeps mu and nu (+ a count).
  assert adamw["state_bytes_per_device"] - adamw["state_scalar_bytes"] == (
      2 * r["param_bytes"] // 8)
  assert adamw["memory"]["argument"] >= r["param_bytes"] // 8

  stats = sum(n for n, _, _ in shampoo["bucket_shapes"])
  assert shampoo["roots_per_device"] == stats // 8 > 0
  assert r["model_matches_measured"]
  assert [m["devices"] for m in r["model"]] == [8, 64, 256] * 2

  for m in (adamw, shampoo):
    assert m["memory"]["peak"] >= m["memory"]["temp"] > 0
    assert m["total_seconds"] > 0
    col = m["collectives"]
    assert col["unknown_trip_counts"] == 0
    assert col["normal_step"]["total"] > 0
    assert col["refresh_step"]["total"] >= col["normal_step"]["total"]
    assert sum(col["normal_step"]["by_kind"].values()) == (
        col["normal_step"]["total"])
  assert shampoo["collectives"]["refresh_conditionals"] >= 1
  assert adamw["collectives"]["refresh_conditionals"] == 0
  # Gathering weights forward and (rematerialised) backward: at least twice
  # the layer parameters for either optimizer.
  assert adamw["collectives"]["normal_step"]["by_kind"]["all-gather"] >= (
      2 * 4 * 12 * config.layers * config.d_model**2)
  assert set(r["targets"]) == {"state", "collectives", "peak_memory",
                               "compile"}
  assert all(isinstance(t["passed"], bool) for t in r["targets"].values())
  assert 0 < r["preconditioned_param_fraction"] <= 1
  text = scale_bench.markdown([r], dict(
      git=dict(commit="x"), machine=dict(jax_version=jax.__version__)))
  assert "| tiny (" in text and "| tiny | as given |" in text
