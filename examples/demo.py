# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Shampoo vs AdamW on Fashion-MNIST, side by side, at two batch sizes.

Trains the same Flax (nnx) MLP 784-256-256-10 with ``shampoo_optax.shampoo``
and with ``optax.adamw``, from the same initialisation, on the same seeded
sequence of mini-batches and with the same warmup + cosine learning-rate
schedule, once per batch size. For each it prints a table of steps and
seconds to a target test accuracy and a verdict: which optimizer got there
sooner in seconds, and how much a Shampoo step costs next to an AdamW step.
It saves a plot of the training loss curves (against steps and against
seconds) per batch size as PNGs.

The default batch sizes show both regimes. At 4096 the model's own work
dwarfs the optimizer's matrix work (per-block products of at most 128 x 128),
so Shampoo's fewer steps are fewer seconds too. At 256 the matrix work is a
large share of a step, and on a CPU AdamW wins per second.

Timing excludes compilation (reported separately) and evaluation.

  python examples/demo.py                        # batch 4096 and 256, 300 steps
  python examples/demo.py --batch-sizes 1024     # one regime
  python examples/demo.py --synthetic            # random images, no data needed
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Sequence

# Before numpy loads OpenBLAS: LAPACK's eigh (Shampoo's CPU root method) is
# much faster single-threaded than with threads competing with XLA's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # pylint: disable=g-import-not-at-top

try:
  from examples import datasets
except ImportError:  # run as `python examples/demo.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  from examples import datasets

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import shampoo_optax

DEFAULT_OUTPUT_DIR = datasets.REPO_ROOT / "examples" / "output"


# --------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------


class MLP(nnx.Module):
  """784 -> hidden -> hidden -> 10, ReLU."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(28 * 28, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.fc3 = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.fc3(x)


def synthetic_data(
    seed: int, num_train: int = 8192, num_test: int = 512
) -> dict:
  """Random 28x28 uint8 images of 10 classes (a noisy prototype per class)."""
  rng = np.random.default_rng(seed + 12345)
  prototypes = rng.uniform(0, 255, size=(10, 28, 28))

  def make(n):
    labels = rng.integers(0, 10, size=n).astype(np.int32)
    noise = rng.normal(0, 60, size=(n, 28, 28))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels

  train_images, train_labels = make(num_train)
  test_images, test_labels = make(num_test)
  return dict(
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
  )


def preprocess(data: dict) -> dict:
  """uint8 images -> standardised float32 [N, 784] on the device."""
  train = data["train_images"].reshape(len(data["train_images"]), -1)
  test = data["test_images"].reshape(len(data["test_images"]), -1)
  train = train.astype(np.float32) / 255.0
  test = test.astype(np.float32) / 255.0
  mean, std = train.mean(), train.std() + 1e-6
  return dict(
      x_train=jnp.asarray((train - mean) / std),
      y_train=jnp.asarray(data["train_labels"], jnp.int32),
      x_test=jnp.asarray((test - mean) / std),
      y_test=jnp.asarray(data["test_labels"], jnp.int32),
  )


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------


def make_optimizers(
    schedule: optax.Schedule, weight_decay: float
) -> dict[str, optax.GradientTransformation]:
  """The two contenders, with the same schedule and weight decay."""
  return {
      "shampoo": shampoo_optax.shampoo(schedule, weight_decay=weight_decay),
      "adamw": optax.adamw(schedule, weight_decay=weight_decay),
  }


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  name: str
  compile_seconds: float
  losses: list[float]  # training loss at every step
  seconds: list[float]  # cumulative training seconds after every step
  eval_steps: list[int]
  eval_accuracy: list[float]
  eval_loss: list[float]
  steps_to_target: int | None = None
  seconds_to_target: float | None = None

  @property
  def final_accuracy(self) -> float:
    return self.eval_accuracy[-1]

  @property
  def final_loss(self) -> float:
    return self.eval_loss[-1]


def _loss_fn(graphdef, params, x, y):
  logits = nnx.merge(graphdef, params)(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, logits


def train_one(
    name: str,
    tx: optax.GradientTransformation,
    graphdef,
    init_params,
    data: dict,
    batches: np.ndarray,
    *,
    eval_every: int,
    target: float,
) -> RunResult:
  """Trains from ``init_params`` on ``batches``; returns the curves."""

  def train_step(params, opt_state, x_all, y_all, idx):
    x, y = x_all[idx], y_all[idx]
    (loss, _), grads = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)(
        graphdef, params, x, y
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss

  def evaluate(params, x, y):
    loss, logits = _loss_fn(graphdef, params, x, y)
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  params = init_params
  opt_state = tx.init(params)
  batches_dev = jnp.asarray(batches)
  args = (params, opt_state, data["x_train"], data["y_train"], batches_dev[0])

  t0 = time.perf_counter()
  step_fn = jax.jit(train_step, donate_argnums=(0, 1)).lower(*args).compile()
  eval_fn = (
      jax.jit(evaluate).lower(params, data["x_test"], data["y_test"]).compile()
  )
  # One throw-away execution on copies, so that first-run overheads (buffer
  # allocation, thread-pool start-up) count as compile time, not training.
  warm = step_fn(*jax.tree.map(jnp.copy, args[:2]), *args[2:])
  jax.block_until_ready(warm)
  jax.block_until_ready(eval_fn(params, data["x_test"], data["y_test"]))
  del warm
  compile_seconds = time.perf_counter() - t0
  print(f"[{name}] compiled in {compile_seconds:.2f} s", flush=True)

  result = RunResult(name, compile_seconds, [], [], [], [], [])
  num_steps = len(batches)
  train_seconds = 0.0
  for step in range(1, num_steps + 1):
    t0 = time.perf_counter()
    params, opt_state, loss = step_fn(
        params,
        opt_state,
        data["x_train"],
        data["y_train"],
        batches_dev[step - 1],
    )
    loss = float(loss)  # waits for the step to finish
    train_seconds += time.perf_counter() - t0
    result.losses.append(loss)
    result.seconds.append(train_seconds)

    if step % eval_every == 0 or step == num_steps:
      test_loss, test_acc = (
          float(v) for v in eval_fn(params, data["x_test"], data["y_test"])
      )
      result.eval_steps.append(step)
      result.eval_accuracy.append(test_acc)
      result.eval_loss.append(test_loss)
      if result.steps_to_target is None and test_acc >= target:
        result.steps_to_target = step
        result.seconds_to_target = train_seconds
      print(
          f"[{name}] step {step:5d}/{num_steps} | train loss {loss:.4f} | "
          f"test loss {test_loss:.4f} | test acc {test_acc:.4f} | "
          f"{train_seconds:7.2f} s",
          flush=True,
      )
      if not np.isfinite(loss):
        print(f"[{name}] non-finite loss, stopping", flush=True)
        break
  return result


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def format_table(results: Sequence[RunResult], target: float) -> str:
  headers = [
      "optimizer",
      f"steps to {target:g}",
      f"seconds to {target:g}",
      "final test acc",
      "final test loss",
      "compile s",
  ]
  rows = []
  for r in results:
    rows.append(
        [
            r.name,
            "-" if r.steps_to_target is None else str(r.steps_to_target),
            "-"
            if r.seconds_to_target is None
            else f"{r.seconds_to_target:.2f}",
            f"{r.final_accuracy:.4f}",
            f"{r.final_loss:.4f}",
            f"{r.compile_seconds:.2f}",
        ]
    )
  widths = [
      max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)
  ]

  def line(cells):
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(headers), sep, *(line(row) for row in rows)])


def verdict(results: Sequence[RunResult], target: float,
            batch_size: int) -> str:
  """One line: who reached ``target`` sooner in seconds, and at what cost."""
  by_name = {r.name: r for r in results}
  if set(by_name) != {"shampoo", "adamw"}:
    return ""
  s, a = by_name["shampoo"], by_name["adamw"]
  step_cost = (s.seconds[-1] / len(s.seconds)) / (a.seconds[-1] / len(a.seconds))
  head = (f"batch {batch_size}: a Shampoo step costs {step_cost:.2f}x an"
          " AdamW step")
  missed = [r.name for r in (s, a) if r.steps_to_target is None]
  if missed:
    return f"{head}; {' and '.join(missed)} did not reach {target:g}."
  steps = s.steps_to_target / a.steps_to_target
  seconds = s.seconds_to_target / a.seconds_to_target
  winner = "Shampoo" if seconds < 1 else "AdamW"
  line = (f"{head}; Shampoo reached {target:g} in {steps:.2f}x AdamW's steps"
          f" and {seconds:.2f}x its seconds: {winner} wins per second.")
  if winner == "AdamW":
    line += (" Here the optimizer's matrix work is a large share of a step;"
             " larger batches or models, statistics_every and block_size"
             " shift the balance (README: Tuning guide).")
  return line


def _smooth(values: Sequence[float], alpha: float = 0.9) -> np.ndarray:
  out, acc = [], None
  for v in values:
    acc = v if acc is None else alpha * acc + (1 - alpha) * v
    out.append(acc)
  return np.asarray(out)


def plot_losses(
    results: Sequence[RunResult], path: pathlib.Path, title: str
) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
  for r in results:
    steps = np.arange(1, len(r.losses) + 1)
    (line,) = ax_step.plot(steps, _smooth(r.losses), label=r.name)
    ax_step.plot(
        steps, r.losses, color=line.get_color(), alpha=0.2, linewidth=0.6
    )
    ax_time.plot(
        r.seconds, _smooth(r.losses), color=line.get_color(), label=r.name
    )
    ax_time.plot(
        r.seconds, r.losses, color=line.get_color(), alpha=0.2, linewidth=0.6
    )
  for ax, xlabel in (
      (ax_step, "step"),
      (ax_time, "training seconds (excl. compile)"),
  ):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("train loss (EMA 0.9; raw faint)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--steps", type=int, default=300, help="training steps per optimizer"
  )
  p.add_argument(
      "--batch-sizes",
      "--batch-size",
      default="4096,256",
      help="comma-separated batch sizes, one comparison each",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
      "--learning-rate", type=float, default=3e-3, help="peak learning rate"
  )
  p.add_argument("--warmup-fraction", type=float, default=0.05)
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--hidden", type=int, default=256, help="MLP hidden width")
  p.add_argument("--eval-every", type=int, default=20)
  p.add_argument(
      "--target", type=float, default=0.85, help="target test accuracy"
  )
  p.add_argument(
      "--optimizers",
      default="shampoo,adamw",
      help="comma-separated subset of: shampoo, adamw",
  )
  p.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
  p.add_argument(
      "--data-dir",
      default=None,
      help="Fashion-MNIST directory (default: $FASHION_MNIST_DIR, then "
      "/usr/share/datasets/fashion-mnist)",
  )
  p.add_argument(
      "--synthetic",
      action="store_true",
      help="use small random images instead of Fashion-MNIST (no data needed)",
  )
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error("--steps must be >= 1")
  if args.eval_every < 1:
    p.error("--eval-every must be >= 1")
  try:
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  except ValueError:
    p.error("--batch-sizes must be comma-separated integers, got"
            f" {args.batch_sizes!r}")
  if any(b < 1 for b in args.batch_sizes):
    p.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the comparisons; returns, per batch size, the results, the table,
  the verdict and the PNG path."""
  args = parse_args(argv)
  output_dir = pathlib.Path(args.output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)

  if args.synthetic:
    raw = synthetic_data(args.seed)
    data_name = "synthetic"
  else:
    raw = datasets.load_fashion_mnist(args.data_dir)
    data_name = "Fashion-MNIST"
  data = preprocess(raw)
  n_train, n_test = len(data["y_train"]), len(data["y_test"])
  print(
      f"{data_name}: {n_train} train / {n_test} test images; jax {jax.__version__} "
      f"on {jax.device_count()} {jax.default_backend()} device(s)",
      flush=True,
  )

  warmup = max(1, int(args.warmup_fraction * args.steps))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=args.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(args.steps, warmup + 1),
      end_value=0.01 * args.learning_rate,
  )
  optimizers = make_optimizers(schedule, args.weight_decay)
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  unknown = [n for n in names if n not in optimizers]
  if unknown or not names:
    raise SystemExit(
        f"unknown --optimizers {unknown}; choose from {list(optimizers)}"
    )

  model = MLP(args.hidden, rngs=nnx.Rngs(args.seed))
  graphdef, init_params = nnx.split(model)
  n_params = sum(x.size for x in jax.tree.leaves(init_params))

  runs = []
  for batch_size in args.batch_sizes:
    batches = datasets.batch_indices(
        n_train, batch_size, args.steps, args.seed
    )
    print(
        f"\nMLP 784-{args.hidden}-{args.hidden}-10 ({n_params:,} params), "
        f"batch {batch_size}, {args.steps} steps, peak lr {args.learning_rate:g} "
        f"(warmup {warmup} + cosine), weight decay {args.weight_decay:g}, seed {args.seed}",
        flush=True,
    )
    results = []
    for name in names:
      # Same initial parameters for every optimizer (copied: steps donate them).
      params = jax.tree.map(jnp.copy, init_params)
      results.append(
          train_one(
              name,
              optimizers[name],
              graphdef,
              params,
              data,
              batches,
              eval_every=args.eval_every,
              target=args.target,
          )
      )
    png = output_dir / f"demo_loss_batch{batch_size}.png"
    plot_losses(
        results,
        png,
        f"{data_name}: MLP 784-{args.hidden}-{args.hidden}-10, batch {batch_size}",
    )
    runs.append(dict(batch_size=batch_size, results=results, png=png,
                     table=format_table(results, args.target),
                     verdict=verdict(results, args.target, batch_size)))

  print()
  report = []
  for run in runs:
    report += [
        f"{data_name}, batch {run['batch_size']}, {args.steps} steps; seconds"
        " exclude compilation and evaluation; accuracy checked every"
        f" {args.eval_every} steps; 'compile s' includes one warm-up step",
        run["table"], ""]
  report += [run["verdict"] for run in runs if run["verdict"]]
  print("\n".join(report))
  (output_dir / "demo_table.md").write_text("\n".join(report) + "\n")
  curves = output_dir / "demo_curves.csv"
  with open(curves, "w") as f:
    f.write("batch_size,optimizer,step,train_seconds,train_loss\n")
    for run in runs:
      for r in run["results"]:
        for i, (sec, loss) in enumerate(zip(r.seconds, r.losses), start=1):
          f.write(f"{run['batch_size']},{r.name},{i},{sec:.6f},{loss:.6g}\n")
  pngs = ", ".join(str(run["png"]) for run in runs)
  print(f"\nplots saved to {pngs}\nper-step losses and times: {curves}")
  return {"runs": runs}


if __name__ == "__main__":
  main()
