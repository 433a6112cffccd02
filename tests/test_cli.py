"""Tests for hierarchy/cli.py: the evaluate and pretrained commands."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from hierarchy.checkpoint import save_rule
from hierarchy.cli import main
from hierarchy.config import load_config
from hierarchy.evaluate import trajectory
from hierarchy.experiment import run
from hierarchy.pretrained import load_pretrained
from hierarchy.rules import LSTMRule
from tasks.quadratic import QuadraticTask

TINY_EVAL = [
    "device=cpu",
    "log_level=WARNING",
    "eval.tasks=4",
    "eval.horizons=[10]",
    "eval.report_steps=[5,10]",
    "eval.tune_tasks=4",
    "eval.lr_grid=[0.01,0.1]",
]


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_evaluate_a_pretrained_rule_with_its_recorded_config(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`hierarchy evaluate NAME` uses the recorded config, into runs/evaluate-NAME."""
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "lstm-quadratic", *TINY_EVAL]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "evaluate-lstm-quadratic"
    assert "learned" in out and "adam" in out
    assert "runs/evaluate-lstm-quadratic/results.json" in out

    results = _results(folder)
    assert results["checkpoint"] == "lstm-quadratic"
    assert results["rule"]["kind"] == "lstm" and results["config"]["task"]["dim"] == 10
    assert (folder / "config.yaml").is_file() and (folder / "table_default_T10.txt")

    seed = results["config"]["seed"] + 3
    problem = QuadraticTask(10).sample(
        4, torch.Generator().manual_seed(seed), "test", 10
    )
    expected = trajectory(load_pretrained("lstm-quadratic"), problem, 10)
    learned = results["evaluations"]["default_T10"]["mean_curves"]["learned"]
    assert learned == pytest.approx(expected.double().mean(dim=1).tolist(), rel=1e-6)


def test_evaluate_runs_the_rule_as_the_config_asks(tmp_path: Path, monkeypatch):
    """`levels.0.rule.compile=true` compiles the file's rule for evaluation (the
    fused kernel on the CPU), as the config.yaml written records."""
    import hierarchy.experiment as experiment

    seen, evaluate_tasks = [], experiment.evaluate_tasks

    def spy(config, device, learned, run_dir):
        seen.extend((rule.compile, rule.checkpoint) for rule, _ in learned.values())
        return evaluate_tasks(config, device, learned, run_dir)

    monkeypatch.setattr(experiment, "evaluate_tasks", spy)
    monkeypatch.chdir(tmp_path)
    overrides = [*TINY_EVAL, "levels.0.rule.compile=true"]
    assert main(["evaluate", "lstm-quadratic", *overrides]) == 0
    assert main(["evaluate", "lstm-quadratic", *TINY_EVAL, "run_dir=plain"]) == 0
    assert seen == [(True, False), (False, False)]
    written = _results(tmp_path / "runs" / "evaluate-lstm-quadratic")["config"]
    assert written["levels"][0]["rule"]["compile"] is True


def test_evaluate_a_run_folder_repeats_the_runs_evaluation(
    tiny_config, tmp_path: Path, monkeypatch
) -> None:
    """A run folder evaluated with its own config gives the run's numbers."""
    config = tiny_config()
    trained = run(config)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", config.run_dir, "log_level=WARNING"]) == 0
    again = _results(tmp_path / "runs" / "evaluate-run")
    for key, evaluation in trained["evaluations"].items():
        assert again["evaluations"][key]["summary"] == evaluation["summary"]
        assert (
            again["evaluations"][key]["learning_rates"]
            == (evaluation["learning_rates"])
        )


def test_evaluate_records_the_rule_it_evaluates(
    tiny_config, tmp_path: Path, monkeypatch, caplog
) -> None:
    """With two levels the rule file gives the rule: other settings in the config
    are named as unused, and the written config.yaml holds the rule's own."""
    config = tiny_config()
    run(config)
    monkeypatch.chdir(tmp_path)
    args = [
        "levels.0.rule.kind=mlp",
        "levels.0.rule.momenta=[0.5]",
        "levels.0.rule.hidden_size=7",
        "levels.0.rule.out_scale=5",
        "log_level=WARNING",
    ]
    with caplog.at_level(logging.WARNING, logger="hierarchy.cli"):
        assert main(["evaluate", config.run_dir, *args]) == 0
    assert "'hidden_size': 7, 'out_scale': 5.0, 'momenta': [0.5]}" in caplog.text
    written = yaml.safe_load(
        (tmp_path / "runs" / "evaluate-run" / "config.yaml").read_text()
    )
    rule = written["levels"][0]["rule"]
    assert (rule["kind"], rule["hidden_size"], rule["out_scale"]) == ("lstm", 4, 0.1)
    assert rule["momenta"] == [0.9]  # the default: an LSTM does not read it
    load_config(tmp_path / "runs" / "evaluate-run" / "config.yaml")  # loads again


def test_evaluate_a_three_level_run_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """Deeper stacks evaluate the rule handed down to level 0, as the run did."""
    levels = [
        {"rule": {"kind": "mlp", "hidden_size": 3, "num_layers": 1}, "horizon": 6},
        {"rule": {"kind": "lstm", "hidden_size": 3, "num_layers": 1}, "horizon": 2},
    ]
    config_file = tmp_path / "three.yaml"
    config_file.write_text(
        yaml.safe_dump({"levels": levels, "meta": {"truncation": 1}})
    )
    overrides = [
        *TINY_EVAL,
        "wandb.mode=disabled",
        "task.dim=3",
        "meta.epochs=1",
        "meta.meta_batch=2",
        "meta.val_tasks=2",
        f"run_dir={tmp_path / 'three'}",
    ]
    assert main(["train", str(config_file), *overrides]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(tmp_path / "three"), "run_dir=again"]) == 0
    trained, again = _results(tmp_path / "three"), _results(tmp_path / "again")
    key = "default_T10"
    summary = trained["evaluations"][key]["summary"]
    for name in ("mlp by lstm", "sgd", "nag", "rmsprop", "adam"):
        assert again["evaluations"][key]["summary"][name] == summary[name]

    code = main(["evaluate", "lstm-quadratic", "--config", str(config_file)])
    assert code == 2
    assert "the top level of the config's 3-level stack is a 'lstm' rule" in (
        capsys.readouterr().err
    )


def test_evaluate_a_rule_file_needs_a_config(tmp_path: Path, capsys) -> None:
    """A lone rule file asks for --config; with one it runs."""
    rule_file = save_rule(LSTMRule(hidden_size=4), tmp_path / "rules" / "mine.pt")
    assert main(["evaluate", str(rule_file)]) == 2
    assert "pass --config FILE" in capsys.readouterr().err

    config_file = tmp_path / "quadratic.yaml"
    config_file.write_text(yaml.safe_dump({"task": {"name": "quadratic", "dim": 3}}))
    out = tmp_path / "out"
    args = ["evaluate", str(rule_file), *TINY_EVAL, f"run_dir={out}"]
    assert main([*args, "--config", str(config_file)]) == 0
    assert _results(out)["config"]["task"]["dim"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["nothing-here"], "not a rule file, a run folder or the name of a pre"),
        (["lstm-quadratic", "eval.taskz=3"], "'eval.taskz' does not exist"),
        (["lstm-quadratic", "--config", "missing.yaml"], "'missing.yaml' does not"),
    ],
)
def test_evaluate_refuses_bad_input(args: list[str], message: str, capsys) -> None:
    assert main(["evaluate", *args]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_refuses_a_run_folder_without_a_rule(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "holds neither best.pt nor rule.pt" in capsys.readouterr().err


def test_pretrained_lists_names_and_commands(capsys) -> None:
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    assert "lstm-mnist" in out and "lstm-quadratic" in out
    assert "made by: hierarchy train configs/two_level_mnist_long.yaml" in out


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_a_config_error_is_printed_by_rank_zero_only(
    rank: str, printed: bool, monkeypatch, capsys
) -> None:
    """Under torchrun every rank fails on a bad config; one of them says so."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert main(["train", "two_level_quadratic", "meta.epochz=3"]) == 2
    error = capsys.readouterr().err
    assert ("config key 'meta.epochz' does not exist" in error) is printed


def test_a_run_folder_is_reported_and_config_names_work_anywhere(
    tiny_config, tmp_path: Path, monkeypatch, capsys
) -> None:
    """report takes a run's folder as well as its results.json, and a shipped
    config is found by name, with or without .yaml, from any folder."""
    from hierarchy.cli import CONFIGS, config_file

    config = tiny_config()
    run(config)
    monkeypatch.chdir(tmp_path)
    assert main(["report", config.run_dir]) == 0
    assert "learned" in capsys.readouterr().out
    shipped = CONFIGS / "two_level_quadratic.yaml"
    assert config_file("two_level_quadratic") == shipped
    assert config_file("two_level_quadratic.yaml") == shipped
    assert config_file("elsewhere/two_level_quadratic") == Path(
        "elsewhere/two_level_quadratic"
    )


def test_a_second_ctrl_c_exits_130_without_a_traceback(
    tiny_config, monkeypatch, capsys
) -> None:
    """KeyboardInterrupt (a second Ctrl-C, or one while evaluating) says how to go
    on, with the exit code of an interrupt, and no traceback."""
    import hierarchy.experiment

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hierarchy.experiment, "run", interrupted)
    run_dir = Path(tiny_config().run_dir)
    assert main(["train", "two_level_quadratic", f"run_dir={run_dir}"]) == 130
    error = capsys.readouterr().err
    assert "before the first checkpoint" in error and "Traceback" not in error
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    assert main(["train", "two_level_quadratic", f"run_dir={run_dir}"]) == 130
    assert "stands; add resume=true" in capsys.readouterr().err

    monkeypatch.setattr("hierarchy.cli.evaluate_rule", interrupted)
    assert main(["evaluate", "lstm-quadratic"]) == 130
    error = capsys.readouterr().err
    assert "interrupted" in error and "Traceback" not in error
