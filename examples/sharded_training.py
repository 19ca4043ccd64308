# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Distributed Shampoo under the three ways JAX programs are sharded.

Runs on 8 simulated CPU devices (the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts)::

    python examples/sharded_training.py [--steps 8]

Each pattern trains the same small Flax (linen) MLP on synthetic data with
``shampoo_optax.shampoo(..., shard_axes="data")``: the statistics and inverse
roots of the 64 x 64 kernel's blocks are split over the mesh axis ``"data"``,
so each device holds and inverts 1/8 of them (the smaller kernels' factors
have no axis that 8 divides: they are stored as rows padded to 8, one per
device).

1. ``explicit``: explicit sharding. ``jax.set_mesh(mesh)`` on a mesh with
   ``Explicit`` axes; shardings are part of the types (``jax.typeof``), the
   state comes from ``jax.jit(tx.init)`` and keeps its types across updates.
   Parameters replicated, the batch split over ``"data"`` (data parallel).
2. ``fsdp``: the same, with each kernel split along its first dimension
   (fully sharded data parallel); the forward pass gathers the weights, the
   gradients, the updates and the per-parameter optimizer state keep the
   parameter's sharding.
3. ``pjit``: a mesh with ``Auto`` axes and ``jax.jit(step, in_shardings=...,
   out_shardings=...)``; ``shampoo_optax.state_shardings`` gives the state's
   shardings. The calls run under ``jax.set_mesh(mesh)`` so that Shampoo sees
   the mesh when the step is traced.

On several hosts, call ``jax.distributed.initialize()`` first and build the
global batch with ``jax.make_array_from_process_local_data``; nothing else
changes (``jax.devices()`` then lists the devices of every host).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # Before JAX starts; a no-op when imported.
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

try:
  import shampoo_optax
except ImportError:  # run as `python examples/sharded_training.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  import shampoo_optax

PATTERNS = ("explicit", "fsdp", "pjit")


class MLP(nn.Module):
  """16 -> 64 -> 64 -> 4, ReLU."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(4)(x)


def make_data(batch_size: int = 256):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch_size, 16)).astype(np.float32)
  w = rng.standard_normal((16, 4)).astype(np.float32)
  y = np.argmax(x @ w, axis=-1).astype(np.int32)
  return x, y


def make_optimizer():
  # Block 8: the 64x64 kernel is 8 x 8 blocks, so its factors split over 8
  # devices (by block rows, which FSDP puts one per device).
  return shampoo_optax.shampoo(
      3e-3, block_size=8, precondition_every=2, weight_decay=1e-4,
      shard_axes="data")


def make_train_step(tx, gather_weights: bool = False):
  model = MLP()

  def loss_fn(params, x, y):
    if gather_weights:  # FSDP under explicit sharding: all-gather weights.
      params = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def fsdp_spec(leaf) -> P:
  """Split a kernel along its first dimension when 8 divides it."""
  return P("data", None) if leaf.ndim == 2 and leaf.shape[0] % 8 == 0 else P()


def train(pattern: str, steps: int):
  """Trains under one pattern; returns the losses and the final state."""
  x, y = make_data()
  tx = make_optimizer()
  params = MLP().init(jax.random.key(0), x[:1])

  if pattern in ("explicit", "fsdp"):
    mesh = jax.make_mesh((8,), ("data",),
                         axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
      if pattern == "explicit":
        params = jax.sharding.reshard(params, P())
      else:
        params = jax.tree.map(
            lambda p: jax.sharding.reshard(p, fsdp_spec(p)), params)
      x, y = jax.sharding.reshard((x, y), P("data"))
      opt_state = jax.jit(tx.init)(params)
      types = jax.tree.map(jax.typeof, opt_state)
      step = jax.jit(make_train_step(tx, gather_weights=pattern == "fsdp"))
      losses = []
      for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
      assert jax.tree.map(jax.typeof, opt_state) == types
  else:  # The pjit way.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    param_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    state_sh = shampoo_optax.state_shardings(tx, params, mesh, param_sh)
    data_sh = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, param_sh)
    x, y = jax.device_put((x, y), data_sh)
    with jax.set_mesh(mesh):  # Shampoo reads the mesh when tracing.
      opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
      step = jax.jit(
          make_train_step(tx),
          in_shardings=(param_sh, state_sh, data_sh, data_sh),
          out_shardings=(param_sh, state_sh, NamedSharding(mesh, P())),
          donate_argnums=(0, 1))
      losses = []
      for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
  return losses, params, opt_state


def describe(pattern, losses, params, opt_state) -> str:
  shampoo_state = opt_state[0]
  stacks = ", ".join(
      f"{s.shape[:-2]}->{s.addressable_shards[0].data.shape[:-2]}"
      for s in shampoo_state.stats)
  kernel = params["params"]["Dense_1"]["kernel"]
  momentum = shampoo_state.mu["params"]["Dense_1"]["kernel"]
  return (
      f"{pattern:>8}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; blocks of"
      f" each factor (global->per device) {stacks}; Dense_1 kernel"
      f" {tuple(kernel.sharding.spec)}, its momentum"
      f" {tuple(momentum.sharding.spec)}")


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--patterns", nargs="+", default=PATTERNS,
                      choices=PATTERNS)
  args = parser.parse_args(argv)
  if jax.device_count() < 8:
    raise SystemExit(
        "needs 8 devices: run as a script, or set XLA_FLAGS="
        "--xla_force_host_platform_device_count=8 before JAX starts")
  results = {}
  for pattern in args.patterns:
    results[pattern] = train(pattern, args.steps)
    print(describe(pattern, *results[pattern]))
  return results


if __name__ == "__main__":
  main()
