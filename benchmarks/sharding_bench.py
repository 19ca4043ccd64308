"""Distributed Shampoo on 1 vs 8 simulated CPU devices.

Run as ``python -m benchmarks.sharding_bench [--layers 16 --dim 512
--block-size 128 --runs 5 --output PATH]``. It sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself (before JAX
starts), prints a summary and writes ``benchmarks/results/sharding.json``.

For a stack of ``layers`` square ``dim x dim`` matrices (``block_size``
blocks: ``layers * (dim / block_size)^2`` blocks, two Kronecker factors each)
it measures, with ``shard_axes="data"`` on a 1-device and an 8-device mesh:

* the refresh-step time (``precondition_every=1``: every step computes all
  inverse roots), median of ``runs`` jitted steps after a warm-up, and the
  time of a normal step (no roots) for comparison. The 8 simulated devices share the
  machine's cores (2 here), so the ratio shows the overhead and the work
  split, not a speed-up: 8 real devices each run 1/8 of the roots.
* exact per-device numbers, from the addressable shards of the state: the
  root count and bytes of the stacked statistics and roots, and the bytes of
  the per-parameter state (grafting, momentum; replicated for data
  parallelism).
* the collectives in the compiled step, with shapes, bytes per device and the
  stage they belong to (from the HLO's op names).

OpenBLAS (jaxlib's LAPACK on CPU) is set to one thread for both device counts
(the sharded code does so anyway on multi-device CPU meshes; see
``shampoo_optax/_sharding.py``).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import pathlib
import platform
import re
import statistics
import time

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

import shampoo_optax
from shampoo_optax import _sharding

DEFAULT_OUTPUT = pathlib.Path(__file__).parent / "results" / "sharding.json"
_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter)(?:-start)?\(.*?op_name=\"([^\"]*)\"")
_DTYPE_BYTES = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "pred": 1, "u32": 4}


def _stage(op_name: str, shapes) -> str:
  """Which part of the update a collective serves, from its op name."""
  if all(s.endswith("[]") for s in shapes):
    return "scalars (root diagnostics, finiteness, graft norms)"
  if op_name.endswith("/slice"):
    return "every step: roots to the owners of their blocks"
  if op_name.endswith("sharding_constraint"):
    return "every step: gather preconditioned blocks"
  return "other"


def collectives(hlo: str):
  rows = []
  for shapes, op, op_name in _COLLECTIVE.findall(hlo):
    arrays = re.findall(r"(\w+)\[([\d,]*)\]", shapes)
    nbytes = sum(
        _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",")
                                                  if d] or [1]))
        for dtype, dims in arrays)
    shapes = [f"{t}[{d}]" for t, d in arrays]
    op_name = op_name.split("/", 1)[-1]
    rows.append(dict(op=op, shapes=shapes, bytes_per_device=nbytes,
                     stage=_stage(op_name, shapes), op_name=op_name))
  return rows


def _device_bytes(tree, device) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def measure(count: int, args) -> dict:
  mesh = jax.make_mesh((count,), ("data",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:count])
  refresh = _time_steps(mesh, args, precondition_every=1)
  # Roots only at step 0 (the warm-up): the timed steps are normal steps.
  normal = _time_steps(mesh, args, precondition_every=10**9)
  return dict(devices=count,
              refresh_step_seconds_median=statistics.median(refresh.pop("times")),
              normal_step_seconds_median=statistics.median(normal["times"]),
              **refresh)


def _time_steps(mesh, args, precondition_every) -> dict:
  tx = shampoo_optax.scale_by_shampoo(
      block_size=args.block_size, precondition_every=precondition_every,
      start_preconditioning_step=0, shard_axes="data")
  keys = jax.random.split(jax.random.key(0), args.layers)
  replicated = NamedSharding(mesh, P())
  params = {f"layer{i:02d}": jax.device_put(
      jax.random.normal(k, (args.dim, args.dim)) / args.dim**0.5, replicated)
            for i, k in enumerate(keys)}
  state_sh = shampoo_optax.state_shardings(tx, params, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    step = jax.jit(tx.update, out_shardings=(replicated, state_sh),
                   donate_argnums=(1,))
    t0 = time.perf_counter()
    compiled = step.lower(params, state).compile()
    compile_seconds = time.perf_counter() - t0
    hlo = compiled.as_text()

    def run(state, runs):
      times = []
      for _ in range(runs):
        t0 = time.perf_counter()
        _, state = step(params, state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
      return state, times

    state, _ = run(state, 1)  # Warm-up.
    state, times = run(state, args.runs)

  device = jax.devices()[0]
  stacks = (state.stats, state.preconditioners)
  return dict(
      times=times,
      compile_seconds=compile_seconds,
      bucket_shapes=[list(s.shape) for s in state.stats],
      roots_per_device=sum(
          s.addressable_shards[0].data.shape[0] for s in state.stats),
      roots_total=sum(s.shape[0] for s in state.stats),
      per_device_bytes=dict(
          stats_and_roots=_device_bytes(stacks, device),
          per_parameter=_device_bytes((state.graft, state.mu), device),
          total=_device_bytes(state, device),
      ),
      global_bytes=dict(
          stats_and_roots=sum(x.nbytes for x in jax.tree.leaves(stacks)),
          total=sum(x.nbytes for x in jax.tree.leaves(state)),
      ),
      max_root_error=float(state.diagnostics.max_root_error),
      collectives=collectives(hlo),
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--block-size", type=int, default=128)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
  _sharding._single_threaded_openblas()  # pylint: disable=protected-access

  results = {count: measure(count, args) for count in (1, 8)}
  one, eight = results[1], results[8]
  summary = dict(
      model=f"{args.layers} layers of {args.dim}x{args.dim}, block "
      f"{args.block_size}",
      refresh_step_ratio_8_over_1=eight["refresh_step_seconds_median"]
      / one["refresh_step_seconds_median"],
      normal_step_ratio_8_over_1=eight["normal_step_seconds_median"]
      / one["normal_step_seconds_median"],
      roots_per_device={1: one["roots_per_device"],
                        8: eight["roots_per_device"]},
      stats_and_roots_bytes_per_device={
          1: one["per_device_bytes"]["stats_and_roots"],
          8: eight["per_device_bytes"]["stats_and_roots"]},
      collectives_8_devices=[
          f"{c['op']} {', '.join(c['shapes'])}: {c['stage']}"
          for c in eight["collectives"]],
  )
  out = dict(
      summary=summary,
      results=[one, eight],
      machine=dict(
          cpu_count=os.cpu_count(), platform=platform.platform(),
          jax=jax.__version__, backend=jax.default_backend(),
          openblas_threads="1 (set by the benchmark)",
          note="8 simulated devices share the CPU cores; timings are not a "
               "speed-up measurement, the per-device counts are exact."),
  )
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(out, indent=1, default=str) + "\n")

  mib = 2.0**20
  print(f"model: {summary['model']}; buckets {one['bucket_shapes']}")
  print("| devices | refresh step (s) | normal step (s) | roots / device |"
        " stats+roots MiB / device | per-param state MiB / device |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in (one, eight):
    b = r["per_device_bytes"]
    print(f"| {r['devices']} | {r['refresh_step_seconds_median']:.3f} | "
          f"{r['normal_step_seconds_median']:.3f} | "
          f"{r['roots_per_device']} | {b['stats_and_roots'] / mib:.1f} | "
          f"{b['per_parameter'] / mib:.1f} |")
  print(f"refresh-step time ratio 8/1: "
        f"{summary['refresh_step_ratio_8_over_1']:.2f} (simulated devices "
        f"share {os.cpu_count()} cores)")
  print("collectives in the compiled 8-device step:")
  for c in eight["collectives"]:
    print(f"  {c['op']:<18} {', '.join(c['shapes'])[:40]:<40} "
          f"{c['bytes_per_device'] / mib:7.3f} MiB  {c['stage']}")
  print(f"wrote {args.output}")
  return out


if __name__ == "__main__":
  main()
