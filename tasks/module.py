"""Any ``nn.Module`` as an optimisee, evaluated at flat parameters through ``higher``.

The built-in tasks are written as batched functions of flat parameters. A user's
own network need not be: ``higher.monkeypatch`` turns the module into a
functional one that runs at any list of parameter tensors, graph tensors from an
unroll included, so second-order unrolls differentiate through it.
"""

from __future__ import annotations

from collections.abc import Callable

import higher
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hierarchy.level import Params, Problem, Task


class ModuleProblem(Problem):
    """B copies of one network, each with its own initialisation and minibatches."""

    def __init__(
        self,
        task: ModuleTask,
        x0: Tensor,
        inputs: Tensor,
        targets: Tensor,
        batches: Tensor,
    ) -> None:
        self.task, self.x0 = task, x0
        self.inputs, self.targets, self.batches = inputs, targets, batches

    def init(self) -> Params:
        return self.x0.clone()

    def select(self, rows: slice) -> ModuleProblem:
        return ModuleProblem(
            self.task, self.x0[rows], self.inputs, self.targets, self.batches[:, rows]
        )

    def loss(self, params: Params, step: int) -> Tensor:
        index = self.batches[step % len(self.batches)]
        losses = []
        # One functional call per problem: higher evaluates one parameter list at a
        # time, so B problems cost B small forward passes instead of one batched op.
        for row, batch in zip(params, index):
            outputs = self.task.fmodule(
                self.inputs[batch], params=self.task.unflatten(row)
            )
            losses.append(self.task.loss_fn(outputs, self.targets[batch]))
        return torch.stack(losses)


class ModuleTask(Task):
    """Train ``make_module()`` on (inputs, targets) minibatches with ``loss_fn``.

    Args:
        make_module: builds a freshly initialised network; called once per problem
            under a seed drawn from the sampling generator.
        train, test: (inputs, targets) tensors; val problems use the train data.
        loss_fn: maps (outputs, targets) to a scalar, cross entropy by default.
        batch_size: examples per minibatch.
    """

    def __init__(
        self,
        make_module: Callable[[], nn.Module],
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        batch_size: int = 128,
    ) -> None:
        self.make_module = make_module
        module = make_module()
        self.shapes = [p.shape for p in module.parameters()]
        self.dim = sum(p.numel() for p in module.parameters())
        self.fmodule = higher.monkeypatch(module, copy_initial_weights=True)
        self.data = {"train": train, "test": test}
        self.loss_fn = loss_fn
        self.batch_size = batch_size

    def unflatten(self, row: Tensor) -> list[Tensor]:
        """The module's parameter tensors as views of one flat row (D,)."""
        sizes = [shape.numel() for shape in self.shapes]
        return [part.view(shape) for part, shape in zip(row.split(sizes), self.shapes)]

    def sample(
        self, batch_size: int, generator: torch.Generator, split: str, horizon: int
    ) -> ModuleProblem:
        inputs, targets = self.data["test" if split == "test" else "train"]
        rows = []
        for seed in torch.randint(2**62, (batch_size,), generator=generator).tolist():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self.make_module()
            rows.append(
                torch.cat([p.detach().reshape(-1) for p in module.parameters()])
            )
        batches = torch.randint(
            len(inputs), (horizon + 1, batch_size, self.batch_size), generator=generator
        )
        device = inputs.device
        return ModuleProblem(
            self, torch.stack(rows).to(device), inputs, targets, batches.to(device)
        )

    def to(self, device: torch.device) -> ModuleTask:
        self.data = {k: (x.to(device), y.to(device)) for k, (x, y) in self.data.items()}
        self.fmodule.to(device)
        return self
