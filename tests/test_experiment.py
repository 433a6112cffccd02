"""Tests for hierarchy.experiment, evaluate and cli: building, running, results."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from hierarchy.baselines import SGD
from hierarchy.cli import main
from hierarchy.config import load_config
from hierarchy.evaluate import format_table, summarise, trajectory
from hierarchy.experiment import build, build_rule, optimisee_rule, run
from hierarchy.level import Level
from hierarchy.rules import LSTMRule, MLPRule
from hierarchy.trainer import MetaTrainer
from tasks.quadratic import QuadraticTask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASELINE_NAMES = ["sgd", "nag", "rmsprop", "adam"]


def _check_outputs(run_dir: Path, results: dict, keys: list[str], horizons: dict):
    """Tables, PNG plots and results.json exist and hold finite numbers."""
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert set(on_disk) == {"config", "meta_train_seconds", "history", "evaluations"}
    assert sorted(on_disk["evaluations"]) == sorted(keys)
    assert sorted(results["evaluations"]) == sorted(keys)
    assert not list(run_dir.glob("*.tmp"))

    for key in keys:
        table = (run_dir / f"table_{key}.txt").read_text()
        for name in ["learned", *BASELINE_NAMES]:
            assert name in table
        png = run_dir / f"curves_{key}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC

        entry = on_disk["evaluations"][key]
        horizon = horizons[key]
        assert entry["horizon"] == horizon and entry["plot"] == str(png)
        assert set(entry["summary"]) == {"learned", *BASELINE_NAMES}
        assert set(entry["learning_rates"]) == set(BASELINE_NAMES)
        for name, by_step in entry["summary"].items():
            assert str(horizon) in by_step
            for mean, sem in by_step.values():
                assert math.isfinite(mean) and math.isfinite(sem)
            curve = entry["mean_curves"][name]
            assert len(curve) == horizon + 1
            assert all(math.isfinite(v) for v in curve)
            assert by_step[str(horizon)][0] == pytest.approx(curve[horizon])
        grid = on_disk["config"]["eval"]["lr_grid"]
        for name, lr in entry["learning_rates"].items():
            assert any(lr == pytest.approx(g) for g in grid)
            scores = entry["tuning_scores"][name]
            assert scores[str(min(grid, key=lambda g: abs(g - lr)))] == min(
                scores.values()
            )


def test_quadratic_end_to_end(tiny_config, tmp_path: Path) -> None:
    """run() on a tiny quadratic config writes tables, PNGs and results.json."""
    config = tiny_config()
    results = run(config)
    run_dir = Path(config.run_dir)
    _check_outputs(run_dir, results, ["default_T10"], {"default_T10": 10})
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "best.pt").exists()
    assert load_config(run_dir / "config.yaml").meta.epochs == 3
    assert len(results["history"]["train_loss"]) == 3


def test_mnist_end_to_end(tmp_path: Path) -> None:
    """run() on a tiny MNIST config with one variation writes every output."""
    config = load_config(
        None,
        [
            "name=tiny_mnist",
            "device=cpu",
            "wandb.mode=disabled",
            "log_level=WARNING",
            f"run_dir={tmp_path / 'run'}",
            "task.name=mnist",
            "task.hidden=[4]",
            "task.batch_size=8",
            "levels.0.rule.hidden_size=4",
            "levels.0.rule.num_layers=1",
            "levels.0.horizon=4",
            "meta.epochs=1",
            "meta.meta_batch=1",
            "meta.truncation=4",
            "meta.val_every=1",
            "meta.val_tasks=2",
            "eval.tasks=2",
            "eval.horizons=[4, 8]",
            "eval.report_steps=[2, 4, 8]",
            "eval.tune_tasks=2",
            "eval.lr_grid=[0.01, 0.1]",
            "eval.variations=[{name: relu, task: {activation: relu}}]",
        ],
    )
    results = run(config)
    keys = ["default_T4", "default_T8", "relu_T4", "relu_T8"]
    horizons = {key: int(key.rsplit("T", 1)[1]) for key in keys}
    _check_outputs(Path(config.run_dir), results, keys, horizons)
    evaluations = results["evaluations"]
    # Both horizons share one learned run on the same held-out networks.
    assert evaluations["default_T8"]["mean_curves"]["learned"][:5] == pytest.approx(
        evaluations["default_T4"]["mean_curves"]["learned"]
    )
    # The variation is a different network, so its curves differ.
    assert (
        evaluations["relu_T4"]["mean_curves"]["learned"]
        != evaluations["default_T4"]["mean_curves"]["learned"]
    )


def test_run_resume_continues(tiny_config, monkeypatch) -> None:
    """resume=true picks up the checkpoint and trains only the remaining epochs."""
    calls = []
    original = MetaTrainer.train_epoch

    def counted(self):
        calls.append(self.epoch)
        return original(self)

    monkeypatch.setattr(MetaTrainer, "train_epoch", counted)
    first = run(tiny_config("meta.epochs=2", "eval.lr_grid=[0.1]"))
    assert calls == [0, 1]
    again = run(tiny_config("meta.epochs=3", "resume=true", "eval.lr_grid=[0.1]"))
    assert calls == [0, 1, 2]
    train_first = first["history"]["train_loss"]
    train_again = again["history"]["train_loss"]
    assert len(train_first) == 2 and len(train_again) == 3
    assert train_again[:2] == train_first


def test_run_evaluates_best_checkpoint(tiny_config, monkeypatch) -> None:
    """The learned rule is evaluated at the best validated weights, not the last."""
    scores = iter([1.0, 0.5, 2.0])
    monkeypatch.setattr(MetaTrainer, "validate", lambda self: next(scores))
    config = tiny_config("meta.val_every=1", "eval.lr_grid=[0.1]")
    results = run(config)
    assert results["history"]["best_epoch"] == 2

    best = torch.load(Path(config.run_dir) / "best.pt", weights_only=True)
    last = torch.load(Path(config.run_dir) / "checkpoint.pt", weights_only=True)
    assert best["epoch"] == 2 and last["epoch"] == 3
    assert not torch.equal(best["theta"], last["rule"]["theta"])

    top, _ = build(config)
    task = top.below
    problem = task.sample(4, torch.Generator().manual_seed(config.seed + 3), "test", 10)
    rule = copy.deepcopy(top.rule)
    with torch.no_grad():
        rule.theta.copy_(best["theta"])
    expected = trajectory(rule, problem, 10).double().mean(dim=1).tolist()
    learned = results["evaluations"]["default_T10"]["mean_curves"]["learned"]
    assert learned == pytest.approx(expected, rel=1e-6)


def test_build_is_seeded(tiny_config) -> None:
    """build() gives the same initial top weights for one seed, others for another."""
    a, _ = build(tiny_config("seed=3"))
    b, _ = build(tiny_config("seed=3"))
    c, _ = build(tiny_config("seed=4"))
    assert torch.equal(a.rule.theta, b.rule.theta)
    assert not torch.equal(a.rule.theta, c.rule.theta)
    assert a.depth == 2 and a.rule.kind == "lstm" and a.rule.hidden_size == 4


def test_build_rule_kinds() -> None:
    """build_rule makes learned rules and baselines from their config."""
    config = load_config(
        None,
        [
            "levels.0.rule.kind=mlp",
            "levels.0.rule.momenta=[]",
            "levels.0.rule.hidden_size=3",
        ],
    )
    rule = build_rule(config.levels[0].rule)
    assert isinstance(rule, MLPRule) and rule.momenta == () and rule.hidden_size == 3
    config = load_config(None, ["levels.0.rule.kind=sgd", "levels.0.rule.lr=0.2"])
    rule = build_rule(config.levels[0].rule)
    assert isinstance(rule, SGD) and rule.lr == pytest.approx(0.2)


def test_optimisee_rule_two_levels_is_top() -> None:
    """With two levels the optimisee's rule is the top rule at its own weights."""
    top = Level(
        LSTMRule(hidden_size=3, num_layers=1), QuadraticTask(2), 3, "first_order"
    )
    rule, theta = optimisee_rule(top, seed=0)
    assert rule is top.rule and torch.equal(theta, top.rule.theta.detach())


def test_optimisee_rule_three_levels_runs_middle_rule() -> None:
    """Deeper, the lower rule's weights are those the trained rule above reaches."""
    torch.manual_seed(0)
    lower = MLPRule(hidden_size=3, num_layers=1)
    middle = Level(lower, QuadraticTask(2), 3, "first_order")
    top = Level(SGD(0.1), middle, 2, "first_order")
    rule, theta = optimisee_rule(top, seed=0)
    assert rule is lower and theta.shape == (1, lower.num_params)
    assert not torch.equal(theta[0], lower.theta.detach())
    assert torch.equal(optimisee_rule(top, seed=0)[1], theta)
    # Copies train on problems of their own: they end at different weights.
    _, copies = optimisee_rule(top, seed=0, copies=3)
    assert copies.shape == (3, lower.num_params)
    assert not torch.equal(copies[0], copies[1])


def test_trajectory_shape_and_first_row() -> None:
    """trajectory gives (steps + 1, B) losses, with the initial loss first."""
    problem = QuadraticTask(3).sample(4, torch.Generator().manual_seed(0), "test", 6)
    curve = trajectory(SGD(0.01), problem, 6)
    assert curve.shape == (7, 4)
    torch.testing.assert_close(curve[0], problem.loss(problem.init(), 0))
    assert (curve[-1] < curve[0]).all()  # small-step SGD decreases a quadratic


def test_summarise_and_table() -> None:
    """summarise gives mean and standard error; the table prints them per row."""
    curve = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    summary = summarise(curve, [0, 1])
    assert summary[0] == (pytest.approx(2.0), pytest.approx(1.0))  # std sqrt 2, n = 2
    assert summary[1] == (pytest.approx(2.0), pytest.approx(0.0))
    table = format_table({"learned": curve, "sgd": curve * 2}, [0, 1], {"sgd": 0.1})
    lines = table.splitlines()
    assert "step 0" in lines[0] and "step 1" in lines[0]
    assert lines[2].startswith("learned") and lines[3].startswith("sgd")
    assert "0.1" in lines[3] and "4" in lines[3]


def test_cli_reports_config_error(capsys) -> None:
    """The CLI exits with 2 and prints the ConfigError naming the bad key."""
    code = main(["train", "two_level_quadratic", "meta.epochz=3"])
    assert code == 2
    assert "'meta.epochz'" in capsys.readouterr().err


def test_cli_runs_tiny_config(tiny_overrides, tmp_path: Path, capsys) -> None:
    """The CLI runs a config by name with overrides and prints its table."""
    extra = ["meta.epochs=1", "eval.lr_grid=[0.1]"]
    code = main(["train", "two_level_quadratic", *tiny_overrides, *extra])
    assert code == 0
    out = capsys.readouterr().out
    results = tmp_path / "run" / "results.json"
    assert "learned" in out and str(results) in out
    assert results.exists()


def test_report_prints_markdown_with_the_best_in_bold(tmp_path, capsys) -> None:
    """`hierarchy report` renders each horizon's row and bolds the lowest mean."""
    import json

    from hierarchy.cli import main

    evaluations = {
        "default_T10": {
            "task": "default",
            "horizon": 10,
            "summary": {
                "learned": {"5": [9.0, 0.1], "10": [0.5, 0.01]},
                "adam": {"5": [1.0, 0.1], "10": [0.7, 0.02]},
            },
        }
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"evaluations": evaluations}))
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| default | 10 | **0.5 ± 0.01** | 0.7 ± 0.02 |" in out
    assert "| 5 |" not in out
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def test_one_problem_shows_no_standard_error() -> None:
    """With one problem (eval.copies=1) tables give the mean alone, not '± nan'."""
    from hierarchy.evaluate import format_table, markdown_summary, summarise

    curves = {
        "one": torch.tensor([[3.0], [1.0]]),
        "two": torch.tensor([[3.0, 2.0]] * 2),
    }
    table = format_table(curves, [1], {})
    assert "nan" not in table and "+- 0.5" in table
    summary = {name: {"1": summarise(c, [1])[1]} for name, c in curves.items()}
    markdown = markdown_summary(
        {"t": {"task": "t", "horizon": 1, "summary": summary}}, [1]
    )
    assert "nan" not in markdown and "**1**" in markdown and "2.5 ± 0.5" in markdown


def test_ctrl_c_in_a_two_level_run_of_a_deeper_evaluation_stops_it(
    tiny_config, monkeypatch
) -> None:
    """The two-level runs a deeper stack is compared with stop the command on
    Ctrl-C, as training does; their rows are not made from a half-trained rule."""
    from hierarchy import experiment
    from hierarchy.trainer import MetaTrainer

    train = MetaTrainer.train

    def interrupted(self):
        history = train(self)
        history.interrupted = True
        return history

    monkeypatch.setattr(MetaTrainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiment.train_two_level(tiny_config("meta.epochs=1"))
