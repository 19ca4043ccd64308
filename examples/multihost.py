# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Distributed Shampoo trained by several JAX processes (multi-host).

Every process runs this script: ``jax.distributed.initialize`` joins them,
``jax.make_mesh`` spans the devices of all of them, each process loads only its
rows of every global batch and ``jax.make_array_from_process_local_data``
assembles the global batch. ``shampoo_optax.shampoo(..., shard_axes="data")``
splits its stacked statistics and inverse roots over all those devices.

Two processes on this machine, 4 simulated CPU devices each (8 in all), with
JAX's CPU collectives (gloo)::

    python examples/multihost.py --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 0 --local-devices 4 --steps 4 \\
        --out /tmp/multihost &
    python examples/multihost.py --coordinator 127.0.0.1:12355 \\
        --num-processes 2 --process-id 1 --local-devices 4 --steps 4 \\
        --out /tmp/multihost

The coordinator (in process 0) listens on the address given; gloo listens on
the address this machine's host name resolves to. Each process writes its
parameters to ``/tmp/multihost/params_<process id>.npz``, and together they
write an Orbax checkpoint (parameters and optimizer state) to
``/tmp/multihost/checkpoint``. One process with 8 devices then trains on the
same global batches and prints the difference (``--compare``), or restores the
checkpoint and continues (``--restore``)::

    python examples/multihost.py --local-devices 8 --steps 4 \\
        --compare /tmp/multihost
    python examples/multihost.py --local-devices 8 --steps 6 \\
        --restore /tmp/multihost/checkpoint

``tests/test_multiprocess.py`` runs these and checks that they agree.

On real hosts, run one process per host without ``--local-devices`` (each
process uses its host's devices), with ``--coordinator`` the address of host 0
(``<host 0 ip>:<port>``, reachable from every host) and ``--process-id`` the
host's index, and ``--out`` a directory every host can write (a shared file
system or a bucket). On Cloud TPU and under SLURM or Open MPI, pass
``--auto-detect`` instead of ``--coordinator``, ``--num-processes`` and
``--process-id``: ``jax.distributed.initialize()`` finds them.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
from typing import Sequence

# Before numpy/jax load OpenBLAS: CPU eigh (LAPACK from scipy's OpenBLAS)
# spins or deadlocks when OpenBLAS threads compete with XLA's thread pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

try:
  import shampoo_optax
except ImportError:  # run as `python examples/multihost.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  import shampoo_optax

GLOBAL_BATCH = 64
FEATURES = 16
CLASSES = 16


class MLP(nn.Module):
  """16 -> 32 -> 32 -> 16, ReLU."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(CLASSES)(x)


def make_optimizer():
  # Block 16: the kernels are 1 x 2, 2 x 2 and 2 x 1 blocks of 16 x 16. No
  # axis of theirs divides 8, so each factor's rows are padded to 8, one per
  # device. The roots are refreshed every second step.
  return shampoo_optax.shampoo(
      3e-3, block_size=16, precondition_every=2, weight_decay=1e-4,
      shard_axes="data")


def global_batch(step: int):
  """The global batch of a step: the same on every process and every run."""
  teacher = np.random.default_rng(0).standard_normal((FEATURES, CLASSES))
  x = np.random.default_rng(1 + step).standard_normal(
      (GLOBAL_BATCH, FEATURES)).astype(np.float32)
  return x, np.argmax(x @ teacher, axis=-1).astype(np.int32)


def process_batch(step: int, mesh):
  """The global batch, from this process's rows (a loader reads only those)."""
  rows = GLOBAL_BATCH // jax.process_count()
  start = jax.process_index() * rows
  sharding = NamedSharding(mesh, P("data"))
  return tuple(
      jax.make_array_from_process_local_data(sharding, a[start:start + rows])
      for a in global_batch(step))


@functools.cache  # Compiled once per process, however often main() runs.
def make_training():
  """The optimizer and the jitted train step."""
  tx = make_optimizer()
  model = MLP()

  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, jax.jit(train_step)


def init_params():
  return jax.jit(MLP().init)(jax.random.key(0),
                             np.zeros((1, FEATURES), np.float32))


def save_checkpoint(path, step, params, opt_state, tx):
  """Every process calls this; each writes the shards it holds.

  The state is saved in its checkpoint layout (no padding rows).
  """
  opt_state = shampoo_optax.unpad_state(tx, params, opt_state)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    checkpointer.save(path, args=ocp.args.StandardSave(
        {"step": step, "params": params, "opt_state": opt_state}), force=True)


def restore_checkpoint(path, tx, mesh):
  """Restores onto ``mesh``, in any number of processes.

  Strict: the checkpoint layout does not depend on the mesh, so any mesh
  will do; `shampoo_optax.pad_state` then lays the state out for it.
  """
  replicated = NamedSharding(mesh, P())
  params = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated),
      jax.eval_shape(init_params))
  state = shampoo_optax.abstract_state(tx, params, mesh, padded=False)
  step = jax.ShapeDtypeStruct((), np.int32, sharding=replicated)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.StandardRestore(
        {"step": step, "params": params, "opt_state": state}))
  return int(restored["step"]), restored["params"], shampoo_optax.pad_state(
      tx, params, restored["opt_state"], mesh)


def host_params(params) -> dict[str, np.ndarray]:
  """The (replicated) parameters as NumPy arrays keyed by their path."""
  return {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def scaled_max_diff(actual, expected) -> float:
  """max |actual - expected| / max |expected| over the arrays."""
  return max(float(np.max(np.abs(actual[k] - expected[k]))
                   / np.max(np.abs(expected[k]))) for k in expected)


def main(argv: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
  """Trains; returns the parameters after each step (see `host_params`)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--coordinator",
                      help="host:port of the coordinator, in process 0")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--auto-detect", action="store_true",
                      help="join the processes of a TPU, SLURM or Open MPI "
                      "job without --coordinator")
  parser.add_argument("--local-devices", type=int,
                      help="simulated CPU devices in this process")
  parser.add_argument("--steps", type=int, default=4,
                      help="train until this step")
  parser.add_argument("--restore", help="checkpoint to continue from")
  parser.add_argument("--out", type=pathlib.Path,
                      help="write params_<process id>.npz and a checkpoint")
  parser.add_argument("--compare", type=pathlib.Path,
                      help="print the difference to the params_*.npz there")
  args = parser.parse_args(argv)

  if args.local_devices:
    jax.config.update("jax_num_cpu_devices", args.local_devices)
  if args.coordinator or args.auto_detect:
    # The coordinator listens only on the address given (default: all).
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes, process_id=args.process_id,
        coordinator_bind_address=args.coordinator)

  tx, train_step = make_training()
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    if args.restore:
      start, params, opt_state = restore_checkpoint(args.restore, tx, mesh)
    else:
      start, params = 0, jax.sharding.reshard(init_params(), P())
      opt_state = jax.jit(tx.init)(params)
    if args.steps <= start:
      parser.error(f"--steps {args.steps}: already at step {start}")
    history = []
    for step in range(start, args.steps):
      params, opt_state, loss = train_step(params, opt_state,
                                           *process_batch(step, mesh))
      history.append(host_params(params))
      print(f"process {jax.process_index()} step {step + 1}: loss "
            f"{float(loss):.4f}")
    if args.out:
      args.out.mkdir(parents=True, exist_ok=True)
      np.savez(args.out / f"params_{jax.process_index()}.npz", **history[-1])
      save_checkpoint((args.out / "checkpoint").absolute(), args.steps,
                      params, opt_state, tx)
  if args.compare:
    for path in sorted(args.compare.glob("params_*.npz")):
      print(f"{path.name}: max |difference| / max |parameter| = "
            f"{scaled_max_diff(np.load(path), history[-1]):.2e}")
  return history


if __name__ == "__main__":
  main()
