"""An MLP classifying MNIST digits, the paper's neural-network optimisee.

Each problem is one network with its own random initialisation and its own
stream of minibatches, fixed at sampling time so that every optimiser run on the
problem sees the same minibatch at the same step. A batch of networks runs as
batched matrix multiplies over flat parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hierarchy.level import Params, Problem, Task

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}


class MLPProblem(Problem):
    """B networks, each with its own initialisation and minibatch indices.

    Args:
        task: the task holding the images and the network's layout.
        x0: initial parameters, shape (B, D).
        images: the split's images (N, 784); labels (N,).
        batches: minibatch indices into ``images``, shape (steps, B, batch).
    """

    def __init__(
        self,
        task: MNISTTask,
        x0: Tensor,
        images: Tensor,
        labels: Tensor,
        batches: Tensor,
    ) -> None:
        self.task, self.x0 = task, x0
        self.images, self.labels, self.batches = images, labels, batches

    def init(self) -> Params:
        return self.x0.clone()

    def select(self, rows: slice) -> MLPProblem:
        return MLPProblem(
            self.task, self.x0[rows], self.images, self.labels, self.batches[:, rows]
        )

    def repeat(self, copies: int) -> MLPProblem:
        return MLPProblem(
            self.task,
            self.x0.repeat(copies, 1),
            self.images,
            self.labels,
            self.batches.repeat(1, copies, 1),
        )

    def loss(self, params: Params, step: int) -> Tensor:
        index = self.batches[step % len(self.batches)]  # (B, n)
        rows = index.reshape(-1)  # index_select gathers faster than indexing
        x = self.images.index_select(0, rows).view(*index.shape, -1)
        logits = self.task.forward(params, x)
        per_example = F.cross_entropy(
            logits.flatten(0, 1), self.labels.index_select(0, rows), reduction="none"
        )
        return per_example.view(index.shape).mean(dim=-1)


class MNISTTask(Task):
    """Train an MLP on MNIST with minibatches of ``batch_size`` images.

    Args:
        train_images, train_labels: images for the train and val splits.
        test_images, test_labels: disjoint images for the test split.
        hidden: hidden layer sizes, (20,) in the paper.
        activation: ``sigmoid`` (paper default), ``relu`` or ``tanh``.
        batch_size: images per minibatch, 128 in the paper.
    """

    def __init__(
        self,
        train_images: Tensor,
        train_labels: Tensor,
        test_images: Tensor,
        test_labels: Tensor,
        hidden: Sequence[int] = (20,),
        activation: str = "sigmoid",
        batch_size: int = 128,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        if batch_size < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"batch_size and hidden sizes must be positive, got {batch_size} "
                f"and {list(hidden)}"
            )
        self.data = {
            "train": (train_images, train_labels),
            "test": (test_images, test_labels),
        }
        self.activation = activation
        self.batch_size = batch_size

        sizes = [train_images.shape[1], *hidden, 10]
        self.layers = list(zip(sizes[:-1], sizes[1:]))
        self.dim = sum(fan_in * fan_out + fan_out for fan_in, fan_out in self.layers)

    def unflatten(self, params: Params) -> list[tuple[Tensor, Tensor]]:
        """Views (weight (B, in, out), bias (B, out)) of each layer of flat params."""
        # One split, not a slice per tensor: its backward writes the gradient
        # once, where each slice's fills a zero tensor of all D coordinates.
        sizes = [
            size
            for fan_in, fan_out in self.layers
            for size in (fan_in * fan_out, fan_out)
        ]
        parts = params.split(sizes, dim=-1)
        return [
            (parts[2 * k].unflatten(-1, (fan_in, fan_out)), parts[2 * k + 1])
            for k, (fan_in, fan_out) in enumerate(self.layers)
        ]

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """Logits (B, n, 10) of B networks on their own images x (B, n, 784)."""
        layers = self.unflatten(params)
        act = ACTIVATIONS[self.activation]
        for depth, (weight, bias) in enumerate(layers):
            x = torch.baddbmm(bias.unsqueeze(1), x, weight)
            if depth < len(layers) - 1:
                x = act(x)
        return x

    def init_params(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer, like nn.Linear."""
        chunks = []
        for fan_in, fan_out in self.layers:
            bound = 1.0 / math.sqrt(fan_in)
            size = fan_in * fan_out + fan_out
            chunks.append(
                (torch.rand(batch_size, size, generator=generator) * 2 - 1) * bound
            )
        return torch.cat(chunks, dim=1)

    def sample(
        self, batch_size: int, generator: torch.Generator, split: str, horizon: int
    ) -> MLPProblem:
        images, labels = self.data["test" if split == "test" else "train"]
        x0 = self.init_params(batch_size, generator)
        batches = torch.randint(
            len(images),
            (horizon + 1, batch_size, self.batch_size),
            generator=generator,
        )
        device = images.device
        return MLPProblem(self, x0.to(device), images, labels, batches.to(device))

    def to(self, device: torch.device) -> MNISTTask:
        self.data = {
            split: (x.to(device), y.to(device)) for split, (x, y) in self.data.items()
        }
        return self
