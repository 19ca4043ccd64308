# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Shampoo trains: lower loss than SGD, at least Adam's, at equal steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shampoo_optax


def train(tx, params, loss_fn, batches):
  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for batch in batches:
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  return params, np.array(losses)


def best_final_loss(make_tx, learning_rates, *args):
  """Best (over the learning rates) mean loss of the last 10% of steps."""
  results = []
  for lr in learning_rates:
    _, losses = train(make_tx(lr), *args)
    tail = losses[-max(1, len(losses) // 10):]
    results.append(np.inf if not np.all(np.isfinite(tail)) else tail.mean())
  return min(results)


def test_ill_conditioned_regression():
  """A linear model on correlated, badly scaled features."""
  rng = np.random.default_rng(0)
  n_in, n_out, steps = 32, 8, 200
  mixing = rng.standard_normal((n_in, n_in)) * np.logspace(0, -2, n_in)
  true_w = rng.standard_normal((n_in, n_out))
  batches = []
  for _ in range(steps):
    x = rng.standard_normal((64, n_in)) @ mixing
    batches.append((jnp.asarray(x, jnp.float32),
                    jnp.asarray(x @ true_w, jnp.float32)))
  loss_fn = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
  params = jnp.zeros((n_in, n_out))
  lrs = (0.3, 0.1, 0.03, 0.01)
  args = (params, loss_fn, batches)
  sgd = best_final_loss(optax.sgd, lrs, *args)
  adam = best_final_loss(optax.adam, lrs, *args)
  shampoo = best_final_loss(
      functools.partial(shampoo_optax.shampoo, precondition_every=5), lrs,
      *args)
  assert shampoo < sgd
  assert shampoo < adam


def test_fashion_mnist_logistic_regression():
  """Real data (skipped without the Debian package or FASHION_MNIST_DIR)."""
  datasets = pytest.importorskip("examples.datasets")
  try:
    data = datasets.load_fashion_mnist()
  except FileNotFoundError:
    pytest.skip("Fashion-MNIST not installed (make data)")
  x = jnp.asarray(data["train_images"][:20000].reshape(-1, 784) / 255.0,
                  jnp.float32)
  y = jnp.asarray(data["train_labels"][:20000])
  rng = np.random.default_rng(0)
  batches = [(x[i], y[i]) for i in
             (rng.integers(0, len(x), 128) for _ in range(300))]

  def loss_fn(params, batch):
    logits = batch[0] @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[1]).mean()

  params = {"w": jnp.zeros((784, 10)), "b": jnp.zeros(10)}
  lrs = (1e-1, 1e-2, 1e-3)
  args = (params, loss_fn, batches)
  sgd = best_final_loss(optax.sgd, (1.0, 0.3, 0.1), *args)
  adam = best_final_loss(optax.adam, lrs, *args)
  shampoo = best_final_loss(shampoo_optax.shampoo, lrs, *args)
  assert shampoo < sgd
  assert shampoo <= adam * 1.01
