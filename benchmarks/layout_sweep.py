# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Compiles the update for many sharded layouts, each in a crash-proof worker.

XLA's SPMD partitioner once segfaulted on some layouts (a kernel split by
rows whose blocks straddle the shards and whose other dim leaves a
remainder block). A crash kills the process, so the cases run in a worker
subprocess that is restarted after the case that killed it. For each case
(leaf shape, layer axes, block size, mesh, the leaf's split, transform,
``shard_axes``, explicit or ``Auto`` axes, ``cut_at_shards``) it records
whether the update compiled, the XLA warnings printed while compiling
("Involuntary full rematerialization"), and the bytes of each kind of
collective in the compiled update.

  python -m benchmarks.layout_sweep                 # the full sweep
  python -m benchmarks.layout_sweep --quick         # a few dozen cases
  python -m benchmarks.layout_sweep --out benchmarks/results/layout_sweep

Writes ``cases.json`` and a summary ``layout_sweep.md`` to ``--out``.
"""

import argparse
import collections
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import time

MESHES = {"8": ((8,), ("data",)), "4": ((4,), ("data",)),
          "2x4": ((2, 4), ("data", "model"))}

# (shape, layer_axes, block sizes): remainders and straddles of every kind.
LEAVES = [
    ((48, 40), None, (16,)),
    ((384, 320), None, (128,)),
    ((640, 320), None, (128,)),
    ((1536, 1000), None, (512,)),
    ((512, 1000), None, (128,)),
    ((768, 3072), None, (128,)),
    ((64, 16), None, (8,)),
    ((24, 16), None, (8,)),
    ((100, 60), None, (16, 32)),
    ((96, 200), None, (32, 64)),
    ((40, 48), None, (16,)),
    ((136, 72), None, (16, 64)),
    ((256, 384), None, (128,)),
    ((8, 1000), None, (128,)),
    ((4, 48, 40), 0, (16,)),
    ((12, 48, 32), 0, (8, 16)),
    ((3, 96, 72), 0, (32,)),
    ((2, 64, 4, 16), 0, (16, 64)),
    ((4, 48, 6, 8), 0, (16,)),
]


def splits(ndim, layer, mesh):
  """Named PartitionSpec entries for the leaf: rows, cols, layers, both."""
  names = MESHES[mesh][1]
  first = 0 if layer is None else 1
  out = {}
  for label, axis in (("rows", first), ("cols", ndim - 1)):
    spec = [None] * ndim
    spec[axis] = names[0] if len(names) == 1 else names
    out[label] = spec
  if layer is not None:
    spec = [None] * ndim
    spec[0] = names[0] if len(names) == 1 else names
    out["layers"] = spec
  if len(names) == 2:
    spec = [None] * ndim
    spec[first], spec[ndim - 1] = names
    out["both"] = spec
  return out


def _size(entry, sizes):
  names = () if entry is None else (entry,) if isinstance(entry, str) else entry
  count = 1
  for name in names:
    count *= sizes[name]
  return count


def cases(quick: bool):
  out = []
  for shape, layer, blocks in LEAVES:
    for block, mesh in itertools.product(blocks, ("8", "2x4", "4")):
      for label, spec in splits(len(shape), layer, mesh).items():
        names = MESHES[mesh][1]
        shard_axes = names[0] if len(names) == 1 else list(names)
        sizes = dict(zip(names, MESHES[mesh][0]))
        if any(d % _size(e, sizes) for d, e in zip(shape, spec)):
          continue  # Explicit sharding needs even shards.
        variants = [("shampoo", "explicit", shard_axes, False)]
        if not quick and mesh != "4":
          variants += [("soap", "explicit", shard_axes, False),
                       ("shampoo", "auto", shard_axes, False),
                       ("soap", "auto", shard_axes, False),
                       ("shampoo", "explicit", None, False),
                       ("shampoo", "explicit", shard_axes, True)]
        for tx, mode, axes, cut in variants:
          out.append(dict(shape=list(shape), layer_axes=layer, block=block,
                          mesh=mesh, split=label, spec=spec, tx=tx, mode=mode,
                          shard_axes=axes, cut_at_shards=cut))
  if quick:
    out = [c for c in out if c["mesh"] == "8" and c["split"] == "rows"]
  return out


def _collectives(text):
  """Bytes moved per kind of collective in compiled HLO text (result sizes)."""
  sizes = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "bf16": 2, "f16": 2,
           "f64": 8, "s64": 8}
  moved = collections.Counter()
  pattern = re.compile(
      r"= \(?((?:[a-z0-9]+\[[0-9,]*\][^ ]*(?:, )?)+)\)? "
      r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
      r"(?:-start)?\(")
  for line in text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", m.group(1)):
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      moved[m.group(2)] += count * sizes.get(dtype, 4)
  return dict(moved)


def _run_case(case):
  """Compiles one case's update (in the worker); returns its collectives."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import shampoo_optax  # pylint: disable=g-import-not-at-top

  shape, names = MESHES[case["mesh"]]
  axis_type = AxisType.Explicit if case["mode"] == "explicit" else AxisType.Auto
  mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names),
                       devices=jax.devices()[:int(__import__("math").prod(
                           shape))])
  axes = case["shard_axes"]
  make = (shampoo_optax.scale_by_shampoo if case["tx"] == "shampoo"
          else shampoo_optax.scale_by_soap)
  tx = make(block_size=case["block"],
            shard_axes=tuple(axes) if isinstance(axes, list) else axes,
            layer_axes={"w": case["layer_axes"]},
            cut_at_shards=case["cut_at_shards"])
  spec = P(*(tuple(e) if isinstance(e, list) else e for e in case["spec"]))
  params = {"w": jax.ShapeDtypeStruct(tuple(case["shape"]), jnp.float32)}
  param_sh = {"w": NamedSharding(mesh, spec)}
  with jax.set_mesh(mesh):
    if case["mode"] == "explicit":
      params = {"w": jax.ShapeDtypeStruct(tuple(case["shape"]), jnp.float32,
                                          sharding=param_sh["w"])}
      state = jax.eval_shape(tx.init, params)
      compiled = jax.jit(tx.update).lower(params, state).compile()
    else:
      state_sh = shampoo_optax.state_shardings(tx, params, mesh, param_sh)
      state = jax.eval_shape(tx.init, params)
      compiled = jax.jit(tx.update, in_shardings=(param_sh, state_sh),
                         out_shardings=(param_sh, state_sh)).lower(
                             params, state).compile()
  return _collectives(compiled.as_text())


def _worker(path, start):
  cases_ = json.loads(pathlib.Path(path).read_text())
  for i in range(start, len(cases_)):
    print(f"##CASE {i}", file=sys.stderr, flush=True)
    try:
      result = {"status": "ok", "collectives": _run_case(cases_[i])}
    except Exception as e:  # pylint: disable=broad-except
      result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:400]}
    print(f"##RESULT {i} {json.dumps(result)}", file=sys.stderr, flush=True)


def run(cases_, out: pathlib.Path, timeout: float):
  out.mkdir(parents=True, exist_ok=True)
  path = out / "cases_input.json"
  path.write_text(json.dumps(cases_))
  results = [None] * len(cases_)
  start = 0
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  while start < len(cases_):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.layout_sweep", "--worker",
         str(path), str(start)], env=env, capture_output=True, text=True,
        timeout=timeout, check=False)
    current, warnings = None, collections.Counter()
    for line in proc.stderr.splitlines():
      if line.startswith("##CASE "):
        current, warnings = int(line.split()[1]), collections.Counter()
      elif line.startswith("##RESULT "):
        _, index, payload = line.split(" ", 2)
        results[int(index)] = dict(json.loads(payload),
                                   warnings=dict(warnings))
        current = None
      elif "Involuntary full rematerialization" in line:
        warnings["involuntary_full_rematerialization"] += 1
    if current is None:
      break
    results[current] = {"status": f"crash (exit {proc.returncode})",
                        "warnings": dict(warnings)}
    print(f"case {current} crashed: {cases_[current]}", flush=True)
    start = current + 1
  rows = [dict(c, **r) for c, r in zip(cases_, results)]
  (out / "cases.json").write_text(json.dumps(rows, indent=1))
  path.unlink()
  return rows


def summary(rows) -> str:
  by_status = collections.Counter(r["status"].split(" ")[0] for r in rows)
  remat = [r for r in rows if r.get("warnings")]
  lines = [f"{len(rows)} cases: " + ", ".join(
      f"{n} {s}" for s, n in sorted(by_status.items())),
           f"with 'Involuntary full rematerialization': {len(remat)}", ""]
  bad = [r for r in rows if r["status"] != "ok" or r.get("warnings")]
  if bad:
    lines += ["| shape | layer | block | mesh | split | tx | mode | shard_axes"
              " | cut | status | warnings |", "|" + "---|" * 11]
    for r in bad:
      lines.append(
          f"| {tuple(r['shape'])} | {r['layer_axes']} | {r['block']} |"
          f" {r['mesh']} | {r['split']} | {r['tx']} | {r['mode']} |"
          f" {r['shard_axes']} | {r['cut_at_shards']} |"
          f" {r['status'][:80]} | {r.get('warnings', {})} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="benchmarks/results/layout_sweep")
  parser.add_argument("--timeout", type=float, default=3600)
  parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args.worker[0], int(args.worker[1]))
    return
  started = time.time()
  rows = run(cases(args.quick), pathlib.Path(args.out), args.timeout)
  text = summary(rows)
  (pathlib.Path(args.out) / "layout_sweep.md").write_text(
      f"# Layout sweep ({time.time() - started:.0f} s)\n\n{text}\n")
  print(text)


if __name__ == "__main__":
  main()
