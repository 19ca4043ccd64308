# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The ``precondition`` option and `hidden_matrices`: which leaves get
matrices, the others Adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numerics import assert_close
import shampoo_optax

SHAPES = {"embed": (16, 6), "hidden": [(6, 8), (8, 6)], "lm_head": (6, 16),
          "norm": (6,)}


def _params():
  return jax.tree.map(jnp.ones, SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _grads(count):
  rng = np.random.default_rng(0)
  return [jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
      _params()) for _ in range(count)]


# The diagonal route of each transform, and its Adam: Shampoo's grafted Adam
# (b1 = 0: Shampoo's own momentum would follow it), SOAP's Adam.
ROUTES = {
    "shampoo": (lambda **kw: shampoo_optax.scale_by_shampoo(
        b1=0.0, b2=0.99, graft_eps=1e-8, block_size=4, **kw),
                optax.scale_by_adam(b1=0.0, b2=0.99, eps=1e-8)),
    "soap": (lambda **kw: shampoo_optax.scale_by_soap(
        b1=0.9, b2=0.99, eps=1e-8, block_size=4, **kw),
             optax.scale_by_adam(b1=0.9, b2=0.99, eps=1e-8)),
}


@pytest.mark.parametrize("name", ROUTES)
def test_leaves_left_out_get_adam_and_the_rest_matrices(name):
  make, adam = ROUTES[name]
  mask = {"embed": False, "hidden": True, "lm_head": False, "norm": True}
  tx = make(precondition=mask)
  params = _params()
  state, adam_state = tx.init(params), adam.init(params)
  for step, grads in enumerate(_grads(4)):
    updates, state = tx.update(grads, state, params)
    expected, adam_state = adam.update(grads, adam_state)
    for leaf in ("embed", "lm_head", "norm"):
      assert_close(updates[leaf], expected[leaf], rtol=1e-5)
    if step == 0:  # Shampoo's first step is its grafted Adam's.
      continue
    for got, adam_update in zip(updates["hidden"], expected["hidden"]):
      gap = float(jnp.max(jnp.abs(got - adam_update)))
      assert gap > 0.1 * float(jnp.max(jnp.abs(adam_update)))
  # Only the hidden matrices have factors.
  hidden_only = make().init({"hidden": params["hidden"]})
  assert [x.shape for x in state.stats] == [
      x.shape for x in hidden_only.stats]


@pytest.mark.parametrize("name", ROUTES)
def test_every_form_of_the_mask_gives_the_same_plan(name):
  make, _ = ROUTES[name]
  params = _params()
  full = {"embed": False, "hidden": [True, True], "lm_head": False,
          "norm": True}
  prefix = {"embed": False, "hidden": True, "lm_head": False, "norm": True}
  forms = [full, prefix, lambda p: prefix, shampoo_optax.hidden_matrices()]
  shapes = [[x.shape for x in make(precondition=m).init(params).stats]
            for m in forms]
  hidden_only = make().init({"hidden": params["hidden"]})
  assert all(s == [x.shape for x in hidden_only.stats] for s in shapes)
  assert len(make(precondition=False).init(params).stats) == 0
  every = make().init(params).stats
  assert len(make(precondition=True).init(params).stats) == len(every)
  assert len(every) > len(hidden_only.stats)


def test_inside_optax_partition_with_a_prefix_mask():
  """optax.partition hands the transform a tree with masked nodes."""
  params = _params()
  tx = optax.partition(
      {"matrices": shampoo_optax.shampoo(
          1e-2, block_size=4, precondition={"embed": False, "hidden": True,
                                            "lm_head": False, "norm": True}),
       "frozen": optax.set_to_zero()},
      {"embed": "matrices", "hidden": "matrices", "lm_head": "matrices",
       "norm": "frozen"})
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(_grads(1)[0], state, params)
  assert float(jnp.max(jnp.abs(updates["norm"]))) == 0.0
  assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))


def test_a_bad_mask_names_the_option_and_the_leaf():
  params = _params()
  with pytest.raises(ValueError, match=r"precondition of \['embed'\].*'no'"):
    shampoo_optax.shampoo(1e-3, precondition={
        "embed": "no", "hidden": True, "lm_head": True, "norm": True}).init(
            params)
  with pytest.raises(ValueError, match="precondition must be None, a bool"):
    shampoo_optax.soap(1e-3, precondition={"embed": False}).init(params)


def test_hidden_matrices_on_stock_flax_modules():
  """Embedding tables, output heads and attention biases ([heads,
  head_dim] in Flax) are left out; kernels kept."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.token_embed = nnx.Embed(32, 16, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=16,
                                         decode=False, rngs=rngs)
      self.mlp = nnx.Linear(16, 32, rngs=rngs)
      self.lm_head = nnx.Linear(16, 32, rngs=rngs)

  params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  mask = shampoo_optax.hidden_matrices()(params)
  kept = {jax.tree_util.keystr(path) for path, keep in
          jax.tree_util.tree_flatten_with_path(mask)[0] if keep}
  assert kept == {f"['{m}']['{w}']['kernel'].value" for m, w in (
      ("attn", "query"), ("attn", "key"), ("attn", "value"), ("attn", "out"))
                  } | {"['mlp']['kernel'].value"}, kept
  with_paths = jax.tree_util.tree_flatten_with_path(mask)[0]
  assert len(with_paths) == len(jax.tree.leaves(params))
