# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Orbax save and restore of AdamW's, Shampoo's and SOAP's state, side by side.

    python -m benchmarks.checkpoint_bench [--layers 4] [--d-model 256]
        [--rounds 4] [--optimizers adamw shampoo soap] [--out DIR]
        [--name checkpoint]

On 8 simulated CPU devices (the module sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts,
unless the flag is already there), the parameters of a GPT-like Flax model
(`benchmarks.workloads.CharTransformer`: ``--layers`` unrolled pre-LN blocks,
``d_model`` wide, 4 heads, byte vocabulary; 70 arrays at 4 layers) are split
FSDP-style over an explicit mesh axis ``"fsdp"``: each along its largest dim
that 8 divides. Shampoo and SOAP run with ``shard_axes="fsdp"`` and their
defaults (blocks of 128), so some factors (the attention kernels' 2 x 2
blocks) are stored as padded rows and the checkpoint layout differs from the
one in memory. Every floating state leaf is filled with non-constant values
(zeros would flatter the compression).

Per optimizer, the README's recipe, timed by phase:

* save: ``unpad_state`` (Shampoo, SOAP), then ``ocp.StandardCheckpointer``'s
  ``save`` of ``{"params", "opt_state"}`` until it has finished writing;
* restore: the target (``abstract_state(..., padded=False)`` for Shampoo and
  SOAP; for AdamW the live state's shapes and shardings, the cheapest
  target there is), the strict ``restore``, then ``pad_state`` (Shampoo,
  SOAP). Every phase ends with ``jax.block_until_ready``.

The machine is shared, so the optimizers are measured in turn, ``--rounds``
rounds of all of them in one process, and ratios are taken within the run:
the first round (``cold``: what a run's first checkpoint costs, compiles
included) and the fastest round of each phase (``best``: every later
checkpoint). Writes ``<out>/<name>.json`` and ``<out>/<name>.md``.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import datetime
import json
import math
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

from benchmarks import run as run_lib
from benchmarks import workloads
import shampoo_optax

AXIS = "fsdp"
PHASES = ("unpad", "write", "save", "target", "read", "pad", "restore")


def make_params(layers: int, d_model: int, mesh):
  """The model's parameters, each split along its largest dim 8 divides."""
  model = workloads.CharTransformer(256, d_model, layers, 4, 128)
  params = model.init(jax.random.key(0), jnp.zeros((1, 128), jnp.int32))
  params = jax.tree.map(np.asarray, params)
  k = mesh.shape[AXIS]

  def spec(x):
    dims = [d for d in range(x.ndim) if x.shape[d] % k == 0]
    if not dims:
      return P()
    d = max(dims, key=lambda d: x.shape[d])
    return P(*(AXIS if i == d else None for i in range(x.ndim)))

  return jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)


def make_optimizer(name: str):
  if name == "adamw":
    return optax.adamw(1e-3, weight_decay=1e-4)
  if name == "shampoo":
    return shampoo_optax.shampoo(1e-3, weight_decay=1e-4, shard_axes=AXIS)
  if name == "soap":
    return shampoo_optax.soap(1e-3, weight_decay=1e-4, shard_axes=AXIS)
  raise ValueError(name)


def _filled(state, rows):
  """Every floating leaf plus a non-constant pattern (same shardings).

  ``rows`` holds, per leaf, how many leading rows are real (the rest are
  padding rows and stay zero), or ``None`` for the whole leaf.
  """
  def fill(x, n):
    if not jnp.issubdtype(x.dtype, jnp.floating) or not x.size:
      return x
    pattern = jnp.sin(jnp.arange(x.size, dtype=jnp.float32) * 0.37)
    pattern = pattern.reshape(x.shape)
    if n is not None:
      pattern = jnp.where(
          jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1)) < n,
          pattern, 0.0)
    return x + pattern.astype(x.dtype)

  treedef = jax.tree.structure(state)
  return jax.jit(lambda leaves: jax.tree.unflatten(treedef, [
      fill(x, n) for x, n in zip(leaves, rows)]))(jax.tree.leaves(state))


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def save_and_restore(name, tx, params, state, mesh, path):
  """One checkpoint round trip by the README's recipe; seconds by phase."""
  padded = name != "adamw"
  seconds = {}
  saved, seconds["unpad"] = _timed(
      lambda: shampoo_optax.unpad_state(tx, params, state) if padded
      else state)

  def write():
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, {"params": params, "opt_state": saved})
      checkpointer.wait_until_finished()

  _, seconds["write"] = _timed(write)
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      params)
  target, seconds["target"] = _timed(
      lambda: shampoo_optax.abstract_state(tx, abstract_params, mesh,
                                           padded=False) if padded
      else jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=x.sharding), state))

  def read():
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path, {"params": abstract_params,
                                         "opt_state": target})

  restored, seconds["read"] = _timed(read)
  back, seconds["pad"] = _timed(
      lambda: shampoo_optax.pad_state(tx, abstract_params,
                                      restored["opt_state"], mesh) if padded
      else restored["opt_state"])
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    if not np.array_equal(np.asarray(a), np.asarray(b)):
      raise AssertionError(f"{name}: the restored state differs")
  seconds["save"] = seconds["unpad"] + seconds["write"]
  seconds["restore"] = seconds["target"] + seconds["read"] + seconds["pad"]
  return seconds


def describe(name, tx, params, state, mesh):
  """Arrays and bytes of the state, and the real rows of its padded factors.

  A factor stored as padded rows ``[rows, *packed]`` in memory has the shape
  ``[*batch, *packed]`` in the checkpoint layout: ``prod(batch)`` real rows.
  """
  leaves = jax.tree.leaves(state)
  rows = [None] * len(leaves)
  if name != "adamw":
    saved = jax.tree.leaves(
        shampoo_optax.abstract_state(tx, params, mesh, padded=False))
    rows = [None if a.shape == x.shape else
            math.prod(a.shape[:a.ndim - x.ndim + 1])
            for a, x in zip(saved, leaves)]
  return dict(arrays=len(leaves),
              mib=sum(x.size * x.dtype.itemsize for x in leaves) / 2**20,
              padded_arrays=sum(n is not None for n in rows)), rows


def markdown(results, meta) -> str:
  optimizers = list(results)
  lines = [
      f"# Orbax checkpoint of the optimizer state: {meta['model']}",
      "",
      f"{meta['devices']} simulated CPU devices, FSDP over `{AXIS}`;"
      f" {meta['rounds']} rounds of every optimizer in turn in one process"
      " (git " + str(meta["git"].get("commit", "?"))[:10] + ")."
      " Seconds; `x` = ratio to AdamW in the same run. `cold`: the first"
      " round (compiles included); `best`: the fastest round of each phase.",
      "",
      "| optimizer | arrays | MiB | padded arrays |",
      "| --- | --- | --- | --- |",
  ]
  for name in optimizers:
    r = results[name]
    lines.append(f"| {name} | {r['arrays']} | {r['mib']:.1f} |"
                 f" {r['padded_arrays']} |")
  lines += ["", "| phase | " + " | ".join(
      f"{n} cold | {n} best" for n in optimizers) + " |",
            "| --- |" + " --- |" * (2 * len(optimizers))]
  base = results.get("adamw")
  for phase in PHASES:
    cells = []
    for name in optimizers:
      for kind in ("cold", "best"):
        s = results[name][kind][phase]
        cell = f"{s:.2f}"
        if base and name != "adamw" and phase in ("save", "restore"):
          cell += f" ({s / base[kind][phase]:.2f}x)"
        cells.append(cell)
    lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--optimizers", nargs="+",
                  default=["adamw", "shampoo", "soap"],
                  choices=["adamw", "shampoo", "soap"])
  ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
  ap.add_argument("--name", default="checkpoint")
  args = ap.parse_args(argv)

  devices = len(jax.devices())
  mesh = jax.make_mesh((devices,), (AXIS,), axis_types=(AxisType.Explicit,))
  params = make_params(args.layers, args.d_model, mesh)
  meta = dict(
      started=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      argv=sys.argv if argv is None else argv, git=run_lib.git_info(),
      jax_version=jax.__version__, orbax_version=ocp.__version__,
      devices=devices, rounds=args.rounds,
      model=(f"CharTransformer, {args.layers} layers, d_model"
             f" {args.d_model}, {len(jax.tree.leaves(params))} parameter"
             " arrays"))
  states, results = {}, {}
  with jax.set_mesh(mesh):
    for name in args.optimizers:
      tx = make_optimizer(name)
      state = jax.jit(tx.init)(params)
      results[name], rows = describe(name, tx, params, state, mesh)
      states[name] = (tx, _filled(state, rows))
  rounds = {name: [] for name in args.optimizers}
  directory = tempfile.mkdtemp(prefix="checkpoint_bench_")
  try:
    for r in range(args.rounds):
      for name in args.optimizers:
        tx, state = states[name]
        path = os.path.join(directory, f"{name}_{r}")
        rounds[name].append(
            save_and_restore(name, tx, params, state, mesh, path))
        shutil.rmtree(path)
        print(f"round {r} {name}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in rounds[name][-1].items()), flush=True)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  for name in args.optimizers:
    results[name].update(
        rounds=rounds[name], cold=rounds[name][0],
        best={p: min(s[p] for s in rounds[name]) for p in PHASES})
  for name in args.optimizers:
    if name != "adamw" and "adamw" in results:
      results[name]["ratio_to_adamw"] = {
          kind: {p: results[name][kind][p] / results["adamw"][kind][p]
                 for p in ("save", "restore")} for kind in ("cold", "best")}
  table = markdown(results, meta)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
    json.dump(dict(meta=meta, results=results), f, indent=1)
  with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
    f.write(table)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
