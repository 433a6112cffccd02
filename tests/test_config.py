"""Tests for hierarchy.config: typed loading, overrides, errors naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hierarchy.config import Config, ConfigError, load_config
from hierarchy.experiment import build_task

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.mark.parametrize(
    "override, key",
    [
        ("meta.epochz=3", "meta.epochz"),
        ("meta.epochs=abc", "meta.epochs"),
        ("levels.0.mode=second", "levels.0.mode"),
        ("meta.truncation=101", "meta.truncation"),
        ("levels=[]", "levels"),
        ("levels.0.rule.kind=transformer", "levels.0.rule.kind"),
        ("levels.1.mode=higher", "levels.1.mode"),
        ("levels.0.horizon=0", "levels.0.horizon"),
        ("task.dim=1.5", "task.dim"),
        ("meta.lr=-0.1", "meta.lr"),
        ("meta.meta_batch=0", "meta.meta_batch"),
        ("dtype=float16", "dtype"),
        ("device=tpu", "device"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("eval.report_steps=[500]", "eval.report_steps"),
    ],
)
def test_bad_override_names_key(override: str, key: str) -> None:
    """Each bad value raises ConfigError whose message quotes the offending key."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.horizons=[]", "eval.horizons"),
        ("eval.baselines=[foo]", "eval.baselines"),
        ("eval.lr_grid=[]", "eval.lr_grid"),
        ("eval.lr_grid=[0.0]", "eval.lr_grid"),
        ("meta.optimizer=lbfgs", "meta.optimizer"),
        ("task.activation=swish", "task.activation"),
        ("task.dim=0", "task.dim"),
        ("task.data_source=web", "task.data_source"),
        ("eval.tune_tasks=0", "eval.tune_tasks"),
        ("device=cudafoo", "device"),
        ("levels.0.rule.hidden_size=0", "levels.0.rule.hidden_size"),
        ("levels.0.rule.num_layers=0", "levels.0.rule.num_layers"),
        ("meta.lr=.nan", "meta.lr"),
        ("meta.grad_clip=-1", "meta.grad_clip"),
        ("eval.lr_grid=[.nan]", "eval.lr_grid"),
        ("log_level=LOUD", "log_level"),
        ("eval.variations=[{name: default, task: {}}]", "eval.variations"),
        ("levels.0.rule.momenta=[0.5]", "levels.0.rule.momenta"),
        ("levels.0.rule.lr=0.1", "levels.0.rule.lr"),
        # omegaconf lets nested lists and mappings into typed lists
        ("eval.lr_grid=[{rule: {kind: mlp}, horizon: 3}]", "eval.lr_grid"),
        ("eval.baselines=[[sgd]]", "eval.baselines"),
        ("eval.horizons=[{a: 1}]", "eval.horizons"),
        ("eval.report_steps=[[10]]", "eval.report_steps"),
        ("task.hidden=[{a: 1}]", "task.hidden"),
        ("task.hidden=[20,0]", "task.hidden"),
        ("task.hidden={0: 40}", "task.hidden"),
        # an interpolation that resolves to a value the key does not take
        ("task.hidden=${task.batch_size}", "task.hidden"),
        ("levels.0.horizon=${nothere}", "levels.0.horizon"),
        ("task.hidden.-1=40", "task.hidden.-1=40"),
        ("task={hidden: {0: 40}}", "task.hidden"),
        ("task.hidden=null", "task.hidden"),
        ("levels.0=[]", "levels.0"),
        ("levels.0=null", "levels.0"),
        (
            "eval.variations=[{name: x, task: {hidden: {0: 4}}}]",
            "eval.variations.0.task.hidden",
        ),
        (
            "eval.variations=[{name: x, task: {hidden: 20}}]",
            "eval.variations.0.task.hidden",
        ),
        ("eval.horizons={}", "eval.horizons"),
        ("levels.0.rule.momenta=[[0.9]]", "levels.0.rule.momenta"),
    ],
)
def test_unvalidated_keys_name_key(override: str, key: str) -> None:
    """Values a type alone cannot reject raise ConfigError naming their key."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"'{key}'" in str(info.value)


def test_truncation_checked_against_overridden_horizon() -> None:
    """truncation is compared with the top level's horizon after all overrides."""
    config = load_config(None, ["levels.0.horizon=10", "meta.truncation=10"])
    assert config.meta.truncation == 10
    with pytest.raises(ConfigError, match="'meta.truncation'.*10"):
        load_config(None, ["levels.0.horizon=10", "meta.truncation=11"])


def test_truncation_checked_against_top_level() -> None:
    """With several levels the truncation is bounded by the top level's horizon."""
    levels = "levels=[{horizon: 50}, {horizon: 5, rule: {kind: mlp}}]"
    config = load_config(None, [levels, "meta.truncation=5"])
    assert [level.horizon for level in config.levels] == [50, 5]
    assert config.levels[1].rule.kind == "mlp" and config.levels[0].rule.kind == "lstm"
    with pytest.raises(ConfigError, match="'meta.truncation'"):
        load_config(None, [levels, "meta.truncation=10"])


def test_malformed_override_is_refused() -> None:
    """An override without '=' is a ConfigError that shows the expected form."""
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["meta.epochs"])


def test_unknown_task_name_raises_at_load_and_at_build() -> None:
    """An unknown task name is refused by load_config and by build_task."""
    with pytest.raises(ConfigError, match="'task.name'.*imagenet"):
        load_config(None, ["task.name=imagenet"])
    config = load_config(None)
    config.task.name = "imagenet"
    with pytest.raises(ConfigError, match="'task.name'.*imagenet"):
        build_task(config.task, torch.device("cpu"))


def test_yaml_unknown_and_mistyped_keys_name_key(tmp_path: Path) -> None:
    """Errors coming from the YAML file itself also name the full key."""
    path = tmp_path / "bad.yaml"
    path.write_text("meta:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="meta.epochz"):
        load_config(path)
    path.write_text("meta:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="meta.epochs"):
        load_config(path)


@pytest.mark.parametrize(
    "override",
    [
        "levels.0.rule.compile=2",
        "levels.0.rule.checkpoint=0",
        "meta.check_gradient=1.5",
        "levels.0.rule={compile: 3}",
        "levels=[{rule: {compile: 4}}]",
        "levels.0.rule.compile='2'",
    ],
)
def test_a_number_for_a_true_or_false_key_is_refused(override: str) -> None:
    """omegaconf would read any number as a bool (2 as true); only true or false
    (or yes, no, on, off) are taken."""
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, [override])


def test_a_number_for_a_true_or_false_key_in_a_file_is_refused(tmp_path) -> None:
    """The same check for a file's keys, inside a list of levels too."""
    path = tmp_path / "bad.yaml"
    path.write_text("levels:\n  - rule: {kind: lstm, compile: 5}\n")
    with pytest.raises(ConfigError, match="'levels.0.rule.compile' = 5"):
        load_config(path)
    path.write_text("levels:\n  - rule: {kind: lstm, compile: yes}\n")
    assert load_config(path).levels[0].rule.compile is True


def test_a_file_of_the_wrong_kind_of_value_names_its_key(tmp_path) -> None:
    """A mapping, list or single value where the config takes another kind, and a
    file that is not text, each get one line; omegaconf raised a TypeError."""
    path = tmp_path / "bad.yaml"
    for text, message in [
        ("levels: {a: 1}\n", "'levels' = {'a': 1}: expected a list"),
        ("task: 5\n", "'task' = 5: expected a mapping"),
        ("meta: {epochs: [3]}\n", "'meta.epochs' = [3]: expected a single value"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path)
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is reported as a ConfigError."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path: Path) -> None:
    """Every config in configs/ loads and validates into a typed Config."""
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.name == path.stem
    assert config.run_dir == f"runs/{path.stem}"
    assert config.levels and config.meta.truncation <= config.levels[-1].horizon


def test_shipped_configs_exist() -> None:
    """The quadratic and MNIST configs are both shipped."""
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"two_level_quadratic", "two_level_mnist"} <= names


def test_overrides_apply_with_types(tmp_path: Path) -> None:
    """Overrides land typed, list items are addressable, and defaults stay."""
    config = load_config(
        CONFIGS / "two_level_quadratic.yaml",
        [
            "meta.epochs=7",
            "levels.0.mode=higher",
            "eval.horizons=[5, 200]",
            "levels.0.rule.kind=mlp",
            "levels.0.rule.momenta=[0.5]",
            "meta.grad_clip=1.5",
            "task.data_root=null",
            f"run_dir={tmp_path}",
        ],
    )
    assert config.meta.epochs == 7 and isinstance(config.meta.epochs, int)
    assert config.levels[0].mode == "higher"
    assert config.eval.horizons == [5, 200]
    assert config.levels[0].rule.momenta == [0.5]
    assert config.meta.grad_clip == 1.5
    assert config.task.data_root is None
    assert config.run_dir == str(tmp_path)
    assert config.meta.lr == 0.003  # from the file, untouched


def test_run_dir_interpolates_name() -> None:
    """The default run_dir follows the experiment name."""
    assert load_config(None, ["name=abc"]).run_dir == "runs/abc"


def test_defaults_are_the_papers() -> None:
    """Without a file, the defaults are a two-level LSTM setup on quadratics."""
    config = load_config()
    assert config.task.name == "quadratic" and config.task.dim == 10
    assert len(config.levels) == 1 and config.levels[0].rule.kind == "lstm"
    assert config.levels[0].rule.hidden_size == 20
    assert config.levels[0].rule.num_layers == 2


def test_yaml_syntax_error_and_non_mapping_are_config_errors(tmp_path: Path) -> None:
    """A broken YAML file or one holding a list is refused naming the file."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("meta:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(listing)


def test_keys_a_rule_does_not_read_are_refused_unless_left_at_default() -> None:
    """momenta is for the MLP rule, lr for the baselines, the network sizes for
    learned rules: set for another kind, they would be ignored, so they fail."""
    load_config(None, ["levels.0.rule.kind=mlp", "levels.0.rule.momenta=[0.5]"])
    load_config(None, ["levels.0.rule.kind=adam", "levels.0.rule.lr=0.1"])
    with pytest.raises(ConfigError, match="kind 'adam' do not read it"):
        load_config(None, ["levels.0.rule.kind=adam", "levels.0.rule.hidden_size=5"])

    # Switching an MLP level with its own momenta to the LSTM names the fix.
    mlp = ["levels.0.rule.kind=mlp", "levels.0.rule.momenta=[0.5]"]
    with pytest.raises(ConfigError, match=r"its default \[0.9\]: rules of kind 'lstm'"):
        load_config(None, [*mlp, "levels.0.rule.kind=lstm"])
    load_config(None, [*mlp, "levels.0.rule.kind=lstm", "levels.0.rule.momenta=[0.9]"])


def test_retired_dtype_key_of_old_run_folders(tmp_path: Path) -> None:
    """A recorded config with the retired ``dtype: float32`` still loads (the long
    MNIST run's does); another dtype is refused, naming the key and the fix."""
    config = load_config(REPO / "results" / "two_level_mnist_long" / "config.yaml")
    assert config.name == "two_level_mnist_long"
    path = tmp_path / "old.yaml"
    path.write_text("dtype: float64\n")
    with pytest.raises(ConfigError, match="'dtype' = 'float64'.*remove the key"):
        load_config(path)


def test_an_unknown_key_error_lists_the_keys_its_section_accepts(tmp_path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("meta:\n  epochz: 3\n")
    with pytest.raises(
        ConfigError, match="'meta.epochz'.*did you mean 'epochs'.*accepts optimizer, lr"
    ):
        load_config(path)
    path.write_text("levels:\n  - rule: {kind: lstm, hiden_size: 3}\n")
    with pytest.raises(ConfigError, match="'levels.0.rule.hiden_size' does not exist"):
        load_config(path)
    with pytest.raises(ConfigError, match="'levels.0.rule.a' does not exist; the lev"):
        load_config(None, ["levels.0.rule={a: 1}"])


def test_an_override_adds_a_key_to_a_variations_task() -> None:
    """A variation's task is an open mapping of overrides: new keys are taken."""
    config = load_config(
        "configs/two_level_mnist.yaml", ["eval.variations.0.task.activation=relu"]
    )
    assert config.eval.variations[0].task == {"hidden": [40], "activation": "relu"}
    with pytest.raises(ConfigError, match="'levels' = {'a': 1}: expected a list"):
        load_config(None, ["levels={a: 1}"])
