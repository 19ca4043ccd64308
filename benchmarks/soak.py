# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Long-run soak test of Shampoo's numerics (not part of CI).

A small MLP (32 -> 64 -> 64 -> 8, tanh) learns a fixed teacher on
ill-conditioned inputs (feature scales spanning ``--condition``, so the
input covariance has condition number ``condition^2``), with the roots
recomputed at every step (``precondition_every=1``). Every ``--nan-every``
steps the gradient is replaced by NaN to exercise the skip policy. The
training runs in compiled chunks (``lax.scan``) and records, per chunk, the
loss, the cumulative failed-root count, the largest root error of any refresh
and the count of skipped steps.

    python -m benchmarks.soak [--steps 20000] [--root-method eigh|newton]

Writes ``benchmarks/results/soak.json`` and prints a summary; exits non-zero
if the loss ever became non-finite or a skipped step was not counted.
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import shampoo_optax

IN, HIDDEN, OUT = 32, 64, 8


def init_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  dense = lambda k, m, n: {
      "kernel": jax.random.normal(k, (m, n)) / np.sqrt(m),
      "bias": jnp.zeros((n,))}
  return {"l1": dense(k1, IN, HIDDEN), "l2": dense(k2, HIDDEN, HIDDEN),
          "l3": dense(k3, HIDDEN, OUT)}


def forward(params, x):
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  h = jnp.tanh(h @ params["l2"]["kernel"] + params["l2"]["bias"])
  return h @ params["l3"]["kernel"] + params["l3"]["bias"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20000)
  parser.add_argument("--chunk", type=int, default=500)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--block-size", type=int, default=32)
  parser.add_argument("--root-method", default="auto")
  parser.add_argument("--matrix-eps", type=float, default=1e-6)
  parser.add_argument("--condition", type=float, default=1e4,
                      help="ratio of the largest to smallest feature scale")
  parser.add_argument("--nan-every", type=int, default=2500,
                      help="replace the gradient by NaN every N steps (0: never)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "soak.json"))
  args = parser.parse_args(argv)

  key = jax.random.key(args.seed)
  k_params, k_teacher, k_data = jax.random.split(key, 3)
  scales = jnp.logspace(0, np.log10(args.condition), IN) / np.sqrt(
      args.condition)
  teacher = init_params(k_teacher)
  params = init_params(k_params)
  tx = shampoo_optax.shampoo(
      args.learning_rate, block_size=args.block_size, precondition_every=1,
      root_method=args.root_method, matrix_eps=args.matrix_eps,
      weight_decay=1e-4)
  opt_state = tx.init(params)

  def loss_fn(params, step):
    x = jax.random.normal(jax.random.fold_in(k_data, step),
                          (args.batch_size, IN)) * scales
    y = forward(teacher, x / scales)  # the teacher sees whitened inputs
    return jnp.mean((forward(params, x) - y) ** 2)

  def train_step(carry, step):
    params, opt_state, worst_error = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, step)
    if args.nan_every:
      poison = (step % args.nan_every) == args.nan_every - 1
      grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    diag = optax.tree_utils.tree_get(opt_state, "diagnostics")
    worst_error = jnp.maximum(worst_error, diag.max_root_error)
    return (params, opt_state, worst_error), loss

  @jax.jit
  def run_chunk(params, opt_state, worst_error, start):
    steps = start + jnp.arange(args.chunk)
    (params, opt_state, worst_error), losses = jax.lax.scan(
        train_step, (params, opt_state, worst_error), steps)
    return params, opt_state, worst_error, losses

  history, all_finite = [], True
  worst_error = jnp.zeros([], jnp.float32)
  compile_start = time.perf_counter()
  run_chunk.lower(params, opt_state, worst_error, 0).compile()
  compile_seconds = time.perf_counter() - compile_start
  start_time = time.perf_counter()
  first_loss = None
  for start in range(0, args.steps, args.chunk):
    params, opt_state, worst_error, losses = run_chunk(
        params, opt_state, worst_error, start)
    losses = np.asarray(losses)
    first_loss = float(losses[0]) if first_loss is None else first_loss
    diag = optax.tree_utils.tree_get(opt_state, "diagnostics")
    finite = bool(np.all(np.isfinite(losses)))
    all_finite &= finite
    history.append({
        "step": start + args.chunk,
        "loss_mean": float(np.mean(losses)),
        "loss_max": float(np.max(losses)),
        "loss_finite": finite,
        "root_failures": int(diag.root_failures),
        "max_root_error_so_far": float(worst_error),
        "nonfinite_steps": int(diag.nonfinite_steps),
    })
    print(f"step {start + args.chunk:6d}  loss {np.mean(losses):.5f}  "
          f"root failures {int(diag.root_failures)}  worst root error "
          f"{float(worst_error):.3g}  skipped {int(diag.nonfinite_steps)}",
          flush=True)
  seconds = time.perf_counter() - start_time

  steps = len(history) * args.chunk
  diag = optax.tree_utils.tree_get(opt_state, "diagnostics")
  expected_skips = steps // args.nan_every if args.nan_every else 0
  state_finite = all(bool(jnp.all(jnp.isfinite(x)))
                     for x in jax.tree.leaves((params, opt_state)))
  result = {
      "config": {k: v for k, v in vars(args).items() if k != "out"},
      "root_method": (shampoo_optax.default_root_method()
                      if args.root_method == "auto" else args.root_method),
      "steps": steps,
      "refreshes": steps - int(diag.nonfinite_steps),
      "loss_first": first_loss,
      "loss_final_chunk_mean": history[-1]["loss_mean"],
      "loss_always_finite": all_finite,
      "state_finite": state_finite,
      "root_failures": int(diag.root_failures),
      "max_root_error": float(worst_error),
      "nonfinite_steps": int(diag.nonfinite_steps),
      "expected_nonfinite_steps": expected_skips,
      "compile_seconds": compile_seconds,
      "train_seconds": seconds,
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "machine": platform.machine(),
      "history": history,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "history"},
                   indent=1))
  ok = (all_finite and state_finite
        and int(diag.nonfinite_steps) == expected_skips)
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
