"""Three levels and deeper: the depth comparison of a run, end to end, tiny."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hierarchy.experiment import build, level_zero_steps, run, two_level_config

THREE_LEVELS = (
    "levels=[{rule: {kind: mlp, hidden_size: 3, num_layers: 1}, horizon: 3, "
    "meta_batch: 2}, {rule: {kind: lstm, hidden_size: 4, num_layers: 1, "
    "out_scale: 0.01}, horizon: 4}]"
)


@pytest.fixture
def three_level(tiny_config):
    """The tiny quadratic config with an MLP at level 1 under an LSTM at level 2."""

    def make(*overrides: str):
        return tiny_config(
            THREE_LEVELS,
            "meta.truncation=2",
            "meta.epochs=2",
            "meta.meta_batch=2",
            "eval.copies=2",
            *overrides,
        )

    return make


def test_level_zero_steps_counts_the_recursion(three_level) -> None:
    """One epoch of the top unrolls meta_batch x (horizon + 1) of each level below."""
    config = three_level()
    top, _ = build(config)
    assert level_zero_steps(top.below.below) == 1
    assert level_zero_steps(top.below) == 2 * (3 + 1)
    assert level_zero_steps(top) == 1 * (4 + 1) * 2 * (3 + 1)


def test_two_level_config_matches_the_budget(three_level) -> None:
    """The two-level comparison takes the deep stack's optimisee steps."""
    config = three_level()
    budget = 2 * 2 * level_zero_steps(build(config)[0])  # epochs x meta_batch x ...
    two = two_level_config(config, config.levels[-1].rule, "lstm_2_levels", budget)
    assert len(two.levels) == 1 and two.levels[0].rule.kind == "lstm"
    assert two.levels[0].horizon == 3 and two.meta.truncation == 3
    assert two.meta.meta_batch == 2 * 2
    steps = two.meta.epochs * two.meta.meta_batch * (3 + 1)
    assert steps == budget
    assert Path(two.run_dir) == Path(config.run_dir) / "lstm_2_levels"


def test_three_level_run_compares_depths(three_level) -> None:
    """A three-level run reports the MLP trained by the LSTM and by tuned Adam from
    the same start on the same problems, both two-level stacks, and baselines."""
    config = three_level()
    results = run(config)
    run_dir = Path(config.run_dir)

    names = ["mlp by lstm", "mlp by adam", "mlp, 2 levels", "lstm, 2 levels"]
    evaluation = results["evaluations"]["default_T10"]
    assert list(evaluation["summary"]) == names + ["sgd", "nag", "rmsprop", "adam"]
    for name in names:
        assert evaluation["table"].count(name) == 1

    depth = results["depth"]
    curves = depth["training_curves"]["mean_curves"]
    assert list(curves) == ["mlp by lstm", "mlp by adam"]
    assert len(curves["mlp by lstm"]) == 4 + 1
    # Same initial weights, same problems at step 0: the curves start together.
    assert curves["mlp by lstm"][0] == pytest.approx(curves["mlp by adam"][0])
    assert curves["mlp by lstm"][1:] != curves["mlp by adam"][1:]
    assert (run_dir / "training_curves.png").stat().st_size > 0

    assert depth["meta_train_steps"] == 2 * 2 * (4 + 1) * 2 * (3 + 1)
    for name in ("mlp, 2 levels", "lstm, 2 levels"):
        record = depth["two_level"][name]
        steps = record["epochs"] * record["meta_batch"] * (3 + 1)
        assert steps == depth["meta_train_steps"]
        assert (Path(record["run_dir"]) / "best.pt").exists()


def test_two_level_mlp_starts_where_the_stack_mlp_starts(three_level) -> None:
    """'Same initialisation': the two-level MLP is built with the stack's MLP init."""
    config = three_level()
    top, _ = build(config)
    two = two_level_config(config, config.levels[0].rule, "mlp_2_levels", 10)
    alone, _ = build(two)
    assert torch.equal(alone.rule.theta, top.below.rule.theta)


def test_two_level_comparison_can_be_switched_off(three_level) -> None:
    """eval.two_level=false keeps the depth comparison to the training curves."""
    results = run(three_level("eval.two_level=false"))
    assert results["depth"]["two_level"] == {}
    summary = results["evaluations"]["default_T10"]["summary"]
    assert list(summary)[:2] == ["mlp by lstm", "mlp by adam"]
