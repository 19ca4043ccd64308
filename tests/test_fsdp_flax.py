# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""FSDP training of stock Flax models with Shampoo and SOAP (8 devices).

Through ``examples/fsdp_flax.py``: a stock NNX Transformer (``nnx.Embed``,
``nnx.MultiHeadAttention``, ``nnx.LayerNorm``, blocks stacked by
``nnx.vmap``/``nnx.scan``) with Shampoo on an explicit mesh, and the linen
one with SOAP on an ``Auto`` mesh (``jax.jit`` with in/out shardings). The
README's older FSDP route ran the whole model on explicit axes, where
``nnx.Embed``'s gather raised a ``ShardingTypeError`` asking for
``out_sharding``.
"""

from flax import nnx
import jax
import numpy as np
import pytest

from examples import fsdp_flax

pytestmark = pytest.mark.multidevice

# The partitioner (whose warnings are checked) runs before the backend; a
# lower backend level only makes the compile faster.
FAST = {"xla_backend_optimization_level": 0}


def _split(x) -> bool:
  return x.addressable_shards[0].data.shape != x.shape


def test_nnx_model_is_stock():
  model = nnx.eval_shape(lambda: fsdp_flax.NnxLM(nnx.Rngs(0)))
  types = {type(node) for _, node in nnx.iter_graph(model)}
  assert {nnx.Embed, nnx.MultiHeadAttention, nnx.LayerNorm,
          nnx.Linear} <= types


@pytest.mark.parametrize("framework, optimizer, route", [
    ("nnx", "shampoo", "explicit"),
    ("linen", "soap", "pjit"),
])
def test_fsdp_trains_stock_flax(framework, optimizer, route):
  result = fsdp_flax.train(framework, optimizer, route, steps=3,
                           compiler_options=FAST)
  assert fsdp_flax.check(result) == []  # The loss fell; state ~ total / 8.
  assert result["remat"] == []

  # Every parameter has a dim that 8 divides: each is split as planned.
  params, specs = result["params"], result["param_specs"]
  for param, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs)):
    assert param.sharding.spec == spec and _split(param), (param.shape, spec)

  # So is every state array of more than one element: factors, roots,
  # momentum, the grafting or Adam moments.
  whole = [(jax.tree_util.keystr(path), leaf.shape) for path, leaf in
           jax.tree_util.tree_leaves_with_path(result["opt_state"])
           if leaf.size > 1 and not _split(leaf)]
  assert not whole

  # A split kernel's per-parameter state keeps its sharding.
  kernel = ("layers", "up", "kernel") if framework == "nnx" else (
      "layers", "Dense_0", "kernel")
  spec = specs
  for key in kernel:
    spec = spec[key]
  mirrored = [leaf for path, leaf in
              jax.tree_util.tree_leaves_with_path(result["opt_state"])
              if all(f"'{key}'" in jax.tree_util.keystr(path)
                     for key in kernel)]
  assert mirrored, "no per-parameter state found for the kernel"
  for leaf in mirrored:
    assert leaf.sharding.spec == spec

  measured = result["state_per_device"]
  total = fsdp_flax.nbytes(result["opt_state"])
  assert measured == pytest.approx(total / 8, rel=0.05)
  assert np.isfinite(result["losses"]).all()
