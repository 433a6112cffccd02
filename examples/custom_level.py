"""A new update rule and a new task, stacked with the built-in levels.

``LearnedAdam`` is Adam whose three hyperparameters are its weights,
theta = [log lr, logit beta1, logit beta2], so a level above can learn them by
gradient descent through the unroll (the update is written out over flat
tensors, the same arithmetic as higher's differentiable Adam, so that batched
weights work). ``LogisticTask`` is logistic regression on synthetic data drawn
afresh for every problem: features with scales spread over an order of
magnitude, true weights, and labels drawn from the true model.

Two stacks are meta-trained with ``MetaTrainer``:

- two levels: LearnedAdam on logistic regression, trained by torch's Adam in
  ``higher`` mode (the hypergradient keeps second-order terms);
- three levels: the same, with the built-in LSTM rule as level 2 learning to
  adjust LearnedAdam's weights over a few steps of its own.

Both are evaluated on the same held-out problems against SGD, NAG, RMSprop and
Adam, each at the learning rate a grid search picks on training problems.

    python examples/custom_level.py [--epochs 60] [--quick]  # --quick: seconds
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor

from hierarchy import (
    Level,
    LSTMRule,
    MetaTrainer,
    Problem,
    Task,
    UpdateRule,
    build_stack,
)
from hierarchy.baselines import tune_learning_rate
from hierarchy.checkpoint import load_rule
from hierarchy.evaluate import format_table, trajectory
from hierarchy.experiment import optimisee_rule
from hierarchy.logging import setup_logging


class LearnedAdam(UpdateRule):
    """Adam with learned learning rate and betas: theta = [log lr, logit b1, logit b2].

    The log and logit keep the rate positive and the betas in (0, 1) wherever
    the level above moves theta.
    """

    kind = "learned_adam"

    def __init__(
        self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999
    ) -> None:
        super().__init__({"log_lr": (1,), "logit_beta1": (1,), "logit_beta2": (1,)})
        with torch.no_grad():
            self.theta.copy_(torch.tensor([math.log(lr), _logit(beta1), _logit(beta2)]))

    def hyperparameters(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """lr, beta1, beta2 at weights ``theta`` (P,) or (B, P), each (1,) or (B, 1)."""
        w = self.unflatten(theta)
        return (
            w["log_lr"].exp(),
            torch.sigmoid(w["logit_beta1"]),
            torch.sigmoid(w["logit_beta2"]),
        )

    def init_state(self, params: Tensor) -> tuple[Tensor, ...]:
        zeros = torch.zeros_like(params)
        return zeros, zeros.clone(), params.new_zeros(())

    def update(
        self, theta: Tensor, grad: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        lr, beta1, beta2 = self.hyperparameters(theta)
        first, second, count = state
        count = count + 1
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad

        # eps inside the root: the derivative of sqrt stays finite where a
        # gradient coordinate is exactly zero, so the hypergradient does too.
        first_hat = first / (1 - beta1**count)
        second_hat = second / (1 - beta2**count)
        update = -lr * first_hat / torch.sqrt(second_hat + 1e-16)
        return update, (first, second, count)

    def values(self, theta: Tensor) -> dict[str, float]:
        """The hyperparameters at unbatched weights ``theta`` (P,), as numbers."""
        lr, beta1, beta2 = (v.item() for v in self.hyperparameters(theta))
        return {"lr": lr, "beta1": beta1, "beta2": beta2}

    def config(self) -> dict:
        return self.values(self.theta)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class LogisticProblem(Problem):
    """B logistic regressions, each on its own data and minibatch sequence.

    Args:
        features: (B, N, F) inputs; labels: (B, N) in {0, 1}.
        batches: (steps, B, batch) minibatch indices; x0: (B, F + 1) start.
    """

    def __init__(
        self, features: Tensor, labels: Tensor, batches: Tensor, x0: Tensor
    ) -> None:
        self.features, self.labels = features, labels
        self.batches, self.x0 = batches, x0

    def init(self) -> Tensor:
        return self.x0.clone()

    def loss(self, params: Tensor, step: int) -> Tensor:
        index = self.batches[step % len(self.batches)]
        x = torch.gather(
            self.features,
            1,
            index.unsqueeze(-1).expand(-1, -1, self.features.shape[-1]),
        )
        y = torch.gather(self.labels, 1, index)
        weights, bias = params[:, :-1], params[:, -1:]
        logits = einsum(x, weights, "b n f, b f -> b n") + bias
        per_example = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return per_example.mean(dim=-1)


class LogisticTask(Task):
    """Logistic regression with ``features`` inputs on ``examples`` drawn per problem.

    Feature scales are exp(U(-1.5, 1.5)), up to 20 times apart (the curvature up
    to 400 times), so one learning rate does not suit every coordinate; the true
    weights are standard normal. Every split draws from the same distribution;
    held-out problems differ by their random stream.
    """

    def __init__(self, features: int = 10, examples: int = 256, batch: int = 32):
        if min(features, examples, batch) < 1:
            raise ValueError(
                f"features, examples and batch must be positive, got {features}, "
                f"{examples} and {batch}"
            )
        self.features, self.examples, self.batch = features, examples, batch
        self.dim = features + 1

    def sample(
        self, batch_size: int, generator: torch.Generator, split: str, horizon: int
    ) -> LogisticProblem:
        shape = (batch_size, self.examples, self.features)
        scales = torch.exp(
            torch.rand(batch_size, 1, self.features, generator=generator) * 3 - 1.5
        )
        x = torch.randn(*shape, generator=generator) * scales
        true = torch.randn(batch_size, self.features, generator=generator)
        p = torch.sigmoid(einsum(x, true, "b n f, b f -> b n"))
        y = torch.bernoulli(p, generator=generator)
        batches = torch.randint(
            self.examples, (horizon + 1, batch_size, self.batch), generator=generator
        )
        x0 = torch.randn(batch_size, self.dim, generator=generator) * 0.1
        return LogisticProblem(x, y, batches, x0)


def meta_train(
    top: Level, run_dir: Path, args: argparse.Namespace, lr: float
) -> MetaTrainer:
    """Train ``top.rule`` with torch's Adam; its best validated weights are loaded."""
    trainer = MetaTrainer(
        top,
        run_dir,
        lr=lr,
        epochs=args.epochs,
        meta_batch=args.meta_batch,
        truncation=top.horizon,
        val_every=max(1, args.epochs // 5),
        val_tasks=args.eval_tasks,
        seed=args.seed,
    )
    trainer.train()
    best = load_rule(
        trainer.best_path, rules={"lstm": LSTMRule, "learned_adam": LearnedAdam}
    )
    with torch.no_grad():
        top.rule.theta.copy_(best.theta)
    return trainer


def _positive(text: str) -> int:
    """argparse type: a positive integer."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    """Meta-train both stacks, evaluate them with the baselines, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = {  # flag: (help, default, default with --quick)
        "--epochs": ("meta-epochs per stack", 60, 2),
        "--horizon": ("optimisee steps", 40, 8),
        "--meta-batch": ("problems per meta-update", 16, 2),
        "--eval-tasks": ("held-out problems", 64, 4),
    }
    for flag, (text, default, quick) in sizes.items():
        parser.add_argument(
            flag, type=_positive, help=f"{text}: {default}, or {quick} with --quick"
        )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/custom_level"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny budget, for tests: seconds"
    )
    args = parser.parse_args(argv)
    for flag, (_, default, quick) in sizes.items():
        name = flag[2:].replace("-", "_")
        if getattr(args, name) is None:  # what is given wins over --quick
            setattr(args, name, quick if args.quick else default)
    setup_logging("WARNING" if args.quick else "INFO")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    # Both stacks start LearnedAdam at lr 0.01, a tenth of what tuned Adam picks.
    task = LogisticTask()
    two = build_stack(task, [LearnedAdam(lr=0.01)], [args.horizon], ["higher"])
    meta_train(two, args.run_dir / "two_levels", args, lr=0.05)

    # The LSTM's meta-loss sums LearnedAdam's meta-loss over the LSTM's own steps,
    # which rewards raising the rate fast; with a top rate of 0.01 instead of the
    # paper's 0.003 it learned to overshoot, and the weights it ends at were worse.
    inner_steps = 3 if args.quick else 8
    three = build_stack(
        task,
        [LearnedAdam(lr=0.01), LSTMRule(hidden_size=10, num_layers=1)],
        [args.horizon, inner_steps],
        ["higher", "first_order"],
    )
    meta_train(three, args.run_dir / "three_levels", args, lr=0.003)
    three_rule, three_theta = optimisee_rule(three, args.seed + 4)

    problem = task.sample(
        args.eval_tasks,
        torch.Generator().manual_seed(args.seed + 3),
        "test",
        args.horizon,
    )
    curves = {
        "adam-2-level": trajectory(two.rule, problem, args.horizon),
        "adam-3-level": trajectory(
            three_rule, problem, args.horizon, theta=three_theta
        ),
    }
    lrs = {}
    grid = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
    for name in ("sgd", "nag", "rmsprop", "adam"):
        tuned, _ = tune_learning_rate(
            name, task, grid, args.horizon, args.eval_tasks, seed=args.seed + 2
        )
        lrs[name] = tuned.lr
        curves[name] = trajectory(tuned, problem, args.horizon)

    steps = sorted({args.horizon // 4, args.horizon // 2, args.horizon})
    table = format_table(curves, steps, lrs)
    learned = {
        "adam-2-level": two.rule.values(two.rule.theta),
        "adam-3-level": three_rule.values(three_theta),
    }
    print(
        f"logistic regression, {args.eval_tasks} held-out problems: mean loss +- "
        f"standard error\n{table}"
    )
    for name, values in learned.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return {"table": table, "curves": curves, "learned": learned, "lrs": lrs}


if __name__ == "__main__":
    main()
