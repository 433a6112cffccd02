"""Tests for hierarchy.unroll: meta-gradients in both modes, carries, truncation."""

from __future__ import annotations

import pytest
import torch

from hierarchy.rules import LSTMRule, MLPRule, UpdateRule
from hierarchy.unroll import Carry, loss_and_grad, start, unroll
from tasks.quadratic import QuadraticProblem


class LearnedLR(UpdateRule):
    """update = -theta[0] * grad: gradient descent with a learned learning rate."""

    kind = "learned_lr"

    def __init__(self, lr: float) -> None:
        super().__init__({"lr": (1,)})
        with torch.no_grad():
            self.theta.fill_(lr)

    def init_state(self, params):
        return ()

    def update(self, theta, grad, state):
        return -self.unflatten(theta)["lr"] * grad, ()


def _quadratic(batch: int = 1, dim: int = 2, seed: int = 0) -> QuadraticProblem:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, dim, dim, generator=generator, dtype=torch.float64)
    y = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    x0 = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return QuadraticProblem(w, y, x0)


def _meta_loss(rule, theta, problem, steps, mode) -> torch.Tensor:
    carry = start(problem, rule, mode)
    loss, _ = unroll(rule, theta, problem, carry, steps, mode)
    return loss.sum()


def test_higher_matches_finite_differences() -> None:
    """The second-order meta-gradient equals central finite differences."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=3, num_layers=2, out_scale=0.1).double()
    problem = _quadratic(batch=2, dim=2, seed=1)
    theta = rule.theta.detach().clone().requires_grad_(True)

    _meta_loss(rule, theta, problem, 3, "higher").backward()
    grad = theta.grad.clone()

    eps = 1e-6
    coords = torch.randperm(rule.num_params, generator=torch.Generator().manual_seed(0))
    checked = 0
    for i in coords[:12].tolist():
        plus, minus = theta.detach().clone(), theta.detach().clone()
        plus[i] += eps
        minus[i] -= eps
        with torch.no_grad():
            up = _meta_loss(rule, plus, problem, 3, "higher").item()
            down = _meta_loss(rule, minus, problem, 3, "higher").item()
        estimate = (up - down) / (2 * eps)
        assert grad[i].item() == pytest.approx(estimate, rel=1e-4, abs=1e-8), i
        checked += abs(estimate) > 1e-6
    assert checked >= 6  # the coordinates checked carry real signal


def test_first_order_differs_from_finite_differences() -> None:
    """first_order drops second derivatives, so its gradient is not the true one."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=3, num_layers=1).double()
    problem = _quadratic(batch=2, dim=2, seed=1)
    first = rule.theta.detach().clone().requires_grad_(True)
    second = rule.theta.detach().clone().requires_grad_(True)
    _meta_loss(rule, first, problem, 3, "first_order").backward()
    _meta_loss(rule, second, problem, 3, "higher").backward()
    assert not torch.allclose(first.grad, second.grad, rtol=1e-3)


def _hand_gradients(problem: QuadraticProblem, a: float):
    """d/da of f(x1) + f(x2) and of f(x2) for x <- x - a g, both modes, by hand.

    With f(x) = ||Wx - y||^2, grad f(x) = A x - b, A = 2 W^T W, b = 2 W^T y.
    x1 = x0 - a g0, x2 = x1 - a g1. Treating the gradients fed to the rule as
    constants, dx1/da = -g0 and dx2/da = -g0 - g1; keeping them,
    dx2/da = -g0 - g1 - a A dx1/da = -g0 - g1 + a A g0.
    """
    w, y, x0 = problem.w[0], problem.y[0], problem.x0[0]
    big_a, b = 2 * w.T @ w, 2 * w.T @ y
    g0 = big_a @ x0 - b
    x1 = x0 - a * g0
    g1 = big_a @ x1 - b
    x2 = x1 - a * g1
    g2 = big_a @ x2 - b
    dx1 = -g0
    dx2_first = -g0 - g1
    dx2_higher = -g0 - g1 + a * big_a @ g0
    return {
        "first_order": (g1 @ dx1 + g2 @ dx2_first, g2 @ dx2_first),
        "higher": (g1 @ dx1 + g2 @ dx2_higher, g2 @ dx2_higher),
    }


@pytest.mark.parametrize("mode", ["first_order", "higher"])
def test_two_steps_match_hand_derivation(mode: str) -> None:
    """Both modes give the hand-derived d/dtheta of the meta-loss and of L(x_2)."""
    problem = _quadratic(batch=1, dim=2, seed=3)
    rule = LearnedLR(0.05).double()
    a = rule.theta.item()  # 0.05 as stored in float32, then widened
    expected_sum, expected_last = _hand_gradients(problem, a)[mode]

    theta = rule.theta.detach().clone().requires_grad_(True)
    carry = start(problem, rule, mode)
    meta_loss, end = unroll(rule, theta, problem, carry, 2, mode)
    (d_sum,) = torch.autograd.grad(meta_loss.sum(), theta, retain_graph=True)
    (d_last,) = torch.autograd.grad(end.loss.sum(), theta)

    assert d_sum.item() == pytest.approx(expected_sum.item(), rel=1e-10)
    assert d_last.item() == pytest.approx(expected_last.item(), rel=1e-10)


def test_first_order_differs_from_higher_on_hand_problem() -> None:
    """On the hand problem the two modes' gradients differ by the a A g0 term."""
    problem = _quadratic(batch=1, dim=2, seed=3)
    rule = LearnedLR(0.05).double()
    grads = {}
    for mode in ("first_order", "higher"):
        theta = rule.theta.detach().clone().requires_grad_(True)
        _meta_loss(rule, theta, problem, 2, mode).backward()
        grads[mode] = theta.grad.item()
    hand = _hand_gradients(problem, rule.theta.item())
    gap = (hand["higher"][0] - hand["first_order"][0]).item()
    assert abs(gap) > 1e-3 * abs(grads["higher"])
    assert grads["higher"] - grads["first_order"] == pytest.approx(gap, rel=1e-8)


@pytest.mark.parametrize("mode", ["first_order", "higher"])
def test_loss_and_grad_graph_by_mode(mode: str) -> None:
    """The loss is differentiable in both modes; the gradient only in higher."""
    problem = _quadratic(batch=2, dim=3)
    theta = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    params = problem.init() * theta
    loss, grad = loss_and_grad(problem, params, 0, mode)
    assert loss.shape == (2,) and grad.shape == (2, 3)
    assert loss.requires_grad
    assert grad.requires_grad == (mode == "higher")
    # The gradient is the analytic one, 2 W^T (W x - y).
    x = params.detach()
    residual = torch.einsum("bij,bj->bi", problem.w, x) - problem.y
    expected = 2 * torch.einsum("bij,bi->bj", problem.w, residual)
    torch.testing.assert_close(grad.detach(), expected)


class CountedValueAndGrad(QuadraticProblem):
    """A quadratic problem that counts its calls of ``value_and_grad``."""

    calls = 0

    def value_and_grad(self, params, step):
        CountedValueAndGrad.calls += 1
        return super().value_and_grad(params, step)


@pytest.mark.parametrize(
    "mode, keep_graph, needs_grad, graph_free",
    [
        ("first_order", False, True, True),
        ("first_order", True, False, True),
        ("first_order", True, True, False),
        ("higher", True, True, False),
        ("higher", True, False, False),
    ],
)
def test_loss_and_grad_asks_value_and_grad_where_no_graph_is_kept(
    mode: str, keep_graph: bool, needs_grad: bool, graph_free: bool
) -> None:
    """A first-order step that keeps no graph of the loss takes the problem's
    value_and_grad; one that keeps it, or a higher-order one, runs autograd.
    Both give the same values, and the same gradient in params."""
    base = _quadratic(batch=2, dim=3)
    problem = CountedValueAndGrad(base.w, base.y, base.x0)
    theta = torch.tensor([0.7], dtype=torch.float64, requires_grad=needs_grad)
    params = problem.init() * theta
    CountedValueAndGrad.calls = 0
    loss, grad = loss_and_grad(problem, params, 0, mode, keep_graph)
    assert CountedValueAndGrad.calls == int(graph_free)

    leaf = params.detach().requires_grad_(True)
    expected = problem.loss(leaf, 0)
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    assert torch.equal(loss.detach(), expected.detach())
    assert torch.equal(grad.detach(), expected_grad)
    if needs_grad:
        (d_theta,) = torch.autograd.grad(loss.sum(), theta)
        (expected_d_theta,) = torch.autograd.grad(
            problem.loss(problem.init() * theta, 0).sum(), theta
        )
        torch.testing.assert_close(d_theta, expected_d_theta)


def test_start_evaluates_initial_point() -> None:
    """start gives x0, a fresh state, the loss and gradient at x0, and step 0."""
    problem = _quadratic(batch=2, dim=3)
    rule = MLPRule(hidden_size=3, momenta=(0.9,)).double()
    carry = start(problem, rule, "first_order")
    assert torch.equal(carry.params, problem.x0)
    assert carry.step == 0
    assert len(carry.state) == 1 and not carry.state[0].any()
    residual = torch.einsum("bij,bj->bi", problem.w, problem.x0) - problem.y
    torch.testing.assert_close(carry.loss.detach(), residual.pow(2).sum(-1))
    assert carry.params.grad_fn is None


def test_unroll_meta_loss_is_sum_of_losses_after_each_step() -> None:
    """meta-loss is sum_t L(x_t) for t = 1..T, and the carry advances T steps."""
    problem = _quadratic(batch=3, dim=4, seed=2)
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=3, num_layers=1).double()
    theta = rule.theta.detach()
    carry = start(problem, rule, "first_order")
    meta_loss, end = unroll(rule, theta, problem, carry, 4, "first_order")

    losses, step_carry = [], carry
    for _ in range(4):
        _, step_carry = unroll(rule, theta, problem, step_carry, 1, "first_order")
        losses.append(step_carry.loss)
    assert end.step == 4 and step_carry.step == 4
    torch.testing.assert_close(meta_loss, torch.stack(losses).sum(0))
    torch.testing.assert_close(end.params, step_carry.params)
    torch.testing.assert_close(end.loss, problem.loss(end.params, 4))


def test_unroll_in_segments_equals_one_unroll() -> None:
    """Two unrolls of 2 + 3 steps reach the same point and loss as one of 5."""
    problem = _quadratic(batch=2, dim=3, seed=4)
    torch.manual_seed(1)
    rule = MLPRule(hidden_size=4, momenta=(0.5,)).double()
    theta = rule.theta.detach()
    carry = start(problem, rule, "first_order")
    whole, end = unroll(rule, theta, problem, carry, 5, "first_order")
    first, mid = unroll(rule, theta, problem, carry, 2, "first_order")
    second, end2 = unroll(rule, theta, problem, mid.detach(), 3, "first_order")
    assert end2.step == 5
    torch.testing.assert_close(first + second, whole)
    torch.testing.assert_close(end2.params, end.params)


def test_batched_theta_rows_are_independent() -> None:
    """With theta (B, P), row b of the meta-loss depends only on theta[b]."""
    problem = _quadratic(batch=2, dim=3, seed=5)
    rule = LearnedLR(0.01).double()
    thetas = torch.tensor([[0.01], [0.05]], dtype=torch.float64, requires_grad=True)
    loss, _ = unroll(rule, thetas, problem, start(problem, rule, "higher"), 3, "higher")
    for b in range(2):
        single = QuadraticProblem(
            problem.w[b : b + 1], problem.y[b : b + 1], problem.x0[b : b + 1]
        )
        alone, _ = unroll(
            rule, thetas[b].detach(), single, start(single, rule, "higher"), 3, "higher"
        )
        torch.testing.assert_close(loss[b : b + 1].detach(), alone.detach())
    (grad,) = torch.autograd.grad(loss[0], thetas)
    assert grad[0].abs().item() > 0 and grad[1].item() == 0


def test_carry_detach_cuts_graph_keeps_values() -> None:
    """Carry.detach leaves equal values and no tensor with a graph."""
    problem = _quadratic(batch=2, dim=3)
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=3, num_layers=1).double()
    carry = start(problem, rule, "higher")
    _, end = unroll(rule, rule.theta, problem, carry, 2, "higher")
    tensors = [end.params, end.loss, end.grad, *end.state]
    assert all(t.grad_fn is not None for t in tensors)
    cut = end.detach()
    assert isinstance(cut, Carry) and cut.step == end.step == 2
    for before, after in zip(tensors, [cut.params, cut.loss, cut.grad, *cut.state]):
        assert after.grad_fn is None and not after.requires_grad
        assert torch.equal(before.detach(), after)


@pytest.mark.parametrize("in_place", [False, True])
def test_evaluation_keeps_no_graph_of_past_losses(in_place: bool) -> None:
    """The losses that evaluation keeps are values: the graphs that
    produced them (every step's activations) are freed as the run goes."""
    import gc
    import weakref

    from hierarchy.evaluate import optimise

    problem = _quadratic(batch=3, dim=4)
    raw, alive = [], []
    loss = problem.loss

    def recording(params, step):
        gc.collect()
        alive.append(sum(ref() is not None for ref in raw))
        value = loss(params, step)
        raw.append(weakref.ref(value))
        return value

    problem.loss = recording
    rule = MLPRule(hidden_size=3).double()
    losses, _ = optimise(rule, problem, 5, in_place=in_place)
    # At most the loss of the step before is still referenced, by the carry.
    assert len(raw) == 6 and max(alive) <= 1
    assert losses.shape == (6, 3)


@pytest.mark.parametrize("kind", ["lstm", "mlp", "learned_lr"])
def test_in_place_evaluation_follows_the_unroll(kind: str) -> None:
    """``optimise`` with ``in_place`` (``step_``, as evaluation runs a rule) gives
    the unroll's losses and end point: to rounding for the LSTM, whose in-place
    step has its own layout, and exactly for rules that keep ``update``'s."""
    from hierarchy.evaluate import optimise

    torch.manual_seed(0)
    rule = {"lstm": LSTMRule, "mlp": MLPRule}.get(kind, lambda **_: LearnedLR(0.05))(
        hidden_size=4
    ).double()
    problem = _quadratic(batch=3, dim=5)
    losses, end = optimise(rule, problem, 6)
    calls, step_ = [], rule.step_
    rule.step_ = lambda *args: calls.append(1) or step_(*args)
    in_place, in_place_end = optimise(rule, problem, 6, in_place=True)
    assert len(calls) == 6
    if kind == "lstm":
        torch.testing.assert_close(in_place, losses)
        torch.testing.assert_close(in_place_end, end)
    else:
        assert torch.equal(in_place, losses) and torch.equal(in_place_end, end)
