"""Data-parallel meta-training across processes and machines with torch.distributed.

torchrun starts one process (rank) per device and gives each the environment
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``setup``
joins the process group those name, with NCCL when the device is a GPU and gloo
on the CPU; with one process it starts nothing, and a ``Context`` of one process
turns every operation below into the identity.

Every rank draws the whole meta-batch of an epoch from the global seed's stream,
as one process would, and unrolls only its own rows of it: rank r of W holds rows
[r * B / W, (r + 1) * B / W). Each rank's meta-loss is the mean over its rows and
the shares are equal, so the mean of the ranks' meta-gradients is the gradient of
the mean over the whole meta-batch: W processes follow the trajectory of one, up
to float rounding, and every rank takes the same optimiser step on the same
averaged gradient, so all hold identical top-level parameters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from hierarchy.config import ConfigError

if TYPE_CHECKING:
    from hierarchy.level import Problem
    from hierarchy.rules import UpdateRule

logger = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def backend_for(device: torch.device) -> str:
    """The collective backend for a process computing on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


def world_size_from_env() -> int:
    """Processes the launcher started (WORLD_SIZE), 1 when none is set."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(
            f"environment variable WORLD_SIZE = {raw!r}: expected a positive "
            f"integer, as torchrun sets it"
        )
    return size


def prints() -> bool:
    """Whether this process prints results and errors: rank 0 of the group it
    joined, or, before it joins one (a config error), the process torchrun
    started as RANK 0, so that a message is printed once. A process alone
    (WORLD_SIZE unset or 1) prints whatever RANK it was left, and so does one
    whose variables torchrun would not set, as its error must be seen."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        size, rank = (
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("RANK", "0")),
        )
    except ValueError:
        return True  # an error about the bad variable is what there is to print
    return size <= 1 or rank == 0 or not 0 <= rank < size


def _launch_integer(name: str, low: int, high: int) -> int:
    """The integer in environment variable ``name``, from ``low`` to ``high``."""
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ConfigError(
            f"environment variable {name} = {raw!r}: expected an integer from "
            f"{low} to {high}, as torchrun sets it"
        )
    return value


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device.

    With WORLD_SIZE unset or 1, or a group already joined, nothing is started.
    On a GPU each process computes on ``cuda:LOCAL_RANK`` and talks over NCCL; on
    the CPU over gloo. Ranks other than 0 log warnings and errors only.
    """
    if dist.is_initialized():
        return _local_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size_from_env() == 1:
        left = [
            f"{name}={os.environ[name]}"
            for name in ("RANK", "LOCAL_RANK")
            if os.environ.get(name, "0") != "0"
        ]
        if left:
            logger.warning(
                "%s is set but WORLD_SIZE is %s: running as one process, rank 0 "
                "(left from another launch?)",
                " and ".join(left),
                os.environ.get("WORLD_SIZE", "unset"),
            )
        return device

    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
            f"are not set; start the processes with torchrun"
        )
    world_size = world_size_from_env()
    _launch_integer("RANK", 0, world_size - 1)
    _launch_integer("MASTER_PORT", 1, 65535)
    local_rank = _launch_integer("LOCAL_RANK", 0, world_size - 1)
    device = _local_device(device, local_rank)
    backend = backend_for(device)

    # torch.distributed.nn binds the default group into its functions' defaults
    # when it is first imported, and torch.optim imports it through dynamo. Once
    # a group exists, that import would keep it alive past destroy_process_group:
    # gloo's threads then outlive the interpreter and abort the process at exit.
    # Imported now, before the group, the defaults hold None.
    import torch.distributed.nn  # noqa: F401

    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)

    context = Context.current()
    if not context.is_main:
        for name in ("hierarchy", "tasks"):
            logging.getLogger(name).setLevel(logging.WARNING)
    logger.info(
        "process group of %d ranks over %s; rank 0 computes on %s",
        context.world_size,
        backend,
        device,
    )
    return device


def _local_device(device: torch.device, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` for a GPU device, the device itself otherwise."""
    if device.type != "cuda":
        return device
    if device.index is not None and device.index != local_rank:
        raise ConfigError(
            f"config key 'device' = '{device}' names one GPU, but this process "
            f"has LOCAL_RANK {local_rank} and computes on cuda:{local_rank}; set "
            f"device to 'cuda' or 'auto'"
        )
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {local_rank} needs GPU cuda:{local_rank}, but this "
            f"machine has {torch.cuda.device_count()}; start at most that many "
            f"processes per machine (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def rows_of(rank: int, world_size: int, total: int) -> slice:
    """Rank ``rank``'s contiguous rows of ``total``, shares as equal as can be."""
    return slice(rank * total // world_size, (rank + 1) * total // world_size)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Context:
    """This process's place among the ranks, and the collectives training needs.

    ``device`` is where tensors go to be reduced: the GPU for NCCL, the CPU for
    gloo. The default context is a single process, where every method is the
    identity and nothing is communicated.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def current(cls) -> Context:
        """The context of the process group this process joined, if any."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that writes checkpoints, results and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def rows(self, total: int) -> slice:
        """This rank's rows of a batch of ``total``."""
        return rows_of(self.rank, self.world_size, total)

    def share(self, problem: Problem, total: int) -> Problem:
        """This rank's rows of a batch of ``total`` problems, on their own."""
        if not self.active:
            return problem
        return problem.select(self.rows(total))

    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Replace each ``.grad`` by its mean over the ranks, the same on all."""
        if not self.active:
            return
        for param in params:
            if param.grad is None:
                raise RuntimeError(
                    f"a parameter of shape {tuple(param.shape)} has no gradient "
                    f"to average; every rank must backpropagate into every one"
                )
            grad = param.grad.to(self.device)
            dist.all_reduce(grad)
            grad /= self.world_size
            param.grad.copy_(grad)

    def broadcast_(self, tensor: Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` in place, on every rank, with rank ``src``'s."""
        if not self.active:
            return
        with torch.no_grad():
            buffer = tensor.detach().to(self.device).clone()
            dist.broadcast(buffer, src)
            tensor.copy_(buffer)

    def mean(self, value: float) -> float:
        """The mean over the ranks of one number each, the same on all."""
        if not self.active:
            return value
        buffer = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(buffer)
        return buffer.item() / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank, the same answer on all."""
        if not self.active:
            return flag
        buffer = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
        return bool(buffer.item())

    def mean_of_rows(self, values: Tensor, total: int) -> float:
        """The mean of ``total`` numbers spread across the ranks by ``rows``."""
        if not self.active:
            return values.mean().item()
        buffer = values.detach().double().sum().reshape(1).to(self.device)
        dist.all_reduce(buffer)
        return buffer.item() / total

    def gather_rows(self, part: Tensor, total: int) -> Tensor:
        """Join every rank's columns ``rows(total)`` of a (T, n) tensor: (T, total).

        Every rank gets the whole tensor, on the device ``part`` is on.
        """
        if not self.active:
            return part
        shares = [rows_of(r, self.world_size, total) for r in range(self.world_size)]
        width = max(share.stop - share.start for share in shares)
        padded = part.new_zeros(part.shape[0], width, device=self.device)
        padded[:, : part.shape[1]] = part
        pieces = [torch.empty_like(padded) for _ in shares]
        dist.all_gather(pieces, padded)
        columns = [
            piece[:, : share.stop - share.start] for piece, share in zip(pieces, shares)
        ]
        return torch.cat(columns, dim=1).to(part.device)

    def trajectory(
        self,
        rule: UpdateRule,
        problem: Problem,
        steps: int,
        theta: Tensor | None = None,
        desc: str | None = None,
    ) -> Tensor:
        """``evaluate.trajectory`` with the problems split across the ranks.

        Each rank runs ``rule`` on its rows of ``problem`` and every rank gets the
        losses of all of them, (steps + 1, B), or (steps + 1, K * B) for K copies
        of the weights ``theta`` (K, P), in the order one process gives.
        """
        from hierarchy.evaluate import trajectory

        if theta is not None and theta.dim() == 2:
            return torch.cat(
                [self.trajectory(rule, problem, steps, row, desc) for row in theta],
                dim=1,
            )
        if not self.active:
            return trajectory(rule, problem, steps, desc, theta)
        total = len(problem.init())
        desc = desc if self.is_main else None  # one progress bar, on rank 0
        mine = trajectory(rule, self.share(problem, total), steps, desc, theta)
        return self.gather_rows(mine, total)

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.active:
            dist.barrier()
