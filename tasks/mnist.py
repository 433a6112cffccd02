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

from hierarchy import kernels
from hierarchy.level import Params, Problem, Task

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
ACTIVATION_CODES = {"sigmoid": 0, "relu": 1, "tanh": 2}  # as mlp.cpp reads them

# Each activation's backward from its output, as autograd computes it.
_aten = torch.ops.aten
ACTIVATION_GRADS = {
    "sigmoid": _aten.sigmoid_backward,
    "relu": lambda grad, out: _aten.threshold_backward(grad, out, 0),
    "tanh": _aten.tanh_backward,
}


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
        x, labels = self.minibatch(step)
        logits = self.task.forward(params, x)
        per_example = F.cross_entropy(logits.flatten(0, 1), labels, reduction="none")
        return per_example.view(x.shape[:2]).mean(dim=-1)

    def minibatch(self, step: int) -> tuple[Tensor, Tensor]:
        """Images (B, n, 784) and labels (B * n,) of step ``step``'s minibatches."""
        index = self.batches[step % len(self.batches)]  # (B, n)
        rows = index.reshape(-1)  # index_select gathers faster than indexing
        x = self.images.index_select(0, rows).view(*index.shape, -1)
        return x, self.labels.index_select(0, rows)

    def value_and_grad(self, params: Params, step: int) -> tuple[Tensor, Tensor]:
        """The loss and its gradient by backpropagation written out: the very
        operations autograd runs for ``loss``, in its order, so the gradient is
        the same to the bit, without a graph's bookkeeping (a fifth of the time
        of the loss and gradient of one MNIST network). On the CPU, where the
        fused kernels are built, ``mlp.cpp`` runs the same operations from C++;
        not dispatching each from Python saves a third of the time again.
        """
        compiled = kernels.built() if params.device.type == "cpu" else None
        if compiled is not None:
            loss, grad = compiled.mlp_value_and_grad(
                params,
                self.images,
                self.labels,
                self.batches,
                step % len(self.batches),
                self.task.sizes,
                ACTIVATION_CODES[self.task.activation],
            )
            return loss, grad
        return self.value_and_grad_eager(params, step)

    def value_and_grad_eager(self, params: Params, step: int) -> tuple[Tensor, Tensor]:
        """``value_and_grad`` by torch calls from Python."""
        x, labels = self.minibatch(step)
        batch, n = x.shape[:2]
        layers = self.task.unflatten(params.detach())
        *inputs, logits = self.task.activations(layers, x)
        log_p = torch.log_softmax(logits.flatten(0, 1), dim=1)
        per_example = F.nll_loss(log_p, labels, reduction="none")
        loss = per_example.view(batch, n).mean(dim=-1)

        # Backward: the mean, the negative log-likelihood and the log-softmax.
        grad = torch.ones_like(loss).unsqueeze(-1).expand(batch, n) / n
        grad = _aten.nll_loss_backward(
            grad.reshape(-1), log_p, labels, None, 0, -100, log_p.new_empty(())
        )
        grad = torch._log_softmax_backward_data(grad, log_p, 1, log_p.dtype)
        grad = grad.view(batch, n, -1)

        # Each layer from the top: its bias and weight gradients, then its input's.
        grads = []
        for depth in range(len(layers) - 1, -1, -1):
            if depth < len(layers) - 1:
                grad = ACTIVATION_GRADS[self.task.activation](grad, inputs[depth + 1])
            grads.append(grad.sum(1, keepdim=True).squeeze(1))
            grads.append(inputs[depth].transpose(1, 2).bmm(grad).flatten(-2))
            if depth > 0:
                grad = grad.bmm(layers[depth][0].transpose(1, 2))
        return loss, torch.cat(grads[::-1], dim=-1)


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

        self.sizes = [train_images.shape[1], *hidden, 10]
        self.layers = list(zip(self.sizes[:-1], self.sizes[1:]))
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
        return self.activations(self.unflatten(params), x)[-1]

    def activations(
        self, layers: list[tuple[Tensor, Tensor]], x: Tensor
    ) -> list[Tensor]:
        """Each layer's input, x first, then the logits: what backpropagation
        through the network reads."""
        act = ACTIVATIONS[self.activation]
        outputs = [x]
        for depth, (weight, bias) in enumerate(layers):
            x = torch.baddbmm(bias.unsqueeze(1), x, weight)
            if depth < len(layers) - 1:
                x = act(x)
            outputs.append(x)
        return outputs

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
