"""Tests for hierarchy.level: levels as tasks, the stack recursion, any depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_rows_match

from hierarchy.level import Level, LevelProblem, Problem, RowsOf, build_stack
from hierarchy.rules import LSTMRule, MLPRule
from hierarchy.trainer import MetaTrainer
from hierarchy.unroll import start, unroll
from tasks.quadratic import QuadraticTask


def _tiny_mlp() -> MLPRule:
    return MLPRule(hidden_size=3, num_layers=1, momenta=(0.9,))


def _tiny_lstm() -> LSTMRule:
    return LSTMRule(hidden_size=3, num_layers=1)


def test_level_rejects_bad_mode_and_horizon() -> None:
    """A Level refuses an unknown mode and a horizon below 1, naming the value."""
    task = QuadraticTask(2)
    with pytest.raises(ValueError, match="second"):
        Level(_tiny_mlp(), task, 3, "second")
    with pytest.raises(ValueError, match="horizon"):
        Level(_tiny_mlp(), task, 0, "first_order")


def test_build_stack_rejects_empty_and_mismatched_lists() -> None:
    """build_stack needs one rule, horizon and mode per level, and at least one."""
    task = QuadraticTask(2)
    with pytest.raises(ValueError, match="at least one"):
        build_stack(task, [], [], [])
    with pytest.raises(ValueError, match="1, 2, 1 and 1"):
        build_stack(task, [_tiny_mlp()], [3, 4], ["first_order"])


def test_build_stack_order_and_depth() -> None:
    """rules[0] trains the optimisee, rules[-1] is the top; depth counts level 0."""
    torch.manual_seed(0)
    task = QuadraticTask(2)
    rules = [_tiny_mlp(), _tiny_mlp(), _tiny_lstm()]
    top = build_stack(task, rules, [3, 2, 2], ["first_order", "higher", "first_order"])
    assert top.depth == 4
    assert top.rule is rules[2] and top.horizon == 2 and top.mode == "first_order"
    middle = top.below
    assert isinstance(middle, Level) and middle.rule is rules[1]
    assert middle.mode == "higher" and middle.dim == rules[1].num_params
    bottom = middle.below
    assert isinstance(bottom, Level) and bottom.rule is rules[0]
    assert bottom.horizon == 3 and bottom.below is task and bottom.depth == 2
    assert top.dim == rules[2].num_params


def test_level_problem_starts_from_rule_weights() -> None:
    """A level's problems start at B copies of its rule's weights, fresh each call."""
    torch.manual_seed(0)
    level = Level(_tiny_mlp(), QuadraticTask(2), 3, "first_order")
    problem = level.sample(4, torch.Generator().manual_seed(0), "train", 5)
    assert isinstance(problem, LevelProblem)
    init = problem.init()
    assert init.shape == (4, level.rule.num_params)
    assert torch.equal(init, level.rule.theta.detach().expand(4, -1))
    init.add_(1.0)
    assert torch.equal(problem.init()[0], level.rule.theta.detach())


def test_level_problem_loss_is_meta_loss_of_level_below() -> None:
    """LevelProblem.loss(phi) is the unroll meta-loss of fresh quadratics under phi."""
    torch.manual_seed(0)
    task = QuadraticTask(3)
    level = Level(_tiny_mlp(), task, 4, "first_order")
    phis = level.rule.theta.detach().expand(2, -1).clone()
    phis[1] += 0.05
    problem = level.sample(2, torch.Generator().manual_seed(7), "train", 1)
    loss = problem.loss(phis, 0)
    assert loss.shape == (2,)

    generator = torch.Generator().manual_seed(problem.seed)
    quadratics = task.sample(2, generator, "train", 4)
    carry = start(quadratics, level.rule, "first_order")
    expected, _ = unroll(level.rule, phis, quadratics, carry, 4, "first_order")
    torch.testing.assert_close(loss, expected)


def test_level_problem_loss_is_fixed_by_the_step() -> None:
    """Like a minibatch, the step fixes the problems: same step, same loss."""
    torch.manual_seed(0)
    level = Level(_tiny_mlp(), QuadraticTask(3), 4, "first_order")
    problem = level.sample(2, torch.Generator().manual_seed(7), "train", 1)
    phis = problem.init()
    torch.testing.assert_close(problem.loss(phis, 3), problem.loss(phis, 3))
    assert not torch.allclose(problem.loss(phis, 1), problem.loss(phis, 3))
    other = level.sample(2, torch.Generator().manual_seed(8), "train", 1)
    assert not torch.allclose(other.loss(phis, 3), problem.loss(phis, 3))


def test_level_meta_batch_averages_problems_per_row() -> None:
    """With meta_batch n, each row's meta-loss is the mean over its n problems."""
    torch.manual_seed(0)
    task = QuadraticTask(3)
    level = Level(_tiny_mlp(), task, 4, "first_order", meta_batch=3)
    theta = level.rule.theta.detach().expand(2, -1).clone()
    theta[1] -= 0.1
    loss = level.meta_loss(theta, 2, torch.Generator().manual_seed(5), "train")

    quadratics = task.sample(6, torch.Generator().manual_seed(5), "train", 4)
    rows = theta.repeat_interleave(3, dim=0)
    carry = start(quadratics, level.rule, "first_order")
    each, _ = unroll(level.rule, rows, quadratics, carry, 4, "first_order")
    torch.testing.assert_close(loss, each.view(2, 3).mean(dim=1))
    with pytest.raises(ValueError, match="meta_batch"):
        Level(_tiny_mlp(), task, 4, "first_order", meta_batch=0)


def test_level_meta_loss_differentiable_in_theta() -> None:
    """Level.meta_loss at batched theta has a non-zero gradient for every row."""
    torch.manual_seed(0)
    level = Level(_tiny_lstm(), QuadraticTask(2), 3, "higher")
    theta = level.rule.theta.detach().expand(3, -1).clone().requires_grad_(True)
    loss = level.meta_loss(theta, 3, torch.Generator().manual_seed(0), "train")
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    assert grad.shape == theta.shape
    assert (grad.abs().sum(dim=1) > 0).all()


def test_four_level_stack_trains(tmp_path: Path) -> None:
    """A four-level stack meta-trains 2 epochs, changing only the top theta."""
    torch.manual_seed(0)
    rules = [_tiny_mlp(), _tiny_mlp(), _tiny_lstm()]
    top = build_stack(
        QuadraticTask(2), rules, [3, 2, 2], ["first_order", "higher", "first_order"]
    )
    assert top.depth == 4
    before = [rule.theta.detach().clone() for rule in rules]
    trainer = MetaTrainer(
        top,
        tmp_path,
        lr=0.01,
        epochs=2,
        meta_batch=2,
        truncation=1,
        val_every=1,
        val_tasks=2,
        seed=0,
    )
    history = trainer.train()

    assert len(history.train_loss) == 2 and len(history.val_loss) == 2
    assert all(torch.isfinite(torch.tensor(history.train_loss)))
    assert not torch.equal(rules[2].theta.detach(), before[2])
    assert torch.isfinite(rules[2].theta).all()
    for rule, start_theta in zip(rules[:2], before[:2]):
        assert torch.equal(rule.theta.detach(), start_theta)
    assert (tmp_path / "checkpoint.pt").exists()


def test_level_problem_selected_rows_unroll_the_same_problems_below() -> None:
    """Rows of a level's batch meta-train on the problems they have in the batch,
    also when a share is split again, and their gradient is the same."""
    torch.manual_seed(0)
    level = Level(_tiny_mlp(), QuadraticTask(3), 4, "first_order", meta_batch=2)
    problem = level.sample(4, torch.Generator().manual_seed(7), "train", 1)
    assert_rows_match(problem, slice(1, 3))
    assert_rows_match(problem.select(slice(1, 4)), slice(1, 2))

    phis = problem.init().requires_grad_(True)
    (whole,) = torch.autograd.grad(problem.loss(phis, 2)[2:].sum(), phis)
    part = phis[2:].detach().requires_grad_(True)
    (share,) = torch.autograd.grad(
        problem.select(slice(2, 4)).loss(part, 2).sum(), part
    )
    torch.testing.assert_close(share, whole[2:])


class _Bowls(Problem):
    """Quadratic bowls around per-row centres; no select of its own."""

    def __init__(self) -> None:
        self.centres = torch.arange(12.0).view(4, 3)

    def init(self) -> torch.Tensor:
        return torch.zeros(4, 3)

    def loss(self, params: torch.Tensor, step: int) -> torch.Tensor:
        return (params - self.centres * (step + 1)).pow(2).sum(dim=-1)


def test_any_problem_can_be_split_through_the_whole_batch() -> None:
    """Without a select of its own a problem's rows still have their own losses."""
    problem = _Bowls()
    assert isinstance(problem.select(slice(1, 3)), RowsOf)
    assert_rows_match(problem, slice(1, 3))
    with pytest.raises(ValueError, match="step 1"):
        problem.select(slice(0, 4, 2))
