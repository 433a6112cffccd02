"""Transfer: the pretrained MNIST rule on networks it never saw, against tuned Adam.

The shipped rule ``lstm-mnist`` was meta-trained on 100-step runs of one network:
a single hidden layer of 20 sigmoid units. Here it trains, through
``LearnedOptimizer`` in a plain PyTorch loop, three networks it never saw: an MLP
with two hidden layers (64 and 32 units) with sigmoid, the same with ReLU, and a
small CNN, each for ``--steps`` steps (three times its training horizon by
default). The rival is ``torch.optim.Adam`` with its learning rate picked from a
grid on a separate tuning seed (lowest mean minibatch loss over the last 30
steps). For every evaluation seed both optimisers start from the same weights and
see the same minibatches. Both run as they would in a user's loop; the rule gets
no tuning at all.

Reported per network and optimiser, mean and standard error over seeds: the mean
minibatch loss over the 30 steps up to step 50, 100 (the rule's training
horizon) and the last; after the last step the loss on all 4,000 training
digits, the loss and the accuracy on the 1,000 held-out digits (the embedded
MNIST sample, see tasks/mnist_data.py); and milliseconds per step on one thread.

    python benchmarks/transfer.py [--steps 300] [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hierarchy.optim import LearnedOptimizer
from tasks.mnist_data import load_mnist

ADAM_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1]
BATCH = 128
WINDOW = 30
"""Steps over which the minibatch loss is averaged, ending at each reported step."""
TUNING_SEED = 1000


def mlp(activation: type[nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, 64),
            activation(),
            nn.Linear(64, 32),
            activation(),
            nn.Linear(32, 10),
        )

    return make


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


MODELS = {"mlp_sigmoid": mlp(nn.Sigmoid), "mlp_relu": mlp(nn.ReLU), "cnn": cnn}


def train(
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data,
    seed: int,
    steps: int,
) -> dict:
    """Train a fresh ``make_model()`` with seed ``seed``; its losses and end scores.

    The seed fixes the initial weights and the minibatch sequence, so two
    optimisers given one seed start from the same point and see the same data.
    """
    torch.manual_seed(seed)
    model = make_model()
    generator = torch.Generator().manual_seed(seed)
    batches = torch.randint(len(data.train_images), (steps, BATCH), generator=generator)
    optimizer = make_optimizer(model)

    losses = []
    start = time.perf_counter()
    for index in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(
            model(data.train_images[index]), data.train_labels[index]
        )
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start

    with torch.no_grad():
        train_loss = F.cross_entropy(model(data.train_images), data.train_labels)
        logits = model(data.test_images)
        test_loss = F.cross_entropy(logits, data.test_labels)
        accuracy = (logits.argmax(dim=1) == data.test_labels).float().mean()
    finite = all(math.isfinite(v) for v in losses)
    return {
        "losses": losses,
        **{
            f"loss_{end}": statistics.fmean(losses[end - WINDOW : end])
            if finite
            else math.inf
            for end in report_steps(steps)
        },
        "train_loss": train_loss.item(),
        "test_loss": test_loss.item(),
        "test_accuracy": accuracy.item(),
        "seconds_per_step": seconds / steps,
    }


def report_steps(steps: int) -> list[int]:
    """Steps at which the windowed minibatch loss is reported: 50, 100 and the last."""
    return sorted({end for end in (50, 100) if WINDOW <= end < steps} | {steps})


def scores(run: dict) -> list[str]:
    """The end scores of a run: windowed losses, then the full-data scores."""
    return [key for key in run if key.startswith("loss_")] + [
        "train_loss",
        "test_loss",
        "test_accuracy",
    ]


def learned(model: nn.Module) -> torch.optim.Optimizer:
    return LearnedOptimizer.from_pretrained("lstm-mnist", model.parameters())


def adam(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda model: torch.optim.Adam(model.parameters(), lr=lr)


def summary(runs: list[dict]) -> dict:
    """Mean and standard error over seeds of each end score; the mean loss curve."""
    out = {}
    for key in scores(runs[0]):
        values = [run[key] for run in runs]
        sem = (
            statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0
        )
        out[key] = [statistics.fmean(values), sem]
    out["seconds_per_step"] = statistics.fmean(r["seconds_per_step"] for r in runs)
    out["per_seed"] = {key: [run[key] for run in runs] for key in scores(runs[0])}
    out["mean_curve"] = [
        statistics.fmean(step) for step in zip(*(r["losses"] for r in runs))
    ]
    return out


def compare(name: str, data, steps: int, seeds: list[int]) -> dict:
    """Tune Adam's rate on the tuning seed, then run both on the evaluation seeds."""
    make_model = MODELS[name]
    grid = {
        lr: train(make_model, adam(lr), data, TUNING_SEED, steps)[f"loss_{steps}"]
        for lr in ADAM_GRID
    }
    best = min(grid, key=grid.__getitem__)
    print(
        f"{name}: Adam's loss over the last {WINDOW} steps on the tuning seed, "
        f"by rate: {grid}; picked {best}"
    )

    results = {
        "parameters": sum(p.numel() for p in make_model().parameters()),
        "adam_grid": {str(lr): score for lr, score in grid.items()},
        "adam_lr": best,
        "adam_lr_on_grid_edge": best in (min(ADAM_GRID), max(ADAM_GRID)),
    }
    for label, make_optimizer in (("learned", learned), ("adam", adam(best))):
        runs = [train(make_model, make_optimizer, data, seed, steps) for seed in seeds]
        results[label] = summary(runs)
    return results


def table(models: dict) -> str:
    """A Markdown table: one row per network and optimiser, mean +- s.e."""
    first = next(iter(models.values()))["learned"]
    keys = [key for key in first if key.startswith("loss_")]
    keys += ["train_loss", "test_loss", "test_accuracy"]
    titles = [f"loss, steps {int(k[5:]) - WINDOW + 1}-{k[5:]}" for k in keys[:-3]]
    titles += ["train loss", "test loss", "test accuracy"]
    lines = [
        "| network | optimiser | " + " | ".join(titles) + " | ms/step |",
        "|---|---|" + "---|" * (len(titles) + 1),
    ]
    for name, result in models.items():
        for label in ("learned", "adam"):
            entry = result[label]
            shown = "lstm-mnist" if label == "learned" else "Adam"
            shown += "" if label == "learned" else f" lr={result['adam_lr']:g}"
            cells = [f"{entry[k][0]:.4g} ± {entry[k][1]:.2g}" for k in keys]
            ms = 1000 * entry["seconds_per_step"]
            lines.append(f"| {name} | {shown} | {' | '.join(cells)} | {ms:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="40 steps, 1 seed")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "transfer.json",
    )
    args = parser.parse_args()
    steps, seeds = (40, 1) if args.quick else (args.steps, args.seeds)
    if steps < WINDOW:
        parser.error(f"--steps must be at least {WINDOW}, got {steps}")

    torch.set_num_threads(1)
    data = load_mnist(source="embedded")
    start = time.perf_counter()
    models = {name: compare(name, data, steps, list(range(seeds))) for name in MODELS}
    seconds = time.perf_counter() - start

    print(table(models))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/transfer.py"
                + (" --quick" if args.quick else f" --steps {steps} --seeds {seeds}"),
                "rule": "lstm-mnist",
                "data": data.source,
                "steps": steps,
                "seeds": list(range(seeds)),
                "tuning_seed": TUNING_SEED,
                "batch_size": BATCH,
                "adam_grid": ADAM_GRID,
                "window_steps": WINDOW,
                "threads": 1,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "seconds": seconds,
                "models": models,
                "table": table(models),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"written to {args.out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
