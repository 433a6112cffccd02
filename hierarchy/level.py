"""The level abstraction and the recursion that stacks levels to any depth.

A ``Task`` samples batches of ``Problem``s: something with initial parameters and
a loss. A ``Level`` owns an update rule and is itself a ``Task`` for the level
above: its problems start from the rule's initial weights, and their loss at
weights phi is the meta-loss of unrolling the level below under the rule at phi.
Nothing here knows how many levels there are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from hierarchy.rules import Params, UpdateRule
from hierarchy.unroll import MODES, start, unroll

SPLITS = ("train", "val", "test")


class Problem(ABC):
    """A batch of B independent objectives over flat parameters of length D.

    A new problem writes ``init`` and ``loss``; the loss must be differentiable
    in ``params`` (twice, for a level unrolled in ``higher`` mode).
    """

    @abstractmethod
    def init(self) -> Params:
        """Initial parameters, shape (B, D); the same values on every call."""

    @abstractmethod
    def loss(self, params: Params, step: int) -> Tensor:
        """Loss of each problem at ``params`` (B, D) at unroll step ``step``: (B,).

        The step selects stochastic data (a minibatch), so that every optimiser
        run on this problem sees the same minibatch at the same step.
        """


class Task(ABC):
    """A distribution of problems that a level learns to optimise.

    A new task sets ``dim`` and writes ``sample``, drawing every random number
    from ``generator`` so that a seed fixes the problems; one that holds data
    tensors also writes ``to``. See examples/custom_level.py.
    """

    dim: int
    """Number of parameters D of one problem."""

    @abstractmethod
    def sample(
        self, batch_size: int, generator: torch.Generator, split: str, horizon: int
    ) -> Problem:
        """Draw ``batch_size`` problems for an unroll of ``horizon`` steps.

        ``split`` is one of ``train``, ``val`` or ``test``; tasks with data keep
        the test split's data disjoint from the others.
        """

    def to(self, device: torch.device) -> Task:
        """Move any data the task holds; tasks without data return themselves."""
        return self


class Level(Task):
    """Level k >= 1: an update rule that optimises the level below.

    Args:
        rule: the coordinatewise rule m_k whose weights are this level's parameters.
        below: the task of level k - 1 (an optimisee task or another level).
        horizon: steps T_{k-1} of the unroll of the level below.
        mode: ``first_order`` or ``higher``, how gradients reach the rule.
    """

    def __init__(self, rule: UpdateRule, below: Task, horizon: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unroll mode {mode!r} is not one of {list(MODES)}")
        if horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon}")
        self.rule = rule
        self.below = below
        self.horizon = horizon
        self.mode = mode
        self.dim = rule.num_params

    def sample(
        self, batch_size: int, generator: torch.Generator, split: str, horizon: int
    ) -> Problem:
        return LevelProblem(self, batch_size, generator, split)

    def to(self, device: torch.device) -> Level:
        self.rule.to(device)
        self.below = self.below.to(device)
        return self

    def meta_loss(
        self, theta: Tensor, batch_size: int, generator: torch.Generator, split: str
    ) -> Tensor:
        """Meta-loss (B,) of a whole unroll of fresh problems of the level below."""
        problem = self.below.sample(batch_size, generator, split, self.horizon)
        carry = start(problem, self.rule, self.mode)
        loss, _ = unroll(self.rule, theta, problem, carry, self.horizon, self.mode)
        return loss

    @property
    def depth(self) -> int:
        """Number of levels from this one down to the optimisee, inclusive."""
        below = self.below.depth if isinstance(self.below, Level) else 1
        return below + 1


class LevelProblem(Problem):
    """B copies of a level's rule, each trained from the rule's initial weights.

    Each loss evaluation samples fresh problems of the level below, one per copy,
    so the loss is stochastic like a minibatch loss.
    """

    def __init__(
        self, level: Level, batch_size: int, generator: torch.Generator, split: str
    ) -> None:
        self.level = level
        self.batch_size = batch_size
        self.generator = generator
        self.split = split
        self._init = level.rule.theta.detach().clone()

    def init(self) -> Params:
        return self._init.expand(self.batch_size, -1).clone()

    def loss(self, params: Params, step: int) -> Tensor:
        return self.level.meta_loss(params, self.batch_size, self.generator, self.split)


def build_stack(
    task: Task, rules: list[UpdateRule], horizons: list[int], modes: list[str]
) -> Level:
    """Stack ``rules`` on ``task``: rules[0] trains the optimisee, rules[-1] is top.

    ``horizons[k]`` is the unroll length of the level that rules[k] optimises.
    """
    if not rules:
        raise ValueError("a stack needs at least one level; got an empty list")
    if not len(rules) == len(horizons) == len(modes):
        raise ValueError(
            f"rules, horizons and modes must have one entry per level, got "
            f"{len(rules)}, {len(horizons)} and {len(modes)}"
        )
    below: Task = task
    for rule, horizon, mode in zip(rules, horizons, modes):
        below = Level(rule, below, horizon, mode)
    assert isinstance(below, Level)
    return below
