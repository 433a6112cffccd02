"""Tests for hierarchy/pretrained: the rules shipped in the package."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import hierarchy.pretrained as pretrained
from hierarchy.checkpoint import CheckpointError
from hierarchy.config import load_config
from hierarchy.optim import LearnedOptimizer

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["lstm-mnist", "lstm-quadratic"]


def test_available_lists_the_shipped_rules() -> None:
    assert pretrained.available() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_shipped_rule_is_the_run_it_records(name: str) -> None:
    """The file is the recorded run's rule, its hash matches, its config fits it."""
    metadata = pretrained.info(name)
    shipped = Path(pretrained.__file__).parent / metadata["rule"]
    source = ROOT / metadata["source"]["rule"]
    assert shipped.read_bytes() == source.read_bytes()
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == metadata["sha256"]
    assert (ROOT / metadata["source"]["results"]).is_file()

    rule = pretrained.load_pretrained(name)
    config = load_config(pretrained.config_path(name))
    recorded = config.levels[-1].rule
    assert rule.kind == recorded.kind
    for key, value in rule.config().items():
        assert getattr(recorded, key) == value
    assert name.split("-")[1] == config.task.name


def test_unknown_name_is_refused_with_the_names() -> None:
    with pytest.raises(ValueError, match="'lstm-cifar'; available: lstm-mnist, lstm"):
        pretrained.load_pretrained("lstm-cifar")
    with pytest.raises(ValueError, match="available: lstm-mnist"):
        LearnedOptimizer.from_pretrained("lstm-cifar", [torch.zeros(1)])


def test_a_damaged_shipped_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A rule file that no longer matches its recorded SHA-256 is not loaded."""
    folder = Path(pretrained.__file__).parent
    for path in folder.glob("lstm-mnist*"):
        shutil.copy(path, tmp_path / path.name)
    data = bytearray((tmp_path / "lstm-mnist.pt").read_bytes())
    data[-100] ^= 1
    (tmp_path / "lstm-mnist.pt").write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "_folder", lambda: tmp_path)
    with pytest.raises(CheckpointError, match="SHA-256 .* reinstall"):
        pretrained.load_pretrained("lstm-mnist")


def test_from_pretrained_takes_group_defaults() -> None:
    """from_pretrained needs no training and passes its keywords on as defaults."""
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = LearnedOptimizer.from_pretrained("lstm-mnist", params, scale=0.5)
    assert optimizer.param_groups[0]["scale"] == 0.5
    assert torch.equal(
        optimizer.rule.theta, pretrained.load_pretrained("lstm-mnist").theta
    )
