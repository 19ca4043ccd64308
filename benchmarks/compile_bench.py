"""Compile time of one train step vs the number of layers.

    python -m benchmarks.compile_bench [--reference-path PATH]
        [--layers 8 32 64] [--width 256] [--out benchmarks/results]

For MLPs of L equal-shaped layers (``width x width`` kernels plus biases) it
measures, for ``optax.adamw``, ``shampoo_optax.shampoo`` and (with a path) the
reference ``distributed_shampoo``, the wall time to trace+lower and to
compile one jitted train step (forward, backward, optimizer update), the
first call included, each in a fresh jit. It also counts, in the lowered
StableHLO and in the compiled HLO, the ``eigh`` decompositions (LAPACK
``syevd`` custom calls or ``stablehlo`` eigh ops) and the ``while`` loops:
compile time that grows with L usually comes from per-leaf ops like these.

Writes ``<out>/compile.json`` and ``<out>/compile.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import _reference
from benchmarks import run as run_lib


def mlp(num_layers: int, width: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), num_layers)
  params = {
      f"layer_{i:03d}": {
          "kernel": jax.random.normal(k, (width, width)) / jnp.sqrt(width),
          "bias": jnp.zeros((width,)),
      } for i, k in enumerate(keys)
  }

  def loss_fn(p, batch):
    x = batch["x"]
    for i in range(num_layers):
      layer = p[f"layer_{i:03d}"]
      x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return jnp.mean((x - batch["y"]) ** 2)

  batch = {"x": jnp.ones((32, width)), "y": jnp.zeros((32, width))}
  return params, loss_fn, batch


def count_ops(text: str) -> dict[str, int]:
  """Call sites (not metadata mentions) of eigh and while, and op count."""
  return dict(
      # StableHLO: `stablehlo.custom_call @lapack_ssyevd_ffi(` or
      # `@Eigh(`; HLO: `custom_call_target="lapack_ssyevd_ffi"`.
      eigh=len(re.findall(
          r"custom_call @\w*(?:syevd|heevd|Eigh)\w*\(|"
          r"custom_call_target=\"\w*(?:syevd|heevd|Eigh)\w*\"", text)),
      while_=len(re.findall(r"stablehlo\.while\b|[\])}] while\(", text)),
      ops=len(re.findall(r"^\s*(?:%\S+|ROOT \S+|\S+) = ", text,
                         re.MULTILINE)),
  )


def measure(name: str, num_layers: int, width: int,
            options: dict) -> dict:
  params, loss_fn, batch = mlp(num_layers, width)
  if name == "reference":  # Configured like shampoo's defaults, as in run.
    options = {**run_lib.shampoo_defaults(), **options}
  opt = run_lib.make_optimizer(name, 1e-3, 0.0, options)
  state = opt.init(params)

  def step(p, s, b):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  t0 = time.perf_counter()
  lowered = jax.jit(step).lower(params, state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out = jax.block_until_ready(compiled(params, state, batch))
  t3 = time.perf_counter()
  del out
  lowered_text = lowered.as_text()
  try:
    compiled_text = compiled.as_text() or ""
  except Exception:  # pylint: disable=broad-except
    compiled_text = ""
  lo, co = count_ops(lowered_text), count_ops(compiled_text)
  return dict(
      optimizer=name, layers=num_layers, width=width,
      lower_seconds=t1 - t0, compile_seconds=t2 - t1,
      total_seconds=t2 - t0, first_call_seconds=t3 - t2,
      lowered_eigh=lo["eigh"], lowered_while=lo["while_"],
      compiled_eigh=co["eigh"], compiled_while=co["while_"],
      lowered_ops=lo["ops"], compiled_ops=co["ops"],
      lowered_chars=len(lowered_text),
      state_over_param_bytes=run_lib.tree_bytes(state)
      / run_lib.tree_bytes(params),
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reference-path", default=None)
  ap.add_argument("--layers", type=int, nargs="+", default=[8, 32, 64])
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--optimizers", nargs="+", default=list(run_lib.OPTIMIZERS),
                  choices=run_lib.OPTIMIZERS)
  ap.add_argument("--shampoo-options", default="{}")
  ap.add_argument("--reference-options", default="{}")
  ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
  args = ap.parse_args(argv)

  names = list(args.optimizers)
  if "shampoo" in names and run_lib._shampoo_fn() is None:  # pylint: disable=protected-access
    names.remove("shampoo")
  if "reference" in names:
    if args.reference_path is None:
      names.remove("reference")
    else:
      _reference.load_reference(args.reference_path)
  shampoo_options = json.loads(args.shampoo_options)
  options = {"adamw": {}, "shampoo": shampoo_options,
             "reference": json.loads(args.reference_options)
             or dict(shampoo_options)}

  rows = []
  for layers in args.layers:
    for name in names:
      r = measure(name, layers, args.width, options[name])
      rows.append(r)
      print(f"{name:9s} L={layers:3d}: lower {r['lower_seconds']:.1f}s "
            f"compile {r['compile_seconds']:.1f}s  eigh "
            f"{r['lowered_eigh']}/{r['compiled_eigh']}  while "
            f"{r['lowered_while']}/{r['compiled_while']}", flush=True)

  os.makedirs(args.out, exist_ok=True)
  meta = dict(git=run_lib.git_info(), machine=run_lib.machine_info(),
              options=options, width=args.width)
  with open(os.path.join(args.out, "compile.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)

  lines = [f"commit {meta['git']['commit']}; {meta['machine']['cpu_model']}, "
           f"{meta['machine']['cpu_count']} cores, jax "
           f"{meta['machine']['jax_version']}; MLP of L layers "
           f"{args.width}x{args.width} (+bias), batch 32", "",
           "Seconds to lower + compile one train step (first call):", "",
           "| layers | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for layers in args.layers:
    cells = []
    for name in names:
      r = next(r for r in rows if r["layers"] == layers
               and r["optimizer"] == name)
      cells.append(f"{r['total_seconds']:.1f} ({r['lower_seconds']:.1f} + "
                   f"{r['compile_seconds']:.1f})")
    lines.append(f"| {layers} | " + " | ".join(cells) + " |")
  lines += ["", "(total (lower + compile)). eigh / while call sites and "
            "instruction count (lowered StableHLO / compiled HLO):", "",
            "| layers | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names)]
  for layers in args.layers:
    cells = []
    for name in names:
      r = next(r for r in rows if r["layers"] == layers
               and r["optimizer"] == name)
      cells.append(f"eigh {r['lowered_eigh']}/{r['compiled_eigh']}, while "
                   f"{r['lowered_while']}/{r['compiled_while']}, ops "
                   f"{r['lowered_ops']}/{r['compiled_ops']}")
    lines.append(f"| {layers} | " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "compile.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
