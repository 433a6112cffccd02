"""Three levels and deeper: the depth comparison of a run, end to end, tiny."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hierarchy.cli import print_depth
from hierarchy.experiment import build, level_zero_steps, run, two_level_config
from hierarchy.level import build_stack
from hierarchy.rules import LSTMRule, MLPRule
from tasks.quadratic import QuadraticTask

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
            "eval.two_level_meta_batch=4",
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
    assert two.meta.meta_batch == 4
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


def test_two_level_comparison_can_be_switched_off(three_level, capsys) -> None:
    """eval.two_level=false keeps the depth comparison to the training curves,
    and the printout announces no two-level runs."""
    results = run(three_level("eval.two_level=false"))
    assert results["depth"]["two_level"] == {}
    summary = results["evaluations"]["default_T10"]["summary"]
    assert list(summary)[:2] == ["mlp by lstm", "mlp by adam"]
    print_depth(results["depth"])
    printed = capsys.readouterr().out
    assert "mlp by lstm" in printed and "two-level" not in printed


@pytest.mark.parametrize("top_mode", ["higher", "first_order"])
def test_top_meta_gradient_of_three_levels_against_finite_differences(
    top_mode: str,
) -> None:
    """In higher mode the top rule's meta-gradient through both levels below is the
    exact derivative of the meta-loss; first-order mode drops a term and misses."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        rules = [
            MLPRule(hidden_size=3, num_layers=1, momenta=(0.9,)),
            LSTMRule(hidden_size=3, num_layers=1, out_scale=0.05),
        ]
        top = build_stack(QuadraticTask(2), rules, [3, 3], ["higher", top_mode], [2, 1])

        def meta_loss(theta: torch.Tensor) -> torch.Tensor:
            generator = torch.Generator().manual_seed(0)
            return top.meta_loss(theta, 2, generator, "train").sum()

        theta = top.rule.theta.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(meta_loss(theta), theta)
        errors = []
        with torch.no_grad():
            for k in range(4):
                direction = torch.randn(
                    theta.shape, generator=torch.Generator().manual_seed(k)
                )
                eps = 1e-6
                plus = meta_loss(theta + eps * direction)
                minus = meta_loss(theta - eps * direction)
                numeric = (plus - minus) / (2 * eps)
                analytic = grad @ direction
                errors.append(((analytic - numeric).abs() / numeric.abs()).item())
    finally:
        torch.set_default_dtype(default)

    if top_mode == "higher":
        assert max(errors) < 1e-5, errors
    else:
        assert max(errors) > 1e-3, errors
