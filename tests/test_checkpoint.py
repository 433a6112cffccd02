"""Tests for hierarchy/checkpoint.py: rule checkpoints written, read and refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hierarchy.baselines import Adam
from hierarchy.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_rule,
    rule_payload,
    save_rule,
)
from hierarchy.experiment import build
from hierarchy.rules import LSTMRule, MLPRule, UpdateRule
from hierarchy.trainer import MetaTrainer


def _updates(rule: UpdateRule, steps: int = 3) -> list[torch.Tensor]:
    """The rule's updates over a few steps of fixed gradients, state carried on."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 7, generator=generator) * 10.0**-k for k in range(steps)]
    state, out = rule.init_state(grads[0]), []
    with torch.no_grad():
        for grad in grads:
            update, state = rule.update(rule.theta, grad, state)
            out.append(update)
    return out


@pytest.mark.parametrize(
    "rule",
    [
        LSTMRule(hidden_size=6, num_layers=1, out_scale=0.05, preprocess_p=5.0),
        MLPRule(hidden_size=5, momenta=(0.5, 0.9)),
    ],
    ids=["lstm", "mlp"],
)
def test_saved_rule_gives_the_same_updates(rule: UpdateRule, tmp_path: Path) -> None:
    """save_rule then load_rule rebuilds the settings and updates bit for bit."""
    path = save_rule(rule, tmp_path / "rule.pt", epoch=7)
    loaded = load_rule(path)
    assert type(loaded) is type(rule) and loaded.config() == rule.config()
    for expected, actual in zip(_updates(rule), _updates(loaded)):
        assert torch.equal(expected, actual)
    assert torch.load(path, weights_only=True)["epoch"] == 7


def test_payload_records_preprocessing_and_output_scale() -> None:
    """The checkpoint carries every setting the rule's updates depend on."""
    payload = rule_payload(LSTMRule(hidden_size=3, out_scale=0.2, preprocess_p=7.0))
    assert payload["format"] == CHECKPOINT_FORMAT and payload["kind"] == "lstm"
    assert payload["rule_config"] == {
        "hidden_size": 3,
        "num_layers": 2,
        "out_scale": 0.2,
        "preprocess_p": 7.0,
    }
    assert payload["theta"].device.type == "cpu" and not payload["theta"].requires_grad


def test_trainer_best_checkpoint_reloads_to_the_trained_rule(tiny_config, tmp_path):
    """best.pt from MetaTrainer has the rule-file layout and loads to its rule."""
    top, _ = build(tiny_config("meta.epochs=2", "meta.val_every=2"))
    trainer = MetaTrainer.from_config(top, tiny_config())
    trainer.run_dir = tmp_path
    trainer.train()
    written = torch.load(trainer.best_path, weights_only=True)
    expected = rule_payload(top.rule, epoch=written["epoch"])
    assert written.keys() == expected.keys()
    assert written["rule_config"] == expected["rule_config"]
    loaded = load_rule(trainer.best_path)
    for expected, actual in zip(_updates(top.rule), _updates(loaded)):
        assert torch.equal(expected, actual)


def _tamper(tmp_path: Path, **changes) -> Path:
    payload = {**rule_payload(LSTMRule(hidden_size=4)), **changes}
    for key in [k for k, v in changes.items() if v is None]:
        del payload[key]
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": CHECKPOINT_FORMAT + 1}, "format 2; this version reads format 1"),
        ({"format": None}, "has format None"),
        ({"kind": "adam"}, r"holds a 'adam' rule; .* \['lstm', 'mlp'\]"),
        ({"kind": "mlp"}, "rule_config builds a 'mlp' rule of 45 weights"),
        ({"theta": torch.zeros(10)}, r"theta of shape \(10,\)"),
        ({"theta": torch.zeros(5, 2)}, r"theta of shape \(5, 2\)"),
        ({"theta": torch.zeros(2, dtype=torch.long)}, "floating-point tensor"),
        ({"theta": [0.0, 1.0]}, "floating-point tensor, got list"),
        ({"rule_config": {"hidden_size": 4, "depth": 3}}, "does not build"),
        ({"rule_config": [4]}, "rule_config is a list"),
        ({"kind": None}, r"lacks the keys \['kind'\]"),
    ],
)
def test_tampered_or_foreign_checkpoints_are_refused(
    tmp_path: Path, changes: dict, message: str
) -> None:
    """Each damaged field is refused with a message naming the file and field."""
    path = _tamper(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message) as error:
        load_rule(path)
    assert str(path) in str(error.value)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    theta = rule_payload(LSTMRule(hidden_size=4))["theta"]
    theta[3] = float("nan")
    with pytest.raises(CheckpointError, match="1 non-finite weights"):
        load_rule(_tamper(tmp_path, theta=theta))


def test_unreadable_and_non_rule_files_are_refused(tmp_path: Path) -> None:
    """Garbage, a pickled object, a plain tensor and a training checkpoint fail."""
    path = tmp_path / "file.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_rule(path)

    torch.save({"format": 1, "kind": "lstm", "hook": Path("x")}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_rule(path)  # weights_only=True refuses arbitrary pickled objects

    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a dict"):
        load_rule(path)

    torch.save({"format": 1, "epoch": 3, "rule": {}}, path)
    with pytest.raises(CheckpointError, match="training checkpoint"):
        load_rule(path)


def test_own_rule_classes_load_when_named(tmp_path: Path) -> None:
    """A hand rule is refused by default and loaded when its class is passed."""
    path = save_rule(Adam(0.02), tmp_path / "adam.pt")
    with pytest.raises(CheckpointError, match="'adam'"):
        load_rule(path)
    loaded = load_rule(path, rules={"adam": Adam})
    assert isinstance(loaded, Adam) and loaded.lr == pytest.approx(0.02)
