"""Typed experiment configuration, loaded from YAML with command-line overrides.

A config file is merged onto the dataclasses below, so every key has a type and
a default; ``key=value`` overrides from the command line are merged last. An
unknown key or a value of the wrong type raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import BooleanNode, Container, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASKS = ("quadratic", "mnist")
DATA_SOURCES = ("auto", "torchvision", "embedded")


class ConfigError(ValueError):
    """A configuration value that the framework cannot accept."""


@dataclass
class RuleConfig:
    """An update rule: ``lstm`` or ``mlp`` (learned) or a baseline's name."""

    kind: str = "lstm"
    hidden_size: int = 20
    num_layers: int = 2
    out_scale: float = 0.1
    preprocess_p: float = 10.0
    momenta: list[float] = field(default_factory=lambda: [0.9])
    lr: float = 1e-3
    compile: bool = False
    """Run the rule through torch.compile; it runs eagerly if it cannot compile."""
    checkpoint: bool = False
    """Recompute the rule's activations in backward (less memory, more time)."""


@dataclass
class LevelConfig:
    """One level: its rule, and how it unrolls the level below.

    ``meta_batch`` is the number of problems of the level below that each
    evaluation of this level's loss averages when a learned level above trains
    it; the top level's meta-batch is ``meta.meta_batch``.
    """

    rule: RuleConfig = field(default_factory=RuleConfig)
    horizon: int = 100
    mode: str = "first_order"
    meta_batch: int = 1


@dataclass
class TaskConfig:
    """The optimisee at level 0."""

    name: str = "quadratic"
    dim: int = 10
    hidden: list[int] = field(default_factory=lambda: [20])
    activation: str = "sigmoid"
    batch_size: int = 128
    data_root: Optional[str] = None
    data_source: str = "auto"


@dataclass
class MetaConfig:
    """Training of the top level by a hand-designed torch.optim optimiser."""

    optimizer: str = "adam"
    lr: float = 0.003
    epochs: int = 100
    meta_batch: int = 32
    """Problems per meta-update, across all processes together: under torchrun
    each of N processes unrolls meta_batch / N of them, so the meta-gradient is
    the one a single process would take. A multiple of N."""
    truncation: int = 20
    grad_clip: Optional[float] = None
    max_bad_updates: int = 5
    """Stop after this many non-finite meta-updates in a row (each is skipped)."""
    log_grad_norms: bool = False
    """Log the meta-gradient norm and the gradient norm each level's rule sees."""
    check_gradient: bool = False
    """Before training, compare the meta-gradient with finite differences."""
    checkpoint_steps: Optional[int] = None
    """Keep the graph of this many steps at a time within a truncation segment,
    rebuilding each in backward (less memory, about one more forward pass)."""
    val_every: int = 10
    val_tasks: int = 64


@dataclass
class VariationConfig:
    """A task evaluated with the learned rule as trained, under another name."""

    name: str = "variation"
    task: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Held-out comparison against tuned baselines."""

    tasks: int = 256
    horizons: list[int] = field(default_factory=lambda: [100])
    report_steps: list[int] = field(default_factory=lambda: [10, 50, 100])
    baselines: list[str] = field(
        default_factory=lambda: ["sgd", "nag", "rmsprop", "adam"]
    )
    lr_grid: list[float] = field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    )
    tune_tasks: int = 64
    variations: list[VariationConfig] = field(default_factory=list)
    copies: int = 4
    """Stacks of three levels or more: copies of the first level's rule trained
    by the levels above for evaluation."""
    two_level: bool = True
    """Stacks of three levels or more: also meta-train the first level's rule and
    the top rule directly on the optimisee, with the same optimisee steps."""
    two_level_meta_batch: int = 256
    """Problems per meta-update of those two-level runs."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "hierarchy"


@dataclass
class Config:
    """A whole experiment: levels[0] trains the optimisee, levels[-1] is the top."""

    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/${name}"
    resume: bool = False
    log_level: str = "INFO"
    threads: Optional[int] = None
    """CPU threads for torch; null keeps torch's default (all cores)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    levels: list[LevelConfig] = field(default_factory=lambda: [LevelConfig()])
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


SECTIONS = {
    section.__name__: section
    for section in (
        RuleConfig,
        LevelConfig,
        TaskConfig,
        MetaConfig,
        VariationConfig,
        EvalConfig,
        WandbConfig,
        Config,
    )
}
"""The config's dataclasses by name, to list a section's keys in errors."""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Merge a YAML file and ``key=value`` overrides onto the typed defaults."""
    config = None
    try:
        config = OmegaConf.structured(Config)
        if path is not None:
            path = Path(path)
            if path.is_dir():
                raise ConfigError(
                    f"config file {str(path)!r} is a folder; give a YAML file"
                )
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            try:
                loaded = OmegaConf.load(path)
            except UnicodeDecodeError:
                raise ConfigError(
                    f"config file {str(path)!r} is not UTF-8 text; give a YAML file"
                ) from None
            except yaml.YAMLError as error:
                message = str(error).replace("\n", " ")
                raise ConfigError(
                    f"config file {str(path)!r} is not valid YAML: {message}"
                ) from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(
                    f"config file {str(path)!r} must hold a mapping of "
                    f"keys at its top level, not a list or a value"
                )
            _drop_retired(loaded, path)
            _check_values(config, loaded, "")
            config = OmegaConf.merge(config, loaded)
        for override in overrides:
            _apply(config, override)
        resolved = OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        # omegaconf does not say which interpolation failed to resolve.
        failed = _failed_interpolation(config) if config is not None else None
        raise ConfigError(_describe(*(failed or (error,)))) from None

    assert isinstance(resolved, Config)
    validate(resolved)
    return resolved


# Keys that earlier versions wrote into run folders, with the one value that
# behaves as the current version does; older run folders stay loadable.
RETIRED_KEYS = {"dtype": "float32"}


def _drop_retired(loaded: DictConfig, path: Path) -> None:
    """Drop retired top-level keys that hold their current behaviour; refuse
    others, since the run they describe cannot be repeated as written."""
    for key, current in RETIRED_KEYS.items():
        if key not in loaded:
            continue
        if loaded[key] != current:
            raise ConfigError(
                f"config key {key!r} = {loaded[key]!r} in {str(path)!r} was retired: "
                f"this version always runs as {key}={current}; remove the key"
            )
        del loaded[key]


def _apply(config: DictConfig, override: str) -> None:
    """Set one ``key=value`` override; list items are addressed as levels.0.mode."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"override {override!r} is not of the form key=value "
            f"(for example meta.epochs=50)"
        )
    negative = [part for part in key.split(".") if re.fullmatch(r"-\d+", part)]
    if negative:
        raise ConfigError(
            f"override {override!r}: list items are addressed by their index from "
            f"0 (as in levels.0.mode), not {negative[0]}"
        )
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        raise ConfigError(
            f"override {override!r}: the value {raw!r} is not valid YAML; quote "
            f"strings that hold YAML syntax, e.g. key='[a'"
        ) from None
    # Unknown keys (of sections; an open mapping such as a variation's task takes
    # new ones), kinds and bools, named by their full key.
    _check_values(config, _nested(key, value), "", by_index=key.count(".") + 1)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    in_list = isinstance(node, ListConfig) and leaf.isdigit() and int(leaf) < len(node)
    if not (isinstance(node, DictConfig) or in_list):
        raise ConfigError(
            f"config key {key!r} does not exist; see the config's "
            f"defaults in hierarchy/config.py for the accepted keys"
        )
    try:
        OmegaConf.update(config, key, value, merge=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config key {key!r}: {_first_line(error)}") from None


def _nested(key: str, value: object) -> DictConfig:
    """``{a: {b: value}}`` for the key ``a.b``: an override as a file would hold it."""
    for part in reversed(key.split(".")):
        value = {int(part) if part.isdigit() else part: value}
    return OmegaConf.create(value, flags={"allow_objects": True})


def _check_values(
    template: DictConfig | ListConfig,
    source: object,
    prefix: str,
    by_index: int = 0,
) -> None:
    """Check a file's or an override's values against the typed defaults, naming
    each by its full key: a mapping, a list or a single value where the config
    takes one; true or false where it takes a bool (omegaconf reads 2 as true);
    and only the keys a section has. omegaconf's own errors for these come from
    deep inside a merge, as a TypeError or with the key's path cut short.
    ``by_index``: the number of levels, from this one down, that are an
    override's key path, where a mapping of indices ({levels: {0: ...}} for
    levels.0...) stands for items of a list; below them, as in a file, a
    mapping where a list belongs is refused."""
    if isinstance(template, ListConfig):
        # Items are checked against the list's item type: a file's list replaces
        # the default one, and an override addresses an item as levels.0.
        element = template._metadata.element_type
        if isinstance(source, ListConfig):
            items = list(enumerate(source))
        elif isinstance(source, DictConfig) and by_index:
            items = [(index, source[index]) for index in source]
            if not all(isinstance(index, int) for index, _ in items):
                return  # the caller reports a mapping where a list belongs
        else:
            return
        if dataclasses.is_dataclass(element):
            for index, item in items:
                if not isinstance(item, DictConfig):
                    shown = "null" if item is None else _shown(item)
                    raise ConfigError(
                        f"config key {f'{prefix}{index}'!r} = {shown}: expected a "
                        f"mapping"
                    )
                _check_values(
                    OmegaConf.structured(element),
                    item,
                    f"{prefix}{index}.",
                    max(by_index - 1, 0),
                )
        return
    if not isinstance(source, DictConfig):
        return
    section = template._metadata.object_type
    for key in source:
        full = f"{prefix}{key}"
        if key not in template:
            if dataclasses.is_dataclass(section):
                names = [entry.name for entry in dataclasses.fields(section)]
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                where = f"{prefix.rstrip('.')} section" if prefix else "top level"
                raise ConfigError(
                    f"config key {full!r} does not exist{hint}; the {where} "
                    f"accepts {', '.join(names)}"
                )
            continue
        node, value = template._get_node(key), source._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)):
            kind = "a mapping" if isinstance(node, DictConfig) else "a list"
        else:
            kind = "a value"
        if value._is_none() and not node._is_optional():
            raise ConfigError(f"config key {full!r} = null: expected {kind}")
        if value._is_none() or value._is_interpolation():
            continue
        if isinstance(node, (DictConfig, ListConfig)):
            indexed = (
                by_index > 1
                and isinstance(node, ListConfig)
                and isinstance(value, DictConfig)
                and all(isinstance(index, int) for index in value)
            )
            if not isinstance(value, type(node)) and not indexed:
                shown = value if isinstance(value, Container) else value._value()
                raise ConfigError(
                    f"config key {full!r} = {_shown(shown)}: expected {kind}"
                )
            _check_values(node, value, f"{full}.", max(by_index - 1, 0))
        elif isinstance(value, (DictConfig, ListConfig)):
            raise ConfigError(
                f"config key {full!r} = {_shown(value)}: expected a single value, "
                f"not a mapping or a list"
            )
        elif isinstance(node, BooleanNode):
            raw = value._value()
            words = ("true", "false", "yes", "no", "on", "off", "y", "n")
            if isinstance(raw, str):
                wrong = raw.strip().lower() not in words
            else:
                wrong = isinstance(raw, (int, float)) and not isinstance(raw, bool)
            if wrong:
                raise ConfigError(
                    f"config key {full!r} = {raw!r}: expected true or false"
                )


def _shown(value: object) -> str:
    """A value as the error messages quote it: containers as plain Python."""
    if isinstance(value, Container):
        value = OmegaConf.to_container(value)
    return repr(value)


def _failed_interpolation(
    node: DictConfig | ListConfig, prefix: str = ""
) -> tuple[OmegaConfBaseException, str] | None:
    """The first interpolation under ``node`` that does not resolve to a value
    its key accepts, with its error and full key."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        full = f"{prefix}{key}"
        if OmegaConf.is_interpolation(node, key):
            try:
                node[key]
            except OmegaConfBaseException as error:
                return error, full
            continue
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            failed = _failed_interpolation(child, f"{full}.")
            if failed:
                return failed
    return None


def _describe(error: OmegaConfBaseException, key: str | None = None) -> str:
    """One line naming the offending key, from omegaconf's richer message."""
    key = key or getattr(error, "full_key", None)
    message = _first_line(error)
    return f"config key {key!r}: {message}" if key else f"config: {message}"


def _first_line(error: OmegaConfBaseException) -> str:
    """omegaconf's first line, plus the keys accepted where it names an unknown
    one ("Key 'x' not in 'RuleConfig'")."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    unknown = re.search(r"not in '(\w+Config)'", message)
    section = SECTIONS.get(unknown.group(1)) if unknown else None
    if section is not None:
        names = ", ".join(entry.name for entry in dataclasses.fields(section))
        joint = " It" if message.endswith(("?", ".")) else "; it"
        message += f"{joint} accepts {names}"
    return message


def validate(config: Config) -> None:
    """Check values that a type alone cannot, naming the key and what is accepted."""
    from hierarchy.baselines import BASELINES
    from hierarchy.distributed import world_size_from_env
    from hierarchy.rules import RULES
    from hierarchy.trainer import COUNTS, OPTIMIZERS
    from hierarchy.unroll import MODES

    def fail(key: str, value: object, accepted: str) -> None:
        raise ConfigError(f"config key {key!r} = {value!r}: expected {accepted}")

    _check_list_items(config, "", fail)
    if not config.levels:
        fail("levels", [], "a list of at least one level")
    for k, level in enumerate(config.levels):
        if level.rule.kind not in RULES and level.rule.kind not in BASELINES:
            fail(
                f"levels.{k}.rule.kind",
                level.rule.kind,
                f"one of {sorted(RULES) + sorted(BASELINES)}",
            )
        _check_rule_keys(level.rule, f"levels.{k}.rule", fail)
        if level.mode not in MODES:
            fail(f"levels.{k}.mode", level.mode, f"one of {list(MODES)}")
        if level.horizon < 1:
            fail(f"levels.{k}.horizon", level.horizon, "a positive integer")
        if level.meta_batch < 1:
            fail(f"levels.{k}.meta_batch", level.meta_batch, "a positive integer")
        for key in ("hidden_size", "num_layers"):
            if getattr(level.rule, key) < 1:
                fail(
                    f"levels.{k}.rule.{key}",
                    getattr(level.rule, key),
                    "a positive integer",
                )
        for key in ("out_scale", "preprocess_p", "lr"):
            if not _positive(getattr(level.rule, key)):
                fail(
                    f"levels.{k}.rule.{key}",
                    getattr(level.rule, key),
                    "a positive finite number",
                )

    meta, top = config.meta, config.levels[-1]
    if top.meta_batch != 1:
        fail(
            f"levels.{len(config.levels) - 1}.meta_batch",
            top.meta_batch,
            "1 at the top level, whose meta-batch is set by meta.meta_batch",
        )
    if not 1 <= meta.truncation <= top.horizon:
        fail(
            "meta.truncation",
            meta.truncation,
            f"an integer from 1 to the top level's horizon ({top.horizon})",
        )
    for key in COUNTS:
        if getattr(meta, key) < 1:
            fail(f"meta.{key}", getattr(meta, key), "a positive integer")
    world_size = world_size_from_env()
    if meta.meta_batch % world_size:
        fail(
            "meta.meta_batch",
            meta.meta_batch,
            f"a multiple of the number of processes ({world_size}), each of which "
            f"unrolls an equal share",
        )
    if len(config.levels) > 1 and config.eval.two_level:
        if config.eval.two_level_meta_batch % world_size:
            fail(
                "eval.two_level_meta_batch",
                config.eval.two_level_meta_batch,
                f"a multiple of the number of processes ({world_size})",
            )
    if not _positive(meta.lr):
        fail("meta.lr", meta.lr, "a positive finite number")
    if meta.checkpoint_steps is not None and meta.checkpoint_steps < 1:
        fail(
            "meta.checkpoint_steps",
            meta.checkpoint_steps,
            "a positive number of steps, or null to keep whole segments",
        )
    if meta.grad_clip is not None and not _positive(meta.grad_clip):
        fail("meta.grad_clip", meta.grad_clip, "a positive norm, or null for none")
    if meta.optimizer not in OPTIMIZERS:
        fail("meta.optimizer", meta.optimizer, f"one of {sorted(OPTIMIZERS)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.device):
        fail("device", config.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    if config.threads is not None and config.threads < 1:
        fail("threads", config.threads, "a positive integer, or null for all cores")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail("log_level", config.log_level, "'DEBUG', 'INFO', 'WARNING' or 'ERROR'")
    if config.wandb.mode not in ("offline", "disabled", "online"):
        fail("wandb.mode", config.wandb.mode, "'offline', 'disabled' or 'online'")
    _validate_task(config.task, "task", fail)
    for k, variation in enumerate(config.eval.variations):
        _validate_task(
            task_with_overrides(
                config.task, variation.task, f"eval.variations.{k}.task"
            ),
            f"eval.variations.{k}.task",
            fail,
        )
    names = ["default"] + [variation.name for variation in config.eval.variations]
    for name in names:
        if names.count(name) > 1:
            fail("eval.variations", name, "names unique and other than 'default'")
    _validate_eval(config.eval, fail)


# The rule keys each kind reads; a key that another kind reads, set away from its
# default, would be ignored, so it is refused instead.
_NETWORK_KEYS = ("hidden_size", "num_layers", "out_scale", "preprocess_p")
_RULE_KEYS = {"lstm": _NETWORK_KEYS, "mlp": (*_NETWORK_KEYS, "momenta")}
_BASELINE_KEYS = ("lr",)


def _check_rule_keys(rule: RuleConfig, prefix: str, fail: Callable) -> None:
    """Refuse a rule key set for a kind of rule that does not read it."""
    reads = _RULE_KEYS.get(rule.kind, _BASELINE_KEYS)
    default = RuleConfig()
    for key in sorted({*_RULE_KEYS["mlp"], *_BASELINE_KEYS} - set(reads)):
        if getattr(rule, key) != getattr(default, key):
            kinds = [kind for kind, keys in _RULE_KEYS.items() if key in keys]
            fail(
                f"{prefix}.{key}",
                getattr(rule, key),
                f"its default {getattr(default, key)!r}: rules of kind {rule.kind!r} "
                f"do not read it (it is for {' and '.join(kinds) or 'the baselines'})",
            )


def _check_list_items(node: object, prefix: str, fail) -> None:
    """Every item of a typed list is of the list's type: an override can slip a
    nested list or mapping past omegaconf into a list of numbers or names."""
    hints = typing.get_type_hints(type(node))
    for entry in dataclasses.fields(node):
        key, hint = prefix + entry.name, hints[entry.name]
        value = getattr(node, entry.name)
        if dataclasses.is_dataclass(value):
            _check_list_items(value, key + ".", fail)
        elif typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            for k, element in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_list_items(element, f"{key}.{k}.", fail)
                elif not _is_a(element, item):
                    fail(key, value, f"a list of {item.__name__} values")


def _is_a(value: object, kind: type) -> bool:
    """``value`` is of ``kind``, an int counting as a float but a bool as neither."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _positive(value: float) -> bool:
    """A positive, finite number (nan and inf are refused)."""
    return value > 0 and math.isfinite(value)


def _validate_task(task: TaskConfig, prefix: str, fail) -> None:
    from tasks.mnist import ACTIVATIONS

    if task.name not in TASKS:
        fail(f"{prefix}.name", task.name, f"one of {list(TASKS)}")
    if task.dim < 1:
        fail(f"{prefix}.dim", task.dim, "a positive integer")
    if task.batch_size < 1:
        fail(f"{prefix}.batch_size", task.batch_size, "a positive integer")
    if any(size < 1 for size in task.hidden):
        fail(
            f"{prefix}.hidden",
            task.hidden,
            "a list of positive layer sizes ([] for a linear classifier)",
        )
    if task.activation not in ACTIVATIONS:
        fail(f"{prefix}.activation", task.activation, f"one of {sorted(ACTIVATIONS)}")
    if task.data_source not in DATA_SOURCES:
        fail(f"{prefix}.data_source", task.data_source, f"one of {list(DATA_SOURCES)}")


def _validate_eval(evaluation: EvalConfig, fail) -> None:
    from hierarchy.baselines import BASELINES

    if not evaluation.horizons or min(evaluation.horizons) < 1:
        fail("eval.horizons", evaluation.horizons, "a non-empty list of positive steps")
    for name in evaluation.baselines:
        if name not in BASELINES:
            fail("eval.baselines", name, f"names from {sorted(BASELINES)}")
    if not evaluation.lr_grid or not all(map(_positive, evaluation.lr_grid)):
        fail("eval.lr_grid", evaluation.lr_grid, "a non-empty list of positive rates")
    for key in ("tasks", "tune_tasks", "copies", "two_level_meta_batch"):
        if getattr(evaluation, key) < 1:
            fail(f"eval.{key}", getattr(evaluation, key), "a positive integer")
    longest = max(evaluation.horizons)
    for step in evaluation.report_steps:
        if not 0 <= step <= longest:
            fail(
                "eval.report_steps",
                step,
                f"steps from 0 to the longest horizon {longest}",
            )


def task_with_overrides(base: TaskConfig, changes: dict, key: str) -> TaskConfig:
    """``base`` with a variation's overrides, which must name TaskConfig keys."""
    template = OmegaConf.structured(base)
    _check_values(template, OmegaConf.create(changes), f"{key}.")
    try:
        merged = OmegaConf.merge(template, changes)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config key {key!r}: {_first_line(error)}") from None
    return OmegaConf.to_object(merged)
