# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
r"""Save on one mesh, resume on another, and check nothing changed.

Runs on simulated CPU devices (the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts,
unless the flag is already there)::

    python examples/resume_on_other_mesh.py --save-devices 8 --restore-devices 2
    python examples/resume_on_other_mesh.py --save-devices 1 --restore-devices 2x4

A mesh is ``N`` devices (axis ``"data"``) or ``AxB`` (axes ``"data"`` and
``"model"``); ``none`` is one device without a mesh (``shard_axes=None``,
everything on ``jax.devices()[0]``). A small MLP with a stacked
(scanned-style) layer is trained with its kernels split over the mesh (FSDP)
and Shampoo's factors following them where they can (the 96-wide kernels'
16-wide blocks do not line up with every split; factors that no mesh axis
divides are stored as padded rows); ``--optimizer soap`` trains with
`shampoo_optax.soap` instead. After ``--steps`` steps the parameters and the
optimizer state, in its checkpoint layout (`shampoo_optax.unpad_state`: no
padding rows, the same shapes on every mesh), are saved with Orbax,
restored onto the other mesh with a *strict* restore, laid out for that
mesh (`shampoo_optax.pad_state`) and trained ``--steps`` more. The result
is compared with an uninterrupted run on the first mesh; the script exits
with status 1 if they differ by more than float32 round-off.

Saving and resuming can also run in two processes, e.g. resuming in one
that has a single device::

    python examples/resume_on_other_mesh.py --save-devices 8 --save-to DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=1 \
        python examples/resume_on_other_mesh.py --restore-devices none \
        --resume-from DIR

The first writes the checkpoint and the uninterrupted run's parameters
(``uninterrupted.npz``) into ``DIR``; the second restores, trains, writes
its parameters (``resumed.npz``) and compares.
"""

from __future__ import annotations

import os
import sys

# Before JAX starts; a no-op when imported.
if __name__ == "__main__" and "xla_force_host_platform_device_count" not in (
    os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import contextlib
import math
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

try:
  import shampoo_optax
except ImportError:  # run as `python examples/resume_on_other_mesh.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  import shampoo_optax

LAYERS, WIDTH, BATCH = 2, 96, 256


def make_mesh(spec: str):
  """``"N"`` -> ``("data",)`` of N devices; ``"AxB"`` -> ``("data", "model")``.

  ``"none"`` -> ``None``: one device, no mesh.
  """
  if spec == "none":
    return None
  sizes = tuple(int(s) for s in spec.split("x"))
  names = ("data", "model")[:len(sizes)]
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Explicit,) *
                       len(sizes), devices=jax.devices()[:math.prod(sizes)])


def param_specs(mesh):
  """FSDP: kernels split over every mesh axis, vectors replicated."""
  axes = mesh.axis_names
  matrix = P(*axes) if len(axes) == 2 else P(axes[0], None)
  return {"w_in": matrix, "b_in": P(),
          "layers": {"w": P(None, *matrix), "b": P()},
          "w_out": P(axes[0], None), "b_out": P()}


def init_params(seed: int = 0):
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32) / np.sqrt(s[-2])
  return {"w_in": normal(16, WIDTH), "b_in": np.zeros(WIDTH, np.float32),
          "layers": {"w": normal(LAYERS, WIDTH, WIDTH),
                     "b": np.zeros((LAYERS, WIDTH), np.float32)},
          "w_out": normal(WIDTH, 8), "b_out": np.zeros(8, np.float32)}


def batch(step: int):
  rng = np.random.default_rng(1000 + step)
  x = rng.standard_normal((BATCH, 16)).astype(np.float32)
  return x, (x[:, :4].sum(-1) > 0).astype(np.int32) + 2 * (x[:, 4] > 0)


def loss_fn(params, x, y):
  # FSDP: the weights are gathered for the forward pass; the gradients come
  # back split like the weights.
  if jax.sharding.get_abstract_mesh().axis_names:
    params = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params)
  h = jnp.tanh(x @ params["w_in"] + params["b_in"])

  def layer(h, weights):
    w, b = weights
    return jnp.tanh(h @ w + b), None

  h, _ = jax.lax.scan(layer, h, (params["layers"]["w"],
                                 params["layers"]["b"]))
  logits = h @ params["w_out"] + params["b_out"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_optimizer(mesh, optimizer: str = "shampoo"):
  make = {"shampoo": shampoo_optax.shampoo, "soap": shampoo_optax.soap}
  return make[optimizer](
      3e-3, block_size=16, precondition_every=2, weight_decay=1e-4,
      shard_axes=None if mesh is None else mesh.axis_names,
      layer_axes={"w_in": None, "b_in": None, "layers": {"w": 0, "b": 0},
                  "w_out": None, "b_out": None})


def on_mesh(mesh):
  """``jax.set_mesh(mesh)``, or nothing without a mesh."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def one_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def place(tree, mesh):
  if mesh is None:
    return jax.device_put(tree, one_device())
  with jax.set_mesh(mesh):
    return jax.tree.map(lambda x, s: jax.sharding.reshard(jnp.asarray(x), s),
                        tree, param_specs(mesh))


def train(params, opt_state, mesh, steps: range, optimizer: str = "shampoo"):
  tx = make_optimizer(mesh, optimizer)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with on_mesh(mesh):
    if opt_state is None:
      opt_state = jax.jit(tx.init)(params)
    for i in steps:
      x, y = batch(i)
      if mesh is not None:
        x = jax.sharding.reshard(jnp.asarray(x), P(mesh.axis_names[0]))
        y = jax.sharding.reshard(jnp.asarray(y), P(mesh.axis_names[0]))
      params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


def save(path, params, opt_state, mesh, optimizer: str = "shampoo"):
  """Saves the state in its checkpoint layout (no padding rows)."""
  opt_state = shampoo_optax.unpad_state(make_optimizer(mesh, optimizer),
                                        params, opt_state)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {"params": params, "opt_state": opt_state})


def restore(path, mesh, optimizer: str = "shampoo"):
  """A strict restore onto ``mesh``, then the state laid out for it.

  Without a mesh, `shampoo_optax.abstract_state` puts the state on JAX's
  default device (``jax.devices()[0]`` here), and the parameters go there
  too, whatever mesh the checkpoint was written from.
  """
  if mesh is None:
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=one_device()),
        init_params())
  else:
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, s)),
        init_params(), param_specs(mesh))
  tx = make_optimizer(mesh, optimizer)
  target = {"params": params,
            "opt_state": shampoo_optax.abstract_state(tx, params, mesh,
                                                      padded=False)}
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, target)
  return restored["params"], shampoo_optax.pad_state(
      tx, params, restored["opt_state"], mesh)


def max_relative_difference(a, b) -> float:
  """Largest ``max|a - b| / max|b|`` over the leaves."""
  return max(
      float(np.abs(np.asarray(x) - np.asarray(y)).max()
            / max(np.abs(np.asarray(y)).max(), 1e-30))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def save_arrays(path, tree):
  """``tree``'s leaves into an ``.npz``, named by their paths."""
  np.savez(path, **{jax.tree_util.keystr(k): np.asarray(x)
                    for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]})


def load_arrays(path, like):
  """`save_arrays`' file as a tree like ``like``."""
  with np.load(path) as arrays:
    return jax.tree_util.tree_map_with_path(
        lambda k, _: arrays[jax.tree_util.keystr(k)], like)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--save-devices", default="8")
  parser.add_argument("--restore-devices", default="2")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--optimizer", default="shampoo",
                      choices=("shampoo", "soap"))
  parser.add_argument("--save-to", default=None,
                      help="only train, save into this directory and exit")
  parser.add_argument("--resume-from", default=None,
                      help="resume from --save-to's directory")
  parser.add_argument("--tolerance", type=float, default=1e-4,
                      help="largest accepted max|diff| / max|value|")
  args = parser.parse_args(argv)
  first, second = range(args.steps), range(args.steps, 2 * args.steps)

  with contextlib.ExitStack() as stack:
    directory = args.resume_from or args.save_to or stack.enter_context(
        tempfile.TemporaryDirectory())
    path = os.path.join(os.path.abspath(directory), "checkpoint")
    if args.resume_from is None:
      save_mesh = make_mesh(args.save_devices)
      params, opt_state = train(place(init_params(), save_mesh), None,
                                save_mesh, first, args.optimizer)
      reference, _ = train(params, opt_state, save_mesh, second,
                           args.optimizer)
      save(path, params, opt_state, save_mesh, args.optimizer)
      if args.save_to is not None:
        save_arrays(os.path.join(directory, "uninterrupted.npz"), reference)
        print(f"saved on {args.save_devices} into {directory}")
        return 0
    else:
      reference = load_arrays(os.path.join(directory, "uninterrupted.npz"),
                              init_params())
    restore_mesh = make_mesh(args.restore_devices)
    params, opt_state = restore(path, restore_mesh, args.optimizer)
    resumed, _ = train(params, opt_state, restore_mesh, second,
                       args.optimizer)
    if args.resume_from is not None:
      save_arrays(os.path.join(directory, "resumed.npz"), resumed)

  difference = max_relative_difference(resumed, reference)
  ok = difference <= args.tolerance
  saved = (f"saved in {args.resume_from}" if args.resume_from else
           f"saved on {args.save_devices}")
  print(f"{args.optimizer}: {saved}, resumed on {args.restore_devices}"
        f" ({jax.device_count()} devices in this process):"
        f" max |resumed - uninterrupted| / max |uninterrupted| ="
        f" {difference:.2e} ({'ok' if ok else 'DIFFERENT'})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
