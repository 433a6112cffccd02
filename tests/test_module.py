"""Tests for tasks/module.py: an nn.Module optimisee evaluated through higher."""

import torch
from conftest import assert_rows_match
from torch import nn

from hierarchy.unroll import loss_and_grad
from tasks.mnist import MLPProblem, MNISTTask
from tasks.module import ModuleTask


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 784, generator=generator), torch.randint(
        10, (n,), generator=generator
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 6), nn.Sigmoid(), nn.Linear(6, 10))


def test_module_task_matches_the_batched_mnist_mlp() -> None:
    """Loss and gradient through higher equal those of the built-in batched MLP."""
    x, y = _data()
    module_task = ModuleTask(_mlp, (x, y), (x, y), batch_size=8)
    mnist_task = MNISTTask(x, y, x, y, hidden=(6,), batch_size=8)
    problem = module_task.sample(3, torch.Generator().manual_seed(1), "train", 4)

    # nn.Linear stores (out, in); the flat MNIST layout is (in, out) per layer.
    rows = []
    for row in problem.init():
        w1, b1, w2, b2 = module_task.unflatten(row)
        rows.append(torch.cat([w1.t().reshape(-1), b1, w2.t().reshape(-1), b2]))
    mirror = MLPProblem(mnist_task, torch.stack(rows), x, y, problem.batches)

    for mode in ("first_order", "higher"):
        loss, grad = loss_and_grad(problem, problem.init(), 2, mode)
        loss_ref, grad_ref = loss_and_grad(mirror, mirror.init(), 2, mode)
        torch.testing.assert_close(loss, loss_ref)
        w1_grad = grad[:, : 6 * 784].reshape(3, 6, 784).transpose(1, 2)
        w1_ref = grad_ref[:, : 784 * 6].reshape(3, 784, 6)
        torch.testing.assert_close(w1_grad, w1_ref)


def test_module_task_second_order_reaches_the_parameters() -> None:
    """In higher mode the gradient stays differentiable with respect to params."""
    x, y = _data()
    task = ModuleTask(_mlp, (x, y), (x, y), batch_size=8)
    problem = task.sample(2, torch.Generator().manual_seed(2), "train", 2)
    params = problem.init().requires_grad_(True)
    _, grad = loss_and_grad(problem, params, 0, "higher")
    (hessian_row,) = torch.autograd.grad(grad[:, 0].sum(), params)
    assert hessian_row.abs().sum() > 0


def test_module_task_initialisation_is_seeded() -> None:
    """The same generator seed gives the same initial networks and minibatches."""
    x, y = _data()
    task = ModuleTask(_mlp, (x, y), (x, y), batch_size=8)
    a = task.sample(2, torch.Generator().manual_seed(3), "train", 3)
    b = task.sample(2, torch.Generator().manual_seed(3), "train", 3)
    c = task.sample(2, torch.Generator().manual_seed(4), "train", 3)
    assert torch.equal(a.init(), b.init()) and torch.equal(a.batches, b.batches)
    assert not torch.equal(a.init(), c.init())
    assert not torch.equal(a.init()[0], a.init()[1])


def test_module_problem_selected_rows_keep_their_networks_and_minibatches() -> None:
    """A share of a batch of networks has their initialisations and minibatches."""
    x, y = _data()
    task = ModuleTask(_mlp, (x, y), (x, y), batch_size=8)
    problem = task.sample(4, torch.Generator().manual_seed(2), "train", 3)
    assert_rows_match(problem, slice(1, 3))
