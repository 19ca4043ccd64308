# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""FSDP training of stock Flax (NNX and linen) Transformers with Shampoo/SOAP.

Runs on 8 simulated CPU devices (the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts)::

    python examples/fsdp_flax.py [--frameworks nnx linen]
        [--optimizers shampoo soap] [--route explicit|pjit|single] [--steps 6]

The model is a 2-layer causal Transformer LM built from stock layers only
(``Embed``, ``MultiHeadAttention``, ``LayerNorm``, ``Linear``/``Dense``), its
layers stacked (``nnx.vmap`` to create, ``nnx.scan`` to apply; ``nn.scan``
in linen; ``layer_axes`` tells the optimizer), trained on random token
sequences (each next token is a fixed random permutation of the current
one, so the loss can fall). Every
parameter is split over the mesh axis ``"data"`` along its largest dim that
8 divides (the layer axis excepted), the batch too: FSDP.

Under explicit sharding a stock embedding fails (``jnp.take`` of a table by
batch-split token ids asks for ``out_sharding``), and no stock layer passes
one. The routes:

* ``explicit`` (recommended): an ``Explicit`` mesh for the parameters, the
  optimizer state and the update; only the model's forward runs under
  ``jax.sharding.auto_axes``, where the partitioner places the gather::

      def loss_fn(params, tokens, targets):
        params = jax.tree.map(lambda p: reshard(p, P()), params)  # gather
        return auto_axes(model_loss, out_sharding=P())(params, tokens,
                                                       targets)

  The gradients come back with the parameters' explicit shardings, so
  Shampoo sees them and keeps each block's statistics and root on the
  device that holds its piece of the parameter: the update moves nothing
  but scalars and a few small leaves that no whole block fits.
* ``pjit``: an ``Auto`` mesh, ``jax.jit`` with in/out shardings and
  ``shampoo_optax.state_shardings(tx, params, mesh, param_shardings)``. It
  trains the same model unchanged, but the update cannot see the
  parameters' shardings while it is traced, so the factors are split by
  ``shard_axes`` alone and the gradient blocks move to their owners by
  all-to-alls and back.
* ``single``: one device, no mesh (a reference for the losses).

Prints the losses, the optimizer state's bytes per device (measured on the
arrays, and ``shampoo_optax.state_report``'s plan), the bytes of every kind
of collective in the compiled train step and any "Involuntary full
rematerialization" warning XLA printed while compiling it (captured from
the process's stderr). Exits 1 unless every run's loss fell and its state
per device is within 5% of total / 8.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # Before JAX starts; a no-op when imported.
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8").strip()
  # CPU eigh (LAPACK) stalls when OpenBLAS threads compete with XLA's.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import contextlib
import re
import tempfile
from typing import Any, Sequence

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

try:
  import shampoo_optax
except ImportError:  # run as `python examples/fsdp_flax.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  import shampoo_optax

FRAMEWORKS = ("nnx", "linen")
OPTIMIZERS = ("shampoo", "soap")
ROUTES = ("explicit", "pjit", "single")
DEVICES = 8

VOCAB, D_MODEL, HEADS, LAYERS, SEQ_LEN = 128, 64, 4, 2, 16


# -----------------------------------------------------------------------------
# The models: stock layers only, layers stacked by scan.


class NnxBlock(nnx.Module):
  """Pre-LayerNorm decoder block."""

  def __init__(self, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, D_MODEL, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.up = nnx.Linear(D_MODEL, 4 * D_MODEL, rngs=rngs)
    self.down = nnx.Linear(4 * D_MODEL, D_MODEL, rngs=rngs)

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxLM(nnx.Module):
  """Token and position embeddings, scanned blocks, LayerNorm, logits."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
    self.pos = nnx.Embed(SEQ_LEN, D_MODEL, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return NnxBlock(rngs)

    self.layers = make_layers(rngs)
    self.ln = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.head = nnx.Linear(D_MODEL, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x)

    return self.head(self.ln(body(x, self.layers)))


class LinenBlock(nn.Module):
  """Pre-LayerNorm decoder block (the body of `nn.scan`)."""

  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + nn.MultiHeadDotProductAttention(HEADS)(nn.LayerNorm()(x),
                                                   mask=mask)
    h = nn.gelu(nn.Dense(4 * D_MODEL)(nn.LayerNorm()(x)))
    return x + nn.Dense(D_MODEL)(h), None


class LinenLM(nn.Module):
  """Token and position embeddings, scanned blocks, LayerNorm, logits."""

  @nn.compact
  def __call__(self, tokens):
    x = (nn.Embed(VOCAB, D_MODEL)(tokens)
         + nn.Embed(SEQ_LEN, D_MODEL)(jnp.arange(tokens.shape[1])))
    x, _ = nn.scan(LinenBlock, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=LAYERS)(
                       name="layers")(x, None)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def build_model(framework: str, seed: int = 0):
  """``(apply, params)``: a pure ``apply(params, tokens) -> logits``."""
  # Initialized under jit: one program instead of hundreds of eager ops.
  if framework == "nnx":
    model = nnx.jit(lambda: NnxLM(nnx.Rngs(seed)))()
    graph, params = nnx.split(model, nnx.Param)
    return (lambda p, tokens: nnx.merge(graph, p)(tokens)), params
  model = LinenLM()
  params = jax.jit(model.init)(jax.random.key(seed),
                               jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]
  return (lambda p, tokens: model.apply({"params": p}, tokens)), params


def make_batches(steps: int, batch_size: int, seed: int = 0):
  """Random sequences: each next token a fixed permutation of the current."""
  rng = np.random.default_rng(seed)
  successor = rng.permutation(VOCAB)
  batches = []
  for _ in range(steps):
    seq = [rng.integers(0, VOCAB, batch_size)]
    for _ in range(SEQ_LEN):
      seq.append(successor[seq[-1]])
    seq = np.stack(seq, axis=1).astype(np.int32)
    batches.append((seq[:, :-1], seq[:, 1:]))
  return batches


# -----------------------------------------------------------------------------
# Sharding and the optimizer.


def _stacked(path) -> bool:
  return "layers" in jax.tree_util.keystr(path)


def layer_axes(params):
  """Axis 0 of every leaf under the scanned ``layers`` is the layer axis."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 0 if _stacked(path) else None, params)


def fsdp_spec(path, leaf, size: int = DEVICES) -> P:
  """Splits the largest dim that ``size`` divides (not the layer axis)."""
  first = 1 if _stacked(path) else 0
  dims = [d for d in range(first, leaf.ndim) if leaf.shape[d] % size == 0]
  if not dims:
    return P()
  split = max(dims, key=lambda d: leaf.shape[d])  # The first of the largest.
  return P(*("data" if d == split else None for d in range(leaf.ndim)))


def fsdp_specs(params):
  return jax.tree_util.tree_map_with_path(fsdp_spec, params)


def make_optimizer(name: str, shard_axes: str | None = "data"):
  # Block 8 keeps every device's shard of every kernel whole blocks here
  # (64 / 8 devices = 8 rows), as block 512 would for d_model 4096.
  options = dict(block_size=8, precondition_every=2, layer_axes=layer_axes,
                 shard_axes=shard_axes)
  if name == "shampoo":
    return shampoo_optax.shampoo(3e-3, start_preconditioning_step=1,
                                 weight_decay=1e-4, **options)
  return shampoo_optax.soap(3e-3, weight_decay=1e-4, **options)


def model_loss(apply):
  def loss(params, tokens, targets):
    logits = apply(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()
  return loss


def make_train_step(tx, loss):
  def train_step(params, opt_state, tokens, targets):
    value, grads = jax.value_and_grad(loss)(params, tokens, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return train_step


# -----------------------------------------------------------------------------
# What the compiled step moves, and what XLA warned about while compiling it.

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
          "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
          "u64": 8}
_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|all-to-all|reduce-scatter|"
    r"collective-permute)(?:-start)?\(")
REMAT = "Involuntary full rematerialization"


def collectives(hlo: str) -> list[tuple[str, int]]:
  """``(op, bytes of its results)`` of every collective in an HLO module."""
  out = []
  for shapes, op in _COLLECTIVE.findall(hlo):
    size = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shapes):
      size += _BYTES.get(dtype, 4) * int(np.prod(
          [int(d) for d in dims.split(",") if d]))
    out.append((op, size))
  return out


def collective_totals(hlo: str) -> dict[str, tuple[int, int]]:
  """``{op: (count, bytes)}`` of the collectives in an HLO module."""
  totals = {}
  for op, size in collectives(hlo):
    count, total = totals.get(op, (0, 0))
    totals[op] = (count + 1, total + size)
  return totals


@contextlib.contextmanager
def captured_stderr():
  """Yields a list that receives what was written to fd 2 in the block.

  XLA's C++ logging (the SPMD partitioner's warnings among it) writes to the
  file descriptor, past ``sys.stderr``; the text is echoed afterwards.
  """
  lines = []
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield lines
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode(errors="replace")
      sys.stderr.write(text)
      lines.extend(text.splitlines())


def compile_logged(lowered, compiler_options=None):
  """``(compiled, remat warnings)`` of a `jax.stages.Lowered`."""
  with captured_stderr() as lines:
    compiled = lowered.compile(compiler_options)
  return compiled, [line for line in lines if REMAT in line]


def bytes_per_device(tree) -> int:
  """The most bytes of ``tree``'s arrays that any one device holds."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values())


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


# -----------------------------------------------------------------------------
# Training.


def train(framework: str = "nnx", optimizer: str = "shampoo",
          route: str = "explicit", steps: int = 6, batch_size: int = 32,
          seed: int = 0, compiler_options: dict[str, Any] | None = None
          ) -> dict[str, Any]:
  """Trains under one route; returns what it measured and the final state.

  Args:
    framework: ``"nnx"`` or ``"linen"``.
    optimizer: ``"shampoo"`` or ``"soap"``.
    route: ``"explicit"``, ``"pjit"`` or ``"single"`` (see the module doc).
    steps: train steps, one fresh batch each.
    batch_size: sequences per batch (8 must divide it on a mesh).
    seed: of the initialization and of the data.
    compiler_options: passed to ``Lowered.compile`` (the tests lower
      ``xla_backend_optimization_level`` to compile faster).

  Returns:
    A dict with ``losses`` (one per step), the final ``params`` and
    ``opt_state``, ``tx``, ``mesh`` (``None`` for ``"single"``),
    ``param_specs``, the ``compiled`` train step, its ``collectives``
    (``{op: (count, bytes)}``), the ``remat`` warnings XLA printed while
    compiling it, the optimizer's ``report`` (`shampoo_optax.StateReport`)
    and ``state_per_device``, the state's bytes on the fullest device.
  """
  apply, params = build_model(framework, seed)
  loss = model_loss(apply)
  batches = make_batches(steps, batch_size, seed)
  specs = fsdp_specs(params)
  mesh = None
  if route == "single":
    tx = make_optimizer(optimizer, shard_axes=None)
    opt_state = jax.jit(tx.init)(params)
    step = jax.jit(make_train_step(tx, loss), donate_argnums=(0, 1))
    compiled, remat = compile_logged(
        step.lower(params, opt_state, *batches[0]), compiler_options)
    report = shampoo_optax.state_report(tx, params)
  elif route == "explicit":
    tx = make_optimizer(optimizer)
    mesh = jax.make_mesh((DEVICES,), ("data",),
                         axis_types=(AxisType.Explicit,))

    def fsdp_loss(params, tokens, targets):
      # Gather the weights (FSDP); their gradients come back split. The
      # model runs on Auto axes, where stock layers need no out_sharding.
      params = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
      return jax.sharding.auto_axes(loss, out_sharding=P())(
          params, tokens, targets)

    with jax.set_mesh(mesh):
      params = jax.device_put(
          params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
      opt_state = jax.jit(tx.init)(params)
      types = jax.tree.map(jax.typeof, opt_state)
      batches = jax.device_put(batches, NamedSharding(mesh, P("data")))
      step = jax.jit(make_train_step(tx, fsdp_loss), donate_argnums=(0, 1))
      compiled, remat = compile_logged(
          step.lower(params, opt_state, *batches[0]), compiler_options)
      report = shampoo_optax.state_report(tx, params, mesh)
  elif route == "pjit":
    tx = make_optimizer(optimizer)
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    state_sh = shampoo_optax.state_shardings(tx, params, mesh, param_sh)
    data_sh = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def fsdp_loss(params, tokens, targets):
      # Gather the weights, or the partitioner may move activations instead.
      params = jax.lax.with_sharding_constraint(
          params, jax.tree.map(lambda _: replicated, params))
      return loss(params, tokens, targets)

    params = jax.device_put(params, param_sh)
    batches = jax.device_put(batches, data_sh)
    with jax.set_mesh(mesh):  # Shampoo reads the mesh when tracing.
      opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
      step = jax.jit(
          make_train_step(tx, fsdp_loss),
          in_shardings=(param_sh, state_sh, data_sh, data_sh),
          out_shardings=(param_sh, state_sh, replicated),
          donate_argnums=(0, 1))
      compiled, remat = compile_logged(
          step.lower(params, opt_state, *batches[0]), compiler_options)
    report = shampoo_optax.state_report(tx, params, mesh, param_sh)
  else:
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")

  losses = []
  for tokens, targets in batches:
    params, opt_state, value = compiled(params, opt_state, tokens, targets)
    losses.append(float(value))
  if route == "explicit":  # The update keeps every state leaf's type.
    assert jax.tree.map(jax.typeof, opt_state) == types
  return dict(
      losses=losses, params=params, opt_state=opt_state, tx=tx, mesh=mesh,
      param_specs=specs, compiled=compiled,
      collectives=collective_totals(compiled.as_text()), remat=remat,
      report=report, state_per_device=bytes_per_device(opt_state))


def describe(name: str, result: dict[str, Any]) -> str:
  """Losses, state bytes per device, collectives and remat of one run."""
  kib = lambda b: f"{b / 1024:.1f} KiB"
  report = result["report"]
  moved = ", ".join(f"{op} {kib(size)} ({count})"
                    for op, (count, size) in sorted(
                        result["collectives"].items())) or "none"
  losses = result["losses"]
  return (
      f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}\n"
      f"  parameters {kib(report.param_bytes)}; optimizer state"
      f" {kib(report.total())}, {kib(result['state_per_device'])} on the"
      f" fullest of {report.devices} devices (planned"
      f" {kib(report.per_device())})\n"
      f"  collectives of the compiled step (bytes, count): {moved}\n"
      f"  involuntary full rematerializations: {len(result['remat'])}")


def check(result: dict[str, Any]) -> list[str]:
  """What is wrong with a run: the loss did not fall, the state is not split.
  """
  problems = []
  losses = result["losses"]
  if not losses[-1] < losses[0]:
    problems.append(f"the loss did not decrease: {losses}")
  devices = result["report"].devices
  even = nbytes(result["opt_state"]) / devices
  if result["state_per_device"] > 1.05 * even:
    problems.append(
        f"{result['state_per_device']} bytes of optimizer state on one"
        f" device, more than 1.05 x total / {devices} = {even:.0f}")
  return problems


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, str], Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS,
                      default=FRAMEWORKS)
  parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS,
                      default=OPTIMIZERS)
  parser.add_argument("--route", choices=ROUTES, default="explicit")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.route != "single" and jax.device_count() < DEVICES:
    raise SystemExit(
        "needs 8 devices: run as a script, or set XLA_FLAGS="
        "--xla_force_host_platform_device_count=8 before JAX starts")
  results, problems = {}, []
  for framework in args.frameworks:
    for optimizer in args.optimizers:
      result = train(framework, optimizer, args.route, args.steps,
                     args.batch_size, args.seed)
      name = f"{framework} {optimizer} {args.route}"
      print(describe(name, result), flush=True)
      problems += [f"{name}: {p}" for p in check(result)]
      results[framework, optimizer] = result
  if problems:
    raise SystemExit("\n".join(problems))
  return results


if __name__ == "__main__":
  main()
