# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Stacked (scanned) layers: each slice is preconditioned as its own leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numerics import assert_close
import shampoo_optax

L, D, BATCH, STEPS = 4, 16, 64, 20
# Refreshes at steps 1, 4, 7, ...: the 20 steps include six.
OPTIONS = dict(block_size=8, precondition_every=3)


def run(tx, grads_per_step, params):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    out.append(updates)
  return out


def random_steps(shape, seed=0, steps=8):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), jnp.float32)
          for _ in range(steps)]


@pytest.mark.parametrize("axes,stacked_shape,unit_axes", [
    (0, (L, 12, 10), (1, 2)),
    (1, (12, L, 10), (0, 2)),
    (2, (12, 10, L), (0, 1)),
    ((0, 2), (2, 12, 3, 10), (1, 3)),
])
def test_stacked_leaf_equals_its_slices(axes, stacked_shape, unit_axes):
  grads = random_steps(stacked_shape)
  axes_tuple = (axes,) if isinstance(axes, int) else axes
  tx = shampoo_optax.scale_by_shampoo(
      **OPTIONS, layer_axes={"w": axes, "b": None})
  bias = jnp.zeros(10)
  stacked = run(tx, [{"w": g, "b": g.sum(axes_tuple).sum(0)} for g in grads],
                {"w": grads[0], "b": bias})

  def slices(x):
    moved = jnp.moveaxis(x, axes_tuple, range(len(axes_tuple)))
    return list(moved.reshape((-1,) + moved.shape[len(axes_tuple):]))

  unrolled = run(shampoo_optax.scale_by_shampoo(**OPTIONS),
                 [{"w": slices(g), "b": g.sum(axes_tuple).sum(0)}
                  for g in grads],
                 {"w": slices(grads[0]), "b": bias})
  for s, u in zip(stacked, unrolled):
    assert_close(slices(s["w"]), u["w"], rtol=1e-6)
    assert_close(s["b"], u["b"], rtol=1e-6)
  del unit_axes


def test_a_rank_three_stack_is_not_a_rank_three_tensor():
  # Without layer_axes the [L, a, b] kernel is one tensor (p = 6, an L x L
  # factor mixing the layers); with them, L matrices (p = 4).
  grads = random_steps((L, 12, 10))
  params = {"w": grads[0]}
  with_axes = run(shampoo_optax.scale_by_shampoo(**OPTIONS, layer_axes={"w": 0}),
                  [{"w": g} for g in grads], params)
  without = run(shampoo_optax.scale_by_shampoo(**OPTIONS),
                [{"w": g} for g in grads], params)
  diff = np.abs(np.asarray(with_axes[-1]["w"] - without[-1]["w"])).max()
  assert diff > 1e-2 * np.abs(np.asarray(without[-1]["w"])).max()
  state = shampoo_optax.scale_by_shampoo(**OPTIONS, layer_axes={"w": 0}).init(params)
  assert all(s.shape[0] == L and s.ndim == 5 for s in state.stats)


def test_callable_layer_axes_and_bad_values():
  params = {"layers": {"w": jnp.zeros((L, 8, 8))}, "head": jnp.zeros((8, 3))}
  tx = shampoo_optax.scale_by_shampoo(
      layer_axes=lambda p: jax.tree_util.tree_map_with_path(
          lambda path, _: 0 if "layers" in jax.tree_util.keystr(path) else None,
          p))
  state = tx.init(params)
  assert sorted(s.shape[0] for s in state.stats) == [1, 1, L, L]
  # A spec with no stacked leaf at all is the default.
  no_layers = shampoo_optax.scale_by_shampoo(
      layer_axes={"layers": {"w": None}, "head": None}).init(params)
  assert [s.shape for s in no_layers.stats] == [
      s.shape for s in shampoo_optax.scale_by_shampoo().init(params).stats]
  for bad in ({"layers": {"w": 3}, "head": None},
              {"layers": {"w": "0"}, "head": None},
              {"layers": {"w": (0, 0)}, "head": None},
              {"layers": None}):
    with pytest.raises(ValueError, match="layer_axes"):
      shampoo_optax.scale_by_shampoo(layer_axes=bad).init(params)


# ---------------------------------------------------------------------------
# Flax models: scanned and unrolled twins with the same weights and batches.


def batches(seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(STEPS):
    x = rng.standard_normal((BATCH, D)).astype(np.float32)
    yield x, (x[:, :3] > 0).astype(np.int32).sum(-1)


def loss_of(apply):
  def loss(params, x, y):
    logits = apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def train(loss, params, layer_axes):
  tx = shampoo_optax.shampoo(3e-2, **OPTIONS, layer_axes=layer_axes)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for x, y in batches():
    params, state = step(params, state, x, y)
  return params


def test_linen_scan_equals_unrolled():
  nn = pytest.importorskip("flax.linen")

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return jnp.tanh(nn.Dense(D)(x)), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, _ = nn.scan(Layer, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=L)(name="layers")(
                         x, None)
      return nn.Dense(3)(x)

  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(L):
        x, _ = Layer(name=f"layer{i}")(x, None)
      return nn.Dense(3)(x)

  scanned = Scanned().init(jax.random.key(0), jnp.zeros((1, D)))["params"]
  unrolled = {f"layer{i}": jax.tree.map(lambda x, i=i: x[i],
                                        scanned["layers"])
              for i in range(L)} | {"Dense_0": scanned["Dense_0"]}
  layer_axes = {"layers": jax.tree.map(lambda _: 0, scanned["layers"]),
                "Dense_0": jax.tree.map(lambda _: None, scanned["Dense_0"])}
  apply = lambda module: lambda p, x: module.apply({"params": p}, x)
  got = train(loss_of(apply(Scanned())), scanned, layer_axes)
  want = train(loss_of(apply(Unrolled())), unrolled, None)
  for i in range(L):
    assert_close(jax.tree.map(lambda x, i=i: x[i], got["layers"]),
                 want[f"layer{i}"], rtol=1e-4)
  assert_close(got["Dense_0"], want["Dense_0"], rtol=1e-4)


def test_nnx_scan_equals_unrolled():
  nnx = pytest.importorskip("flax.nnx")

  class Layer(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.dense(x))

  class Scanned(nnx.Module):

    def __init__(self, rngs):
      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Layer(rngs)

      self.layers = make(rngs)
      self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, layer):
        return layer(x)

      return self.head(body(x, self.layers))

  class Unrolled(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.List([Layer(rngs) for _ in range(L)])
      self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x):
      for layer in self.layers:
        x = layer(x)
      return self.head(x)

  scanned_graph, scanned = nnx.split(Scanned(nnx.Rngs(0)), nnx.Param)
  unrolled_graph, unrolled = nnx.split(Unrolled(nnx.Rngs(1)), nnx.Param)
  weights = nnx.to_pure_dict(unrolled)
  weights["head"] = nnx.to_pure_dict(scanned)["head"]
  for i in range(L):
    weights["layers"][i] = jax.tree.map(
        lambda x, i=i: x[i], nnx.to_pure_dict(scanned)["layers"])
  nnx.replace_by_pure_dict(unrolled, weights)
  apply = lambda graph: lambda params, x: nnx.merge(graph, params)(x)
  layer_axes = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: 0 if "layers" in jax.tree_util.keystr(path) else None,
      params)
  got = nnx.to_pure_dict(
      train(loss_of(apply(scanned_graph)), scanned, layer_axes))
  want = nnx.to_pure_dict(
      train(loss_of(apply(unrolled_graph)), unrolled, None))
  for i in range(L):
    assert_close(jax.tree.map(lambda x, i=i: x[i], got["layers"]),
                 want["layers"][i], rtol=1e-4)
  assert_close(got["head"], want["head"], rtol=1e-4)
