# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Step times of Shampoo's refresh modes: all, staggered and drift.

    python -m benchmarks.refresh_bench [--workloads fmnist_mlp ...]
        [--rounds 10] [--out benchmarks/results]

``refresh="all"`` recomputes every inverse root on one step in
``precondition_every``; ``"staggered"`` recomputes a ``1 /
precondition_every`` share of them on every step; ``"drift"`` scores every
root on every step and recomputes at most that share, the most drifted
(`shampoo_optax.drift_error`). For each workload of
`benchmarks.run`, the modes (Shampoo's defaults otherwise, so
``precondition_every=20``) train on the workload's real batches with one
compiled `benchmarks.run.Trainer` each. After compilation and the first 2
steps (step 0 is grafting only; step 1 is ``start_preconditioning_step``,
where every mode computes every root), the modes run in turn in this one
process, one ``precondition_every`` cycle each per round, the order
reversed every other round, so machine noise hits them alike. Every step
(forward, backward, update) is timed up to ``jax.block_until_ready``.

Per mode: the median, 90th percentile, maximum and mean (the amortized cost)
step time, the maximum over the median, and the slowest phase of the cycle
(median of the steps at one position in the cycle) over the median: the
noise-robust form of "no step stalls". Per workload: each mode's mean / all
mean. Targets: staggered max / median <= 1.3, staggered mean / all mean
<= 1.05.

Writes ``<out>/refresh.json`` (with every step's time) and
``<out>/refresh.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import jax
import numpy as np

from benchmarks import run as run_lib
from benchmarks import workloads as workloads_lib

MODES = ("all", "staggered", "drift")
WARMUP = 2
MAX_OVER_MEDIAN = 1.3
MEAN_RATIO = 1.05


def time_modes(workload, *, rounds: int, steps_per_round: int, lr: float,
               options: dict | None = None, warmup: int = WARMUP) -> dict:
  """Per mode, the times of ``rounds * steps_per_round`` interleaved steps.

  ``workload.batches(0)`` must yield ``warmup + rounds * steps_per_round``
  batches. Returns ``{mode: {"counts": [...], "seconds": [...],
  "compile_seconds": s}}``, ``counts`` being the optimizer step (0-based)
  each time belongs to.
  """
  runs = {}
  for mode in MODES:
    trainer = run_lib.Trainer(workload, "shampoo",
                              {**(options or {}), "refresh": mode})
    params = workload.init_params(0)
    state = trainer.init(params)
    batches = workload.batches(0)
    batch = next(batches)
    trainer.compile(params, state, batch)
    for _ in range(warmup):
      params, state, _ = trainer(params, state, batch, lr)
      batch = next(batches)
    jax.block_until_ready((params, state))
    runs[mode] = dict(trainer=trainer, params=params, state=state,
                      batch=batch, batches=batches, count=warmup,
                      counts=[], seconds=[])
  # A collection inside a timed step would show as a stall of that mode.
  gc.collect()
  gc.disable()
  try:
    for r in range(rounds):
      for mode in MODES if r % 2 == 0 else MODES[::-1]:
        run = runs[mode]
        for _ in range(steps_per_round):
          t0 = time.perf_counter()
          out = run["trainer"](run["params"], run["state"], run["batch"], lr)
          jax.block_until_ready(out)
          run["seconds"].append(time.perf_counter() - t0)
          run["params"], run["state"], _ = out
          run["counts"].append(run["count"])
          run["count"] += 1
          run["batch"] = next(run["batches"], None)
  finally:
    gc.enable()
  return {mode: dict(counts=run["counts"], seconds=run["seconds"],
                     compile_seconds=run["trainer"].compile_seconds)
          for mode, run in runs.items()}


def summarize(times: dict, period: int, start: int = 1) -> dict:
  """Step-time statistics per mode, and staggered / all ratios."""
  out = {}
  for mode, t in times.items():
    secs = np.asarray(t["seconds"])
    phase = (np.asarray(t["counts"]) - start) % period
    median = float(np.median(secs))
    slowest_phase = max(float(np.median(secs[phase == k]))
                        for k in np.unique(phase))
    out[mode] = dict(
        n_steps=int(secs.size), median=median,
        p90=float(np.percentile(secs, 90)), max=float(secs.max()),
        mean=float(secs.mean()), max_over_median=float(secs.max()) / median,
        slowest_phase_over_median=slowest_phase / median,
        compile_seconds=t["compile_seconds"])
  for mode in MODES[1:]:
    out[f"{mode}_mean_over_all_mean"] = out[mode]["mean"] / out["all"]["mean"]
    out[f"{mode}_median_over_all_median"] = (out[mode]["median"]
                                             / out["all"]["median"])
  out["pass"] = dict(
      staggered_max_over_median=(out["staggered"]["max_over_median"]
                                 <= MAX_OVER_MEDIAN),
      staggered_mean_over_all_mean=(out["staggered_mean_over_all_mean"]
                                    <= MEAN_RATIO))
  return out


def markdown(results: dict, meta: dict) -> str:
  ms = lambda s: f"{1e3 * s:.1f}"
  lines = [
      f"commit {meta['git']['commit']}"
      f"{' (dirty)' if meta['git']['dirty'] else ''}; "
      f"{meta['machine']['cpu_model']}, {meta['machine']['cpu_count']} cores, "
      f"jax {meta['machine']['jax_version']}; {meta['rounds']} rounds of "
      f"{meta['precondition_every']} steps per mode; load average at start "
      f"{meta['machine']['load_average']}, at end {meta['load_average_end']}"
      + (f"; XLA_FLAGS={meta['machine']['xla_flags']}"
         if meta["machine"]["xla_flags"] else ""),
      "",
      "| workload | mode | median ms | p90 ms | max ms | mean (amortized) ms "
      "| max / median | slowest phase / median | mean / all mean |",
      "|---|---|---|---|---|---|---|---|---|"]
  for wname, res in results.items():
    for mode in MODES:
      e = res[mode]
      ratio = (f"{res[f'{mode}_mean_over_all_mean']:.3f}"
               if mode != "all" else "")
      lines.append(
          f"| {wname} | {mode} | {ms(e['median'])} | {ms(e['p90'])} | "
          f"{ms(e['max'])} | {ms(e['mean'])} | {e['max_over_median']:.2f} | "
          f"{e['slowest_phase_over_median']:.2f} | {ratio} |")
  lines += ["", f"Targets: staggered max / median <= {MAX_OVER_MEDIAN}, "
            f"staggered mean / all mean <= {MEAN_RATIO}.", ""]
  for wname, res in results.items():
    verdict = lambda ok: "pass" if ok else "**fail**"
    lines.append(
        f"- {wname}: max / median "
        f"{res['staggered']['max_over_median']:.2f} "
        f"({verdict(res['pass']['staggered_max_over_median'])}), mean ratio "
        f"{res['staggered_mean_over_all_mean']:.3f} "
        f"({verdict(res['pass']['staggered_mean_over_all_mean'])})")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", nargs="+",
                  default=list(workloads_lib.WORKLOADS),
                  choices=list(workloads_lib.WORKLOADS))
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
  args = ap.parse_args(argv)

  period = run_lib.precondition_every("shampoo", {})
  meta = dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(),
              argv=sys.argv if argv is None else argv, git=run_lib.git_info(),
              machine=run_lib.machine_info(), rounds=args.rounds,
              precondition_every=period, warmup_steps=WARMUP)
  results = {}
  raw = {}
  for wname in args.workloads:
    # Enough batches for every step, whatever the workload's budget.
    w = workloads_lib.get(wname, steps=WARMUP + args.rounds * period)
    lr = w.lrs["shampoo"][1]
    t0 = time.perf_counter()
    raw[wname] = time_modes(w, rounds=args.rounds, steps_per_round=period,
                            lr=lr)
    results[wname] = dict(summarize(raw[wname], period), lr=lr)
    print(f"[{wname}] {time.perf_counter() - t0:.0f}s: "
          + json.dumps({m: results[wname][m] for m in MODES}), flush=True)
  meta["load_average_end"] = os.getloadavg()
  table = markdown(results, meta)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "refresh.json"), "w") as f:
    json.dump(dict(meta=meta, results=results, steps=raw), f)
  with open(os.path.join(args.out, "refresh.md"), "w") as f:
    f.write(table)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
