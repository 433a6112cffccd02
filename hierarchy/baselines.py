"""Hand-designed optimisers as update rules, and their learning-rate search.

Each baseline is an ``UpdateRule`` whose only weight is its log learning rate, so
it runs through the same unroll as a learned rule, on the same problems, and a
batch of problems may each carry a learning rate of its own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hierarchy.distributed import Context
from hierarchy.level import Problem, Task
from hierarchy.rules import Params, State, UpdateRule, Updates

logger = logging.getLogger(__name__)


class HandRule(UpdateRule):
    """A hand-designed rule with a fixed learning rate stored as log(lr) in theta."""

    def __init__(self, lr: float = 1e-3) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        super().__init__({"log_lr": (1,)})
        with torch.no_grad():
            self.theta.fill_(math.log(lr))

    @property
    def lr(self) -> float:
        return math.exp(self.theta.item())

    def config(self) -> dict:
        return {"lr": self.lr}

    def _lr(self, theta: Tensor) -> Tensor:
        return self.unflatten(theta)["log_lr"].exp()


class SGD(HandRule):
    """Plain gradient descent: x <- x - lr g."""

    kind = "sgd"

    def init_state(self, params: Params) -> State:
        return ()

    def update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State]:
        return -self._lr(theta) * grad, ()


class NAG(HandRule):
    """Nesterov momentum in torch.optim.SGD's form, momentum 0.9."""

    kind = "nag"
    momentum = 0.9

    def init_state(self, params: Params) -> State:
        return (torch.zeros_like(params),)

    def update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State]:
        velocity = self.momentum * state[0] + grad
        step = grad + self.momentum * velocity
        return -self._lr(theta) * step, (velocity,)


class RMSprop(HandRule):
    """RMSprop in torch.optim's form, smoothing 0.99 and eps 1e-8."""

    kind = "rmsprop"
    alpha, eps = 0.99, 1e-8

    def init_state(self, params: Params) -> State:
        return (torch.zeros_like(params),)

    def update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State]:
        square = self.alpha * state[0] + (1 - self.alpha) * grad * grad
        return -self._lr(theta) * grad / (square.sqrt() + self.eps), (square,)


class Adam(HandRule):
    """Adam with bias correction, betas (0.9, 0.999) and eps 1e-8."""

    kind = "adam"
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def init_state(self, params: Params) -> State:
        zeros = torch.zeros_like(params)
        return (zeros, zeros.clone(), params.new_zeros(()))

    def update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State]:
        first, second, count = state
        count = count + 1
        first = self.beta1 * first + (1 - self.beta1) * grad
        second = self.beta2 * second + (1 - self.beta2) * grad * grad
        first_hat = first / (1 - self.beta1**count)
        second_hat = second / (1 - self.beta2**count)
        update = -self._lr(theta) * first_hat / (second_hat.sqrt() + self.eps)
        return update, (first, second, count)


BASELINES: dict[str, type[HandRule]] = {
    "sgd": SGD,
    "nag": NAG,
    "rmsprop": RMSprop,
    "adam": Adam,
}


def grid_final_losses(
    name: str, problem: Problem, grid: Sequence[float], horizon: int
) -> list[float]:
    """Mean final loss of baseline ``name`` at each rate of ``grid`` on ``problem``.

    All rates run as one batch: the B problems are repeated once per rate and
    each row carries its own log learning rate, so K rates cost one unroll of K * B
    problems instead of K unrolls of B.
    """
    from hierarchy.evaluate import optimise

    rule = BASELINES[name](1.0)
    batch = problem.init().shape[0]
    log_lrs = torch.tensor([math.log(lr) for lr in grid])
    theta = log_lrs.repeat_interleave(batch).unsqueeze(-1)
    losses, _ = optimise(rule, problem.repeat(len(grid)), horizon, theta=theta)
    return losses[-1].view(len(grid), batch).mean(dim=1).tolist()


def tune_learning_rate(
    name: str,
    task: Task,
    grid: Sequence[float],
    horizon: int,
    tasks: int,
    seed: int,
    context: Context | None = None,
) -> tuple[HandRule, dict[float, float]]:
    """Pick the learning rate of baseline ``name`` by grid search on train problems.

    Every rate runs on the same ``tasks`` problems from the train split; the
    score is the mean loss after ``horizon`` steps (a diverged run scores inf).
    Returns the baseline at the best rate and the score of every rate. With a
    distributed ``context`` the problems are shared among its ranks, and every
    rank gets the same scores.
    """
    context = Context() if context is None else context
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    problem = task.sample(tasks, torch.Generator().manual_seed(seed), "train", horizon)

    if context.world_size == 1:
        finals = grid_final_losses(name, problem, grid, horizon)
    else:
        # Shares of a batch of problems, not of rates, are what ranks split.
        finals = [
            context.trajectory(BASELINES[name](lr), problem, horizon)[-1].mean().item()
            for lr in grid
        ]
    scores = {
        lr: final if math.isfinite(final) else math.inf
        for lr, final in zip(grid, finals)
    }

    best = min(scores, key=scores.__getitem__)
    if len(grid) > 1 and best in (min(grid), max(grid)):
        logger.warning(
            "%s: the best learning rate %.3g is at the edge of the grid "
            "%s; widen eval.lr_grid",
            name,
            best,
            list(grid),
        )
    logger.debug("tuned %s: lr %.3g (scores %s)", name, best, scores)
    return BASELINES[name](best), scores
