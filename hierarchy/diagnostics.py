"""Hypergradient diagnostics: the analytic meta-gradient against finite differences.

The top rule's meta-gradient is what every level's learning rests on; this check
says whether autograd's value is the derivative of the meta-loss actually being
minimised. In ``higher`` mode the two agree to rounding; ``first_order`` mode
drops the second-order terms on purpose, so there they differ by those terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hierarchy.level import Level
from hierarchy.unroll import start, unroll


@dataclass
class GradientCheck:
    """Directional derivatives of the meta-loss, analytic and numeric."""

    mode: str
    eps: float
    analytic: list[float]
    numeric: list[float]

    @property
    def max_relative_error(self) -> float:
        """Largest |analytic - numeric| / max(|numeric|, tiny) over directions."""
        return max(
            abs(a - n) / max(abs(n), 1e-12) for a, n in zip(self.analytic, self.numeric)
        )

    def summary(self) -> str:
        """One line for the log."""
        note = (
            "" if self.mode == "higher" else " (first_order drops second-order terms)"
        )
        return (
            f"meta-gradient check, {self.mode} mode{note}: largest relative error "
            f"{self.max_relative_error:.3g} over {len(self.analytic)} directions, "
            f"eps {self.eps:g}"
        )


def check_meta_gradient(
    top: Level,
    meta_batch: int,
    steps: int,
    seed: int = 0,
    directions: int = 3,
    eps: float | None = None,
) -> GradientCheck:
    """Directional derivatives of the meta-loss of ``steps`` unrolled steps of
    ``meta_batch`` fresh problems at the top rule's weights, by autograd and by
    central differences along random unit directions.

    The problems are drawn from ``seed`` anew for every evaluation, so all
    evaluations see the same ones. ``eps`` defaults to 1e-3 in float32 and 1e-6
    in float64; float32 agreement is to about 1e-2 at best.
    """
    theta = top.rule.theta.detach().clone()
    if eps is None:
        eps = 1e-6 if theta.dtype == torch.float64 else 1e-3

    def meta_loss(weights: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        problem = top.below.sample(meta_batch, generator, "train", top.horizon)
        carry = start(problem, top.rule, top.mode)
        loss, _ = unroll(top.rule, weights, problem, carry, steps, top.mode)
        return loss.mean()

    weights = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(meta_loss(weights), weights)

    analytic, numeric = [], []
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(directions):
        direction = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        direction = (direction / direction.norm()).to(theta.device)
        with torch.no_grad():
            plus = meta_loss(theta + eps * direction).item()
            minus = meta_loss(theta - eps * direction).item()
        analytic.append((grad @ direction).item())
        numeric.append((plus - minus) / (2 * eps))
    if not all(map(math.isfinite, analytic + numeric)):
        raise FloatingPointError(
            f"the meta-loss or its gradient is not finite at the current weights "
            f"(analytic {analytic}, numeric {numeric})"
        )
    return GradientCheck(top.mode, eps, analytic, numeric)
