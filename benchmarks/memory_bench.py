# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Optimizer state bytes per parameter byte, by option and by kind.

    python -m benchmarks.memory_bench [--workloads fmnist_mlp ...]
        [--out benchmarks/results]

For the parameter tree of each workload of `benchmarks.run` (built
abstractly with ``jax.eval_shape``: nothing is allocated), it reads the
state's bytes from shapes with `shampoo_optax.state_report`, for AdamW and
Shampoo with the options in ``CONFIGS``, each built by
`benchmarks.run.make_optimizer` with the workload's schedule and weight decay
exactly as the time-to-target runs build them (so "shampoo defaults" is
their ``state / param bytes`` column). Shampoo's bytes are also split by kind
(statistics, roots, grafting, momentum, other). The recorded ``state / param
bytes`` of ``benchmarks/results/full/results.json`` (the reference, and our
Shampoo at that run's commit) are added when that file exists.

Writes ``<out>/memory.json`` and ``<out>/memory.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import shampoo_optax
from shampoo_optax import _report

from benchmarks import run as run_lib
from benchmarks import workloads as workloads_lib

# (label, optimizer, options); options are JSON-able, as for
# `benchmarks.run --shampoo-options`.
CONFIGS = (
    ("adamw", "adamw", {}),
    ("shampoo defaults", "shampoo", {}),
    ("preconditioner_dtype=bfloat16", "shampoo",
     {"preconditioner_dtype": "bfloat16"}),
    ("mu_dtype=bfloat16", "shampoo", {"mu_dtype": "bfloat16"}),
    ("both bfloat16", "shampoo",
     {"preconditioner_dtype": "bfloat16", "mu_dtype": "bfloat16"}),
    ("low memory: preconditioner_dtype=bfloat16, b1=0", "shampoo",
     {"preconditioner_dtype": "bfloat16", "b1": 0.0}),
)
# Upper bounds on state bytes / param bytes, every workload.
TARGETS = {"shampoo defaults": 4.5,
           "low memory: preconditioner_dtype=bfloat16, b1=0": 3.0}
RECORDED = os.path.join("benchmarks", "results", "full", "results.json")


def abstract_params(workload):
  """The workload's initial parameters as ``jax.ShapeDtypeStruct``s."""
  return jax.eval_shape(lambda: workload.init_params(0))


def measure(params, name: str, options: dict, steps: int = 1000,
            weight_decay: float = 1e-4) -> dict:
  """State bytes of one optimizer for ``params``, in total and by kind."""
  unit = workloads_lib.schedule(1e-3, steps)
  tx = run_lib.make_optimizer(name, unit, weight_decay, options)
  report = shampoo_optax.state_report(tx, params)
  return dict(
      optimizer=name, options=options, state_bytes=report.total(),
      param_bytes=report.param_bytes,
      bytes_per_param_byte=report.bytes_per_param_byte,
      by_kind={kind: report.total(kind) / report.param_bytes
               for kind in _report.KINDS})


def recorded(path: str = RECORDED) -> dict:
  """``{label: {workload: state/param bytes}}`` from a full-suite run."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    data = json.load(f)
  commit = (data["meta"]["git"]["commit"] or "?")[:7]
  out = {}
  for wname, res in data["workloads"].items():
    for opt, entry in res.get("summary", {}).items():
      if opt == "adamw":
        continue
      label = (f"reference (recorded: full suite at {commit})"
               if opt == "reference" else
               f"shampoo defaults at {commit} (recorded: full suite)")
      out.setdefault(label, {})[wname] = entry["state_over_param_bytes"]
  return out


def markdown(results: dict, recorded_rows: dict, meta: dict) -> str:
  names = list(results)
  lines = [
      f"commit {meta['git']['commit']}"
      f"{' (dirty)' if meta['git']['dirty'] else ''}; jax "
      f"{meta['jax_version']}; {meta['started']}", "",
      "Optimizer state bytes / parameter bytes (from shapes, "
      "`shampoo_optax.state_report`); the recorded rows are the `state / "
      f"param bytes` column of `{RECORDED}`:", "",
      "| options | " + " | ".join(names) + " | target |",
      "|---|" + "---|" * len(names) + "---|"]
  for label, _, _ in CONFIGS:
    values = [results[w][label]["bytes_per_param_byte"] for w in names]
    target = ""
    if label in TARGETS:
      ok = all(v <= TARGETS[label] for v in values)
      target = f"<= {TARGETS[label]}: {'pass' if ok else '**fail**'}"
    lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values)
                 + f" | {target} |")
  for label, row in recorded_rows.items():
    lines.append(f"| {label} | " + " | ".join(
        f"{row[w]:.2f}" if w in row else "-" for w in names) + " | |")
  for w in names:
    param_bytes = next(iter(results[w].values()))["param_bytes"]
    lines += ["", f"By kind, {w} ({param_bytes:,} parameter bytes):", "",
              "| options | " + " | ".join(_report.KINDS) + " | total |",
              "|---|" + "---|" * (len(_report.KINDS) + 1)]
    for label, e in results[w].items():
      lines.append(f"| {label} | " + " | ".join(
          f"{e['by_kind'][k]:.3f}" for k in _report.KINDS)
          + f" | {e['bytes_per_param_byte']:.3f} |")
  lines += ["", "AdamW's state (its `mu` and `nu`) is all `other`: the kinds "
            "are Shampoo's."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", nargs="+",
                  default=list(workloads_lib.WORKLOADS),
                  choices=list(workloads_lib.WORKLOADS))
  ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
  args = ap.parse_args(argv)

  meta = dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(),
              argv=sys.argv if argv is None else argv, git=run_lib.git_info(),
              jax_version=jax.__version__)
  results = {}
  for wname in args.workloads:
    w = workloads_lib.get(wname)
    params = abstract_params(w)
    results[wname] = {
        label: measure(params, name, options, w.steps, w.weight_decay)
        for label, name, options in CONFIGS}
  recorded_rows = recorded()
  table = markdown(results, recorded_rows, meta)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "memory.json"), "w") as f:
    json.dump(dict(meta=meta, configs=CONFIGS, targets=TARGETS,
                   results=results, recorded=recorded_rows), f, indent=1)
  with open(os.path.join(args.out, "memory.md"), "w") as f:
    f.write(table)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
