# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""optax's common optimizer patterns, for `shampoo`, `soap` and their
`scale_by_` forms: what optax's own alias and contrib tests ask of every
optimizer (convergence on small problems, dtypes, wrappers, donation,
``tree_map_params``, ``tree_get``/``tree_set``, sharded state types).
"""

import functools
import inspect

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numerics import assert_close
import shampoo_optax


def _scaled(scale_by, learning_rate):
  return optax.chain(scale_by(), optax.scale_by_learning_rate(learning_rate))


# The options that change the plan or the math (matrices for hidden
# weights only, one-sided factors above 6, pseudo-inverse roots, -1/2 per
# side of matrices, width-aware scaling; SOAP's bases refreshed by drift),
# all at once.
INGREDIENTS = dict(precondition=shampoo_optax.hidden_matrices(),
                   max_precondition_dim=6, base_width=4)

OPTIMIZERS = {
    "shampoo": shampoo_optax.shampoo,
    "soap": shampoo_optax.soap,
    "scale_by_shampoo": functools.partial(_scaled,
                                          shampoo_optax.scale_by_shampoo),
    "scale_by_soap": functools.partial(_scaled, shampoo_optax.scale_by_soap),
    "shampoo_ingredients": functools.partial(
        shampoo_optax.shampoo, matrix_eps_mode="pseudo_inverse",
        exponent_override={2: 2}, **INGREDIENTS),
    "soap_ingredients": functools.partial(shampoo_optax.soap, refresh="drift",
                                          **INGREDIENTS),
}


def _parabola():
  target = jnp.array([1.0, -1.0, 1.0])
  return jnp.array([-1.0, 10.0, 1.0]), lambda p: jnp.sum((p - target)**2), (
      target)


def _rosenbrock():
  a, b = 1.0, 100.0
  return jnp.zeros(2), lambda p: (a - p[0])**2 + b * (p[1] - p[0]**2)**2, (
      jnp.array([a, a * a]))


def _matrix_parabola():
  """``||A (W - T)||^2`` with an ill-conditioned ``A``: the left factor
  matters."""
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
  a = jnp.asarray(rng.standard_normal((8, 8)) + 3 * np.eye(8), jnp.float32)
  return jnp.zeros((8, 6)), lambda w: jnp.sum((a @ (w - target))**2), target


def _mixed():
  rng = np.random.default_rng(1)
  target = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}
  loss = lambda p: sum(jnp.sum((p[k] - target[k])**2) for k in target)
  return {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}, loss, target


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("problem,learning_rate,steps,tolerance", [
    (_parabola, 1e-1, 1000, 1e-3),
    (_rosenbrock, 1e-2, 5000, 1e-3),
    (_matrix_parabola, 1e-1, 1000, 5e-2),  # Adam: 0.7 in as many steps
    (_mixed, 3e-2, 1000, 1e-3),
])
def test_converges(name, problem, learning_rate, steps, tolerance):
  params, loss, target = problem()
  tx = OPTIMIZERS[name](optax.cosine_decay_schedule(learning_rate, steps,
                                                    0.01))

  def step(_, carry):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, _ = jax.jit(lambda p, s: jax.lax.fori_loop(0, steps, step, (p, s)))(
      params, tx.init(params))
  assert_close(params, target, rtol=tolerance)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_preserves_dtypes(name, dtype):
  params = {"w": jnp.ones((6, 4), dtype), "b": jnp.ones(4, dtype)}
  tx = OPTIMIZERS[name](1e-3)
  state = tx.init(params)
  types = jax.tree.map(jax.typeof, state)
  updates, state = jax.jit(tx.update)(params, state, params)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(
      lambda p: p.dtype, params)
  assert jax.tree.map(jax.typeof, state) == types


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_multi_steps_and_inject_hyperparams(name):
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones(4)}
  grads = jax.tree.map(lambda p: 0.1 * jnp.arange(p.size, dtype=p.dtype)
                       .reshape(p.shape), params)
  multi = optax.MultiSteps(OPTIMIZERS[name](1e-3), every_k_schedule=2)
  state = multi.init(params)
  for _ in range(4):
    updates, state = jax.jit(multi.update)(grads, state, params)
  assert int(state.gradient_step) == 2
  make = OPTIMIZERS[name]
  static = (shampoo_optax.STATIC_OPTIONS if "shampoo" in name
            else shampoo_optax.SOAP_STATIC_OPTIONS)
  injected = optax.inject_hyperparams(
      make, static_args=() if name.startswith("scale_by") else static)(
          learning_rate=1e-3)
  state = injected.init(params)
  updates, _ = jax.jit(injected.update)(grads, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(2e-3)
  doubled, _ = jax.jit(injected.update)(grads, state, params)
  assert_close(doubled, jax.tree.map(lambda u: 2 * u, updates), rtol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_donating_an_eagerly_made_state(name):
  """No two state leaves share a buffer (SOAP's first and second moments of
  vectors once did)."""
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones(4), "c": jnp.ones(())}
  tx = OPTIMIZERS[name](1e-3)
  state = tx.init(params)
  leaves = jax.tree.leaves(state)
  assert len({id(x) for x in leaves}) == len(leaves)
  update = jax.jit(tx.update, donate_argnums=(1,))
  for _ in range(2):
    _, state = update(params, state, params)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tree_map_params(name):
  """``optax.tree.map_params`` (its init sees an empty placeholder): a no-op
  map, and a map of the parameters' specs onto the per-leaf state."""
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones(4)}
  specs = {"w": P("x"), "b": P()}
  for tx in (OPTIMIZERS[name](1e-3),
             optax.masked(OPTIMIZERS[name](1e-3), {"w": True, "b": False})):
    state = tx.init(params)
    same = optax.tree.map_params(tx, lambda x: x, state)
    assert jax.tree.structure(same) == jax.tree.structure(state)
    mapped = optax.tree.map_params(
        tx, lambda _, spec: spec, state, specs,
        transform_non_params=lambda _: None, is_leaf=lambda x: isinstance(
            x, optax.MaskedNode))
    found = [x for x in jax.tree.leaves(
        mapped, is_leaf=lambda x: isinstance(x, P)) if isinstance(x, P)]
    assert P("x") in found  # The momentum follows its parameter's spec.


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_tree_get_and_tree_set(name):
  params = {"w": jnp.ones((6, 4))}
  tx = OPTIMIZERS[name](1e-3)
  state = tx.init(params)
  assert int(optax.tree.get(state, "count")) == 0
  assert int(optax.tree.get(state, "nonfinite_steps")) == 0
  state = optax.tree.set(state, count=jnp.asarray(7, jnp.int32))
  assert int(optax.tree.get(state, "count")) == 7
  _, state = tx.update(params, state, params)
  assert int(optax.tree.get(state, "count")) == 8


@pytest.mark.multidevice
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_state_types_are_stable(name):
  """On 8 devices, FSDP: every state leaf keeps its type (sharding
  included) through the update, and the updates their parameters'."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  options = dict(block_size=8, shard_axes="data")
  if name.startswith("scale_by"):
    tx = optax.chain(getattr(shampoo_optax, name)(**options),
                     optax.scale_by_learning_rate(1e-3))
  else:
    tx = OPTIMIZERS[name](1e-3, **options)
  with jax.set_mesh(mesh):
    params = {"w": jax.sharding.reshard(jnp.ones((64, 24)), P("data")),
              "b": jax.sharding.reshard(jnp.ones(24), P())}
    state = jax.jit(tx.init)(params)
    types = jax.tree.map(jax.typeof, state)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert jax.tree.map(jax.typeof, state) == types
    assert jax.tree.map(jax.typeof, updates) == jax.tree.map(jax.typeof,
                                                             params)


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_alias_is_a_drop_in_for_adamw_including_weight_decay(name):
  """``shampoo(lr)``/``soap(lr)`` decay the weights as ``optax.adamw(lr)``
  does by default: with a zero gradient both updates are ``-lr * wd * w``."""
  default = inspect.signature(optax.adamw).parameters["weight_decay"].default
  params = {"w": jnp.full((8, 4), 2.0), "b": jnp.full(4, -3.0)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for tx in (OPTIMIZERS[name](0.5), optax.adamw(0.5)):
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert_close(updates, jax.tree.map(lambda p: -0.5 * default * p, params),
                 rtol=1e-6)
