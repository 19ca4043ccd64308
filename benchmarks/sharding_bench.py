"""Distributed Shampoo on 1 vs 8 simulated CPU devices: data parallel, FSDP.

Run as ``python -m benchmarks.sharding_bench [--layers 16 --dim 512
--block-size 128 --runs 5 --output PATH]``. It sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself (before JAX
starts), prints a summary and writes ``benchmarks/results/sharding.json``
(and a table, ``sharding.md``).

The model is ``layers`` square ``dim x dim`` matrices in ``block_size``
blocks (``layers * (dim / block_size)^2`` blocks, two Kronecker factors
each). Its gradients are the parameters themselves. Layouts, each with
``scale_by_shampoo(shard_axes="data")``:

* ``data_parallel``: ``layers`` leaves, replicated, on an ``Auto`` mesh
  (``jax.jit`` with ``in_shardings``/``out_shardings``), on 1 and on 8
  devices. Only ``shard_axes`` splits the factors (their units axis).
* ``fsdp_leaves``: the same leaves on an *explicit* 8-device mesh, each
  split along its rows (``P("data", None)``). They stack into one family
  of ``layers`` members (see `shampoo_optax._blocks`).
* ``fsdp_stacked_rows``: one ``[layers, dim, dim]`` leaf with
  ``layer_axes=0``, split along its rows (``P(None, "data", None)``),
  explicit mesh: the FSDP of a scanned model (as in ``scale_bench``).
  With ``dim / 8`` rows per device not a multiple of ``block_size``, blocks
  straddle two devices' rows.
* ``fsdp_stacked_rows_cut``: the same with ``cut_at_shards=True``: blocks
  are cut at the shard boundaries (64 x 128 blocks at the defaults), so
  nothing should move.
* ``fsdp_stacked_layers``: the same leaf split along its layer axis
  (``P("data", None, None)``): every device owns whole layers, so the
  factors follow the parameter and nothing should move.

Per layout it measures:

* step times, median of ``runs`` jitted steps after a warm-up:
  ``refresh="all"`` with ``precondition_every=1`` (every step computes every
  root), with ``precondition_every=10**9`` (normal steps: no root is due),
  and ``refresh="staggered"`` with ``precondition_every=20`` (every step a
  1/20 share of each device's roots). The 8 simulated devices share the
  machine's cores (2 here), so 8 vs 1 shows the overhead and the split, not
  a speed-up.
* exact per-device numbers from the addressable shards of the state: roots
  (matrices) per device, bytes of the statistics and roots, of the
  per-family state (grafting, momentum) and in total; also
  `shampoo_optax.state_report`'s bytes per device by kind.
* the collectives of the compiled step: every collective with its shapes,
  per-device bytes and where it comes from (its JAX op name), and the bytes
  per device per step by kind for a normal and a refresh step (rules of
  `benchmarks.scale_bench.collective_bytes`: the refresh ``while`` loop's
  body counts once per phase, 0 on a normal step with ``refresh="all"``).

OpenBLAS (jaxlib's LAPACK on CPU) is set to one thread for every run (the
library does so itself for CPU eigh roots; see
``shampoo_optax._roots._single_threaded_openblas``).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import math
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

from benchmarks import run as run_lib
from benchmarks import scale_bench
import shampoo_optax
from shampoo_optax import _roots

DEFAULT_OUTPUT = pathlib.Path(__file__).parent / "results" / "sharding.json"
_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter)(?:-start)?\((?:.*?op_name=\"([^\"]*)\")?")
_DTYPE_BYTES = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "pred": 1, "u32": 4}
LAYOUTS = ("data_parallel", "fsdp_leaves", "fsdp_stacked_rows",
           "fsdp_stacked_rows_cut", "fsdp_stacked_layers")


def _stage(op_name: str, shapes) -> str:
  """Which part of the update a collective serves, from its op name."""
  if not op_name:
    return "no op name (inserted by the partitioner)"
  if all(s.endswith("[]") for s in shapes):
    return "scalars (root diagnostics, finiteness, graft norms)"
  if "shard_map/while" in op_name:
    return "refresh loop (per phase)"
  if op_name.endswith("shard_map"):
    return "shard_map boundary: factors to/from each device's split"
  return "update: " + op_name


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


def _params(layout: str, mesh, args):
  """The parameters (placed), ``layer_axes`` and the mesh's axis type."""
  keys = jax.random.split(jax.random.key(0), args.layers)
  shape = (args.dim, args.dim)
  if layout in ("data_parallel", "fsdp_leaves"):
    spec = P() if layout == "data_parallel" else P("data", None)
    sharding = NamedSharding(mesh, spec)
    return {f"layer{i:02d}": jax.device_put(
        jax.random.normal(k, shape) / args.dim**0.5, sharding)
            for i, k in enumerate(keys)}, None
  spec = (P(None, "data", None) if layout.startswith("fsdp_stacked_rows")
          else P("data", None, None))
  stacked = jax.random.normal(keys[0], (args.layers,) + shape) / args.dim**0.5
  return {"layers": jax.device_put(stacked, NamedSharding(mesh, spec))}, {
      "layers": 0}


def _mesh(layout: str, count: int):
  kind = AxisType.Auto if layout == "data_parallel" else AxisType.Explicit
  return jax.make_mesh((count,), ("data",), axis_types=(kind,),
                       devices=jax.devices()[:count])


def measure(layout: str, count: int, args) -> dict:
  refresh = _time_steps(layout, count, args, precondition_every=1)
  # Roots only at step 0 (the warm-up): the timed steps are normal steps.
  normal = _time_steps(layout, count, args, precondition_every=10**9,
                       details=False)
  staggered = _time_steps(layout, count, args, precondition_every=20,
                          refresh="staggered", details=False)
  return dict(
      layout=layout, devices=count,
      refresh_step_seconds_median=statistics.median(refresh.pop("times")),
      normal_step_seconds_median=statistics.median(normal["times"]),
      staggered_step_seconds_median=statistics.median(staggered["times"]),
      staggered_collectives_per_step=staggered["collectives_per_step"],
      **refresh)


def _time_steps(layout, count, args, precondition_every, refresh="all",
                details=True) -> dict:
  mesh = _mesh(layout, count)
  params, layer_axes = _params(layout, mesh, args)
  tx = shampoo_optax.scale_by_shampoo(
      block_size=args.block_size, precondition_every=precondition_every,
      start_preconditioning_step=0, shard_axes="data", refresh=refresh,
      layer_axes=layer_axes, cut_at_shards=layout.endswith("_cut"))
  with jax.set_mesh(mesh):
    if layout == "data_parallel":
      state_sh = shampoo_optax.state_shardings(tx, params, mesh)
      replicated = NamedSharding(mesh, P())
      state = jax.jit(tx.init, out_shardings=state_sh)(params)
      step = jax.jit(tx.update, out_shardings=(replicated, state_sh),
                     donate_argnums=(1,))
    else:  # Explicit axes: the shardings are in the types.
      state = jax.jit(tx.init)(params)
      step = jax.jit(tx.update, donate_argnums=(1,))
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

  per_step = scale_bench.collective_bytes(
      hlo, top=4, normal_phases=int(refresh == "staggered"))
  steps = {k: dict(total=per_step[k]["total"],
                   by_kind={n: b for n, b in per_step[k]["by_kind"].items()
                            if b})
           for k in ("normal_step", "refresh_step")}
  out = dict(times=times, collectives_per_step=steps)
  if not details:
    return out
  device = jax.devices()[0]
  stacks = (state.stats, state.preconditioners)
  local_rows = lambda x: max(
      math.prod(s.data.shape[:-2]) for s in x.addressable_shards)
  report = shampoo_optax.state_report(tx, params, mesh)
  out.update(
      compile_seconds=compile_seconds,
      factor_shapes=[list(s.shape) for s in state.stats],
      factor_specs=[str(s.sharding.spec) for s in state.stats],
      family_specs=[str(x.sharding.spec) for x in state.graft],
      roots_per_device=sum(local_rows(s) for s in state.stats),
      roots_total=sum(math.prod(s.shape[:-2]) for s in state.stats),
      per_device_bytes=dict(
          stats_and_roots=_device_bytes(stacks, device),
          per_family=_device_bytes((state.graft, state.mu), device),
          total=_device_bytes(state, device),
      ),
      state_report_per_device={k: report.per_device(k)
                               for k in shampoo_optax._report.KINDS},  # pylint: disable=protected-access
      global_bytes=dict(
          stats_and_roots=sum(x.nbytes for x in jax.tree.leaves(stacks)),
          total=sum(x.nbytes for x in jax.tree.leaves(state)),
      ),
      max_root_error=float(state.diagnostics.max_root_error),
      root_failures=int(state.diagnostics.root_failures),
      refresh_loops=per_step["refresh_loops"],
      eigh_outside_refresh_loop=per_step["eigh_outside_refresh_loop"],
      largest_collectives_normal_step=per_step["normal_step"]["largest"],
      collectives=collectives(hlo),
  )
  return out


def _kinds(counts: dict) -> str:
  short = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS",
           "all-to-all": "A2A", "collective-permute": "CP"}
  return ", ".join(f"{short[k]} {v / 2**20:.3f}" for k, v in counts.items()
                   ) or "none"


def markdown(results, args, git: dict) -> str:
  mib = 2.0**20
  lines = [
      f"commit {git['commit']}{' (dirty)' if git.get('dirty') else ''}; "
      f"{args.layers} x {args.dim}^2 matrices, block {args.block_size}; "
      f"`scale_by_shampoo(shard_axes=\"data\")`; {os.cpu_count()} cores "
      "shared by the simulated devices. Per device.", "",
      "| layout | devices | roots / device | stats+roots MiB | per-family "
      "MiB | state MiB | refresh step s | normal step s | staggered step s"
      " | collectives normal step, MiB | refresh step, MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    b = r["per_device_bytes"]
    c = r["collectives_per_step"]
    lines.append(
        f"| {r['layout']} | {r['devices']} | {r['roots_per_device']} | "
        f"{b['stats_and_roots'] / mib:.1f} | {b['per_family'] / mib:.1f} | "
        f"{b['total'] / mib:.1f} | {r['refresh_step_seconds_median']:.3f} | "
        f"{r['normal_step_seconds_median']:.3f} | "
        f"{r['staggered_step_seconds_median']:.3f} | "
        f"{c['normal_step']['total'] / mib:.3f} "
        f"({_kinds(c['normal_step']['by_kind'])}) | "
        f"{c['refresh_step']['total'] / mib:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--block-size", type=int, default=128)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS),
                      choices=LAYOUTS)
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
  _roots._single_threaded_openblas()  # pylint: disable=protected-access

  results = []
  for layout in args.layouts:
    for count in ((1, 8) if layout == "data_parallel" else (8,)):
      results.append(measure(layout, count, args))
      r = results[-1]
      print(f"{layout} on {count}: refresh "
            f"{r['refresh_step_seconds_median']:.3f}s normal "
            f"{r['normal_step_seconds_median']:.3f}s staggered "
            f"{r['staggered_step_seconds_median']:.3f}s", flush=True)
  by = {(r["layout"], r["devices"]): r for r in results}
  summary = dict(model=f"{args.layers} layers of {args.dim}x{args.dim}, "
                 f"block {args.block_size}")
  if ("data_parallel", 1) in by and ("data_parallel", 8) in by:
    one, eight = by[("data_parallel", 1)], by[("data_parallel", 8)]
    summary.update(
        refresh_step_ratio_8_over_1=eight["refresh_step_seconds_median"]
        / one["refresh_step_seconds_median"],
        normal_step_ratio_8_over_1=eight["normal_step_seconds_median"]
        / one["normal_step_seconds_median"])
  summary["per_layout"] = {
      f"{r['layout']} x{r['devices']}": dict(
          roots_per_device=r["roots_per_device"],
          state_bytes_per_device=r["per_device_bytes"]["total"],
          stats_and_roots_bytes_per_device=r["per_device_bytes"][
              "stats_and_roots"],
          collectives_per_step=r["collectives_per_step"],
          factor_specs=sorted(set(r["factor_specs"])),
          eigh_outside_refresh_loop=r["eigh_outside_refresh_loop"],
          collectives=[
              f"{c['op']} {', '.join(c['shapes'])}: {c['stage']}"
              for c in r["collectives"]],
      ) for r in results}
  out = dict(
      summary=summary,
      results=results,
      git=run_lib.git_info(),
      machine=dict(
          cpu_count=os.cpu_count(), platform=platform.platform(),
          jax=jax.__version__, backend=jax.default_backend(),
          openblas_threads="1 (set by the benchmark)",
          note="8 simulated devices share the CPU cores; timings are not a "
               "speed-up measurement, the per-device counts are exact."),
  )
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(json.dumps(out, indent=1, default=str) + "\n")
  text = markdown(results, args, out["git"])
  args.output.with_suffix(".md").write_text(text)

  print(text)
  for r in results:
    print(f"collectives, {r['layout']} on {r['devices']} device(s):")
    for c in r["collectives"]:
      print(f"  {c['op']:<18} {', '.join(c['shapes'])[:40]:<40} "
            f"{c['bytes_per_device'] / 2**20:7.3f} MiB  {c['stage'][:70]}")
  print(f"wrote {args.output}")
  return out


if __name__ == "__main__":
  main()
