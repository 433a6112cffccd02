"""Rule checkpoints: a trained update rule as a small file of tensors and settings.

A rule checkpoint (``best.pt`` of a run, ``rule.pt``, a pretrained rule) is a dict
of the format version, the rule's kind, its constructor arguments (layer sizes,
gradient preprocessing ``preprocess_p``, output scale ``out_scale``) and its flat
weights ``theta``. It is read with ``torch.load(weights_only=True)``, so loading
one runs no pickled code, and every field is checked before a rule is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from hierarchy.rules import RULES, UpdateRule

# The format version, the error and the atomic write are shared with the
# training checkpoints of trainer.py, where they are defined.
from hierarchy.trainer import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    read_checkpoint,
    save_atomic,
)

logger = logging.getLogger(__name__)

RULE_KEYS = ("format", "kind", "rule_config", "theta")


def rule_payload(rule: UpdateRule, epoch: int | None = None) -> dict:
    """The rule alone: format, kind, constructor arguments and weights (on the CPU).

    ``MetaTrainer.rule_payload`` writes the same layout for ``best.pt``; a test
    keeps the two equal.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "kind": rule.kind,
        "rule_config": rule.config(),
        "theta": rule.theta.detach().cpu().clone(),
    }
    if epoch is not None:
        payload["epoch"] = epoch
    return payload


def save_rule(rule: UpdateRule, path: str | Path, epoch: int | None = None) -> Path:
    """Write ``rule`` as a rule checkpoint that ``load_rule`` reads back exactly."""
    path = Path(path)
    save_atomic(rule_payload(rule, epoch), path)
    logger.debug("rule %s written to %s", rule.kind, path)
    return path


def load_rule(
    path: str | Path, rules: Mapping[str, type[UpdateRule]] | None = None
) -> UpdateRule:
    """Rebuild a trained rule from a rule checkpoint (``best.pt``, ``rule.pt``).

    Args:
        path: the checkpoint file.
        rules: the rule classes by kind that may be built; the learned rules of
            ``hierarchy.rules.RULES`` by default. Pass your own to load a rule
            class you wrote (its ``kind`` as key).

    Raises ``CheckpointError`` naming the file and the field when the file is not
    a rule checkpoint of this format, holds another kind of rule, or its weights
    do not fit the configuration it records.
    """
    path = Path(path)
    rules = RULES if rules is None else rules
    payload = read_checkpoint(path, "rule checkpoint")
    check_rule_payload(payload, str(path), rules)

    try:
        rule = rules[payload["kind"]](**payload["rule_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"rule checkpoint {path}: its rule_config {payload['rule_config']!r} "
            f"does not build a {payload['kind']!r} rule ({error})"
        ) from None
    theta = payload["theta"]
    if theta.shape != rule.theta.shape:
        raise CheckpointError(
            f"rule checkpoint {path} has theta of shape {tuple(theta.shape)}; its "
            f"rule_config builds a {payload['kind']!r} rule of {rule.num_params} "
            f"weights"
        )
    with torch.no_grad():
        rule.theta.copy_(theta)
    return rule


def check_rule_payload(
    payload: object, source: str, rules: Mapping[str, type[UpdateRule]]
) -> None:
    """Refuse a payload that is not a rule checkpoint this version can build."""
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"rule checkpoint {source} holds a {type(payload).__name__}, not a "
            f"dict with keys {list(RULE_KEYS)}"
        )
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"rule checkpoint {source} has format {payload.get('format')!r}; this "
            f"version reads format {CHECKPOINT_FORMAT}"
        )
    if "rule" in payload and "kind" not in payload:
        raise CheckpointError(
            f"{source} is a training checkpoint (checkpoint.pt); load the rule "
            f"file best.pt beside it"
        )
    missing = [key for key in RULE_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"rule checkpoint {source} lacks the keys {missing}")
    if payload["kind"] not in rules:
        raise CheckpointError(
            f"rule checkpoint {source} holds a {payload['kind']!r} rule; the rules "
            f"that can be loaded are {sorted(rules)}"
        )
    if not isinstance(payload["rule_config"], dict):
        raise CheckpointError(
            f"rule checkpoint {source}: rule_config is a "
            f"{type(payload['rule_config']).__name__}, not a dict of settings"
        )
    theta = payload["theta"]
    if not isinstance(theta, torch.Tensor) or not theta.is_floating_point():
        raise CheckpointError(
            f"rule checkpoint {source}: theta must be a floating-point tensor, "
            f"got {type(theta).__name__}"
            + (f" of {theta.dtype}" if isinstance(theta, torch.Tensor) else "")
        )
    if not torch.isfinite(theta).all():
        bad = int((~torch.isfinite(theta)).sum())
        raise CheckpointError(
            f"rule checkpoint {source}: theta holds {bad} non-finite weights"
        )
