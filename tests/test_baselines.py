"""Tests for hierarchy.baselines: hand rules against torch.optim, lr tuning."""

from __future__ import annotations

import math

import pytest
import torch

from hierarchy.baselines import (
    BASELINES,
    NAG,
    SGD,
    Adam,
    HandRule,
    RMSprop,
    tune_learning_rate,
)
from hierarchy.evaluate import trajectory
from hierarchy.unroll import start, unroll
from tasks.quadratic import QuadraticProblem, QuadraticTask

TORCH_EQUIVALENTS = {
    "sgd": (SGD, lambda p, lr: torch.optim.SGD([p], lr=lr)),
    "nag": (
        NAG,
        lambda p, lr: torch.optim.SGD([p], lr=lr, momentum=0.9, nesterov=True),
    ),
    "rmsprop": (RMSprop, lambda p, lr: torch.optim.RMSprop([p], lr=lr)),
    "adam": (Adam, lambda p, lr: torch.optim.Adam([p], lr=lr)),
}


def _problem() -> QuadraticProblem:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    x0 = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    return QuadraticProblem(w, y, x0)


@pytest.mark.parametrize("name", sorted(TORCH_EQUIVALENTS))
def test_hand_rule_matches_torch_optim(name: str) -> None:
    """Each baseline follows torch.optim's own implementation step for step."""
    rule_cls, make_optim = TORCH_EQUIVALENTS[name]
    lr = 0.01
    problem = _problem()
    rule = rule_cls(lr).double()
    theta = rule.theta.detach()

    x = problem.init().clone().requires_grad_(True)
    optim = make_optim(x, math.exp(theta.item()))
    carry = start(problem, rule, "first_order")
    moved = 0.0
    for step in range(1, 6):
        optim.zero_grad()
        problem.loss(x, step - 1).sum().backward()
        optim.step()
        _, carry = unroll(rule, theta, problem, carry, 1, "first_order")
        torch.testing.assert_close(
            carry.params.detach(), x.detach(), rtol=1e-12, atol=1e-12
        )
        moved = (x.detach() - problem.x0).abs().max().item()
    assert moved > 1e-3  # the runs actually went somewhere


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_hand_rule_stores_log_lr(name: str) -> None:
    """A baseline's only weight is log(lr); lr and config() give it back."""
    rule = BASELINES[name](0.03)
    assert rule.num_params == 1
    assert rule.theta.item() == pytest.approx(math.log(0.03))
    assert rule.lr == pytest.approx(0.03)
    assert BASELINES[name](**rule.config()).lr == pytest.approx(0.03)
    assert rule.kind == name


@pytest.mark.parametrize("lr", [0.0, -1.0])
def test_hand_rule_rejects_non_positive_lr(lr: float) -> None:
    """A learning rate that is not positive is refused."""
    with pytest.raises(ValueError, match="positive"):
        SGD(lr)


def test_hand_rule_batched_lr() -> None:
    """With theta (B, 1) each problem steps with its own learning rate."""
    rule = SGD(0.1)
    grad = torch.ones(2, 3)
    theta = torch.log(torch.tensor([[0.1], [0.5]]))
    update, _ = rule.update(theta, grad, rule.init_state(grad))
    torch.testing.assert_close(update, torch.tensor([[-0.1] * 3, [-0.5] * 3]))


def test_learned_lr_gradient_flows_through_log_lr() -> None:
    """A HandRule is trainable: d(meta-loss)/d log-lr is finite and non-zero."""
    problem = _problem()
    rule: HandRule = Adam(0.01).double()
    carry = start(problem, rule, "higher")
    loss, _ = unroll(rule, rule.theta, problem, carry, 3, "higher")
    loss.sum().backward()
    assert torch.isfinite(rule.theta.grad).all() and rule.theta.grad.abs().item() > 0


def _final_losses_by_torch(task, grid, horizon, tasks, seed) -> dict[float, float]:
    """Mean final loss of torch.optim.SGD at each rate, on the same problems."""
    out = {}
    for lr in grid:
        problem = task.sample(
            tasks, torch.Generator().manual_seed(seed), "train", horizon
        )
        x = problem.init().clone().requires_grad_(True)
        optim = torch.optim.SGD([x], lr=lr)
        for step in range(horizon):
            optim.zero_grad()
            problem.loss(x, step).sum().backward()
            optim.step()
        with torch.no_grad():
            out[lr] = problem.loss(x, horizon).mean().item()
    return out


def test_tune_learning_rate_picks_best_finite_rate() -> None:
    """The tuned rate has the lowest final loss; a diverged rate scores inf."""
    task = QuadraticTask(3)
    # The diverging rate comes first, so a NaN score would win an unguarded min.
    grid = [1e3, 1e-3, 1e-2, 3e-2]
    rule, scores = tune_learning_rate("sgd", task, grid, horizon=20, tasks=4, seed=5)

    assert isinstance(rule, SGD)
    assert list(scores) == grid
    assert scores[1e3] == math.inf
    finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    assert set(finite) == {1e-3, 1e-2, 3e-2}
    best = min(finite, key=finite.__getitem__)
    assert rule.lr == pytest.approx(best)
    assert scores[best] < min(s for lr, s in finite.items() if lr != best)

    reference = _final_losses_by_torch(task, grid[1:], 20, 4, 5)
    for lr, value in reference.items():
        assert scores[lr] == pytest.approx(value, rel=1e-4)
    assert best == min(reference, key=reference.__getitem__)


def test_tune_learning_rate_uses_final_loss_not_first() -> None:
    """Scores are the final loss after horizon steps, matching trajectory()."""
    task = QuadraticTask(2)
    _, scores = tune_learning_rate(
        "adam", task, [0.01, 0.1], horizon=7, tasks=3, seed=1
    )
    for lr, score in scores.items():
        problem = task.sample(3, torch.Generator().manual_seed(1), "train", 7)
        curve = trajectory(Adam(lr), problem, 7)
        assert curve.shape == (8, 3)
        assert score == pytest.approx(curve[-1].mean().item())
        assert score != pytest.approx(curve[0].mean().item())


def test_tune_learning_rate_rejects_unknown_baseline() -> None:
    """An unknown baseline name is refused, naming it."""
    with pytest.raises(ValueError, match="lbfgs"):
        tune_learning_rate("lbfgs", QuadraticTask(2), [0.1], 3, 2, 0)
