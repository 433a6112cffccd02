"""Trained update rules shipped inside the package, loaded by name.

Each rule is a rule checkpoint ``NAME.pt`` with two files beside it:
``NAME.yaml`` says what it is, the command that trained it, the run it came
from and the checkpoint's SHA-256; ``NAME.config.yaml`` is that run's config,
which ``hierarchy evaluate NAME`` evaluates with.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import yaml

from hierarchy.checkpoint import CheckpointError, load_rule
from hierarchy.rules import UpdateRule

__all__ = ["available", "config_path", "info", "load_pretrained"]

METADATA_KEYS = ("name", "description", "rule", "sha256", "config", "command")


def _folder() -> Path:
    return Path(str(resources.files(__package__)))


def available() -> list[str]:
    """Names of the pretrained rules, sorted."""
    return sorted(
        path.name.removesuffix(".yaml")
        for path in _folder().glob("*.yaml")
        if not path.name.endswith(".config.yaml")
    )


def info(name: str) -> dict:
    """The metadata recorded beside pretrained rule ``name``.

    Keys: name, description, rule (file), sha256, config (file), command, and
    where the run that made it keeps its rule, config and results.
    """
    if name not in available():
        raise ValueError(
            f"no pretrained rule named {name!r}; available: {', '.join(available())}"
        )
    metadata = yaml.safe_load((_folder() / f"{name}.yaml").read_text())
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise CheckpointError(f"pretrained rule {name!r}: its metadata lacks {missing}")
    return metadata


def config_path(name: str) -> Path:
    """The config of the run that trained pretrained rule ``name``."""
    return _folder() / info(name)["config"]


def load_pretrained(name: str) -> UpdateRule:
    """Pretrained rule ``name``, checked against the SHA-256 recorded beside it."""
    metadata = info(name)
    path = _folder() / metadata["rule"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != metadata["sha256"]:
        raise CheckpointError(
            f"pretrained rule file {path} has SHA-256 {digest}, not the "
            f"{metadata['sha256']} recorded in {name}.yaml; reinstall the package"
        )
    return load_rule(path)
