# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Does the best learning rate carry across widths? A sweep at three widths.

The char Transformer LM of `benchmarks.workloads.char_lm` (Shakespeare, 2
layers, 4 heads, context 64, batch 32) at ``d_model`` 32, 64 and 128 (a
2-core CPU's budget; ``--widths``), the same data and token budget
(``--steps``, 200 by default) for every width.
Every optimizer runs a 6-point learning-rate grid (factor 2) with 2 seeds at
every width, with the benchmarks' shared schedule (warmup 5%, cosine to 1%)
and weight decay 1e-4:

* ``adamw``: ``optax.adamw``;
* ``muon``: ``optax.contrib.muon`` as in `benchmarks._peers` (its
  ``consistent_rms=0.2`` shape scaling, the AdamW part at the same rate);
* ``shampoo``, ``soap``: the library's defaults;
* ``shampoo_width``, ``soap_width``: with ``base_width`` = the narrowest
  width (each block at RMS ``base_width / width``, weight decay scaled
  alike; `shampoo_optax._stages.width_normalized`).

Each (width, optimizer) is compiled once: the learning rate enters the
step as an argument (every update here is linear in it). Writes
``<out>/width_sweep.json`` (every run, resumable with ``--resume``),
``width_sweep.md`` (final validation loss per grid point, mean of the seeds;
the best point per width; the loss at the narrow width's best rate against
the best at each wider width) and ``width_sweep.png`` (loss against learning
rate per width, one panel per optimizer). Seeds run one after the other
over the whole grid, so an interrupted sweep (``--resume`` goes on) has
whole seeds.
"""

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _peers
from benchmarks import workloads
import shampoo_optax

WIDTHS = (32, 64, 128)
LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
OPTIMIZERS = ("adamw", "muon", "shampoo", "shampoo_width", "soap",
              "soap_width")
WEIGHT_DECAY = 1e-4


def make_optimizer(name: str, base_width: int) -> optax.GradientTransformation:
  """``name`` at learning rate 1: the step scales its update by the rate."""
  if name == "adamw":
    return optax.adamw(1.0, weight_decay=WEIGHT_DECAY)
  if name == "muon":
    return _peers.make("muon", 1.0, WEIGHT_DECAY, {})
  make = shampoo_optax.shampoo if name.startswith("shampoo") else (
      shampoo_optax.soap)
  width = {"base_width": base_width} if name.endswith("_width") else {}
  return make(1.0, weight_decay=WEIGHT_DECAY, **width)


def train(workload, tx, lrs, seed, steps):
  """Final validation loss at every lr for one seed.

  The whole run is one compiled ``lax.scan`` over the steps (the same
  program for every lr and seed): on a CPU a small model's step is
  otherwise mostly Python dispatch.
  """

  def step(carry, inputs):
    params, state = carry
    batch, lr = inputs
    grads = jax.grad(workload.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return (jax.tree.map(lambda p, u: p + lr * u, params, updates),
            state), None

  @jax.jit
  def run(params, batches, lr_values):
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)),
                                  (batches, lr_values))
    return params

  batch_iter = workload.batches(seed)
  batches = [next(batch_iter) for _ in range(steps)]
  batches = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  out = {}
  for lr in lrs:
    schedule = workloads.schedule(lr, steps)
    lr_values = np.asarray([schedule(t) for t in range(steps)], np.float32)
    params = run(workload.init_params(seed), batches, lr_values)
    final = workload.eval_fn(params)[workload.metric]
    out[lr] = final if np.isfinite(final) else float("inf")
  return out


def summarize(runs, widths, lrs):
  """Per optimizer: mean loss per (width, lr), best lr per width, transfer."""
  summary = {}
  for name in dict.fromkeys(r["optimizer"] for r in runs):
    grid = {}
    for w in widths:
      for lr in lrs:
        losses = [r["loss"] for r in runs if r["optimizer"] == name
                  and r["width"] == w and r["lr"] == lr]
        if losses:
          grid[(w, lr)] = float(np.mean(losses))
          seeds = len(losses)
    if len(grid) < len(widths) * len(lrs):
      continue
    best = {w: min(lrs, key=lambda lr, w=w: grid[(w, lr)]) for w in widths}
    narrow = best[widths[0]]
    summary[name] = dict(
        seeds=seeds,
        loss={f"{w}@{lr:g}": grid[(w, lr)] for w in widths for lr in lrs},
        best_lr={str(w): best[w] for w in widths},
        same_best_point=len(set(best.values())) == 1,
        # Loss at the narrow width's best lr over the best loss, per width.
        transfer_ratio={str(w): grid[(w, narrow)] / grid[(w, best[w])]
                        for w in widths})
  return summary


def report(summary, widths, lrs, meta) -> str:
  lines = [
      f"commit {meta['git']}; jax {jax.__version__}; char LM (Shakespeare),"
      f" {meta['steps']} steps of batch 32 x context 64 at every width;"
      " final validation loss (nats/char, 256 held-out"
      " windows), mean of the seeds. **Bold**: the best grid point per width."
      f" `base_width` = {widths[0]}.", ""]
  lines += ["| optimizer | seeds | width | "
            + " | ".join(f"{lr:g}" for lr in lrs)
            + " | best lr | loss at the narrow best / best |",
            "|---|---|---|" + "---|" * len(lrs) + "---|---|"]
  for name, s in summary.items():
    for w in widths:
      cells = []
      for lr in lrs:
        value = s["loss"][f"{w}@{lr:g}"]
        text = f"{value:.3f}" if np.isfinite(value) else "diverged"
        cells.append(f"**{text}**" if lr == s["best_lr"][str(w)] else text)
      lines.append(f"| {name} | {s['seeds']} | {w} | " + " | ".join(cells)
                   + f" | {s['best_lr'][str(w)]:g} |"
                   f" {s['transfer_ratio'][str(w)]:.4f} |")
  lines += ["", "Same best grid point at every width: " + ", ".join(
      f"{n} {'yes' if s['same_best_point'] else 'no'}"
      for n, s in summary.items()) + "."]
  return "\n".join(lines) + "\n"


def plot(summary, widths, lrs, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary), 3),
                           sharey=True, squeeze=False)
  for ax, (name, s) in zip(axes[0], summary.items()):
    for w in widths:
      ax.plot(lrs, [s["loss"][f"{w}@{lr:g}"] for lr in lrs], "o-",
              label=f"d_model {w}")
    ax.set_xscale("log")
    ax.set_title(name)
    ax.set_xlabel("peak learning rate")
  axes[0][0].set_ylabel("final val loss")
  axes[0][0].legend()
  finite = [v for s in summary.values() for v in s["loss"].values()
            if np.isfinite(v)]
  axes[0][0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
  ap.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
  ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                  choices=OPTIMIZERS)
  ap.add_argument("--base-width", type=int, default=None,
                  help="base_width of the *_width optimizers (default: the"
                       " first of --widths)")
  ap.add_argument("--seeds", type=int, default=2)
  ap.add_argument("--first-seed", type=int, default=0,
                  help="seeds first-seed .. first-seed + seeds - 1 (to run"
                       " seeds in parallel processes, then --resume on the"
                       " merged runs)")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--shakespeare-path", default=None)
  ap.add_argument("--out", type=pathlib.Path,
                  default=pathlib.Path("benchmarks/results"))
  ap.add_argument("--resume", action="store_true",
                  help="keep the runs already in <out>/width_sweep.json")
  args = ap.parse_args(argv)
  base_width = args.base_width or args.widths[0]
  from benchmarks.run import git_info  # pylint: disable=g-import-not-at-top
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / "width_sweep.json"
  runs = json.loads(path.read_text())["runs"] if (
      args.resume and path.exists()) else []
  done = {(r["optimizer"], r["width"], r["seed"]) for r in runs}
  meta = dict(git=git_info().get("commit"), steps=args.steps,
              seeds=args.seeds, widths=args.widths, lrs=args.lrs)
  lms = {w: workloads.char_lm(steps=args.steps, d_model=w,
                              data_path=args.shakespeare_path)
         for w in args.widths}
  for seed in range(args.first_seed, args.first_seed + args.seeds):
    for width in args.widths:
      for name in args.optimizers:
        if (name, width, seed) in done:
          continue
        start = time.perf_counter()
        results = train(lms[width], make_optimizer(name, base_width),
                        args.lrs, seed, args.steps)
        runs += [dict(optimizer=name, width=width, lr=lr, seed=seed,
                      loss=loss) for lr, loss in results.items()]
        print(f"seed {seed} width {width} {name}:"
              f" {time.perf_counter() - start:.0f} s, best"
              f" {min(results.values()):.3f}", flush=True)
        path.write_text(json.dumps(dict(meta=meta, runs=runs), indent=1))
  summary = summarize(runs, args.widths, args.lrs)
  path.write_text(json.dumps(dict(meta=meta, runs=runs, summary=summary),
                             indent=1))
  (args.out / "width_sweep.md").write_text(
      report(summary, args.widths, args.lrs, meta))
  if summary:
    plot(summary, args.widths, args.lrs, args.out / "width_sweep.png")


if __name__ == "__main__":
  main()
