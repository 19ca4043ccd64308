# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Shampoo vs AdamW on GPT-like decoders under FSDP, compiled but never run.

    python -m benchmarks.scale_bench [--sizes 125m 350m 1.3b] [--quick]
        [--repeats 3] [--shampoo-options JSON] [--output-dir DIR] [--name NAME]

The picture at scale without the hardware: on 8 simulated CPU devices (the
module sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX
starts, unless the flag is already there) it lowers and compiles, and never
runs, the train step (forward, backward, optimizer update, apply) of a
decoder-only Transformer whose parameters are only abstract
``jax.ShapeDtypeStruct``s, so nothing of the model's size is allocated.

Model: pre-norm decoder (RMSNorm scales, fused QKV, causal softmax attention
with 64-wide heads, GELU MLP of width 4d, learned positions, input embedding
tied to the output), float32, no biases. The ``L`` layers are *scanned*:
every per-layer parameter is stacked with a leading layer axis (``[L, d,
3d]``, ...) and the forward pass is a `jax.lax.scan` over a rematerialised
(`jax.checkpoint`) layer. One sequence of ``seq_len`` tokens per device.

Placement: mesh axis ``"fsdp"`` over the 8 devices with *explicit* axes and
`jax.set_mesh` (the README's FSDP pattern): each parameter is split along
its largest non-layer dimension that 8 divides (the vocabulary for the
embedding); the layer body gathers its weights (`jax.sharding.reshard` to
replicated), the batch is split along the sequences. Shampoo runs with its
defaults (block 128) and ``shard_axes="fsdp"``; ``layer_axes`` (0 for the
stacked layer parameters) is passed when `shampoo_optax.shampoo` accepts it
(``inspect.signature``). Shampoo is measured twice, ``refresh="all"``
(``shampoo``: every root on one step in ``precondition_every``) and
``refresh="staggered"`` (``shampoo_staggered``: a ``1/precondition_every``
share of each device's roots on every step). AdamW is ``optax.adamw`` with
the same learning rate and weight decay. Every step donates the parameters
and the optimizer state.

Per size and optimizer, per device:

* memory: ``compiled.memory_analysis()`` (argument, output, alias and temp
  bytes); peak = argument + output - alias + temp. Also the temp bytes of
  ``jax.jit(tx.update)`` alone (gradients sharded like the parameters,
  state donated): the optimizer's own temporaries;
* optimizer state: exact bytes of this device's shard of every state leaf,
  from `shampoo_optax.state_shardings` (``NamedSharding.shard_shape``), by
  kind from `shampoo_optax.state_report`; for Shampoo also its roots per
  device (the matrices of its factors' shards), the roots one refresh phase
  computes per device, and the state of the same optimizer on one device
  (``shard_axes=None``), the total to divide;
* collectives: bytes per step by kind, read from the compiled HLO
  (``compiled.as_text()``). A collective's bytes are those of its
  per-device result (a gathered array, a reduced array, a received
  buffer), times the trip count of every enclosing ``while`` (the layer
  scan: XLA records ``known_trip_count``). Branches of a ``conditional``
  count once, the largest. The root refresh is a ``while`` over refresh
  phases (`jax.lax.fori_loop` with traced bounds, under `jax.shard_map`):
  the ``while`` without a known trip count whose op name ends in
  ``shard_map/while`` or whose body computes an eigendecomposition
  (LAPACK ``syevd``, the CPU root method). Its body counts once per phase:
  a normal step runs 0 phases with ``refresh="all"`` and 1 with
  ``"staggered"``, a refresh step 1 phase in either mode (the first
  preconditioned step of ``"staggered"``, all phases, is not reported);
  everything outside it, including the placement of the factors at the
  ``shard_map`` boundary and any work XLA hoisted out of the loop, counts
  on every step. ``refresh_loops`` counts the loops found and
  ``eigh_outside_refresh_loop`` the eigh call sites that are not inside one
  (hoisted by XLA's loop-invariant code motion: computed on every step).
  Collective-permutes count their buffer on every device, an upper bound
  when their pairs skip devices.
  XLA's CPU backend emits no reduce-scatter: gradients of FSDP weights come
  back as an all-reduce followed by a slice, for both optimizers alike;
* temporaries: XLA allocates a program's buffers, the refresh loop's
  included, whether or not a step runs the loop, so ``temp`` (and the peak)
  is the same for a normal and a refresh step;
* compile seconds: lower (trace included) and compile, each in a fresh
  `jax.jit`, in the same process, in ``--repeats`` rounds of AdamW then
  each Shampoo; the fastest round of each is reported (the machine is
  shared).

Targets (pass/fail, per size and Shampoo mode):

* state: Shampoo's per-device state <= 1.05 x its single-device total / 8;
* collectives: Shampoo's normal step <= AdamW's + the parameter bytes;
* peak: Shampoo's <= AdamW's + Shampoo's per-device state + one refresh
  share of temporaries: the candidate roots of one refresh phase on this
  device, unpacked float32 ``d x d`` matrices (every root of the device
  with ``"all"``, a ``1/precondition_every`` share with ``"staggered"``);
* compile: Shampoo's lower + compile <= 3 x AdamW's.

A model from the exact blocking plan (`shampoo_optax._blocks.make_plan`, the
same FSDP rule at ``D`` devices and the library's own split rules,
`_sharding.factor_batch_specs` and `_sharding.family_spec`, evaluated on an
abstract ``D``-device mesh) extrapolates the per-device state bytes, roots
per device and roots per refresh phase (``"staggered"``) to 64 and 256
devices, with ``layer_axes`` (every stacked leaf cut into its ``L`` layers)
and without (stacked leaves preconditioned as ``[L, ...]`` tensors). At 8
devices the model of the mode used reproduces the measurement (recorded as
``model_matches_measured``).

``--shampoo-options '{"max_precondition_dim": 8192}'`` changes Shampoo's
options (recorded). Writes ``<output-dir>/<name>.json`` and ``.md``
(``--name``, default ``scale``).
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import collections
import dataclasses
import gc
import inspect
import json
import math
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from benchmarks import run as run_lib
import shampoo_optax
from shampoo_optax import _blocks
from shampoo_optax import _sharding
from shampoo_optax import _symmetric

DEVICES = 8
MODEL_DEVICES = (8, 64, 256)
AXIS = "fsdp"
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4  # optax.adamw's default, given to both.
_DEFAULTS = inspect.signature(shampoo_optax.shampoo).parameters
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
         "collective-permute")
DEFAULT_OUTPUT = pathlib.Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  d_model: int
  layers: int
  vocab: int
  seq_len: int

  @property
  def heads(self) -> int:
    return self.d_model // 64


# GPT-2/GPT-3-like sizes; vocabulary 50304 is GPT-2's padded to 128 | V.
CONFIGS = {
    "tiny": Config("tiny", 128, 2, 1024, 64),  # The unit test's.
    "20m": Config("20m", 512, 4, 16384, 256),  # --quick.
    "125m": Config("125m", 768, 12, 50304, 1024),
    "350m": Config("350m", 1024, 24, 50304, 1024),
    "1.3b": Config("1.3b", 2048, 24, 50304, 1024),
}
FULL_SIZES = ("125m", "350m", "1.3b")


# ---------------------------------------------------------------------------
# Model


def param_shapes(config: Config) -> dict:
  """Shapes of the parameters; ``layers`` leaves lead with the layer axis."""
  d, n = config.d_model, config.layers
  return {
      "embed": (config.vocab, d),
      "pos": (config.seq_len, d),
      "ln_f": (d,),
      "layers": {
          "ln1": (n, d), "qkv": (n, d, 3 * d), "out": (n, d, d),
          "ln2": (n, d), "fc1": (n, d, 4 * d), "fc2": (n, 4 * d, d),
      },
  }


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _is_layered(path) -> bool:
  return getattr(path[0], "key", None) == "layers"


def fsdp_spec(shape, devices: int, layered: bool) -> P:
  """Split along the largest non-layer dim that ``devices`` divides."""
  dims = [i for i in range(int(layered), len(shape))
          if shape[i] % devices == 0]
  if not dims:
    return P()
  axis = max(dims, key=lambda i: shape[i])  # First of equals.
  return P(*(AXIS if i == axis else None for i in range(len(shape))))


def abstract_params(config: Config, mesh) -> dict:
  return jax.tree_util.tree_map_with_path(
      lambda path, shape: jax.ShapeDtypeStruct(
          shape, jnp.float32, sharding=NamedSharding(
              mesh, fsdp_spec(shape, DEVICES, _is_layered(path)))),
      param_shapes(config), is_leaf=_is_shape)


def layer_axes_of(params) -> dict:
  """``layer_axes`` for Shampoo: axis 0 of the stacked layer parameters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 0 if _is_layered(path) else None, params)


def _rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def _gather(tree):
  return jax.tree.map(lambda w: jax.sharding.reshard(w, P()), tree)


def make_loss(config: Config):
  """Next-token cross-entropy of the scanned decoder."""
  d, heads = config.d_model, config.heads

  def layer(x, p):
    p = _gather(p)  # FSDP: this layer's weights, whole, on every device.
    b, t, _ = x.shape
    q, k, v = jnp.split(_rms_norm(x, p["ln1"]) @ p["qkv"], 3, axis=-1)
    q, k, v = (z.reshape(b, t, heads, d // heads) for z in (q, k, v))
    scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    attn = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(scores), v)
    x = x + attn.reshape(b, t, d) @ p["out"]
    return x + jax.nn.gelu(_rms_norm(x, p["ln2"]) @ p["fc1"]) @ p["fc2"], None

  def loss_fn(params, tokens):
    embed = jax.sharding.reshard(params["embed"], P())
    x = embed.at[tokens].get(out_sharding=P(AXIS)) + jax.sharding.reshard(
        params["pos"], P())
    x, _ = jax.lax.scan(jax.checkpoint(layer), x, params["layers"])
    x = _rms_norm(x, jax.sharding.reshard(params["ln_f"], P()))
    logits = jnp.einsum("btd,vd->btv", x[:, :-1], embed)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  return loss_fn


# ---------------------------------------------------------------------------
# Optimizers


def shampoo_options(params, overrides=None,
                    refresh="all") -> tuple[dict, dict]:
  """Shampoo's keyword arguments, and all of its options as recorded.

  ``layer_axes`` and ``refresh`` are passed only when the installed
  `shampoo_optax.shampoo` has them; ``overrides`` replace defaults.
  """
  options = dict(weight_decay=WEIGHT_DECAY, shard_axes=AXIS,
                 **(overrides or {}))
  if "layer_axes" in _DEFAULTS:
    options["layer_axes"] = layer_axes_of(params)
  if "refresh" in _DEFAULTS:
    options["refresh"] = refresh
  recorded = {
      name: p.default for name, p in _DEFAULTS.items()
      if p.default is not inspect.Parameter.empty
  }
  recorded.update(options, learning_rate=LEARNING_RATE)
  if "layer_axes" in options:
    recorded["layer_axes"] = "0 for every leaf under 'layers', None elsewhere"
  return options, {k: _jsonable(v) for k, v in recorded.items()}


def _jsonable(value):
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


# ---------------------------------------------------------------------------
# Compiled HLO: collective bytes per step

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_COLLECTIVE = re.compile(
    r"= (.+?) (" + "|".join(KINDS) + r")(-start)?\(")
_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
    r"=%([\w.\-]+)")
_CALLEE_LIST = re.compile(
    r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_EIGH = re.compile(r'custom_call_target="\w*(?:syevd|heevd|Eigh)\w*"')
_ARRAY = re.compile(r"\b(pred|bf16|[fsuc]\d+)\[([\d,]*)\]")


def _type_bytes(type_text: str) -> int:
  """Bytes of every array in an HLO type (an array or a tuple)."""
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    itemsize = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8
    total += itemsize * math.prod(int(n) for n in dims.split(",") if n)
  return total


_OP_NAME = re.compile(r'op_name="(?:jit\([^)]*\)/)?([^"]*)"')


@dataclasses.dataclass
class _Walk:
  every_step: collections.Counter  # (kind, op_name) -> bytes.
  per_phase: collections.Counter  # In the body of the refresh loop.
  computes_roots: bool  # An eigh anywhere inside.
  eigh_outside_refresh_loop: int
  refresh_loops: int
  unknown_trip_counts: int


def _total(counter) -> int:
  return sum(counter.values())


def _summary(counter, top: int) -> dict:
  kinds = collections.Counter()
  for (kind, _), nbytes in counter.items():
    kinds[kind] += nbytes
  return dict(
      total=_total(counter), by_kind={k: kinds[k] for k in KINDS},
      largest=[dict(kind=k, op_name=op, bytes=n)
               for (k, op), n in counter.most_common(top)])


def collective_bytes(hlo: str, top: int = 8, normal_phases: int = 0) -> dict:
  """Per-device collective bytes of a normal and of a refresh step.

  See the module docstring for the rules (trip counts, conditionals, the
  refresh loop). ``normal_phases`` is the number of refresh phases a normal
  step runs: 0 for ``refresh="all"``, 1 for ``"staggered"``; a refresh
  step runs one. Returns, for each step, the total, the bytes by kind and
  the ``top`` largest contributions by kind and JAX op name (the op that the
  partitioner turned into the collective); the same for one refresh phase;
  the number of refresh loops found, of eigh call sites outside them and of
  other ``while`` loops without a known trip count (counted once).
  """
  computations, entry, current = {}, None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header[1], [])
      if line.startswith("ENTRY"):
        entry = header[1]
    elif current is not None and line.startswith(" "):
      current.append(line)

  memo = {}

  def walk(name) -> _Walk:
    if name in memo:
      return memo[name]
    out = _Walk(collections.Counter(), collections.Counter(), False, 0, 0, 0)
    for line in computations[name]:
      if _EIGH.search(line):
        out.computes_roots = True
        out.eigh_outside_refresh_loop += 1
      collective = _COLLECTIVE.search(line)
      if collective:
        if collective[3]:
          raise ValueError(
              "asynchronous collective in the HLO; its result tuple holds"
              f" its operands too: {line.strip()[:200]}")
        op_name = _OP_NAME.search(line)
        key = (collective[2], op_name[1] if op_name else "")
        out.every_step[key] += _type_bytes(collective[1])
      callees = _CALLEE.findall(line) + [
          c.strip().lstrip("%") for group in _CALLEE_LIST.findall(line)
          for c in group.split(",")]
      if not callees:
        continue
      results = [walk(c) for c in callees]
      out.unknown_trip_counts += sum(r.unknown_trip_counts for r in results)
      out.refresh_loops += sum(r.refresh_loops for r in results)
      out.computes_roots |= any(r.computes_roots for r in results)
      if " conditional(" in line:
        out.every_step += max((r.every_step for r in results), key=_total)
        out.per_phase += max((r.per_phase for r in results), key=_total)
        out.eigh_outside_refresh_loop += sum(
            r.eigh_outside_refresh_loop for r in results)
        continue
      trips = 1
      if " while(" in line:
        count = _TRIP_COUNT.search(line)
        op_name = _OP_NAME.search(line)
        if count:
          trips = int(count[1])
        elif (op_name and op_name[1].endswith("shard_map/while")) or any(
            r.computes_roots for r in results):
          # The refresh loop: its body runs once per phase.
          out.refresh_loops += 1
          for r in results:
            out.per_phase += r.every_step
          continue
        else:
          out.unknown_trip_counts += 1
      for r in results:
        out.eigh_outside_refresh_loop += r.eigh_outside_refresh_loop
        for key, nbytes in r.every_step.items():
          out.every_step[key] += trips * nbytes
        for key, nbytes in r.per_phase.items():
          out.per_phase[key] += trips * nbytes
    memo[name] = out
    return out

  w = walk(entry)
  phases = lambda n: w.every_step + collections.Counter(
      {k: n * v for k, v in w.per_phase.items()})
  return dict(normal_step=_summary(phases(normal_phases), top),
              refresh_step=_summary(phases(1), top),
              refresh_phase=_summary(w.per_phase, top),
              normal_phases=normal_phases,
              refresh_loops=w.refresh_loops,
              eigh_outside_refresh_loop=w.eigh_outside_refresh_loop,
              unknown_trip_counts=w.unknown_trip_counts)


# ---------------------------------------------------------------------------
# Measurement

# Shampoo's variants: name -> refresh mode.
SHAMPOO_VARIANTS = {"shampoo": "all", "shampoo_staggered": "staggered"}


def _shard_bytes(shape, dtype, sharding) -> int:
  return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(
      dtype).itemsize


def _shampoo_states(tree):
  return [x for x in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, shampoo_optax.ShampooState))
          if isinstance(x, shampoo_optax.ShampooState)]


def _packed_side(shape) -> int:
  """``d`` of a packed ``[..., d + 1 - d % 2, ceil(d / 2)]`` factor."""
  rows, cols = shape[-2:]
  return 2 * cols if rows == 2 * cols + 1 else rows


def _memory(compiled) -> dict:
  memory = compiled.memory_analysis()
  memory = {k: int(getattr(memory, f"{k}_size_in_bytes"))
            for k in ("argument", "output", "alias", "temp")}
  memory["peak"] = (memory["argument"] + memory["output"] - memory["alias"]
                    + memory["temp"])
  return memory


def _compile(config: Config, tx, mesh):
  """Abstract inputs, then a fresh jit of the train step, lowered, compiled.

  Returns the compiled step, the abstract state (with its shardings), the
  abstract parameters and the seconds to lower (tracing included) and to
  compile.
  """
  params = abstract_params(config, mesh)
  state = shampoo_optax.abstract_state(tx, params, mesh)
  tokens = jax.ShapeDtypeStruct(
      (DEVICES, config.seq_len), jnp.int32,
      sharding=NamedSharding(mesh, P(AXIS)))
  loss_fn = make_loss(config)

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, tokens)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  return compiled, state, params, dict(lower=t1 - t0, compile=t2 - t1)


def _time_compile(config: Config, tx, mesh) -> dict:
  return _compile(config, tx, mesh)[3]


def update_memory(tx, params, state, mesh) -> dict:
  """Memory of ``jax.jit(tx.update)`` alone (gradients and state donated)."""

  def update(grads, opt_state, params):
    return tx.update(grads, opt_state, params)

  with jax.set_mesh(mesh):
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
        params, state, params).compile()
  return _memory(compiled)


def compile_step(config: Config, tx, mesh, refresh: str | None = None,
                 num_phases: int = 1) -> dict:
  """Compiles one train step (never runs it) and measures it.

  ``refresh``: Shampoo's refresh mode (``None`` for other optimizers);
  ``num_phases``: its number of refresh phases (``precondition_every`` for
  ``"staggered"``, else 1).
  """
  compiled, state, params, seconds = _compile(config, tx, mesh)
  memory = _memory(compiled)
  collectives = collective_bytes(
      compiled.as_text(), normal_phases=int(refresh == "staggered"))
  del compiled
  gc.collect()

  leaves = jax.tree.leaves(state)
  report = shampoo_optax.state_report(tx, params, mesh)
  out = dict(
      compile_rounds=[seconds], memory=memory,
      update_memory=update_memory(tx, params, state, mesh),
      collectives=collectives,
      state_bytes_per_device=sum(_shard_bytes(x.shape, x.dtype, x.sharding)
                                 for x in leaves),
      state_scalar_bytes=sum(_shard_bytes(x.shape, x.dtype, x.sharding)
                             for x in leaves if not x.shape),
      state_bytes_global=sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                             for x in leaves),
      state_report_per_device={k: report.per_device(k)
                               for k in shampoo_optax._report.KINDS},  # pylint: disable=protected-access
  )
  gc.collect()
  states = _shampoo_states(state)
  if states:
    stats = [x for st in states for x in st.stats]
    rows = [math.prod(x.sharding.shard_shape(x.shape)[:-2]) for x in stats]
    share = [-(-n // num_phases) for n in rows]
    out.update(
        refresh=refresh, refresh_phases=num_phases,
        factor_shapes=[list(x.shape) for x in stats],
        roots_per_device=sum(rows),
        roots_per_phase=sum(share),
        refresh_share_bytes=sum(
            n * 4 * _packed_side(x.shape)**2 for n, x in zip(share, stats)),
        statistics_bytes_per_device=sum(
            _shard_bytes(x.shape, x.dtype, x.sharding) for x in stats),
        roots_bytes_per_device=sum(
            _shard_bytes(x.shape, x.dtype, x.sharding)
            for st in states for x in st.preconditioners),
    )
  return out


def single_device_state_bytes(tx, params) -> int:
  """Bytes of ``tx.init(params)`` traced without a mesh."""
  plain = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                       params)
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(jax.eval_shape(tx.init, plain)))


def state_model(config: Config, devices: int, per_layer: bool,
                scalar_bytes: int, options: dict) -> dict:
  """Shampoo's per-device state and roots at ``devices``, from the plan.

  The parameters are split by the FSDP rule at ``devices``; the factors'
  batch axes and the per-family arrays (grafting accumulator, momentum) are
  split by the library's own rules (`_sharding.factor_batch_specs`,
  `_sharding.family_spec`) on an abstract ``devices``-device mesh, padded
  rows included (`_sharding.layout_batch_shape`); scalars are replicated.
  ``per_layer`` passes ``layer_axes`` (axis 0 of the stacked layer leaves),
  else they are ``[L, ...]`` tensors.
  ``options``: Shampoo's recorded options.
  """
  leaves = jax.tree_util.tree_leaves_with_path(
      param_shapes(config), is_leaf=_is_shape)
  shapes, layer_axes, specs = [], [], []
  for path, shape in leaves:
    layered = _is_layered(path)
    spec = tuple(fsdp_spec(shape, devices, layered))
    shapes.append(shape)
    layer_axes.append((0,) if per_layer and layered else ())
    specs.append(spec + (None,) * (len(shape) - len(spec)))
  shards = tuple(tuple(devices if e else 1 for e in spec) for spec in specs)
  plan = _blocks.make_plan(tuple(shapes), tuple(layer_axes),
                           options["block_size"],
                           options["max_precondition_dim"],
                           options["exponent_override"],
                           shards if options.get("cut_at_shards") else None)
  mesh = jax.sharding.AbstractMesh((devices,), (AXIS,),
                                   axis_types=(AxisType.Explicit,))
  with jax.sharding.use_abstract_mesh(mesh):
    batch_specs = _sharding.factor_batch_specs(plan, specs, AXIS)
    layouts = [_sharding.layout_batch_shape(f, s)
               for f, s in zip(plan.factors, batch_specs)]
    family_specs = [_sharding.family_spec(plan, f, specs)
                    for f in range(len(plan.families))]
  local = lambda shape, spec: math.prod(
      -(-n // (devices if e else 1))
      for n, e in zip(shape, tuple(spec) + (None,) * len(shape)))
  root_bytes = np.dtype(options["preconditioner_dtype"]).itemsize
  per_family = 4 * (options["graft"] not in ("sgd", "none")) + 4 * (
      float(options["b1"]) != 0)
  num_phases = options["precondition_every"]
  rows = [local(b, s) for b, s in zip(layouts, batch_specs)]
  packed = [math.prod(_symmetric.packed_shape(f.dim)) for f in plan.factors]
  factor_bytes = lambda counts: sum(
      n * (p * (4 + root_bytes) + 4) for n, p in zip(counts, packed))
  family_shapes = [(fam.units,) + fam.shape for fam in plan.families]
  per_device = (
      factor_bytes(rows) + scalar_bytes + per_family * sum(
          local(s, spec) for s, spec in zip(family_shapes, family_specs)))
  total = (factor_bytes([f.count for f in plan.factors]) + scalar_bytes
           + per_family * sum(math.prod(s) for s in family_shapes))
  return dict(
      devices=devices, per_layer=per_layer,
      roots_per_device=sum(rows),
      roots_per_phase_staggered=sum(-(-n // num_phases) for n in rows),
      replicated_factors=sum(not any(s) for s in batch_specs),
      factors=len(plan.factors),
      state_bytes_per_device=per_device,
      single_device_state_bytes=total,
      ratio_to_even_share=per_device / (total / devices),
      state_target_met=per_device <= 1.05 * total / devices,
  )


def measure(config: Config, repeats: int = 1, overrides=None,
            log=print, variants=None) -> dict:
  """AdamW and Shampoo on one model size: measurements, targets, model.

  The compile seconds are the fastest of ``repeats`` rounds (the machine is
  shared), each round AdamW then each Shampoo variant, each a fresh jit.
  ``overrides``: Shampoo options other than its defaults; ``variants``: the
  names of `SHAMPOO_VARIANTS` to measure (default all).
  """
  mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(AxisType.Explicit,))
  params = abstract_params(config, mesh)
  variants = ({n: SHAMPOO_VARIANTS[n] for n in variants or SHAMPOO_VARIANTS}
              if "refresh" in _DEFAULTS else {"shampoo": None})
  options, recorded = {}, {}
  for name, refresh in variants.items():
    options[name], recorded[name] = shampoo_options(params, overrides,
                                                    refresh)
  first = next(iter(variants))
  effective = {name: p.default for name, p in _DEFAULTS.items()
               if p.default is not inspect.Parameter.empty}
  effective.update(options[first])
  param_count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  param_bytes = 4 * param_count
  per_layer_mode = "layer_axes" in options[first]
  leaves = jax.tree.leaves(params)
  plan = _blocks.make_plan(
      tuple(p.shape for p in leaves),
      tuple(((0,) if per_layer_mode and a == 0 else ())
            for a in jax.tree.leaves(layer_axes_of(params),
                                     is_leaf=lambda x: x is None)),
      effective["block_size"], effective["max_precondition_dim"],
      effective["exponent_override"])
  preconditioned = sum(
      math.prod(plan.shapes[m.leaf]) for fam in plan.families
      if fam.preconditioned for m in fam.members)
  txs = dict(adamw=optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))
  for name in variants:
    txs[name] = shampoo_optax.shampoo(LEARNING_RATE, **options[name])
  phases = {name: (recorded[name]["precondition_every"]
                   if refresh == "staggered" else 1)
            for name, refresh in variants.items()}

  results = {}
  for round_ in range(repeats):
    for name, tx in txs.items():
      if round_:
        results[name]["compile_rounds"].append(
            _time_compile(config, tx, mesh))
      else:
        results[name] = compile_step(config, tx, mesh, variants.get(name),
                                     phases.get(name, 1))
      gc.collect()
      r = results[name]
      seconds = r["compile_rounds"][-1]
      log(f"{config.name} {name}: lower {seconds['lower']:.1f}s + compile "
          f"{seconds['compile']:.1f}s, peak "
          f"{r['memory']['peak'] / 2**20:.0f} MiB, temp "
          f"{r['memory']['temp'] / 2**20:.0f} MiB, state "
          f"{r['state_bytes_per_device'] / 2**20:.0f} MiB per device")
  for r in results.values():
    best = min(r["compile_rounds"], key=lambda t: t["lower"] + t["compile"])
    r.update(lower_seconds=best["lower"], compile_seconds=best["compile"],
             total_seconds=best["lower"] + best["compile"])
  adamw = results["adamw"]
  single = single_device_state_bytes(
      shampoo_optax.shampoo(LEARNING_RATE,
                            **{**options[first], "shard_axes": None}),
      params)

  targets = {}
  for name in variants:
    shampoo = results[name]
    shampoo["single_device_state_bytes"] = single
    peak_allowance = (adamw["memory"]["peak"]
                      + shampoo["state_bytes_per_device"]
                      + shampoo["refresh_share_bytes"])
    targets[name] = dict(
        state=dict(value=shampoo["state_bytes_per_device"],
                   limit=1.05 * single / DEVICES),
        collectives=dict(
            value=shampoo["collectives"]["normal_step"]["total"],
            limit=adamw["collectives"]["normal_step"]["total"]
            + param_bytes),
        peak_memory=dict(value=shampoo["memory"]["peak"],
                         limit=peak_allowance),
        compile=dict(value=shampoo["total_seconds"],
                     limit=3 * adamw["total_seconds"]),
    )
    for t in targets[name].values():
      t["passed"] = bool(t["value"] <= t["limit"])

  model = [state_model(config, d, per_layer,
                       results[first]["state_scalar_bytes"], effective)
           for per_layer in (False, True) for d in MODEL_DEVICES]
  at_8 = next(m for m in model
              if m["devices"] == DEVICES and m["per_layer"] == per_layer_mode)
  staggered = results.get("shampoo_staggered", results[first])
  return dict(
      config=dataclasses.asdict(config),
      param_count=param_count, param_bytes=param_bytes,
      preconditioned_param_fraction=preconditioned / param_count,
      mode=dict(sharding="explicit axes, jax.set_mesh",
                layer_axes=per_layer_mode,
                refresh={n: v or "not supported"
                         for n, v in variants.items()},
                overrides=overrides or {}),
      variants=list(variants),
      shampoo_options=recorded[first],
      adamw_options=dict(learning_rate=LEARNING_RATE,
                         weight_decay=WEIGHT_DECAY),
      **results, targets=targets, model=model,
      model_matches_measured=bool(
          at_8["state_bytes_per_device"]
          == results[first]["state_bytes_per_device"]
          and at_8["roots_per_device"] == results[first]["roots_per_device"]
          and at_8["roots_per_phase_staggered"]
          == staggered["roots_per_phase"]),
  )


# ---------------------------------------------------------------------------
# Report


def _mib(nbytes) -> str:
  return f"{nbytes / 2**20:,.0f}"


def _gib(nbytes) -> str:
  return f"{nbytes / 2**30:.2f}"


_SHORT = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS",
          "all-to-all": "A2A", "collective-permute": "CP"}


def _by_kind(counts: dict) -> str:
  return ", ".join(f"{_SHORT[k]} {_gib(v)}" for k, v in counts.items() if v)


def _names(row) -> list[str]:
  return ["adamw"] + row.get("variants", ["shampoo"])


def _label(name: str) -> str:
  return {"shampoo": "shampoo (refresh all)",
          "shampoo_staggered": "shampoo (staggered)"}.get(name, name)


def markdown(rows: list[dict], meta: dict) -> str:
  first = rows[0]
  overrides = first["mode"]["overrides"]
  options = first["shampoo_options"]
  lines = [
      f"commit {meta['git']['commit']}; jax {meta['machine']['jax_version']};"
      f" {DEVICES} simulated CPU devices, mesh axis `{AXIS}` (explicit axes);"
      " compiled, never run. Shampoo: defaults"
      + (f" except `{json.dumps(overrides)}`" if overrides else "")
      + f" (block {options['block_size']}, precondition_every "
      f"{options['precondition_every']}), `shard_axes=\"{AXIS}\"`, "
      f"layer_axes {'0 for the stacked layers' if first['mode']['layer_axes'] else 'not supported'}"
      "; refresh `all` and `staggered`. Per device; MiB unless noted.",
      "",
      "| size | optimizer | peak | temp | update temp | args | state | "
      "roots (per phase) | collectives normal step, GiB | refresh step, GiB"
      " | lower + compile s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    c = r["config"]
    label = (f"{c['name']} ({r['param_count'] / 1e6:,.0f}M, d {c['d_model']}"
             f", L {c['layers']})")
    for name in _names(r):
      m = r[name]
      col = m["collectives"]
      roots = (f"{m['roots_per_device']} ({m['roots_per_phase']})"
               if "roots_per_device" in m else "-")
      lines.append(
          f"| {label if name == 'adamw' else ''} | {_label(name)} | "
          f"{_mib(m['memory']['peak'])} | {_mib(m['memory']['temp'])} | "
          f"{_mib(m['update_memory']['temp'])} | "
          f"{_mib(m['memory']['argument'])} | "
          f"{_mib(m['state_bytes_per_device'])} | {roots} | "
          f"{_gib(col['normal_step']['total'])} "
          f"({_by_kind(col['normal_step']['by_kind'])}) | "
          f"{_gib(col['refresh_step']['total'])} | "
          f"{m['total_seconds']:.1f} ({m['lower_seconds']:.1f} + "
          f"{m['compile_seconds']:.1f}) |")
  lines += [
      "", "Shampoo state per device by kind (`state_report`), MiB; "
      "refresh-phase share (candidate roots of one phase, unpacked float32)"
      "; refresh loops found in the HLO / eigh call sites outside them:", "",
      "| size | statistics | roots | grafting | momentum | other | "
      "share `all` | share `staggered` | loops / eigh outside |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    m = r[_names(r)[1]]
    k = m["state_report_per_device"]
    shares = [r[n]["refresh_share_bytes"] for n in _names(r)[1:]]
    checks = ", ".join(
        f"{r[n]['collectives']['refresh_loops']} / "
        f"{r[n]['collectives']['eigh_outside_refresh_loop']}"
        for n in _names(r)[1:])
    lines.append(
        f"| {r['config']['name']} | " + " | ".join(
            _mib(k[kind]) for kind in ("statistics", "roots", "grafting",
                                       "momentum", "other"))
        + " | " + " | ".join(_mib(s) for s in shares)
        + " |" * (3 - len(shares)) + f" {checks} |")
  lines += [
      "", "Targets (Shampoo value / limit):", "",
      "| size | refresh | state <= 1.05 x total/8 (MiB) | normal-step "
      "collectives <= AdamW + params (GiB) | peak <= AdamW + state + "
      "refresh share (MiB) | compile <= 3 x AdamW (s) |",
      "|---|---|---|---|---|---|",
  ]
  for r in rows:
    for name in _names(r)[1:]:
      t = r["targets"][name]
      cell = lambda k, f, t=t: (f"{'PASS' if t[k]['passed'] else 'FAIL'} "
                                f"{f(t[k]['value'])} / {f(t[k]['limit'])}")
      lines.append(
          f"| {r['config']['name']} | {r[name].get('refresh') or '-'} | "
          f"{cell('state', _mib)} | "
          f"{cell('collectives', _gib)} | {cell('peak_memory', _mib)} | "
          f"{cell('compile', lambda s: f'{s:.1f}')} |")
  lines += [
      "", "Model from the blocking plan and the library's split rules: "
      "Shampoo state per device, MiB (ratio to single-device total / D); "
      "roots per device (per staggered phase); factors whole on every "
      "device / all factors. *Stacked*: `[L, ...]` leaves as tensors "
      "(no `layer_axes`); *per layer*: `layer_axes` 0.", "",
      "| size | leaves | " + " | ".join(f"D={d}" for d in MODEL_DEVICES)
      + " |", "|---|---|" + "---|" * len(MODEL_DEVICES),
  ]
  for r in rows:
    for per_layer in (False, True):
      cells = [m for m in r["model"] if m["per_layer"] == per_layer]
      leaves = "per layer" if per_layer else "stacked"
      lines.append(
          f"| {r['config']['name']} | {leaves} | " + " | ".join(
              f"{_mib(m['state_bytes_per_device'])} "
              f"({m['ratio_to_even_share']:.3f}); {m['roots_per_device']} "
              f"({m['roots_per_phase_staggered']}); "
              f"{m['replicated_factors']}/{m['factors']}"
              for m in cells) + " |")
  lines += ["", "Largest collectives of a normal step, GiB per device (kind, "
            "JAX op that the partitioner turned into it; trip counts "
            "included), and of one refresh phase:", ""]
  for r in rows:
    for name in _names(r):
      col = r[name]["collectives"]
      lines.append(f"- {r['config']['name']} {_label(name)}: " + "; ".join(
          f"{_SHORT[c['kind']]} {_gib(c['bytes'])} `{c['op_name'][:60]}`"
          for c in col["normal_step"]["largest"][:5]))
      if "refresh_phase" in col and name != "adamw":
        phase = col["refresh_phase"]
        lines.append(
            f"  - one refresh phase: {_gib(phase['total'])} GiB"
            + "".join(f"; {_SHORT[c['kind']]} {_gib(c['bytes'])} "
                      f"`{c['op_name'][:60]}`" for c in phase["largest"][:3]))
  lines += ["", "Preconditioned fraction of the parameters (rest: grafted "
            "Adam only, e.g. dims above `max_precondition_dim`): " + ", ".join(
                f"{r['config']['name']} "
                f"{r['preconditioned_param_fraction']:.2f}" for r in rows)
            + "."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=list(FULL_SIZES),
                      choices=list(CONFIGS))
  parser.add_argument("--quick", action="store_true",
                      help="only the ~20M toy config (a smoke test)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="compile rounds; the fastest is reported")
  parser.add_argument("--shampoo-options", default="{}",
                      help="JSON of Shampoo options other than its defaults")
  parser.add_argument("--output-dir", type=pathlib.Path,
                      default=DEFAULT_OUTPUT)
  parser.add_argument("--name", default="scale",
                      help="results go to <output-dir>/<name>.{json,md}")
  args = parser.parse_args(argv)
  if jax.device_count() < DEVICES:
    raise SystemExit(f"needs {DEVICES} devices, found {jax.device_count()}"
                     " (XLA_FLAGS was set before this module was imported)")
  sizes = ["20m"] if args.quick else args.sizes
  rows = []
  for size in sizes:
    rows.append(measure(CONFIGS[size], args.repeats,
                        json.loads(args.shampoo_options),
                        log=lambda s: print(s, flush=True)))
  meta = dict(git=run_lib.git_info(), machine=run_lib.machine_info())
  args.output_dir.mkdir(parents=True, exist_ok=True)
  (args.output_dir / f"{args.name}.json").write_text(
      json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
  text = markdown(rows, meta)
  (args.output_dir / f"{args.name}.md").write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
