"""A plain reference implementation of meta-training, to measure the library against.

``ReferenceLSTM`` is the paper's coordinatewise LSTM optimiser built from stock
modules: two ``nn.LSTMCell`` (input and hidden products as separate matmuls, as
torch computes them) and an ``nn.Linear`` head, after the same gradient
preprocessing as the library. ``reference_epoch`` meta-trains it the
straightforward way: one task at a time, the optimisee an ``nn.Module`` evaluated
at the task's flat parameters through ``torch.func.functional_call``, plain
autograd, truncated backpropagation with the same horizon and truncation, and one
step of the top optimiser per segment on the mean meta-loss of all tasks (the
gradients of each task's segment are accumulated). The meta-gradient is the
library's; only the way it is computed differs. ``reference_run`` evaluates a
trained reference the same plain way: one task at a time, no graph kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hierarchy.level import Problem
from hierarchy.rules import LSTMRule, preprocess
from tasks.mnist import MLPProblem
from tasks.quadratic import QuadraticProblem


class ReferenceLSTM(nn.Module):
    """Coordinatewise LSTM optimiser of stock modules: LSTMCell x layers + Linear."""

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        out_scale: float = 0.1,
        preprocess_p: float = 10.0,
    ) -> None:
        super().__init__()
        sizes = [2] + [hidden_size] * num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(i, hidden_size) for i in sizes[:-1])
        self.head = nn.Linear(hidden_size, 1)
        self.hidden_size, self.out_scale = hidden_size, out_scale
        self.preprocess_p = preprocess_p

    @classmethod
    def from_rule(cls, rule: LSTMRule) -> ReferenceLSTM:
        """A reference with the weights of a library ``LSTMRule`` (same gates)."""
        ref = cls(rule.hidden_size, rule.num_layers, rule.out_scale, rule.preprocess_p)
        views = rule.unflatten(rule.theta.detach())
        with torch.no_grad():
            for layer, cell in enumerate(ref.cells):
                weight, bias = views[f"w{layer}"], views[f"b{layer}"]
                cell.weight_ih.copy_(weight[: cell.input_size].T)
                cell.weight_hh.copy_(weight[cell.input_size :].T)
                cell.bias_ih.copy_(bias)
                cell.bias_hh.zero_()
            ref.head.weight.copy_(views["w_out"].T)
            ref.head.bias.copy_(views["b_out"])
        return ref

    def init_state(self, params: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Zero (h, c) of every layer for the coordinates of ``params`` (N,)."""
        zeros = params.new_zeros(len(params), self.hidden_size)
        return [(zeros, zeros) for _ in self.cells]

    def forward(
        self, grad: Tensor, state: list[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Update (N,) and new state for one task's gradient (N,)."""
        x = preprocess(grad, self.preprocess_p)
        new_state = []
        for cell, hc in zip(self.cells, state):
            h, c = cell(x, hc)
            new_state.append((h, c))
            x = h
        return self.head(x).squeeze(-1) * self.out_scale, new_state


class QuadraticModule(nn.Module):
    """f(x) = ||W x - y||^2 with x the module's parameter."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim))

    def forward(self, w: Tensor, y: Tensor) -> Tensor:
        return (w @ self.x - y).pow(2).sum()


def mlp_module(problem: MLPProblem) -> nn.Sequential:
    """The task's MLP as nn.Linear layers with its activation between them."""
    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
    layers: list[nn.Module] = []
    for depth, (fan_in, fan_out) in enumerate(problem.task.layers):
        if depth:
            layers.append(act[problem.task.activation]())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def task_loss(problem: Problem, module: nn.Module, b: int) -> callable:
    """Loss of task ``b`` of ``problem`` at flat parameters (D,) and a step."""
    if isinstance(problem, QuadraticProblem):

        def quadratic(params: Tensor, step: int) -> Tensor:
            args = (problem.w[b], problem.y[b])
            return functional_call(module, {"x": params}, args)

        return quadratic
    if isinstance(problem, MLPProblem):
        names = [n for n, _ in module.named_parameters()]

        def mlp(params: Tensor, step: int) -> Tensor:
            tensors, offset = {}, 0
            for k, (fan_in, fan_out) in enumerate(problem.task.layers):
                weight = params[offset : offset + fan_in * fan_out]
                offset += fan_in * fan_out
                tensors[names[2 * k]] = weight.view(fan_in, fan_out).T
                tensors[names[2 * k + 1]] = params[offset : offset + fan_out]
                offset += fan_out
            index = problem.batches[step % len(problem.batches), b]
            logits = functional_call(module, tensors, (problem.images[index],))
            return F.cross_entropy(logits, problem.labels[index])

        return mlp
    raise TypeError(f"no reference loss for {type(problem).__name__}")


def _module_and_losses(problem: Problem) -> list[callable]:
    """Each task's loss at flat parameters and a step, through one shared module."""
    if isinstance(problem, QuadraticProblem):
        module: nn.Module = QuadraticModule(problem.init().shape[1])
    else:
        module = mlp_module(problem)
    return [task_loss(problem, module, b) for b in range(len(problem.init()))]


def reference_epoch(
    rule: ReferenceLSTM,
    optimizer: torch.optim.Optimizer,
    problem: Problem,
    horizon: int,
    truncation: int,
) -> float:
    """One meta-epoch on ``problem``'s tasks, one task at a time; mean loss per step.

    Each segment of ``truncation`` steps unrolls every task in turn from where it
    stood, backpropagates its meta-loss (divided by the number of tasks), cuts
    its graph, and after the last task the optimizer takes one step.
    """
    x0 = problem.init()
    count = len(x0)
    losses = _module_and_losses(problem)
    carries = []
    for b in range(count):
        params = x0[b].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(losses[b](params, 0), params)
        carries.append((params.detach(), rule.init_state(params), grad, 0))

    total = 0.0
    for _ in range(math.ceil(horizon / truncation)):
        optimizer.zero_grad(set_to_none=True)
        for b in range(count):
            params, state, grad, step = carries[b]
            steps = min(truncation, horizon - step)
            meta_loss = 0.0
            for step in range(step + 1, step + steps + 1):
                update, state = rule(grad, state)
                params = params + update
                loss = losses[b](params, step)
                (grad,) = torch.autograd.grad(loss, params, retain_graph=True)
                meta_loss = meta_loss + loss
            (meta_loss / count).backward()
            total += meta_loss.item() / count
            state = [(h.detach(), c.detach()) for h, c in state]
            carries[b] = (params.detach(), state, grad.detach(), step)
        optimizer.step()
    return total / horizon


def reference_run(rule: ReferenceLSTM, problem: Problem, steps: int) -> Tensor:
    """Losses (steps + 1, B) of ``rule`` optimising each task of ``problem`` in
    turn for ``steps`` steps, as evaluation runs a trained optimiser: the
    gradient by autograd, the update with no graph."""
    x0 = problem.init()
    curves = []
    for b, loss_at in enumerate(_module_and_losses(problem)):
        params, state, curve = x0[b].clone(), rule.init_state(x0[b]), []
        for step in range(steps + 1):
            leaf = params.requires_grad_(True)
            loss = loss_at(leaf, step)
            (grad,) = torch.autograd.grad(loss, leaf)
            curve.append(loss.detach())
            if step == steps:
                break
            with torch.no_grad():
                update, state = rule(grad, state)
                params = params.detach() + update
        curves.append(torch.stack(curve))
    return torch.stack(curves, dim=1)
