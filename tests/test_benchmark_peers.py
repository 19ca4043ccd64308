# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""The benchmark's peer optimizers build and step on workload-shaped trees.

Kron and PRO need the ``peers`` extra (``pip install -e .[peers]``) and are
skipped without it; Muon is in optax.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import _peers


def _params():
  """A small tree with the leaf names and ranks of the three workloads."""
  shapes = {
      "Conv_0": {"kernel": (3, 3, 1, 4), "bias": (4,)},
      "Embed_0": {"embedding": (11, 8)},
      "pos_embedding": (6, 8),
      "Block_0": {
          "LayerNorm_0": {"scale": (8,), "bias": (8,)},
          "MultiHeadDotProductAttention_0": {
              "query": {"kernel": (8, 2, 4), "bias": (2, 4)},
              "out": {"kernel": (2, 4, 8), "bias": (8,)},
          },
          "Dense_0": {"kernel": (8, 16), "bias": (16,)},
      },
      "Dense_0": {"kernel": (8, 12), "bias": (12,)},
      "Dense_1": {"kernel": (12, 5), "bias": (5,)},
  }
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32),
      shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_muon_dimension_numbers():
  md = optax.contrib.MuonDimensionNumbers
  dims = _peers.muon_dimension_numbers(_params())
  attention = dims["Block_0"]["MultiHeadDotProductAttention_0"]
  assert attention["query"]["kernel"] == md(0, (1, 2))
  assert attention["query"]["bias"] is None
  assert attention["out"]["kernel"] == md((0, 1), 2)
  assert dims["Conv_0"]["kernel"] == md((0, 1, 2), 3)
  assert dims["Block_0"]["Dense_0"]["kernel"] == md(0, 1)
  assert dims["Dense_0"]["kernel"] == md(0, 1)
  # The output layer, embeddings and norms go to Muon's AdamW part.
  assert dims["Dense_1"]["kernel"] is None
  assert dims["Embed_0"]["embedding"] is None
  assert dims["pos_embedding"] is None
  assert dims["Block_0"]["LayerNorm_0"]["scale"] is None


@pytest.mark.parametrize("name", _peers.PEERS)
def test_peer_update_step(name):
  if name != "muon" and importlib.util.find_spec("distributed_kron") is None:
    pytest.skip("distributed-kron not installed (pip install -e .[peers])")
  params = _params()
  grads = jax.tree.map(lambda p: 1.0 - p, params)
  schedule = optax.linear_schedule(1e-3, 1e-4, 10)
  opt = _peers.make(name, schedule, 1e-4, {})
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.shape == p.shape
    assert np.all(np.isfinite(u))
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_import_shim_restores_partition_spec():
  if importlib.util.find_spec("distributed_kron") is None:
    pytest.skip("distributed-kron not installed (pip install -e .[peers])")
  spec = jax.sharding.PartitionSpec
  before = "__class_getitem__" in vars(spec)
  _peers.import_distributed_kron()
  assert ("__class_getitem__" in vars(spec)) == before


def _tiny_workload():
  from benchmarks import workloads  # pylint: disable=import-outside-toplevel

  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)),
                  jnp.float32)

  def loss_fn(params, batch):
    return jnp.mean((batch @ params["w"]) ** 2)

  def batches(seed):
    del seed
    while True:
      yield x

  return workloads.Workload(
      name="tiny", init_params=lambda seed: {"w": jnp.ones((4, 3))},
      loss_fn=loss_fn, batches=batches,
      eval_fn=lambda params: {"loss": float(loss_fn(params, x))},
      metric="loss", higher_is_better=False, targets=(0.1,), steps=2,
      eval_every=1, lrs={"adamw": (1e-3,)})


def test_failed_peer_is_a_result_row(monkeypatch):
  from benchmarks import run  # pylint: disable=import-outside-toplevel

  def broken(name, *args):
    raise RuntimeError(f"{name} cannot run here")

  monkeypatch.setattr(run._peers, "make", broken)
  w = _tiny_workload()
  names = ["adamw", "kron", "pro"]
  _, _, summary = run.run_workload(
      w, names, {n: {} for n in names}, {}, n_seeds=1, timing_rounds=0,
      failed={"kron": "stalled at lr=0.001 seed=0 step=1"})
  assert list(summary) == names
  assert "best_lr" in summary["adamw"]
  assert summary["kron"] == {"failed": "stalled at lr=0.001 seed=0 step=1"}
  assert summary["pro"] == {"failed": "RuntimeError: pro cannot run here"}
  tab = run.table(w, summary)
  assert "| pro " in tab and "failed: RuntimeError: pro cannot run here" in tab
  assert "failed: stalled at lr=0.001" in tab


def test_shampoo_and_soap_run_by_the_same_protocol():
  from benchmarks import run  # pylint: disable=import-outside-toplevel

  w = _tiny_workload()
  names = ["adamw", "shampoo", "soap"]
  _, _, summary = run.run_workload(w, names, {n: {} for n in names}, {},
                                   n_seeds=1, timing_rounds=0, failed={})
  assert list(summary) == names
  for name in names:
    assert summary[name]["best_lr"] == 1e-3, summary[name]
  assert "| soap " in run.table(w, summary)
