# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Shampoo inside the optax / Flax / Orbax ecosystem (one device).

optax combinators, Flax (nnx and linen) training of a small Transformer
block, Orbax save / restore in a fresh process, pytree transformations
(``eval_shape``, ``vmap`` over optimizer states, donation), the absence of
host callbacks in the compiled update, and the diagnostics.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from numerics import assert_close
import shampoo_optax
from shampoo_optax import _blocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_rng(tree, seed, scale=1.0):
  """A random float32 tree of the shapes of ``tree``."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32),
      tree)


def assert_trees_close(a, b, rtol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert_close(a, b, rtol=rtol)


def assert_states_close(a, b, rtol):
  """Optimizer states equal up to round-off.

  The root error diagnostic of accurate roots is round-off itself (about
  1e-6, dimensionless), so it is only required to be small in both.
  """
  errors = []

  def drop_root_error(state):
    if isinstance(state, shampoo_optax.ShampooState):
      errors.append(state.diagnostics.max_root_error)
      return state._replace(diagnostics=state.diagnostics._replace(
          max_root_error=jnp.zeros_like(state.diagnostics.max_root_error)))
    return state

  is_state = lambda x: isinstance(x, shampoo_optax.ShampooState)
  a, b = (jax.tree.map(drop_root_error, s, is_leaf=is_state) for s in (a, b))
  assert_trees_close(a, b, rtol=rtol)
  assert all(np.all(np.asarray(e) < 1e-3) for e in errors), errors


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def shapes_and_dtypes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def diagnostics(state):
  """The `ShampooDiagnostics` anywhere inside a (nested) optax state."""
  return optax.tree_utils.tree_get(state, "diagnostics")


PARAMS = {
    "w": jnp.zeros((6, 5)),
    "k": jnp.zeros((3, 2, 4)),
    "b": jnp.zeros((5,)),
}
SMALL = dict(block_size=8, precondition_every=2)
# One reference optimizer and one compiled update, shared by the tests.
REF = shampoo_optax.shampoo(1e-2, **SMALL)
REF_UPDATE = jax.jit(REF.update)
# The float options, injected (changeable in the state between steps).
FLOATS = dict(learning_rate=1e-2, b1=0.9, b2=0.99, matrix_eps=1e-6,
              graft_eps=1e-8, weight_decay=1e-3, max_root_error=0.5)
INJ = optax.inject_hyperparams(
    shampoo_optax.shampoo, static_args=shampoo_optax.STATIC_OPTIONS)(
        **FLOATS, block_size=8, precondition_every=1)
INJ_TRACES = []


@jax.jit
def INJ_UPDATE(g, state, params):  # pylint: disable=invalid-name
  INJ_TRACES.append(1)
  return INJ.update(g, state, params)


def with_hyperparams(state, **values):
  return state._replace(hyperparams={
      **state.hyperparams,
      **{k: jnp.asarray(v, state.hyperparams[k].dtype)
         for k, v in values.items()}})


# ---------------------------------------------------------------- combinators


def test_chain_with_clip_by_global_norm():
  grads = [tree_rng(PARAMS, seed, scale=10.0) for seed in range(3)]
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   shampoo_optax.shampoo(1e-2, **SMALL))
  state, ref_state = tx.init(PARAMS), REF.init(PARAMS)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, PARAMS)
    clipped = jax.tree.map(
        lambda x: x / optax.tree.norm(g), g)  # norm >> 1: clipped to 1
    r, ref_state = REF_UPDATE(clipped, ref_state, PARAMS)
    assert_trees_close(u, r, rtol=1e-4)


def test_inject_hyperparams_floats_change_without_recompiling():
  params = tree_rng(PARAMS, 0)
  grads = tree_rng(PARAMS, 1)
  state = INJ.init(params)
  assert set(FLOATS) <= set(state.hyperparams)
  _, state = INJ_UPDATE(grads, state, params)
  traces = len(INJ_TRACES)
  for name, value in FLOATS.items():
    u, new_state = INJ_UPDATE(grads, with_hyperparams(state, **{
        name: 0.5 * value}), params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))
    assert float(new_state.hyperparams[name]) == np.float32(0.5 * value)
  # Same state, half the learning rate: exactly half the update.
  u, _ = INJ_UPDATE(grads, state, params)
  half, _ = INJ_UPDATE(grads, with_hyperparams(state, learning_rate=5e-3),
                       params)
  assert_trees_close(half, jax.tree.map(lambda x: x / 2, u), rtol=1e-6)
  # b2 does reach the statistics (its effect is not silently dropped).
  _, a = INJ_UPDATE(grads, state, params)
  _, b = INJ_UPDATE(grads, with_hyperparams(state, b2=0.5), params)
  assert not np.allclose(a.inner_state[0].stats[0], b.inner_state[0].stats[0])
  assert len(INJ_TRACES) == traces  # no retracing, no recompiling
  assert INJ_UPDATE._cache_size() == 1


def test_inject_hyperparams_without_static_args_names_the_fix():
  tx = optax.inject_hyperparams(shampoo_optax.scale_by_shampoo)(block_size=8)
  with pytest.raises(TypeError, match="static_args=shampoo_optax.STATIC_OPTIONS"):
    jax.jit(tx.init)(PARAMS)


def test_multisteps_equals_one_step_with_mean_gradient():
  k = 3
  micro = [tree_rng(PARAMS, seed) for seed in range(2 * k)]
  tx = optax.MultiSteps(shampoo_optax.shampoo(1e-2, **SMALL),
                        every_k_schedule=k)
  params = ref_params = tree_rng(PARAMS, 99)
  state, ref_state = tx.init(params), REF.init(params)
  update = jax.jit(tx.update)
  for big in range(2):
    chunk = micro[big * k:(big + 1) * k]
    for i, g in enumerate(chunk):
      u, state = update(g, state, params)
      if i < k - 1:
        assert all(not np.any(x) for x in jax.tree.leaves(u))
      params = optax.apply_updates(params, u)
    mean = jax.tree.map(lambda *xs: sum(xs) / k, *chunk)
    r, ref_state = REF_UPDATE(mean, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, r)
    assert_trees_close(params, ref_params, rtol=1e-5)
  assert_states_close(state.inner_opt_state, ref_state, rtol=1e-5)


def embedding_model_params():
  return {
      "embed": {"embedding": jnp.zeros((40, 8))},
      "dense": {"kernel": jnp.zeros((8, 6)), "bias": jnp.zeros((6,))},
      "ln": {"scale": jnp.zeros((6,))},
      "attn": {"kernel": jnp.zeros((6, 2, 3))},
  }


def shampoo_or_adamw(params):
  """The README recipe: Shampoo for weight matrices/tensors, AdamW elsewhere.

  Embeddings, biases (also Flax's [heads, head_dim] attention biases) and
  norm scales go to AdamW.
  """
  def label(path, leaf):
    name = jax.tree_util.keystr(path)
    diagonal = any(k in name for k in ("embed", "bias", "scale"))
    return "shampoo" if leaf.ndim >= 2 and not diagonal else "adamw"
  return jax.tree_util.tree_map_with_path(label, params)


def test_partition_and_masked_recipes():
  """Shampoo for matrices, AdamW for embeddings/biases/norms, two ways."""
  params = tree_rng(embedding_model_params(), 0)
  grads = [tree_rng(params, seed) for seed in (1, 2, 3)]
  labels = shampoo_or_adamw(params)
  assert labels == {"embed": {"embedding": "adamw"},
                    "dense": {"kernel": "shampoo", "bias": "adamw"},
                    "ln": {"scale": "adamw"}, "attn": {"kernel": "shampoo"}}
  partitioned = optax.partition(
      {"shampoo": shampoo_optax.shampoo(1e-2, **SMALL),
       "adamw": optax.adamw(1e-2)}, labels)
  mask = jax.tree.map(lambda label: label == "shampoo", labels)
  masked = optax.chain(
      optax.masked(shampoo_optax.shampoo(1e-2, **SMALL), mask),
      optax.masked(optax.adamw(1e-2), jax.tree.map(lambda m: not m, mask)))
  # References: each optimizer alone on its own sub-tree.
  sham, adam = shampoo_optax.shampoo(1e-2, **SMALL), optax.adamw(1e-2)
  subtree = lambda tree, want: {
      k: {kk: v for kk, v in d.items() if mask[k][kk] == want}
      for k, d in tree.items()}
  sham_state = sham.init(subtree(params, True))
  adam_state = adam.init(subtree(params, False))
  sham_update, adam_update = jax.jit(sham.update), jax.jit(adam.update)
  txs = (partitioned, masked)
  states = [tx.init(params) for tx in txs]
  updates = [jax.jit(tx.update) for tx in txs]
  for g in grads:
    us, sham_state = sham_update(subtree(g, True), sham_state,
                                 subtree(params, True))
    ua, adam_state = adam_update(subtree(g, False), adam_state,
                                 subtree(params, False))
    for i, update in enumerate(updates):
      u, states[i] = update(g, states[i], params)
      assert_trees_close(subtree(u, True), us, rtol=1e-5)
      assert_trees_close(subtree(u, False), ua, rtol=1e-5)
  # The masked Shampoo state holds only the masked-in leaves.
  inner = states[1][0].inner_state[0]
  masked_in = jax.tree.leaves(subtree(params, True))
  assert sum(x.size for x in jax.tree.leaves(inner.graft)) == sum(
      x.size for x in masked_in)


def test_apply_if_finite():
  """skip_nonfinite=False defers the NaN policy to optax.apply_if_finite."""
  params = tree_rng(PARAMS, 0)
  tx = optax.apply_if_finite(
      shampoo_optax.shampoo(1e-2, skip_nonfinite=False, **SMALL),
      max_consecutive_errors=3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(tree_rng(PARAMS, 1), state, params)
  bad = tree_rng(PARAMS, 2)
  bad["b"] = bad["b"].at[1].set(jnp.nan)
  u, bad_state = update(bad, state, params)
  assert all(not np.any(x) for x in jax.tree.leaves(u))
  assert_trees_equal(bad_state.inner_state, state.inner_state)
  assert int(bad_state.notfinite_count) == 1
  u, state = update(tree_rng(PARAMS, 3), bad_state, params)
  assert int(state.notfinite_count) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((u, state)))


def test_reduce_on_plateau_scales_shampoo_updates():
  params = tree_rng(PARAMS, 0)
  tx = optax.chain(
      shampoo_optax.shampoo(1e-2, **SMALL),
      optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0))
  base_state, state = REF.init(params), tx.init(params)
  update = jax.jit(tx.update)
  scales = []
  for seed in range(5):
    g = tree_rng(PARAMS, 10 + seed)
    r, base_state = REF_UPDATE(g, base_state, params)
    u, state = update(g, state, params, value=jnp.asarray(1.0))  # no progress
    scale = float(state[1].scale)
    scales.append(scale)
    assert_trees_close(u, jax.tree.map(lambda x: scale * x, r), rtol=1e-6)
  assert scales[0] == 1.0 and scales[-1] < 0.2


# ---------------------------------------------------------------- Flax


def check_routing(params, block_size, max_precondition_dim):
  """Plan route of every leaf, keyed by its path."""
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  plan = _blocks.make_plan(tuple(tuple(x.shape) for _, x in with_paths),
                           ((),) * len(with_paths), block_size,
                           max_precondition_dim)
  families = [plan.families[f] for f in plan.family_of_leaf]
  return {jax.tree_util.keystr(path): f.shape if f.preconditioned else None
          for (path, _), f in zip(with_paths, families)}


VOCAB, D, HEADS, SEQ = 48, 16, 4, 6


def token_batch(seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, VOCAB, (4, SEQ + 1)), jnp.int32)


def test_flax_nnx_optimizer_transformer_block():
  from flax import nnx

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
      self.ln1 = nnx.LayerNorm(D, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(
          num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
      self.ln2 = nnx.LayerNorm(D, rngs=rngs)
      self.mlp = nnx.Linear(D, 2 * D, rngs=rngs)
      self.proj = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
      h = self.embed(x)
      h = h + self.attn(self.ln1(h))
      h = h + self.proj(jax.nn.gelu(self.mlp(self.ln2(h))))
      return self.embed.attend(h)

  model = Block(nnx.Rngs(0))
  kw = dict(block_size=16, max_precondition_dim=32, precondition_every=2)
  optimizer = nnx.Optimizer(model, shampoo_optax.shampoo(1e-2, **kw),
                            wrt=nnx.Param)

  routes = check_routing(nnx.state(model, nnx.Param), 16, 32)
  for path, merged in routes.items():
    if "attn" in path and "bias" in path and "out" not in path:
      # Flax's q/k/v biases are [heads, head_dim]: small matrices that get
      # Shampoo unless routed elsewhere (see shampoo_or_adamw).
      assert merged == (HEADS, D // HEADS), path
    elif "ln" in path or "bias" in path:
      assert merged is None, path  # vectors: diagonal (grafted Adam)
    else:
      # The [48, 16] table too: its dim above max_precondition_dim is cut
      # into blocks of 16 (hidden_matrices() would leave it to Adam).
      assert merged is not None and len(merged) == 2, path
  # [d, heads, head_dim] -> [d, heads*head_dim]; out [heads, head_dim, d].
  assert routes["['attn']['query']['kernel'].value"] in ((16, 16),)
  assert routes["['attn']['out']['kernel'].value"] == (16, 16)

  def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  @nnx.jit
  def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss

  tokens = token_batch(0)
  losses = [float(train_step(model, optimizer, tokens)) for _ in range(8)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
  # Diagnostics are reachable in the nnx optimizer state (as OptArrays).
  diag = diagnostics(optimizer.opt_state)
  assert int(diag.root_failures) == 0
  assert int(diag.last_refresh_step) == 7  # refreshes at steps 1, 3, 5, 7


def test_flax_linen_train_state_transformer_block():
  import flax.linen as nn
  from flax.training import train_state

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x):
      embed = nn.Embed(VOCAB, D, name="embed")
      h = embed(x)
      h = h + nn.MultiHeadDotProductAttention(HEADS, name="attn")(
          nn.LayerNorm(name="ln1")(h))
      y = nn.Dense(2 * D, name="mlp")(nn.LayerNorm(name="ln2")(h))
      h = h + nn.Dense(D, name="proj")(nn.gelu(y))
      return embed.attend(h)

  model = Block()
  tokens = token_batch(1)
  params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
  labels = shampoo_or_adamw(params)
  # Rank-3 attention kernels and dense kernels get Shampoo; the embedding,
  # LayerNorm scales and biases get AdamW.
  for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
    name = jax.tree_util.keystr(path)
    expected = "shampoo" if "kernel" in name else "adamw"
    assert label == expected, name
  tx = optax.partition(
      {"shampoo": shampoo_optax.shampoo(1e-2, block_size=16,
                                        precondition_every=2),
       "adamw": optax.adamw(1e-2)}, labels)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx)
  # The rank-3 attention kernels are preconditioned as [16, 16] matrices.
  routes = check_routing(params["attn"], 16, 4096)
  assert {k: v for k, v in routes.items() if "kernel" in k} == {
      f"['{n}']['kernel']": (D, D) for n in ("query", "key", "value", "out")}

  @jax.jit
  def train_step(state, tokens):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(8):
    state, loss = train_step(state, tokens)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
  assert int(diagnostics(state.opt_state).root_failures) == 0


# ---------------------------------------------------------------- Orbax

CKPT_STEP, TOTAL_STEPS = 3, 7


def _ckpt_problem():
  """Deterministic training problem shared by the parent and child process."""
  params = tree_rng(PARAMS, 0)
  tx = shampoo_optax.shampoo(
      optax.linear_schedule(1e-2, 1e-3, TOTAL_STEPS), weight_decay=1e-3,
      nesterov=True, block_size=4, precondition_every=2)

  def loss(p, step):
    target = tree_rng(PARAMS, 1000)
    rng = jax.random.fold_in(jax.random.key(0), step)
    noise = jax.random.normal(rng, (5,))
    return (sum(jnp.sum((x - t) ** 2) for x, t in zip(
        jax.tree.leaves(p), jax.tree.leaves(target))) +
            jnp.sum(p["b"] * noise))

  @jax.jit
  def step_fn(p, s, step):
    g = jax.grad(loss)(p, step)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return params, tx, step_fn


def _ckpt_run(params, state, step_fn, start, stop):
  for step in range(start, stop):
    params, state = step_fn(params, state, step)
  return params, state


def _ckpt_child(ckpt_dir, out_file):
  """Fresh process: restore at CKPT_STEP, finish the run, dump the leaves."""
  import orbax.checkpoint as ocp
  params, tx, step_fn = _ckpt_problem()
  abstract = jax.eval_shape(lambda: {"params": params,
                                     "opt_state": tx.init(params)})
  restored = ocp.StandardCheckpointer().restore(ckpt_dir, abstract)
  final = _ckpt_run(restored["params"], restored["opt_state"], step_fn,
                    CKPT_STEP, TOTAL_STEPS)
  np.savez(out_file, *[np.asarray(x) for x in jax.tree.leaves(final)])


def test_orbax_restore_in_fresh_process_continues_bit_identically(tmp_path):
  import orbax.checkpoint as ocp
  params, tx, step_fn = _ckpt_problem()
  state = tx.init(params)
  params, state = _ckpt_run(params, state, step_fn, 0, CKPT_STEP)
  ckpt_dir = tmp_path / "ckpt"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(ckpt_dir, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  final = _ckpt_run(params, state, step_fn, CKPT_STEP, TOTAL_STEPS)
  assert int(diagnostics(final[1]).last_refresh_step) >= CKPT_STEP

  out_file = tmp_path / "child.npz"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), str(ckpt_dir),
       str(out_file)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  child = np.load(out_file)
  leaves = jax.tree.leaves(final)
  assert len(child.files) == len(leaves)
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(child[f"arr_{i}"], np.asarray(leaf))


# ---------------------------------------------------------------- pytrees


def test_eval_shape_of_init():
  for tx in (shampoo_optax.shampoo(1e-3, **SMALL),
             optax.inject_hyperparams(
                 shampoo_optax.shampoo,
                 static_args=shampoo_optax.STATIC_OPTIONS)(1e-3, **SMALL)):
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    abstract = jax.eval_shape(tx.init, abstract_params)
    assert shapes_and_dtypes(abstract) == shapes_and_dtypes(tx.init(PARAMS))


def test_vmap_over_independent_states_hyperparameter_sweep():
  """A learning-rate x b2 sweep in one vmapped program equals separate runs."""
  params = tree_rng(PARAMS, 0)
  grads = [tree_rng(PARAMS, seed) for seed in (1, 2, 3)]
  lrs = jnp.array([1e-2, 3e-3, 1e-3])
  b2s = jnp.array([0.9, 0.99, 1.0])
  init = lambda lr, b2: with_hyperparams(INJ.init(params), learning_rate=lr,
                                         b2=b2)
  states = jax.vmap(init)(lrs, b2s)
  vupdate = jax.jit(jax.vmap(INJ.update, in_axes=(None, 0, None)))
  batched = []
  for g in grads:
    u, states = vupdate(g, states, params)
    batched.append(u)
  # Each state alone, through the same (unbatched) compiled update.
  for i, (lr, b2) in enumerate(zip(lrs, b2s)):
    state = init(lr, b2)
    for g, u in zip(grads, batched):
      r, state = INJ_UPDATE(g, state, params)
      assert_trees_close(jax.tree.map(lambda x: x[i], u), r, rtol=2e-5)
    assert_states_close(jax.tree.map(lambda x: x[i], states), state,
                        rtol=1e-5)


def test_donate_argnums():
  params = tree_rng(PARAMS, 0)
  donating = jax.jit(REF.update, donate_argnums=(1,))
  state, ref_state = REF.init(params), REF.init(params)
  for seed in range(3):
    g = tree_rng(PARAMS, seed)
    old_leaves = jax.tree.leaves(state)
    u, state = donating(g, state, params)
    r, ref_state = REF_UPDATE(g, ref_state, params)
    assert_trees_equal(u, r)
    assert all(x.is_deleted() for x in old_leaves)
  assert_trees_equal(state, ref_state)


def host_transfer_ops(hlo_text):
  targets = re.findall(r'custom_call_target="([^"]+)"', hlo_text)
  bad = [t for t in targets if re.search(r"callback|host|python", t, re.I)]
  bad += re.findall(r"\b(outfeed|infeed|send|recv)\(", hlo_text)
  return bad


def test_no_host_callbacks_in_compiled_update():
  params = tree_rng(PARAMS, 0)
  hlo = REF_UPDATE.lower(params, REF.init(params), params).compile().as_text()
  assert "lapack" in hlo or "eigh" in hlo.lower()  # the refresh is compiled in
  assert host_transfer_ops(hlo) == []

  def with_callback(x):  # positive control: the check sees host callbacks
    jax.debug.callback(lambda _: None, x)
    return x + 1
  control = jax.jit(with_callback).lower(jnp.zeros(3)).compile()
  assert host_transfer_ops(control.as_text())


def test_diagnostics_after_failed_root_and_nonfinite_step():
  params = tree_rng(PARAMS, 0)
  update = INJ_UPDATE
  state = INJ.init(params)
  d = diagnostics(state)
  assert (int(d.root_failures), int(d.last_refresh_step),
          int(d.nonfinite_steps)) == (0, -1, 0)
  for seed in range(2):
    _, state = update(tree_rng(PARAMS, seed), state, params)
  d = diagnostics(state)
  assert int(d.last_refresh_step) == 1 and int(d.root_failures) == 0
  assert 0 < float(d.max_root_error) < 0.5

  bad = tree_rng(PARAMS, 5)
  bad["w"] = bad["w"].at[0, 0].set(jnp.inf)
  _, state = update(bad, state, params)
  d = diagnostics(state)
  assert int(d.nonfinite_steps) == 1
  assert int(d.last_refresh_step) == 1  # the skipped step refreshed nothing

  # A refresh with a tolerance no root can meet: every root is rejected.
  roots = optax.tree_utils.tree_get(state, "preconditioners")
  state = with_hyperparams(state, max_root_error=0.0)
  u, state = update(tree_rng(PARAMS, 6), state, params)
  d = diagnostics(state)
  n_factors = sum(int(s.shape[0]) for s in roots)
  assert int(d.root_failures) == n_factors
  assert float(d.max_root_error) > 0.0
  assert int(d.last_refresh_step) == 2  # 0-based count of finite steps
  assert_trees_equal(optax.tree_utils.tree_get(state, "preconditioners"),
                     roots)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))

  state = with_hyperparams(state, max_root_error=0.5)
  _, state = update(tree_rng(PARAMS, 7), state, params)
  d = diagnostics(state)
  assert int(d.root_failures) == n_factors and int(d.nonfinite_steps) == 1
  assert int(d.last_refresh_step) == 3 and float(d.max_root_error) < 0.5


if __name__ == "__main__":
  _ckpt_child(sys.argv[1], sys.argv[2])


# ---------------------------------------------------------------- Review


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_x64_keeps_dtypes_and_numbers(dtype):
  grads = [tree_rng(PARAMS, seed) for seed in range(4)]
  expected, _ = run_updates(REF, grads)
  with jax.enable_x64(True):
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
    tx = shampoo_optax.shampoo(1e-2, **SMALL)
    state = tx.init(cast(PARAMS))
    types = jax.tree.map(jax.typeof, state)
    update = jax.jit(tx.update)
    got = []
    for g in grads:
      u, state = update(cast(g), state, cast(PARAMS))
      assert jax.tree.map(jax.typeof, state) == types
      assert {x.dtype for x in jax.tree.leaves(u)} == {jnp.dtype(dtype)}
      got.append(u)
  for u, e in zip(got, expected):
    assert_trees_close(jax.tree.map(lambda x: x.astype(jnp.float32), u), e,
                       rtol=1e-5)


def run_updates(tx, grads):
  state, update = tx.init(PARAMS), jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, PARAMS)
    out.append(u)
  return out, state


def test_static_options_are_every_option_but_the_floats():
  import inspect  # pylint: disable=g-import-not-at-top
  options = set(inspect.signature(shampoo_optax.shampoo).parameters)
  floats = set(shampoo_optax._shampoo.FLOAT_OPTIONS)
  assert floats <= options
  assert set(shampoo_optax.STATIC_OPTIONS) == options - floats
  assert set(inspect.signature(shampoo_optax.scale_by_shampoo).parameters) <= (
      options)


def test_inject_hyperparams_keeps_the_weight_decay_mask():
  tx = optax.inject_hyperparams(
      shampoo_optax.shampoo, static_args=shampoo_optax.STATIC_OPTIONS)(
          learning_rate=0.01, weight_decay=0.1, b1=0.0, graft="sgd",
          start_preconditioning_step=100,
          mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params),
                                  tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.011, rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -0.010, rtol=1e-6)


def test_inject_hyperparams_and_traced_floats_under_an_explicit_mesh():
  mesh = jax.make_mesh((1,), ("data",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda x: jax.sharding.reshard(x, P()), PARAMS)
    grads = jax.tree.map(lambda x: jax.sharding.reshard(x, P()),
                         tree_rng(PARAMS, 1))
    for shard_axes in (None, "data"):
      tx = optax.inject_hyperparams(
          shampoo_optax.shampoo, static_args=shampoo_optax.STATIC_OPTIONS)(
              learning_rate=1e-2, b2=0.99, shard_axes=shard_axes, **SMALL)
      state = jax.jit(tx.init)(params)
      updates, _ = jax.jit(tx.update)(grads, state, params)
      assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))

    @jax.jit
    def with_traced_b2(b2):
      tx = shampoo_optax.scale_by_shampoo(b2=b2, **SMALL)
      return tx.update(grads, tx.init(params))[0]

    traced = with_traced_b2(jnp.float32(0.99))
  plain = shampoo_optax.scale_by_shampoo(b2=0.99, **SMALL)
  expected = plain.update(tree_rng(PARAMS, 1), plain.init(PARAMS))[0]
  assert_trees_close(traced, expected, rtol=1e-6)


def test_skipped_steps_do_not_advance_a_schedule():
  """Where skipping holds, and the recipe for optax.inject_hyperparams."""
  schedule = lambda count: 1e-2 * (1.0 + count)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
  good = tree_rng(PARAMS, 5)
  options = dict(b1=0.0, graft="sgd", start_preconditioning_step=100)
  recipes = {
      # The schedule inside shampoo: skipped steps do not count.
      "alias": shampoo_optax.shampoo(schedule, **options),
      # Under inject_hyperparams the wrapper counts every call; apply_if_finite
      # keeps it from seeing the bad ones.
      "inject": optax.apply_if_finite(
          optax.inject_hyperparams(
              shampoo_optax.shampoo,
              static_args=shampoo_optax.STATIC_OPTIONS)(
                  learning_rate=schedule, **options),
          max_consecutive_errors=10),
  }
  for name, tx in recipes.items():
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for _ in range(3):
      _, state = update(bad, state, PARAMS)
    u, _ = update(good, state, PARAMS)
    assert_trees_close(u, jax.tree.map(lambda g: -1e-2 * g, good), rtol=1e-6)
    del name


def test_errors_name_the_option():
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(5)}
  grads = tree_rng(params, 0)
  state = shampoo_optax.scale_by_shampoo(block_size=4).init(params)
  with pytest.raises(ValueError, match="other options.*block_size"):
    shampoo_optax.scale_by_shampoo(block_size=8).update(grads, state)
  sgd_state = shampoo_optax.scale_by_shampoo(graft="sgd").init(params)
  with pytest.raises(ValueError, match="graft='adam'"):
    shampoo_optax.scale_by_shampoo(graft="adam").update(grads, sgd_state)
  no_momentum = shampoo_optax.scale_by_shampoo(b1=0.0).init(params)
  with pytest.raises(ValueError, match="b1=0.9"):
    shampoo_optax.scale_by_shampoo(b1=0.9).update(grads, no_momentum)
  for bad in (0, ("data", 1), (), ("x", "x")):
    with pytest.raises(TypeError, match="shard_axes"):
      shampoo_optax.scale_by_shampoo(shard_axes=bad)
  with pytest.raises(ValueError, match=r"b1 must be in \[0.0, 1.0\)"):
    shampoo_optax.scale_by_shampoo(b1=1.0)
  with pytest.raises(ValueError, match="refresh must be one of"):
    shampoo_optax.scale_by_shampoo(refresh="some")
  with pytest.raises(TypeError, match="preconditioner_dtype"):
    shampoo_optax.scale_by_shampoo(preconditioner_dtype=jnp.int8)


def test_python_scalars_are_leaves_like_in_optax_adam():
  params = {"w": jnp.ones((4, 3)), "scale": 1.0, "count": np.float32(2.0)}
  tx = shampoo_optax.shampoo(1e-2)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: 0.5 * jnp.asarray(x), params)
  updates, _ = tx.update(grads, state, params)
  # Scalars get the grafted Adam step and the weight decay, as in
  # optax.adamw (whose default weight decay the alias shares).
  adam = optax.adamw(1e-2, b1=0.9, b2=0.999)
  expected, _ = adam.update(grads, adam.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert_close(updates["scale"], expected["scale"], rtol=1e-5)
  assert_close(updates["count"], expected["count"], rtol=1e-5)
