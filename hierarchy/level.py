"""The level abstraction and the recursion that stacks levels to any depth.

A ``Task`` samples batches of ``Problem``s: something with initial parameters and
a loss. A ``Level`` owns an update rule and is itself a ``Task`` for the level
above: its problems start from the rule's initial weights, and their loss at
weights phi is the meta-loss of unrolling the level below under the rule at phi.
Nothing here knows how many levels there are.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from hierarchy.rules import Params, UpdateRule
from hierarchy.unroll import MODES, start, unroll

SPLITS = ("train", "val", "test")


class Problem(ABC):
    """A batch of B independent objectives over flat parameters of length D.

    A new problem writes ``init`` and ``loss``; the loss must be differentiable
    in ``params`` (twice, for a level unrolled in ``higher`` mode). One whose
    gradient is cheap to write by hand may also write ``value_and_grad``.
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

    def value_and_grad(self, params: Params, step: int) -> tuple[Tensor, Tensor]:
        """Loss (B,) at ``params`` (B, D) and its gradient (B, D), as values with
        no graph: what a first-order unroll asks at every step.

        This version differentiates ``loss`` by autograd. A problem overrides it
        where a hand-written gradient spares autograd's bookkeeping, which on a
        small network costs as much as the arithmetic.
        """
        leaf = params.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(leaf, step)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), grad

    def select(self, rows: slice) -> Problem:
        """The problems ``rows`` (a contiguous slice) of this batch, on their own.

        A process that unrolls its share of a meta-batch needs its rows to be the
        very problems they are in the whole batch. This version fits any problem:
        it evaluates the whole batch with the other rows held at their initial
        parameters. Problems override it to hold and evaluate only their rows.
        """
        return RowsOf(self, rows)

    def repeat(self, copies: int) -> Problem:
        """``copies`` copies of this batch one after another: row i * B + b is
        problem b. Runs several settings (learning rates) as one batch. This
        version fits any problem by evaluating each copy's rows in turn; problems
        override it with batch tensors repeated once, evaluated in one go."""
        return Repeated(self, copies)


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
        meta_batch: problems of the level below that each evaluation of this
            level's loss averages, when a learned level above trains this one.
    """

    def __init__(
        self,
        rule: UpdateRule,
        below: Task,
        horizon: int,
        mode: str,
        meta_batch: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unroll mode {mode!r} is not one of {list(MODES)}")
        if horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon}")
        if meta_batch < 1:
            raise ValueError(f"meta_batch must be a positive integer, got {meta_batch}")
        self.rule = rule
        self.below = below
        self.horizon = horizon
        self.mode = mode
        self.meta_batch = meta_batch
        self.dim = rule.num_params
        self.keep_graph = True
        """False: this level's unroll drops the graph of each loss of the level
        below (see ``loss_and_grad``). ``MetaTrainer`` sets it where the unroll is
        first_order and its meta-loss is differentiated once only."""
        self.track_grad_norm = False
        self.grad_norm = math.nan
        """With ``track_grad_norm``: mean norm of the gradient the rule saw at the
        last step of its latest unroll (a diagnostic; it costs a sync per unroll)."""

    def sample(
        self, batch_size: int, generator: torch.Generator, split: str, horizon: int
    ) -> Problem:
        return LevelProblem(self, batch_size, generator, split)

    def to(self, device: torch.device) -> Level:
        self.rule.to(device)
        self.below = self.below.to(device)
        return self

    def meta_loss(
        self,
        theta: Tensor,
        batch_size: int,
        generator: torch.Generator,
        split: str,
        rows: slice | None = None,
    ) -> Tensor:
        """Meta-loss (B,) of whole unrolls of fresh problems of the level below.

        Each of the B rows of a batched ``theta`` (B, P) unrolls ``meta_batch``
        problems of its own, and its meta-loss is their mean. With ``rows``, only
        those of the ``batch_size`` rows are unrolled (B of them), on the same
        problems of the level below as in the whole batch.
        """
        n = self.meta_batch
        problem = self.below.sample(batch_size * n, generator, split, self.horizon)
        if rows is not None:
            problem = problem.select(slice(rows.start * n, rows.stop * n))
            batch_size = rows.stop - rows.start
        if theta.dim() == 2:
            theta = theta.repeat_interleave(n, dim=0)
        carry = start(problem, self.rule, self.mode, self.keep_graph)
        loss, carry = unroll(
            self.rule, theta, problem, carry, self.horizon, self.mode, self.keep_graph
        )
        if self.track_grad_norm:
            self.grad_norm = carry.grad.detach().norm(dim=-1).mean().item()
        return loss.view(batch_size, n).mean(dim=1)

    @property
    def depth(self) -> int:
        """Number of levels from this one down to the optimisee, inclusive."""
        below = self.below.depth if isinstance(self.below, Level) else 1
        return below + 1


class LevelProblem(Problem):
    """B copies of a level's rule, each trained from the rule's initial weights.

    Each loss evaluation unrolls fresh problems of the level below, so the loss
    is stochastic like a minibatch loss. The problems are fixed by the step, as a
    minibatch is: two optimisers training these copies see the same problems at
    the same step, and a loss evaluated twice at one step is the same function.
    """

    def __init__(
        self, level: Level, batch_size: int, generator: torch.Generator, split: str
    ) -> None:
        self.level = level
        self.batch_size = batch_size
        self.split = split
        self.seed = int(torch.randint(2**62, (1,), generator=generator))
        self._init = level.rule.theta.detach().clone()
        self.rows: slice | None = None
        """The rows of the batch this problem holds, after ``select``; None: all."""

    def init(self) -> Params:
        return self._init.expand(self._count, -1).clone()

    @property
    def _count(self) -> int:
        rows = self.rows
        return self.batch_size if rows is None else rows.stop - rows.start

    def loss(self, params: Params, step: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + step)
        return self.level.meta_loss(
            params, self.batch_size, generator, self.split, self.rows
        )

    def select(self, rows: slice) -> LevelProblem:
        start_row, stop_row = _check_rows(rows, self._count)
        offset = 0 if self.rows is None else self.rows.start
        chosen = copy.copy(self)
        chosen.rows = slice(offset + start_row, offset + stop_row)
        return chosen


class RowsOf(Problem):
    """Some rows of a problem batch, evaluated through the whole batch.

    The other rows stay at their initial parameters and their losses are dropped.
    """

    # Known shortcoming: every loss evaluation costs the whole batch's, so a
    # process unrolling its share of a problem without its own ``select`` saves
    # only the update rule's work, not the loss's.

    def __init__(self, problem: Problem, rows: slice) -> None:
        self.problem = problem
        self.base = problem.init().detach()
        self.start, self.stop = _check_rows(rows, len(self.base))

    def init(self) -> Params:
        return self.base[self.start : self.stop].clone()

    def loss(self, params: Params, step: int) -> Tensor:
        whole = torch.cat(
            [self.base[: self.start], params, self.base[self.stop :]], dim=0
        )
        return self.problem.loss(whole, step)[self.start : self.stop]


class Repeated(Problem):
    """Copies of a problem batch, each evaluated through the problem itself."""

    def __init__(self, problem: Problem, copies: int) -> None:
        if copies < 1:
            raise ValueError(f"copies must be a positive integer, got {copies}")
        self.problem, self.copies = problem, copies

    def init(self) -> Params:
        return self.problem.init().repeat(self.copies, 1)

    def loss(self, params: Params, step: int) -> Tensor:
        return torch.cat(
            [self.problem.loss(part, step) for part in params.chunk(self.copies)]
        )


def _check_rows(rows: slice, batch_size: int) -> tuple[int, int]:
    """Start and stop of ``rows`` in a batch; a contiguous slice is required."""
    start_row, stop_row, step = rows.indices(batch_size)
    if step != 1 or stop_row < start_row:
        raise ValueError(
            f"rows {rows} of a batch of {batch_size} problems: expected a "
            f"contiguous slice with step 1"
        )
    return start_row, stop_row


def build_stack(
    task: Task,
    rules: list[UpdateRule],
    horizons: list[int],
    modes: list[str],
    meta_batches: list[int] | None = None,
) -> Level:
    """Stack ``rules`` on ``task``: rules[0] trains the optimisee, rules[-1] is top.

    ``horizons[k]`` is the unroll length of the level that rules[k] optimises, and
    ``meta_batches[k]`` (default 1) the problems of that level per loss evaluation.
    """
    meta_batches = [1] * len(rules) if meta_batches is None else meta_batches
    if not rules:
        raise ValueError("a stack needs at least one level; got an empty list")
    if not len(rules) == len(horizons) == len(modes) == len(meta_batches):
        raise ValueError(
            f"rules, horizons, modes and meta-batches must have one entry per "
            f"level, got {len(rules)}, {len(horizons)}, {len(modes)} and "
            f"{len(meta_batches)}"
        )
    below: Task = task
    for rule, horizon, mode, n in zip(rules, horizons, modes, meta_batches):
        below = Level(rule, below, horizon, mode, n)
    assert isinstance(below, Level)
    return below
