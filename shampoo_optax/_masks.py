# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Masks for the ``precondition`` option: which parameters get matrices.

Records of the modded-nanogpt optimizer track and Muon's own recipe keep
matrices for the hidden weights only: embeddings, the output head, norms and
biases train with Adam. Norms are vectors, which never get matrices;
`hidden_matrices` excludes embeddings, heads and biases by name.
"""

import re

import jax

# Path components that name an embedding, an output head or a bias in common
# Flax, Haiku and GPT-2-style code: "embedding", "token_embed", "wte", "wpe",
# "head", "lm_head", "logits", "unembed", "bias" (Flax's attention biases are
# [heads, head_dim] matrices); not "heads" or "out".
EMBEDDINGS_AND_HEADS = r"embed|^wte$|^wpe$|(^|_)head$|^logits$|^bias$"


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def hidden_matrices(exclude: str = EMBEDDINGS_AND_HEADS):
  """A ``precondition`` mask: matrices for all but embeddings, heads, biases.

  Use as ``shampoo(lr, precondition=hidden_matrices())`` (or with `soap`):
  the leaves any of whose path components matches ``exclude`` (a regular
  expression, case-insensitive) get the diagonal optimizer (Shampoo's
  grafted one, SOAP's Adam); the others get matrices where their shape
  allows (vectors never do).

  Args:
    exclude: regular expression for the path components (dict keys,
      attribute names, sequence indices) of excluded leaves.

  Returns:
    A callable of the params returning a pytree of bools.
  """
  pattern = re.compile(exclude, re.IGNORECASE)

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(pattern.search(_key_name(k)) for k in path),
        params)

  return mask
