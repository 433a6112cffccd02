"""Side-by-side evaluation: learned rules and tuned baselines on the same problems.

Every optimiser runs on one sampled batch of held-out problems, so all see the
same initial parameters and the same minibatch at each step. Results are loss
curves (steps + 1, B), summarised as mean and standard error in a table, a plot
and a JSON file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from hierarchy.baselines import BASELINES
from hierarchy.level import Problem
from hierarchy.rules import Params, UpdateRule
from hierarchy.unroll import start, unroll

logger = logging.getLogger(__name__)


@torch.no_grad()
def optimise(
    rule: UpdateRule,
    problem: Problem,
    steps: int,
    desc: str | None = None,
    theta: Tensor | None = None,
    in_place: bool = False,
) -> tuple[Tensor, Params]:
    """Run ``rule`` on ``problem``: losses (steps + 1, B), step 0 first, and the
    parameters (B, D) it ends at.

    The rule runs at ``theta`` (its own weights by default), detached, and no graph
    is kept beyond one step: by the unroll's ``update``, as meta-training runs it,
    or with ``in_place`` by ``step_`` on a state from ``inference_state``, as
    ``LearnedOptimizer`` runs it (faster for the LSTM, whose two paths round
    differently). With a ``desc`` a progress bar is shown on a terminal.
    """
    # keep_graph=False: each loss is kept as a value only; keeping its graph held
    # every step's minibatch activations until the end (3.7 GB for 16 MNIST
    # networks over 200 steps).
    carry = start(problem, rule, "first_order", keep_graph=False, in_place=in_place)
    theta = rule.theta if theta is None else theta
    theta = theta.detach().to(carry.params.device)
    losses = [carry.loss]
    quiet = True if desc is None else None  # None: a bar only on a terminal
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=quiet):
        _, carry = unroll(
            rule, theta, problem, carry, 1, "first_order", False, in_place
        )
        losses.append(carry.loss)
    return torch.stack(losses).cpu(), carry.params.detach()


def trajectory(
    rule: UpdateRule,
    problem: Problem,
    steps: int,
    desc: str | None = None,
    theta: Tensor | None = None,
) -> Tensor:
    """Losses of ``rule`` optimising ``problem``: shape (steps + 1, B), step 0 first.

    The rule runs in place (``optimise``), as a user's training loop runs it.
    ``theta`` may also hold several trained copies of the rule's weights, shape
    (K, P): each copy runs on all B problems and the curves are joined, (steps +
    1, K * B), so that means and errors are over copies and problems together.
    """
    if theta is not None and theta.dim() == 2:
        return torch.cat(
            [trajectory(rule, problem, steps, desc, row) for row in theta], dim=1
        )
    return optimise(rule, problem, steps, desc, theta, in_place=True)[0]


def summarise(curve: Tensor, steps: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Mean and standard error over problems of the loss at each of ``steps``."""
    out = {}
    for step in steps:
        values = curve[step].double()
        # One problem gives no spread: the standard error is undefined (nan).
        sem = (
            values.std().item() / math.sqrt(len(values))
            if len(values) > 1
            else math.nan
        )
        out[step] = (values.mean().item(), sem)
    return out


def _spread(sem: float, sign: str) -> str:
    """``sign`` and the standard error, or nothing where one problem gives none."""
    return "" if math.isnan(sem) else f"{sign} {sem:.2g}"


def format_table(
    curves: Mapping[str, Tensor], steps: Sequence[int], lrs: Mapping[str, float]
) -> str:
    """A plain-text table: one row per optimiser, mean +- s.e. at each step."""
    width = max(12, *(len(name) + 2 for name in curves))
    header = f"{'optimiser':<{width}}{'lr':>9}" + "".join(
        f"{'step ' + str(s):>22}" for s in steps
    )
    lines = [header, "-" * len(header)]
    for name, curve in curves.items():
        lr = f"{lrs[name]:.3g}" if name in lrs else "-"
        cells = "".join(
            f"{mean:>13.4g} {_spread(sem, '+-'):<8}"
            for mean, sem in summarise(curve, steps).values()
        )
        lines.append(f"{name:<{width}}{lr:>9}{cells}")
    return "\n".join(lines)


def markdown_summary(evaluations: Mapping[str, dict], steps: Sequence[int]) -> str:
    """A Markdown table of ``results.json`` evaluations: one row per task and step.

    Each cell is mean +- standard error; the lowest mean of each row is in bold.
    """
    rows, names = [], None
    for evaluation in evaluations.values():
        summary = evaluation["summary"]
        names = names or list(summary)
        for step in steps:
            if str(step) not in summary[names[0]] or step != evaluation["horizon"]:
                continue
            cells = {n: summary[n][str(step)] for n in names}
            best = min(cells, key=lambda n: cells[n][0])
            text = [
                f"**{m:.4g}{_spread(e, ' ±')}**"
                if n == best
                else f"{m:.4g}{_spread(e, ' ±')}"
                for n, (m, e) in cells.items()
            ]
            rows.append(f"| {evaluation['task']} | {step} | " + " | ".join(text) + " |")
    header = "| task | step | " + " | ".join(names or []) + " |"
    rule = "|---|---|" + "---|" * len(names or [])
    return "\n".join([header, rule, *rows])


def plot_curves(
    curves: Mapping[str, Tensor],
    path: Path,
    title: str,
    xlabel: str = "optimisee step",
    ylabel: str = "loss",
) -> None:
    """Mean loss per step with a standard-error band, log scale, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        mean = curve.double().mean(dim=1)
        sem = curve.double().std(dim=1) / math.sqrt(curve.shape[1])
        steps = torch.arange(len(mean))
        learned = name not in BASELINES
        ax.plot(steps, mean, label=name, linewidth=2 if learned else 1)
        ax.fill_between(steps, (mean - sem).clamp_min(1e-12), mean + sem, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON via a temporary file and an atomic rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(value: object) -> object:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
