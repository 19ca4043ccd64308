# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Width-aware scaling (``base_width``) against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from numerics import NumpyShampoo
from numerics import run_updates as run
import shampoo_optax
from test_soap import NumpySoap
from test_soap import OPTIONS as SOAP_OPTIONS

PAPER = dict(graft="none", b1=0.0, b2=1.0, precondition_every=1,
             start_preconditioning_step=0)


def width_normalized(direction, block, base_width):
  """Each ``block``-sized block of a matrix at RMS ``base_width / width``,
  the width being the square root of the matrix's size."""
  width = np.sqrt(direction.size)
  out = np.zeros_like(direction)
  for i in range(0, direction.shape[0], block[0]):
    for j in range(0, direction.shape[1], block[1]):
      d = direction[i:i + block[0], j:j + block[1]]
      out[i:i + block[0], j:j + block[1]] = (
          d / np.sqrt(np.mean(d**2)) * base_width / width)
  return out


def tree_grads(shapes, steps, seed):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
           for k, s in shapes.items()} for _ in range(steps)]


def test_shampoo_blocks_at_base_width_over_width():
  # "w": blocks of 8 x 8; "k": a [2, 4, 12] kernel merged to [8, 12];
  # "s": 3 stacked [24, 12] layers (each its own unit); "b": a vector,
  # untouched.
  shapes = {"w": (24, 12), "k": (2, 4, 12), "s": (3, 24, 12), "b": (12,)}
  grads = tree_grads(shapes, steps=3, seed=0)
  tx = shampoo_optax.scale_by_shampoo(
      block_size=8, base_width=6, layer_axes={"w": None, "k": None, "s": 0,
                                              "b": None}, **PAPER)
  ours, _ = run(tx, grads)
  refs = {"w": NumpyShampoo((8, 8)), "k": NumpyShampoo((8, 8)),
          **{("s", i): NumpyShampoo((8, 8)) for i in range(3)}}
  for g, u in zip(grads, ours):
    for name, rows in (("w", 24), ("k", 8)):
      x = np.asarray(g[name]).reshape(rows, 12)
      expected = width_normalized(refs[name].update(x), (8, 8), 6)
      assert_close(u[name], expected.reshape(shapes[name]), rtol=5e-4)
    for i in range(3):
      expected = width_normalized(
          refs[("s", i)].update(np.asarray(g["s"][i])), (8, 8), 6)
      assert_close(u["s"][i], expected, rtol=5e-4)
    assert_close(u["b"], g["b"], rtol=1e-6)
  # A matrix twice as wide on both sides: half the RMS.
  wide = shampoo_optax.scale_by_shampoo(block_size=8, base_width=6, **PAPER)
  (u,), _ = run(wide, [{"w": jnp.ones((48, 24))}])
  np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(u["w"])**2)),
                             6 / np.sqrt(48 * 24), rtol=1e-5)


def test_shampoo_with_grafting_keeps_adam_before_preconditioning():
  # Before start_preconditioning_step the grafted Adam direction of a
  # matrix is scaled by base_width / width; after, grafting is replaced.
  grads = tree_grads({"w": (16, 8)}, steps=2, seed=1)
  ours, _ = run(shampoo_optax.scale_by_shampoo(
      block_size=8, base_width=4, b1=0.0, start_preconditioning_step=1,
      precondition_every=1), grads)
  adam, _ = run(shampoo_optax.scale_by_shampoo(
      block_size=8, b1=0.0, start_preconditioning_step=5), grads)
  width = np.sqrt(16 * 8)
  assert_close(ours[0]["w"], np.asarray(adam[0]["w"]) * 4 / width, rtol=1e-5)
  rms = [np.sqrt(np.mean(np.asarray(ours[1]["w"])[i:i + 8] ** 2))
         for i in (0, 8)]
  np.testing.assert_allclose(rms, [4 / width] * 2, rtol=1e-5)


def test_soap_blocks_at_base_width_over_width():
  grads = [g["w"] for g in tree_grads({"w": (16, 8)}, steps=6, seed=2)]
  ours, _ = run(shampoo_optax.scale_by_soap(
      block_size=8, precondition_every=2, base_width=4, **SOAP_OPTIONS),
                grads)
  plain, _ = run(shampoo_optax.scale_by_soap(
      block_size=8, precondition_every=2, **SOAP_OPTIONS), grads)
  ref = NumpySoap(8, every=2, **SOAP_OPTIONS)
  for t, (g, u, p) in enumerate(zip(grads, ours, plain)):
    expected = ref.update(g)
    if t == 0:  # SOAP's first step only sets up the bases.
      assert not np.any(u)
      continue
    assert_close(p, expected, rtol=2e-4, err_msg=f"step {t}")
    assert_close(u, width_normalized(expected, (8, 8), 4), rtol=2e-4,
                 err_msg=f"step {t}")


@pytest.mark.parametrize("make", [shampoo_optax.shampoo, shampoo_optax.soap])
def test_weight_decay_scales_as_one_over_width(make):
  params = {"w": jnp.ones((32, 8)), "b": jnp.ones(8),
            "head": {"w": jnp.ones((8, 8)), "b": jnp.ones(8)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  lr, wd = 0.1, 0.5
  # The [32, 8] kernel's width is sqrt(32 * 8) = 16, the [8, 8] one's 8.
  every = {"w": wd * 4 / 16, "b": wd, "head": {"w": wd * 4 / 8, "b": wd}}
  for mask, decays in (
      (None, every),
      ({"w": True, "b": False, "head": {"w": True, "b": False}},
       {**every, "b": 0, "head": {"w": wd * 4 / 8, "b": 0}}),
      # A prefix of the params' structure, as optax's masks may be.
      ({"w": True, "b": True, "head": False},
       {**every, "head": {"w": 0, "b": 0}}),
      (lambda p: jax.tree.map(lambda x: x.ndim == 2, p),
       {**every, "b": 0, "head": {"w": wd * 4 / 8, "b": 0}})):
    tx = make(lr, weight_decay=wd, base_width=4, mask=mask)
    # A zero gradient: the update is the weight decay alone.
    updates, _ = tx.update(zero, tx.init(params), params)
    assert_close(updates, jax.tree.map(lambda d, p: -lr * d * p, decays,
                                       params), rtol=1e-6)
  plain = make(lr, weight_decay=wd)
  updates, _ = plain.update(zero, plain.init(params), params)
  assert_close(updates["w"], -lr * wd * params["w"], rtol=1e-6)


@pytest.mark.parametrize("make", [shampoo_optax.shampoo, shampoo_optax.soap])
def test_bad_base_width_names_the_option(make):
  for value in (0, 2.5, "wide"):
    with pytest.raises((ValueError, TypeError), match="base_width"):
      make(1e-3, base_width=value)
