"""Shared helpers: tiny MNIST files in torchvision's layout and tiny configs."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from hierarchy.config import Config, load_config

# The tensors here are tiny; with several threads on a busy machine torch's
# thread pool spends far longer synchronising than computing (a 16x10
# cross-entropy took ~7 ms on 2 threads beside another job, ~5 us on one).
torch.set_num_threads(1)

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_idx_root(
    root: Path, n_train: int = 40, n_test: int = 12, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write random tiny MNIST IDX files under root/MNIST/raw; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for key, array in arrays.items():
        magic = 2051 if array.ndim == 3 else 2049
        header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
        (raw / IDX_NAMES[key]).write_bytes(header + array.tobytes())
    return arrays


@pytest.fixture
def idx_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A temporary data root holding tiny MNIST IDX files, and their arrays."""
    root = tmp_path / "data"
    return root, write_idx_root(root)


TINY_QUADRATIC = [
    "name=tiny",
    "device=cpu",
    "wandb.mode=disabled",
    "log_level=WARNING",
    "task.name=quadratic",
    "task.dim=3",
    "levels.0.rule.kind=lstm",
    "levels.0.rule.hidden_size=4",
    "levels.0.rule.num_layers=1",
    "levels.0.horizon=10",
    "meta.epochs=3",
    "meta.meta_batch=4",
    "meta.truncation=5",
    "meta.val_every=2",
    "meta.val_tasks=4",
    "eval.tasks=4",
    "eval.horizons=[10]",
    "eval.report_steps=[5,10]",
    "eval.tune_tasks=4",
    "eval.lr_grid=[0.01,0.1]",
]


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """key=value overrides for a tiny CPU quadratic run in tmp_path/run."""
    return [*TINY_QUADRATIC, f"run_dir={tmp_path / 'run'}"]


@pytest.fixture
def tiny_config(tiny_overrides: list[str]) -> Callable[..., Config]:
    """Factory: the tiny quadratic config, plus any further overrides."""

    def make(*overrides: str) -> Config:
        return load_config(None, [*tiny_overrides, *overrides])

    return make


def assert_rows_match(problem, rows: slice, steps=(0, 3)) -> None:
    """``problem.select(rows)`` starts where those rows do and has their losses."""
    chosen = problem.select(rows)
    whole_init = problem.init()
    torch.testing.assert_close(chosen.init(), whole_init[rows])

    generator = torch.Generator().manual_seed(0)
    params = whole_init + 0.1 * torch.randn(whole_init.shape, generator=generator)
    for step in steps:
        torch.testing.assert_close(
            chosen.loss(params[rows], step), problem.loss(params, step)[rows]
        )
