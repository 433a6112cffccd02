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
    problem: Problem, params: Params, step: int, mode: str, keep_graph: bool = True
) -> tuple[Tensor, Tensor]:
    """Loss (B,) of ``problem`` at ``params`` (B, D) and its gradient (B, D).

    In ``first_order`` mode the gradient is cut from the graph, the paper's
    assumption that second derivatives of the loss vanish; the loss itself stays
    differentiable in both modes, so the meta-loss reaches the rule through the
    parameter trajectory. In ``higher`` mode the gradient stays in the graph.

    With ``keep_graph=False`` (first_order only) the loss's graph is dropped and
    the loss returned is loss + (params - params) . grad: the same value and the
    same gradient in ``params``, so backward through the meta-loss reuses the
    gradient already computed instead of a second backward through the level
    below. Its own gradient is constant, so the meta-loss must then be
    differentiated once only, not twice (a ``higher`` level above). Where no
    graph of the loss is kept, the problem's ``value_and_grad`` computes both.
    """
    if not keep_graph and mode != "first_order":
        raise ValueError(f"keep_graph=False needs first_order mode, not {mode!r}")
    if mode == "first_order" and not (keep_graph and params.requires_grad):
        loss, grad = problem.value_and_grad(params.detach(), step)
        if params.requires_grad:
            loss = loss + ((params - params.detach()) * grad).sum(dim=-1)
        return loss, grad

    leaf = params if params.requires_grad else params.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = problem.loss(leaf, step)
        (grad,) = torch.autograd.grad(
            loss.sum(), leaf, create_graph=mode == "higher", retain_graph=True
        )
    return loss, grad


def start(
    problem: Problem,
    rule: UpdateRule,
    mode: str,
    keep_graph: bool = True,
    in_place: bool = False,
) -> Carry:
    """Begin an unroll at the problem's initial parameters with a fresh rule state
    (``inference_state``'s, for an ``unroll`` with ``in_place``)."""
    params = problem.init()
    loss, grad = loss_and_grad(problem, params, 0, mode, keep_graph)
    state = rule.inference_state(params) if in_place else rule.init_state(params)
    return Carry(params, state, loss, grad, 0)


def unroll(
    rule: UpdateRule,
    theta: Tensor,
    problem: Problem,
    carry: Carry,
    steps: int,
    mode: str,
    keep_graph: bool = True,
    in_place: bool = False,
) -> tuple[Tensor, Carry]:
    """Run ``steps`` updates of ``rule`` at weights ``theta`` from ``carry``.

    Returns the meta-loss of this stretch, the sum of the losses after each update
    with weight 1 as in the paper, shape (B,), and the carry at its end.
    ``keep_graph`` is as in ``loss_and_grad``. With ``in_place`` the rule runs
    its inference step ``step_``, which keeps no graph and advances the carry's
    state in place: for use under ``torch.no_grad`` on a state the caller owns
    (faster for the LSTM, to float rounding the same values).
    """
    meta_loss = torch.zeros_like(carry.loss)
    params, state, grad = carry.params, carry.state, carry.grad
    loss = carry.loss

    for step in range(carry.step + 1, carry.step + steps + 1):
        if in_place:
            update = rule.step_(theta, grad, state)
        else:
            update, state = rule.step(theta, grad, state)
        params = params + update
        loss, grad = loss_and_grad(problem, params, step, mode, keep_graph)
        meta_loss = meta_loss + loss

    return meta_loss, Carry(params, state, loss, grad, carry.step + steps)
