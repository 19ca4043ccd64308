"""Compile time of one train step, and of the update alone, vs layers.

    python -m benchmarks.compile_bench [--reference-path PATH]
        [--layers 8 32 64] [--widths 64 256] [--repeats 3] [--scanned]
        [--out benchmarks/results]

For MLPs of L equal-shaped layers (``width x width`` kernels plus biases) it
measures, for ``optax.adamw``, ``shampoo_optax.shampoo`` and (with a path) the
reference ``distributed_shampoo``, the wall time to trace+lower and to
compile

* one jitted train step (forward, backward, optimizer update), and
* ``jax.jit(tx.update)`` alone (gradients, state, parameters as arguments),

each in a fresh jit after ``jax.clear_caches()``. Per width and L, the
optimizers are measured back to back in one process, ``--repeats`` rounds
of every optimizer in turn; the fastest round of each (the machine is
shared) is reported, with the ratio to AdamW. The first call of the train
step is timed once. It also counts, in the lowered StableHLO and in the
compiled HLO of the train step, the ``eigh`` decompositions (LAPACK
``syevd`` custom calls or ``stablehlo`` eigh ops) and the ``while`` loops:
compile time that grows with L usually comes from per-leaf ops like these.

With ``--scanned`` the layers are one stacked ``[L, width, width]`` kernel
(and ``[L, width]`` bias) run by ``jax.lax.scan``, as ``nn.scan`` builds
them, and Shampoo gets ``layer_axes`` 0 for them; then the compiled program
should not grow with L at all.

Writes ``<out>/compile.json`` and ``<out>/compile.md`` (``compile_scanned.*``
with ``--scanned``).
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


def scanned_mlp(num_layers: int, width: int, seed: int = 0):
  """The MLP below with its layers stacked and scanned over."""
  params = {
      "kernel": jax.random.normal(jax.random.key(seed),
                                  (num_layers, width, width)) / jnp.sqrt(width),
      "bias": jnp.zeros((num_layers, width)),
  }

  def loss_fn(p, batch):
    def layer(x, weights):
      kernel, bias = weights
      return jnp.tanh(x @ kernel + bias), None

    x, _ = jax.lax.scan(layer, batch["x"], (p["kernel"], p["bias"]))
    return jnp.mean((x - batch["y"]) ** 2)

  batch = {"x": jnp.ones((32, width)), "y": jnp.zeros((32, width))}
  return params, loss_fn, batch


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


def _setup(name: str, num_layers: int, width: int, options: dict,
           scanned: bool):
  params, loss_fn, batch = (scanned_mlp if scanned else mlp)(num_layers, width)
  if name == "reference":  # Configured like shampoo's defaults, as in run.
    options = {**run_lib.shampoo_defaults(), **options}
  if name in ("shampoo", "soap") and scanned:
    options = {**options, "layer_axes": {"kernel": 0, "bias": 0}}
  opt = run_lib.make_optimizer(name, 1e-3, 0.0, options)
  state = opt.init(params)

  def step(p, s, b):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  return params, batch, opt, state, step


def _lower_compile(fn, *args):
  jax.clear_caches()
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return lowered, compiled, t1 - t0, t2 - t1


def measure_once(name: str, num_layers: int, width: int, options: dict,
                 details: bool = False, scanned: bool = False) -> dict:
  """One round: the train step, then the update alone, each fresh."""
  params, batch, opt, state, step = _setup(name, num_layers, width, options,
                                           scanned)
  lowered, compiled, lower_s, compile_s = _lower_compile(
      step, params, state, batch)
  out = dict(step_lower_seconds=lower_s, step_compile_seconds=compile_s,
             step_total_seconds=lower_s + compile_s)
  if details:
    t0 = time.perf_counter()
    result = jax.block_until_ready(compiled(params, state, batch))
    del result
    out["first_call_seconds"] = time.perf_counter() - t0
    lowered_text = lowered.as_text()
    try:
      compiled_text = compiled.as_text() or ""
    except Exception:  # pylint: disable=broad-except
      compiled_text = ""
    lo, co = count_ops(lowered_text), count_ops(compiled_text)
    out.update(
        lowered_eigh=lo["eigh"], lowered_while=lo["while_"],
        compiled_eigh=co["eigh"], compiled_while=co["while_"],
        lowered_ops=lo["ops"], compiled_ops=co["ops"],
        lowered_chars=len(lowered_text),
        state_over_param_bytes=run_lib.tree_bytes(state)
        / run_lib.tree_bytes(params))
  del lowered, compiled
  _, _, lower_s, compile_s = _lower_compile(opt.update, params, state, params)
  out.update(update_lower_seconds=lower_s, update_compile_seconds=compile_s,
             update_total_seconds=lower_s + compile_s)
  return out


def measure(names, num_layers: int, width: int, options: dict,
            repeats: int, scanned: bool = False) -> list[dict]:
  """Every optimizer in turn, ``repeats`` rounds; the fastest of each."""
  rounds = {name: [] for name in names}
  for round_ in range(repeats):
    for name in names:
      rounds[name].append(measure_once(name, num_layers, width,
                                       options[name], details=round_ == 0,
                                       scanned=scanned))
  rows = []
  for name in names:
    row = dict(optimizer=name, layers=num_layers, width=width,
               repeats=repeats, **rounds[name][0])
    for what in ("step", "update"):
      best = min(rounds[name], key=lambda r: r[f"{what}_total_seconds"])
      for part in ("lower", "compile", "total"):
        row[f"{what}_{part}_seconds"] = best[f"{what}_{part}_seconds"]
      row[f"{what}_total_seconds_rounds"] = [
          r[f"{what}_total_seconds"] for r in rounds[name]]
    # Earlier keys, for readers of older results: the train step's.
    row.update(lower_seconds=row["step_lower_seconds"],
               compile_seconds=row["step_compile_seconds"],
               total_seconds=row["step_total_seconds"])
    rows.append(row)
  return rows


def markdown(rows, names, meta, layers, widths) -> str:
  lines = [f"commit {meta['git']['commit']}; {meta['machine']['cpu_model']}, "
           f"{meta['machine']['cpu_count']} cores, jax "
           f"{meta['machine']['jax_version']}; MLP of L layers width x "
           f"width (+bias){', scanned' if meta['scanned'] else ''}, batch 32. Seconds to lower + compile, each in a "
           f"fresh jit after `jax.clear_caches()`, fastest of "
           f"{rows[0]['repeats']} rounds (optimizers back to back); ratio to "
           "AdamW in brackets.", ""]
  get = lambda name, w, l: next(r for r in rows if r["width"] == w
                                and r["layers"] == l and r["optimizer"] == name)
  header = "| width | layers | " + " | ".join(
      f"{n} {what}" for what in ("step", "update") for n in names) + " |"
  lines += [header, "|---|---|" + "---|" * (2 * len(names))]
  for w in widths:
    for l in layers:
      cells = []
      for what in ("step", "update"):
        base = get("adamw", w, l)[f"{what}_total_seconds"]
        for name in names:
          r = get(name, w, l)
          s = r[f"{what}_total_seconds"]
          cell = (f"{s:.2f} ({r[f'{what}_lower_seconds']:.2f} + "
                  f"{r[f'{what}_compile_seconds']:.2f})")
          if name != "adamw":
            cell += f" [{s / base:.1f}x]"
          cells.append(cell)
      lines.append(f"| {w} | {l} | " + " | ".join(cells) + " |")
  lines += ["", "Train step: eigh / while call sites and instruction count "
            "(lowered StableHLO / compiled HLO):", "",
            "| width | layers | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names)]
  for w in widths:
    for l in layers:
      cells = []
      for name in names:
        r = get(name, w, l)
        cells.append(f"eigh {r['lowered_eigh']}/{r['compiled_eigh']}, while "
                     f"{r['lowered_while']}/{r['compiled_while']}, ops "
                     f"{r['lowered_ops']}/{r['compiled_ops']}")
      lines.append(f"| {w} | {l} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reference-path", default=None)
  ap.add_argument("--layers", type=int, nargs="+", default=[8, 32, 64])
  ap.add_argument("--widths", "--width", type=int, nargs="+",
                  default=[64, 256])
  ap.add_argument("--repeats", type=int, default=3,
                  help="rounds per optimizer; the fastest is reported")
  ap.add_argument("--optimizers", nargs="+", default=list(run_lib.OPTIMIZERS),
                  choices=run_lib.OPTIMIZERS)
  ap.add_argument("--shampoo-options", default="{}")
  ap.add_argument("--reference-options", default="{}")
  ap.add_argument("--scanned", action="store_true",
                  help="stacked layers under lax.scan (Shampoo: layer_axes)")
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
  if "adamw" not in names:
    names.insert(0, "adamw")  # The baseline of the ratios.
  shampoo_options = json.loads(args.shampoo_options)
  options = {"adamw": {}, "shampoo": shampoo_options, "soap": {},
             "reference": json.loads(args.reference_options)
             or dict(shampoo_options)}

  rows = []
  for width in args.widths:
    for layers in args.layers:
      for r in measure(names, layers, width, options, args.repeats,
                       args.scanned):
        rows.append(r)
        print(f"{r['optimizer']:9s} width {width:4d} L={layers:3d}: step "
              f"{r['step_total_seconds']:.2f}s ({r['step_lower_seconds']:.2f}"
              f" + {r['step_compile_seconds']:.2f}), update "
              f"{r['update_total_seconds']:.2f}s  eigh "
              f"{r['lowered_eigh']}/{r['compiled_eigh']}  while "
              f"{r['lowered_while']}/{r['compiled_while']}", flush=True)

  os.makedirs(args.out, exist_ok=True)
  meta = dict(git=run_lib.git_info(), machine=run_lib.machine_info(),
              options=options, widths=args.widths, layers=args.layers,
              repeats=args.repeats, scanned=args.scanned)
  name = "compile_scanned" if args.scanned else "compile"
  with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  text = markdown(rows, names, meta, args.layers, args.widths)
  with open(os.path.join(args.out, f"{name}.md"), "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
