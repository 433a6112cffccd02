"""Unrolling a level below under an update rule, in first-order or second-order mode.

One unroll step reads the gradient of the level below at its current parameters,
asks the rule for an update, applies it, and adds the new loss to the meta-loss:
theta_{t+1} = theta_t + m(grad L(theta_t), s_t; phi), meta-loss += w * L(theta_{t+1}).
The same loop serves every level: the top level runs it in truncated segments, an
inner level runs it over its whole horizon to define its own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hierarchy.rules import Params, State, UpdateRule

if TYPE_CHECKING:
    from hierarchy.level import Problem

MODES = ("first_order", "higher")


@dataclass
class Carry:
    """Where an unroll stands: parameters, rule state, and loss and gradient there."""

    params: Params
    state: State
    loss: Tensor
    grad: Tensor
    step: int

    def detach(self) -> Carry:
        """Cut the graph at a truncation boundary; the values carry on unchanged."""
        return Carry(
            params=self.params.detach(),
            state=tuple(s.detach() for s in self.state),
            loss=self.loss.detach(),
            grad=self.grad.detach(),
            step=self.step,
        )


def loss_and_grad(
    problem: Problem, params: Params, step: int, mode: str
) -> tuple[Tensor, Tensor]:
    """Loss (B,) of ``problem`` at ``params`` (B, D) and its gradient (B, D).

    In ``first_order`` mode the gradient is cut from the graph, the paper's
    assumption that second derivatives of the loss vanish; the loss itself stays
    differentiable in both modes, so the meta-loss reaches the rule through the
    parameter trajectory. In ``higher`` mode the gradient stays in the graph.
    """
    if not params.requires_grad:
        params = params.detach().requires_grad_(True)

    with torch.enable_grad():
        loss = problem.loss(params, step)
        (grad,) = torch.autograd.grad(
            loss.sum(), params, create_graph=mode == "higher", retain_graph=True
        )
    return loss, grad


def start(problem: Problem, rule: UpdateRule, mode: str) -> Carry:
    """Begin an unroll at the problem's initial parameters with a fresh rule state."""
    params = problem.init()
    loss, grad = loss_and_grad(problem, params, 0, mode)
    return Carry(params, rule.init_state(params), loss, grad, 0)


def unroll(
    rule: UpdateRule,
    theta: Tensor,
    problem: Problem,
    carry: Carry,
    steps: int,
    mode: str,
) -> tuple[Tensor, Carry]:
    """Run ``steps`` updates of ``rule`` at weights ``theta`` from ``carry``.

    Returns the meta-loss of this stretch, the sum of the losses after each update
    with weight 1 as in the paper, shape (B,), and the carry at its end.
    """
    meta_loss = torch.zeros_like(carry.loss)
    params, state, grad = carry.params, carry.state, carry.grad
    loss = carry.loss

    for step in range(carry.step + 1, carry.step + steps + 1):
        update, state = rule.step(theta, grad, state)
        params = params + update
        loss, grad = loss_and_grad(problem, params, step, mode)
        meta_loss = meta_loss + loss

    return meta_loss, Carry(params, state, loss, grad, carry.step + steps)
