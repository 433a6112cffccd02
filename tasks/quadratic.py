"""Random quadratics f(x) = ||W x - y||^2, the paper's synthetic optimisees."""

from __future__ import annotations

import torch
from einops import einsum
from torch import Tensor

from hierarchy.level import Params, Problem, Task


class QuadraticProblem(Problem):
    """A batch of B quadratics evaluated as one tensor op.

    Args:
        w: matrices, shape (B, n, n).
        y: targets, shape (B, n).
        x0: initial parameters, shape (B, n).
    """

    def __init__(self, w: Tensor, y: Tensor, x0: Tensor) -> None:
        self.w, self.y, self.x0 = w, y, x0

    def init(self) -> Params:
        return self.x0.clone()

    def loss(self, params: Params, step: int) -> Tensor:
        residual = einsum(self.w, params, "b i j, b j -> b i") - self.y
        return residual.pow(2).sum(dim=-1)

    def select(self, rows: slice) -> QuadraticProblem:
        return QuadraticProblem(self.w[rows], self.y[rows], self.x0[rows])

    def repeat(self, copies: int) -> QuadraticProblem:
        return QuadraticProblem(
            self.w.repeat(copies, 1, 1),
            self.y.repeat(copies, 1),
            self.x0.repeat(copies, 1),
        )


class QuadraticTask(Task):
    """Quadratics with W, y and the starting point x0 drawn i.i.d. standard normal.

    Every split draws from the same distribution; held-out problems differ only
    by the random stream they come from.
    """

    def __init__(self, dim: int = 10, device: torch.device | str = "cpu") -> None:
        if dim < 1:
            raise ValueError(f"quadratic dim must be a positive integer, got {dim}")
        self.dim = dim
        self.device = torch.device(device)

    def sample(
        self, batch_size: int, generator: torch.Generator, split: str, horizon: int
    ) -> QuadraticProblem:
        n = self.dim
        w = torch.randn(batch_size, n, n, generator=generator)
        y = torch.randn(batch_size, n, generator=generator)
        x0 = torch.randn(batch_size, n, generator=generator)
        return QuadraticProblem(*(t.to(self.device) for t in (w, y, x0)))

    def to(self, device: torch.device) -> QuadraticTask:
        self.device = torch.device(device)
        return self
