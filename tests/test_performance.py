"""The fast paths give the results of the plain ones.

The library's LSTM rule against the reference of stock nn.LSTMCell modules in
benchmarks/reference.py, compiled and checkpointed rules against the plain rule,
and the batched learning-rate grid against one run per rate.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from hierarchy.baselines import BASELINES, grid_final_losses
from hierarchy.evaluate import trajectory
from hierarchy.level import Repeated, build_stack
from hierarchy.rules import LSTMRule, MLPRule
from hierarchy.unroll import loss_and_grad, start, unroll
from tasks.mnist import MNISTTask
from tasks.quadratic import QuadraticTask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from reference import ReferenceLSTM, reference_epoch, reference_run  # noqa: E402


def _mnist() -> MNISTTask:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(60, 784, generator=generator)
    labels = torch.randint(10, (60,), generator=generator)
    return MNISTTask(images, labels, images[:20], labels[:20], hidden=(5,))


def _rule(seed: int = 0) -> LSTMRule:
    rule = LSTMRule(hidden_size=6).double()
    rule.reset_parameters(torch.Generator().manual_seed(seed))
    return rule


def _meta_gradient(rule: LSTMRule, problem, steps: int) -> torch.Tensor:
    """Gradient of the mean meta-loss of the first ``steps`` steps at the rule."""
    rule.theta.grad = None
    carry = start(problem, rule, "first_order")
    meta_loss, _ = unroll(rule, rule.theta, problem, carry, steps, "first_order")
    meta_loss.mean().backward()
    return rule.theta.grad.clone()


def _reference_gradient(rule: LSTMRule, problem, steps: int) -> torch.Tensor:
    """The same meta-gradient by the reference, in the library's flat layout."""
    ref = ReferenceLSTM.from_rule(rule).double()
    reference_epoch(
        ref, torch.optim.SGD(ref.parameters(), lr=0.0), problem, steps, steps
    )
    parts = {}
    for layer, cell in enumerate(ref.cells):
        parts[f"w{layer}"] = torch.cat([cell.weight_ih.grad.T, cell.weight_hh.grad.T])
        parts[f"b{layer}"] = cell.bias_ih.grad
    parts["w_out"], parts["b_out"] = ref.head.weight.grad.T, ref.head.bias.grad
    return rule.flatten(parts)


def test_lstm_rule_updates_match_reference_cells() -> None:
    """Fused gates give nn.LSTMCell's updates and states, step after step."""
    rule = _rule()
    ref = ReferenceLSTM.from_rule(rule).double()
    grads = torch.randn(4, 1, 50, dtype=torch.float64) * 10.0 ** torch.randint(
        -6, 1, (4, 1, 50)
    )
    state, ref_state = rule.init_state(grads[0]), ref.init_state(grads[0, 0])
    with torch.no_grad():
        for grad in grads:
            update, state = rule.update(rule.theta, grad, state)
            ref_update, ref_state = ref(grad[0], ref_state)
            torch.testing.assert_close(update[0], ref_update)
            torch.testing.assert_close(state[-2][0], ref_state[-1][0])


def _double_problem(task_name: str, split: str = "train"):
    """Three problems of 5 steps of a small quadratic or MLP task, in float64."""
    task = QuadraticTask(4) if task_name == "quadratic" else _mnist()
    problem = task.sample(3, torch.Generator().manual_seed(1), split, 5)
    if task_name == "quadratic":
        problem.w, problem.y, problem.x0 = (
            t.double() for t in (problem.w, problem.y, problem.x0)
        )
    else:
        problem.x0, problem.images = problem.x0.double(), problem.images.double()
    return problem


@pytest.mark.parametrize("task_name", ["quadratic", "mnist"])
def test_meta_gradient_matches_reference(task_name: str) -> None:
    """Batched library unroll and one-task-at-a-time reference agree."""
    problem = _double_problem(task_name)
    rule = _rule()
    library = _meta_gradient(rule, problem, 5)
    torch.testing.assert_close(library, _reference_gradient(rule, problem, 5))
    assert library.abs().sum() > 0


@pytest.mark.parametrize("task_name", ["quadratic", "mnist"])
def test_in_place_evaluation_matches_reference_run(task_name: str) -> None:
    """Evaluation's in-place run of the LSTM on all problems at once gives the
    losses of the plain reference run one problem at a time."""
    problem = _double_problem(task_name, "test")
    rule = _rule()
    expected = reference_run(ReferenceLSTM.from_rule(rule).double(), problem, 5)
    curve = trajectory(rule, problem, 5)
    torch.testing.assert_close(curve, expected)
    assert not torch.equal(curve[-1], curve[0])  # the rule moved the parameters


@pytest.mark.parametrize("task_name", ["quadratic", "mnist", "three levels"])
def test_dropping_the_graph_below_gives_the_same_meta_gradient(task_name) -> None:
    """keep_graph=False reuses each step's gradient for the meta-loss's backward
    (inner levels too): the meta-gradient of keeping every graph, to rounding."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        if task_name == "three levels":
            rules = [MLPRule(hidden_size=4, momenta=(0.5,)), LSTMRule(hidden_size=3)]
            top = build_stack(QuadraticTask(3), rules, [4, 3], ["first_order"] * 2)
        else:
            task = QuadraticTask(4) if task_name == "quadratic" else _mnist()
            top = build_stack(task, [LSTMRule(hidden_size=6)], [5], ["first_order"])
        problem = top.below.sample(3, torch.Generator().manual_seed(1), "train", 5)

        gradients = []
        for keep in (True, False):
            for level in (top, top.below):
                level.keep_graph = keep
            top.rule.theta.grad = None
            carry = start(problem, top.rule, top.mode, keep)
            meta_loss, _ = unroll(
                top.rule, top.rule.theta, problem, carry, 3, top.mode, keep
            )
            meta_loss.mean().backward()
            gradients.append(top.rule.theta.grad.clone())
    finally:
        torch.set_default_dtype(default)
    torch.testing.assert_close(gradients[1], gradients[0])
    assert gradients[0].abs().sum() > 0


def test_trainer_drops_graphs_only_where_nothing_differentiates_twice() -> None:
    """A first_order level under a first_order level (or the top optimiser) drops
    the graph below; under or in higher mode it keeps it."""
    from hierarchy.trainer import MetaTrainer

    expected = {
        ("first_order", "first_order"): [False, False],
        ("first_order", "higher"): [False, True],
        ("higher", "first_order"): [True, True],
        ("higher", "higher"): [True, True],
    }
    for (top_mode, below_mode), keep in expected.items():
        rules = [MLPRule(hidden_size=2, momenta=()), MLPRule(hidden_size=2)]
        top = build_stack(QuadraticTask(2), rules, [2, 2], [below_mode, top_mode])
        MetaTrainer(top, "unused", meta_batch=1, truncation=1)
        assert [top.keep_graph, top.below.keep_graph] == keep
    with pytest.raises(ValueError, match="first_order"):
        loss_and_grad(None, torch.zeros(1, 2), 0, "higher", keep_graph=False)


def test_checkpointed_rule_gives_the_same_meta_gradient() -> None:
    """Recomputing the rule in backward changes memory, not the gradient."""
    problem = QuadraticTask(4).sample(3, torch.Generator().manual_seed(2), "train", 6)
    rule = LSTMRule(hidden_size=6)
    plain = _meta_gradient(rule, problem, 6)
    rule.checkpoint = True
    torch.testing.assert_close(_meta_gradient(rule, problem, 6), plain)


def test_compiled_rule_gives_the_same_updates_and_meta_gradient() -> None:
    """torch.compile of the rule (or its eager fallback) changes nothing."""
    problem = QuadraticTask(4).sample(3, torch.Generator().manual_seed(3), "train", 4)
    rule = LSTMRule(hidden_size=6)
    plain = _meta_gradient(rule, problem, 4)
    grad = torch.randn(3, 4)
    with torch.no_grad():
        eager_update, _ = rule.update(rule.theta, grad, rule.init_state(grad))
    rule.compile = True
    torch.testing.assert_close(_meta_gradient(rule, problem, 4), plain)
    with torch.no_grad():
        update, _ = rule.step(rule.theta, grad, rule.init_state(grad))
    torch.testing.assert_close(update, eager_update)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog) -> None:
    """A rule that cannot compile warns once and runs eagerly with equal results."""

    def broken(fn):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    # float64: the fused float32 kernel does not apply, so torch.compile is tried.
    rule = LSTMRule(hidden_size=6).double()
    grad = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        expected, _ = rule.update(rule.theta, grad, rule.init_state(grad))
        rule.compile = True
        with caplog.at_level(logging.WARNING, logger="hierarchy.rules"):
            first, _ = rule.step(rule.theta, grad, rule.init_state(grad))
            second, _ = rule.step(rule.theta, grad, rule.init_state(grad))
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    warnings = [r for r in caplog.records if "no compiler here" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("task_name", ["quadratic", "mnist"])
def test_batched_grid_matches_one_run_per_rate(name: str, task_name: str) -> None:
    """K rates as one batch of K * B problems score as K separate runs do."""
    task = QuadraticTask(5) if task_name == "quadratic" else _mnist()
    problem = task.sample(4, torch.Generator().manual_seed(4), "train", 8)
    grid = [1e-3, 0.03, 1.0, 30.0]
    batched = grid_final_losses(name, problem, grid, 8)
    for lr, score in zip(grid, batched):
        expected = trajectory(BASELINES[name](lr), problem, 8)[-1].mean().item()
        if math.isfinite(expected):
            assert score == pytest.approx(expected, rel=1e-5)
        else:
            assert not math.isfinite(score)


@pytest.mark.parametrize("task_name", ["quadratic", "mnist"])
def test_repeat_matches_the_generic_copies(task_name: str) -> None:
    """A task's own repeat and the generic one give the same initial points and
    losses, copy after copy."""
    task = QuadraticTask(5) if task_name == "quadratic" else _mnist()
    problem = task.sample(3, torch.Generator().manual_seed(5), "train", 4)
    own, generic = problem.repeat(2), Repeated(problem, 2)
    torch.testing.assert_close(own.init(), generic.init())
    params = own.init() + 0.1 * torch.randn_like(own.init())
    for step in range(3):
        torch.testing.assert_close(own.loss(params, step), generic.loss(params, step))
    torch.testing.assert_close(own.init()[3:], problem.init())


@pytest.mark.parametrize(
    "mode, task",
    [
        ("first_order", []),
        ("higher", []),
        # Minibatches change with the step: a chunk rebuilt at the wrong step fails.
        ("first_order", ["task.name=mnist", "task.hidden=[3]", "task.batch_size=4"]),
    ],
)
def test_chunked_segments_give_the_plain_meta_gradient(tiny_config, mode, task):
    """meta.checkpoint_steps rebuilds chunks of a segment in backward: the same
    training, to float rounding, as keeping the whole segment's graph. The pass
    without a graph steps the (eager) LSTM in place, every step once."""
    from hierarchy.experiment import build
    from hierarchy.trainer import MetaTrainer

    thetas = []
    for chunk in ("null", "2", "3"):
        config = tiny_config(
            f"meta.checkpoint_steps={chunk}", f"levels.0.mode={mode}", *task
        )
        top, _ = build(config)
        calls, step_ = [], top.rule.step_
        top.rule.step_ = lambda *args: calls.append(1) or step_(*args)
        trainer = MetaTrainer.from_config(top, config)
        for _ in range(3):
            trainer.train_epoch()
        thetas.append(top.rule.theta.detach().clone())
        assert len(calls) == (0 if chunk == "null" else 3 * top.horizon)
    for theta in thetas[1:]:
        torch.testing.assert_close(theta, thetas[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(thetas[0], build(tiny_config(*task))[0].rule.theta)
