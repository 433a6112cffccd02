"""Tests for examples/custom_level.py: its rule and task, and a tiny-budget run."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hierarchy.level import Level
from hierarchy.optim import LearnedOptimizer
from hierarchy.unroll import start, unroll

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def custom():
    """examples/custom_level.py imported as a module."""
    path = ROOT / "examples" / "custom_level.py"
    spec = importlib.util.spec_from_file_location("custom_level", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learned_adam_at_fixed_weights_is_torch_adam(custom) -> None:
    """At fixed theta the rule takes torch.optim.Adam's steps."""
    torch.manual_seed(0)
    ours = nn.Linear(4, 2)
    reference = nn.Linear(4, 2)
    reference.load_state_dict(ours.state_dict())
    rule = custom.LearnedAdam(lr=0.05, beta1=0.8, beta2=0.99)
    optimizers = [
        LearnedOptimizer(ours.parameters(), rule),
        torch.optim.Adam(reference.parameters(), lr=0.05, betas=(0.8, 0.99)),
    ]
    x = torch.randn(16, 4)
    for _ in range(10):
        for model, optimizer in zip((ours, reference), optimizers):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_meta_gradient_reaches_all_three_hyperparameters(custom) -> None:
    """The meta-loss of a higher-mode unroll depends on lr, beta1 and beta2."""
    task = custom.LogisticTask(features=3, examples=20, batch=5)
    level = Level(custom.LearnedAdam(lr=0.05), task, horizon=6, mode="higher")
    problem = task.sample(2, torch.Generator().manual_seed(0), "train", 6)
    carry = start(problem, level.rule, "higher")
    meta_loss, _ = unroll(level.rule, level.rule.theta, problem, carry, 6, "higher")
    meta_loss.sum().backward()
    grad = level.rule.theta.grad
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_logistic_task_is_seeded_and_checks_its_arguments(custom) -> None:
    task = custom.LogisticTask(features=3, examples=20, batch=5)
    draws = [task.sample(2, torch.Generator().manual_seed(1), "test", 4) for _ in "ab"]
    assert torch.equal(draws[0].features, draws[1].features)
    assert torch.equal(draws[0].batches, draws[1].batches)
    loss = draws[0].loss(draws[0].init(), 0)
    assert loss.shape == (2,) and (loss > 0).all()
    with pytest.raises(ValueError, match="got 3, 0 and 5"):
        custom.LogisticTask(features=3, examples=0, batch=5)


def test_custom_level_runs_with_a_tiny_budget(custom, tmp_path: Path, capsys) -> None:
    """The example trains both stacks, evaluates and prints the table."""
    results = custom.main(["--epochs", "3", "--quick", "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("adam-2-level", "adam-3-level", "sgd", "nag", "rmsprop", "adam"):
        assert f"\n{name} " in out
    for curve in results["curves"].values():
        assert curve.shape == (9, 4) and torch.isfinite(curve).all()
    for stack in ("two_levels", "three_levels"):
        assert (tmp_path / stack / "best.pt").is_file()
    assert not math.isclose(results["learned"]["adam-2-level"]["lr"], 0.01)


def test_custom_level_flags_are_checked_and_win_over_quick(
    custom, tmp_path: Path, capsys
) -> None:
    """A non-positive size is an argparse error naming it; a given size is kept
    under --quick, which fills in only the sizes not given."""
    with pytest.raises(SystemExit) as exit_info:
        custom.main(["--horizon", "0"])
    assert exit_info.value.code == 2
    assert "--horizon: expected a positive integer, got 0" in capsys.readouterr().err

    results = custom.main(
        ["--quick", "--epochs", "1", "--horizon", "6", "--run-dir", str(tmp_path)]
    )
    assert all(curve.shape[0] == 6 + 1 for curve in results["curves"].values())
