# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Train a Flax NNX MLP on Fashion-MNIST with ``shampoo_optax.shampoo``.

Shampoo is used exactly like ``optax.adamw``: build it with a learning rate
(here a warmup + cosine schedule) and hand it to ``nnx.Optimizer``::

    tx = shampoo_optax.shampoo(schedule, weight_decay=1e-4)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ...
    optimizer.update(model, grads)

Usage::

    python examples/flax_mnist.py                    # 1000 steps, real data
    python examples/flax_mnist.py --steps 200 --data /path/to/fashion-mnist
    python examples/flax_mnist.py --synthetic --steps 20   # no data needed
    python examples/flax_mnist.py --optimizer adamw        # the baseline

Prints the loss and test accuracy as it trains and a summary at the end.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Sequence

# Before numpy/jax load OpenBLAS: CPU eigh (LAPACK from scipy's OpenBLAS)
# spins or deadlocks when OpenBLAS threads compete with XLA's thread pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  from examples import datasets
except ImportError:  # run as `python examples/flax_mnist.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  from examples import datasets

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import shampoo_optax


class MLP(nnx.Module):
  """784 -> hidden -> hidden -> 10, ReLU."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(28 * 28, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.out(x)


def load_data(args) -> dict[str, np.ndarray]:
  """Standardized float32 images and int32 labels."""
  if args.synthetic:
    # Ten random prototype images plus noise: learnable, no download needed.
    rng = np.random.default_rng(args.seed)
    protos = rng.normal(size=(10, 28, 28)).astype(np.float32)
    out = {}
    for split, n in (("train", 2048), ("test", 512)):
      y = rng.integers(0, 10, n).astype(np.int32)
      x = protos[y] + 1.5 * rng.normal(size=(n, 28, 28)).astype(np.float32)
      out[f"{split}_images"], out[f"{split}_labels"] = x, y
    return out
  d = datasets.load_fashion_mnist(args.data)
  train = d["train_images"].astype(np.float32) / 255.0
  mean, std = train.mean(), train.std()
  return dict(
      train_images=(train - mean) / std, train_labels=d["train_labels"],
      test_images=(d["test_images"].astype(np.float32) / 255.0 - mean) / std,
      test_labels=d["test_labels"])


def make_optimizer(args) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup_steps=max(1, args.steps // 20),
      decay_steps=max(2, args.steps), end_value=0.01 * args.lr)
  if args.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=args.weight_decay)
  return shampoo_optax.shampoo(
      schedule, weight_decay=args.weight_decay, block_size=args.block_size,
      precondition_every=args.precondition_every)


def loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_chunk(model, x, y):
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
  return loss, (logits.argmax(-1) == y).sum()


def evaluate(model, data, chunk=2000):
  n = data["test_images"].shape[0]
  loss = correct = 0.0
  for i in range(0, n, chunk):
    l, c = eval_chunk(model, data["test_images"][i:i + chunk],
                      data["test_labels"][i:i + chunk])
    loss, correct = loss + float(l), correct + float(c)
  return loss / n, correct / n


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--data", default=None,
                 help="Fashion-MNIST directory (default: FASHION_MNIST_DIR or "
                      "/usr/share/datasets/fashion-mnist)")
  p.add_argument("--synthetic", action="store_true",
                 help="random prototype images instead of Fashion-MNIST")
  p.add_argument("--optimizer", choices=("shampoo", "adamw"),
                 default="shampoo")
  p.add_argument("--lr", type=float, default=3e-3,
                 help="peak learning rate (AdamW's best works for Shampoo)")
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--precondition-every", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  data = load_data(args)
  n_train = data["train_images"].shape[0]
  batch_size = min(args.batch_size, n_train)
  print(f"{args.optimizer} on {'synthetic data' if args.synthetic else 'Fashion-MNIST'}"
        f": {n_train} train / {data['test_images'].shape[0]} test images, "
        f"{args.steps} steps of batch {batch_size}, peak lr {args.lr:g}, "
        f"jax {jax.__version__} on {jax.default_backend()}", flush=True)

  model = MLP(args.hidden, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, make_optimizer(args), wrt=nnx.Param)
  order = datasets.batch_indices(n_train, batch_size, args.steps, args.seed)

  train_seconds = first_step_seconds = 0.0
  losses, evals = [], []
  for step in range(1, args.steps + 1):
    idx = order[step - 1]
    x, y = data["train_images"][idx], data["train_labels"][idx]
    t0 = time.perf_counter()
    loss = float(train_step(model, optimizer, x, y))
    if step == 1:  # includes compilation
      first_step_seconds = time.perf_counter() - t0
    else:
      train_seconds += time.perf_counter() - t0
    losses.append(loss)
    if not np.isfinite(loss):
      print(f"step {step}: loss is {loss}; stopping", flush=True)
      break
    if step % args.eval_every == 0 or step == args.steps:
      test_loss, acc = evaluate(model, data)
      evals.append((step, acc))
      print(f"step {step:5d}  train loss {np.mean(losses[-args.eval_every:]):.4f}"
            f"  test loss {test_loss:.4f}  test acc {acc:.4f}"
            f"  ({train_seconds:.1f}s)", flush=True)

  final_acc = evals[-1][1] if evals else float("nan")
  best_step, best_acc = max(evals, key=lambda e: e[1]) if evals else (0, 0.0)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(
      nnx.state(optimizer.opt_state)) if hasattr(x, "nbytes"))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  summary = dict(optimizer=args.optimizer, steps=len(losses),
                 final_train_loss=losses[-1] if losses else float("nan"),
                 final_test_acc=final_acc, best_test_acc=best_acc,
                 best_step=best_step, train_seconds=train_seconds,
                 first_step_seconds=first_step_seconds,
                 state_over_param_bytes=state_bytes / param_bytes)
  print("\nsummary")
  print(f"  optimizer        {args.optimizer} (peak lr {args.lr:g})")
  print(f"  steps            {len(losses)}")
  print(f"  final test acc   {final_acc:.4f} (best {best_acc:.4f} at step {best_step})")
  print(f"  train time       {train_seconds:.1f}s "
        f"({1000 * train_seconds / max(1, len(losses) - 1):.1f} ms/step) + "
        f"first step with compilation {first_step_seconds:.1f}s")
  print(f"  state bytes      {summary['state_over_param_bytes']:.2f}x the "
        f"parameter bytes", flush=True)
  return summary


if __name__ == "__main__":
  main()
