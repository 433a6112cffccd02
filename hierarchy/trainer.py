"""Training the top level with a hand-designed optimiser and truncated BPTT.

Each meta-epoch samples a meta-batch of fresh problems from the level below the
top, unrolls them for the top level's horizon in segments of ``truncation``
steps, and after each segment takes one optimiser step on the segment's
meta-loss, then detaches the unroll and carries on. The rule with the best
validation meta-loss is kept beside the latest checkpoint.

Faults are contained: a segment whose meta-loss or meta-gradient is not finite
takes no step, a run that keeps failing stops with its last good checkpoint, and
SIGINT stops after the current epoch with a checkpoint written.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from hierarchy.config import Config
from hierarchy.diagnostics import GradientCheck, check_meta_gradient
from hierarchy.distributed import Context
from hierarchy.evaluate import optimise
from hierarchy.level import Level, Problem
from hierarchy.unroll import Carry, start, unroll

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

COUNTS = ("epochs", "meta_batch", "val_every", "val_tasks", "max_bad_updates")
"""MetaTrainer arguments (and ``meta.`` config keys) that must be positive integers."""

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


@dataclass
class History:
    """Per-epoch meta-training record."""

    train_loss: list[float] = field(default_factory=list)
    val_epochs: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = -1
    seconds: float = 0.0
    """Wall time spent in meta-training epochs, summed across resumed runs."""
    skipped_epochs: list[int] = field(default_factory=list)
    """Epochs (from 1) whose meta-update was skipped as not finite."""
    grad_norms: list[dict[str, float]] = field(default_factory=list)
    """Per epoch, with ``meta.log_grad_norms``: mean gradient norm per level."""
    interrupted: bool = False
    """Whether the last call of ``train`` stopped early on SIGINT."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the run's config."""


class NonFiniteError(RuntimeError):
    """Meta-training produced non-finite meta-updates too many times in a row."""


# Keys of the resolved config that fix what a checkpoint's numbers mean; the
# others (epochs, evaluation, logging) may change between a run and its resume.
STRUCTURAL_KEYS = (
    "seed",
    "task",
    "levels",
    "meta.optimizer",
    "meta.meta_batch",
    "meta.truncation",
)


# Keys a resumed run may change on purpose (a lower rate after a plateau), with a
# warning, as the numbers then differ from an uninterrupted run's.
TUNABLE_KEYS = ("meta.lr", "meta.grad_clip")

# Settings of a level's rule that change how it computes, not what (the fused
# kernel, activation checkpointing): a resumed run may switch them too, with the
# same warning, as the numbers then round differently.
RUNTIME_RULE_KEYS = ("compile", "checkpoint")


def read_checkpoint(path: Path, what: str) -> object:
    """``torch.load`` a checkpoint with ``weights_only=True``; a file that cannot
    be read raises ``CheckpointError`` with the reason in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if path.is_file() and path.stat().st_size == 0:
            reason = "the file is empty"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{what} {path} cannot be read: {reason}") from None


def save_atomic(payload: dict, path: Path) -> None:
    """Write a checkpoint to a temporary file, flush it to disk, then rename it.

    The folder is made when missing: a trainer may validate, and so write its
    best rule, before its first checkpoint.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class MetaTrainer:
    """Trains ``top.rule`` on the problems of ``top.below``.

    Args:
        top: the topmost level of the stack.
        run_dir: where checkpoints go.
        optimizer, lr: the hand-designed optimiser of the top level.
        epochs: meta-epochs, each one unroll of a fresh meta-batch.
        meta_batch: problems unrolled side by side in each epoch, across all
            processes together when torch.distributed runs several; each unrolls
            an equal share, so it must be a multiple of their number.
        truncation: steps per segment of truncated backpropagation.
        grad_clip: clip the meta-gradient to this norm, or None.
        max_bad_updates: stop after this many non-finite meta-updates in a row.
        log_grad_norms: log and record the gradient norm at every level.
        val_every, val_tasks: validation schedule and size (fixed val problems).
        seed: seeds the stream of training problems.
        config: the resolved experiment config, stored in checkpoints.
        tracker: an optional logger with a ``log(dict, step)`` method (wandb).
    """

    def __init__(
        self,
        top: Level,
        run_dir: str | Path,
        optimizer: str = "adam",
        lr: float = 0.003,
        epochs: int = 100,
        meta_batch: int = 32,
        truncation: int = 20,
        grad_clip: float | None = None,
        max_bad_updates: int = 5,
        log_grad_norms: bool = False,
        checkpoint_steps: int | None = None,
        val_every: int = 10,
        val_tasks: int = 64,
        seed: int = 0,
        config: dict | None = None,
        tracker: object | None = None,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"top-level optimizer {optimizer!r} is not one of {sorted(OPTIMIZERS)}"
            )
        arguments = locals()
        for name in COUNTS:
            value = arguments[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= truncation <= top.horizon:
            raise ValueError(
                f"truncation {truncation} must be between 1 and the horizon "
                f"{top.horizon}"
            )
        self.dist = Context.current()
        if meta_batch % self.dist.world_size:
            raise ValueError(
                f"meta_batch {meta_batch} cannot be shared equally by "
                f"{self.dist.world_size} processes; use a multiple of "
                f"{self.dist.world_size}"
            )
        self.dist.broadcast_(top.rule.theta)  # every rank starts from rank 0's
        self.top = top
        self.run_dir = Path(run_dir)
        self.lr = lr
        self.optimizer = OPTIMIZERS[optimizer]([top.rule.theta], lr=lr)
        self.epochs, self.meta_batch = epochs, meta_batch
        self.truncation, self.grad_clip = truncation, grad_clip
        self.max_bad_updates, self.log_grad_norms = max_bad_updates, log_grad_norms
        if checkpoint_steps is not None and checkpoint_steps < 1:
            raise ValueError(
                f"checkpoint_steps must be a positive integer or None, got "
                f"{checkpoint_steps}"
            )
        self.checkpoint_steps = checkpoint_steps
        self.val_every, self.val_tasks = val_every, val_tasks
        self.config = config or {}
        self.tracker = tracker
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.val_seed = seed + 1_000_003
        self.epoch = 0
        self._running = 1  # the epoch in progress, which SIGINT lets finish
        self.bad_updates = 0
        self.history = History()
        if log_grad_norms:
            for level in _levels(top):
                level.track_grad_norm = True
        # A first_order level whose meta-loss is differentiated once (by the top
        # optimiser, or by a first_order level above) needs no graph of the
        # losses below it: their gradients are already computed.
        above = "first_order"
        for level in _levels(top):
            level.keep_graph = not (level.mode == above == "first_order")
            above = level.mode

    @classmethod
    def from_config(
        cls, top: Level, config: Config, tracker: object | None = None
    ) -> MetaTrainer:
        """A trainer with the ``meta`` settings, seed and run folder of ``config``."""
        from omegaconf import OmegaConf

        meta = config.meta
        return cls(
            top,
            config.run_dir,
            optimizer=meta.optimizer,
            lr=meta.lr,
            epochs=meta.epochs,
            meta_batch=meta.meta_batch,
            truncation=meta.truncation,
            grad_clip=meta.grad_clip,
            max_bad_updates=meta.max_bad_updates,
            log_grad_norms=meta.log_grad_norms,
            checkpoint_steps=meta.checkpoint_steps,
            val_every=meta.val_every,
            val_tasks=meta.val_tasks,
            seed=config.seed,
            config=OmegaConf.to_container(OmegaConf.structured(config)),
            tracker=tracker,
        )

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def train_epoch(self) -> float:
        """One unroll of a fresh meta-batch; returns its mean loss per step.

        A segment whose meta-loss or meta-gradient is not finite takes no step and
        ends the epoch, as its unroll is spoilt; the epoch's loss is then nan.
        """
        top = self.top
        problem = top.below.sample(
            self.meta_batch, self.generator, "train", top.horizon
        )
        problem = self.dist.share(problem, self.meta_batch)  # this rank's rows
        carry = start(problem, top.rule, top.mode, top.keep_graph)
        total, norms = 0.0, []

        for _ in range(math.ceil(top.horizon / self.truncation)):
            steps = min(self.truncation, top.horizon - carry.step)
            meta_loss, carry = self._segment(problem, carry, steps)
            loss = meta_loss.mean()
            # Read before backward, which with checkpoint_steps reruns chunks of
            # the unroll, in reverse, and with them the levels below.
            if self.log_grad_norms:
                seen = [level.grad_norm for level in _levels(top)]

            self.optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
            else:
                # A non-finite share spoils the mean gradient on every rank alike.
                top.rule.theta.grad = torch.full_like(top.rule.theta, math.nan)
            # Every rank now holds the mean meta-gradient; a decision taken on it
            # (clipping, skipping a step) is the same on every rank.
            self.dist.average_gradients([top.rule.theta])
            # With no clip the norm is measured and nothing is scaled.
            norm = torch.nn.utils.clip_grad_norm_(
                [top.rule.theta], self.grad_clip or math.inf
            ).item()
            if not math.isfinite(norm):
                # The whole update goes, finite problems' share with it: masking
                # a diverged problem out would still send nan through the shared
                # weights' backward (0 * inf).
                self.optimizer.zero_grad(set_to_none=True)
                self._skip(meta_loss, carry.step)
                return math.nan
            previous = top.rule.theta.detach().clone()
            self.optimizer.step()
            if not torch.isfinite(top.rule.theta).all():
                # A finite gradient can still step to inf (an infinite rate).
                with torch.no_grad():
                    top.rule.theta.copy_(previous)
                self._skip(meta_loss, carry.step, "weights after the step")
                return math.nan
            self.bad_updates = 0

            if self.log_grad_norms:
                norms.append(self._grad_norms(norm, carry, seen))
            carry = carry.detach()
            total += loss.item()

        if norms:
            self.history.grad_norms.append(
                {key: sum(n[key] for n in norms) / len(norms) for key in norms[0]}
            )
        return self.dist.mean(total) / top.horizon

    def _segment(
        self, problem: Problem, carry: Carry, steps: int
    ) -> tuple[Tensor, Carry]:
        """Unroll one truncation segment; with ``checkpoint_steps``, in chunks of
        that many steps whose graphs are rebuilt one at a time in backward.

        Only the carry at each chunk's start is kept through the forward pass, so
        the peak holds one chunk's graph instead of the segment's, for about one
        more forward pass of time. That pass keeps no graph, so a rule whose
        in-place inference step is faster (the eager LSTM) runs it there: the
        chunks rebuilt in backward then start from carries that match their own
        ends to float rounding. The meta-gradient is the same to that rounding.
        """
        top = self.top
        if self.checkpoint_steps is None or self.checkpoint_steps >= steps:
            theta, keep = top.rule.theta, top.keep_graph
            return unroll(top.rule, theta, problem, carry, steps, top.mode, keep)
        meta_loss, done = 0.0, 0
        while done < steps:
            chunk = min(self.checkpoint_steps, steps - done)

            # Reentrant checkpointing takes and gives flat tensors, and runs its
            # forward without a graph: the unroll's inner gradients build their
            # own. (The non-reentrant kind unpacks during those inner gradients
            # and kept more memory than no checkpointing at all.)
            # Defaults bind this chunk's length and first step: backward reruns
            # the function after the loop has moved on.
            def run(
                theta: Tensor, *flat: Tensor, chunk: int = chunk, step: int = carry.step
            ) -> tuple:
                # The pass without a graph steps the rule in place where that is
                # faster, on a copy of the chunk's starting state (the carry stays).
                rule, state = top.rule, flat[3:]
                fast = rule.steps_faster_in_place(theta.device)
                in_place = fast and not torch.is_grad_enabled()
                if in_place:
                    state = _copy_into(rule.inference_state(flat[0]), state)
                start = Carry(flat[0], state, flat[1], flat[2], step)
                mode, keep = top.mode, top.keep_graph
                loss, end = unroll(
                    rule, theta, problem, start, chunk, mode, keep, in_place
                )
                return (loss, end.params, end.loss, end.grad, *end.state)

            flat = (carry.params, carry.loss, carry.grad, *carry.state)
            out = checkpoint(run, top.rule.theta, *flat, use_reentrant=True)
            carry = Carry(out[1], tuple(out[4:]), out[2], out[3], carry.step + chunk)
            meta_loss, done = meta_loss + out[0], done + chunk
        return meta_loss, carry

    def _skip(self, meta_loss: Tensor, step: int, what: str | None = None) -> None:
        """Count and log a skipped meta-update; stop when too many come in a row."""
        self.bad_updates += 1
        self.history.skipped_epochs.append(self.epoch + 1)
        diverged = int((~torch.isfinite(meta_loss.detach())).sum())
        if what is None:
            what = "meta-loss" if diverged else "meta-gradient"
        logger.warning(
            "epoch %d: non-finite %s by optimisee step %d (%d of %d problems "
            "diverged); meta-update skipped, %d in a row, %d in all. The epoch's "
            "problems are redrawn by epoch_problems(%d) (task seed %d)",
            self.epoch + 1,
            what,
            step,
            diverged,
            meta_loss.numel(),
            self.bad_updates,
            len(self.history.skipped_epochs),
            self.epoch,
            self.seed,
        )
        if self.bad_updates >= self.max_bad_updates:
            raise NonFiniteError(
                f"{self.bad_updates} meta-updates in a row were not finite (last "
                f"at epoch {self.epoch + 1}); stopping. The last good checkpoint "
                f"is {self.checkpoint_path} (epoch {self.epoch}); lower meta.lr or "
                f"set meta.grad_clip, then rerun with resume=true"
            )

    def _grad_norms(
        self, meta_norm: float, carry: Carry, seen: list[float]
    ) -> dict[str, float]:
        """The top meta-gradient's norm, and the gradient norm each rule last saw
        in the segment's forward unroll (``seen``, per level from the top; the
        top's own is read from ``carry``)."""
        norms = {f"level {self.top.depth - 1} meta-gradient": meta_norm}
        seen = [carry.grad.detach().norm(dim=-1).mean().item(), *seen[1:]]
        for level, norm in zip(_levels(self.top), seen):
            norms[f"level {level.depth - 1} ({level.rule.kind}) input"] = norm
        return norms

    def check_meta_gradient(self, directions: int = 3) -> GradientCheck:
        """Compare the meta-gradient of one truncation segment, on a meta-batch
        like the training one, with finite differences (see ``diagnostics``)."""
        return check_meta_gradient(
            self.top,
            self.meta_batch,
            self.truncation,
            seed=self.seed + 2_000_003,
            directions=directions,
        )

    def epoch_problems(self, epoch: int) -> Problem:
        """The training problems of meta-epoch ``epoch`` (from 0), drawn afresh.

        Problems come from one stream seeded by the run's seed, one draw per
        epoch, so a fault the log reports at an epoch can be reproduced.
        """
        generator = torch.Generator().manual_seed(self.seed)
        top = self.top
        for _ in range(epoch):
            top.below.sample(self.meta_batch, generator, "train", top.horizon)
        return top.below.sample(self.meta_batch, generator, "train", top.horizon)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss per step of the current rule on fixed validation problems."""
        top = self.top
        generator = torch.Generator().manual_seed(self.val_seed)
        problem = top.below.sample(self.val_tasks, generator, "val", top.horizon)
        problem = self.dist.share(problem, self.val_tasks)
        losses, _ = optimise(top.rule, problem, top.horizon)
        # The meta-loss as an unroll sums it, in order: the losses after each
        # update, so that validation figures stay the same to the last digit.
        meta_loss = torch.zeros_like(losses[0])
        for loss in losses[1:]:
            meta_loss = meta_loss + loss
        meta_loss = meta_loss.to(top.rule.theta.device)
        return self.dist.mean_of_rows(meta_loss, self.val_tasks) / top.horizon

    def train(self) -> History:
        """Meta-train up to ``epochs``, validating and checkpointing as it goes.

        SIGINT (Ctrl-C) stops training after the current epoch, with its
        checkpoint written; ``history.interrupted`` then says so. A second SIGINT
        interrupts at once, and the checkpoint of the epoch before still stands.
        """
        self.history.interrupted = False
        stop = []

        def interrupt(signum: int, frame: object) -> None:
            if stop:
                raise KeyboardInterrupt
            stop.append(signum)
            logger.warning("SIGINT: stopping after epoch %d", self._running)

        previous = _install_sigint(interrupt)
        try:
            # A stop in the last epoch counts too: what follows (evaluation) can
            # take as long as training, and resume=true runs it alone.
            self.history.interrupted = self._train(stop)
        finally:
            _install_sigint(previous)
        return self.history

    def _train(self, stop: list) -> bool:
        """The epochs up to ``epochs``; whether SIGINT stopped them."""
        bar = tqdm(
            range(self.epoch, self.epochs),
            desc="meta-train",
            unit="epoch",
            initial=self.epoch,
            total=self.epochs,
            leave=False,
            disable=None if self.dist.is_main else True,
        )
        for epoch in bar:
            self._running = epoch + 1  # until its checkpoint is written
            start_time = time.perf_counter()
            train_loss = self.train_epoch()
            self.history.seconds += time.perf_counter() - start_time
            self.history.train_loss.append(train_loss)
            self.epoch = epoch + 1
            metrics = {"meta/train_loss": train_loss}
            if self.log_grad_norms and math.isfinite(train_loss):
                norms = self.history.grad_norms[-1]
                metrics.update({f"grad_norm/{k}": v for k, v in norms.items()})
                logger.info(
                    "epoch %d gradient norms: %s",
                    self.epoch,
                    ", ".join(f"{k} {v:.3g}" for k, v in norms.items()),
                )

            last = self.epoch == self.epochs
            if self.epoch % self.val_every == 0 or last:
                val_loss = self.validate()
                self.history.val_epochs.append(self.epoch)
                self.history.val_loss.append(val_loss)
                metrics["meta/val_loss"] = val_loss
                if val_loss < self.history.best_val:
                    self.history.best_val, self.history.best_epoch = (
                        val_loss,
                        self.epoch,
                    )
                    if self.dist.is_main:
                        save_atomic(self.rule_payload(), self.best_path)
                logger.info(
                    "epoch %d/%d: meta-loss %.4g, validation %.4g (best %.4g "
                    "at epoch %d)",
                    self.epoch,
                    self.epochs,
                    train_loss,
                    val_loss,
                    self.history.best_val,
                    self.history.best_epoch,
                )

            self.save()

            bar.set_postfix(loss=f"{train_loss:.4g}")
            if self.tracker is not None and self.dist.is_main:
                self.tracker.log(metrics, step=self.epoch)
            # All ranks stop at the same epoch, whichever of them saw SIGINT.
            if self.dist.any(bool(stop)):
                stop.append(signal.SIGINT)
                logger.warning(
                    "stopped at epoch %d of %d on SIGINT; checkpoint %s; rerun "
                    "with resume=true to continue",
                    self.epoch,
                    self.epochs,
                    self.checkpoint_path,
                )
                self.dist.barrier()
                return True
        self.dist.barrier()  # rank 0's last files are on disk before anyone reads
        return False

    def rule_payload(self) -> dict:
        """The top rule alone: its kind, constructor arguments and weights."""
        rule = self.top.rule
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": rule.kind,
            "rule_config": rule.config(),
            "theta": rule.theta.detach().cpu().clone(),
            "epoch": self.epoch,
        }

    def save(self) -> None:
        """Write everything needed to resume exactly, atomically, from rank 0.

        Every rank resumes from this one file: the task stream is the global one.
        """
        if not self.dist.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "rule": self.rule_payload(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "bad_updates": self.bad_updates,
            "history": vars(self.history),
            "config": self.config,
        }
        save_atomic(payload, self.checkpoint_path)
        logger.debug("checkpoint written to %s", self.checkpoint_path)

    def _check_config(self, saved: dict) -> None:
        """Refuse to resume when a key that shapes the training has changed."""
        for key in STRUCTURAL_KEYS:
            old, new = _lookup(saved, key), _lookup(self.config, key)
            if key == "levels":
                old, new = _without_runtime_keys(old), _without_runtime_keys(new)
            if old is not None and new is not None and old != new:
                key, old, new = _first_difference(key, old, new)
                raise CheckpointError(
                    f"checkpoint {self.checkpoint_path} was written with {key} = "
                    f"{old!r}, but the config now has {new!r}; resume with the "
                    f"original value, or use a new run_dir"
                )
        runtime = [
            f"levels.{index}.rule.{name}"
            for index in range(len(_lookup(self.config, "levels") or []))
            for name in RUNTIME_RULE_KEYS
        ]
        for key in [*TUNABLE_KEYS, *runtime]:
            old, new = _lookup(saved, key), _lookup(self.config, key)
            if old != new and not (key in runtime and old is None):
                logger.warning(
                    "resuming with %s = %r where the checkpoint had %r: the run "
                    "will not match one that was never stopped",
                    key,
                    new,
                    old,
                )

    def load(self) -> None:
        """Resume from the latest checkpoint in ``run_dir``."""
        payload = read_checkpoint(self.checkpoint_path, "checkpoint")
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} has format "
                f"{payload.get('format')!r}; this version reads {CHECKPOINT_FORMAT}"
            )
        # The config's keys first: they name what changed, where the rule's
        # shape alone can only say that something did.
        self._check_config(payload.get("config", {}))
        rule = payload["rule"]
        expected = self.top.rule
        if rule["kind"] != expected.kind or rule["theta"].shape != expected.theta.shape:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} holds a {rule['kind']!r} rule with "
                f"{rule['theta'].numel()} weights; the config builds a "
                f"{self.top.rule.kind!r} rule with {self.top.rule.num_params}"
            )
        with torch.no_grad():
            self.top.rule.theta.copy_(rule["theta"])
        self.optimizer.load_state_dict(payload["optimizer"])
        for group in self.optimizer.param_groups:  # the config's rate, not the saved
            group["lr"] = self.lr
        self.generator.set_state(payload["generator"])
        if "torch_rng" in payload:  # checkpoints of earlier versions lack it
            torch.set_rng_state(payload["torch_rng"])
        self.bad_updates = payload.get("bad_updates", 0)
        self.history = History(**payload["history"])
        self.epoch = payload["epoch"]
        logger.info("resumed from %s at epoch %d", self.checkpoint_path, self.epoch)
        if self.epoch > self.epochs:
            logger.warning(
                "the checkpoint is at epoch %d, past meta.epochs = %d: nothing is "
                "trained, and the rule of epoch %d is the one evaluated",
                self.epoch,
                self.epochs,
                self.epoch,
            )


def _first_difference(key: str, old: object, new: object) -> tuple[str, object, object]:
    """The first key, under ``key``, where two config values differ, and its two
    values: levels.0.rule.compile rather than the whole levels lists."""
    if isinstance(old, dict) and isinstance(new, dict):
        for sub in [*old, *(k for k in new if k not in old)]:
            if old.get(sub) != new.get(sub):
                return _first_difference(f"{key}.{sub}", old.get(sub), new.get(sub))
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"{key} of length", len(old), len(new)
        for index, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _first_difference(f"{key}.{index}", a, b)
    return key, old, new


def _copy_into(fresh: tuple[Tensor, ...], state: tuple[Tensor, ...]) -> tuple:
    """``state``'s values written into ``fresh`` (a rule's new state, in the
    layout its in-place step wants), which is returned."""
    for into, value in zip(fresh, state, strict=True):
        into.copy_(value)
    return fresh


def _levels(top: Level) -> list[Level]:
    """The levels of a stack from the top down."""
    levels = [top]
    while isinstance(levels[-1].below, Level):
        levels.append(levels[-1].below)
    return levels


def _install_sigint(handler: object) -> object:
    """Set the SIGINT handler where a process may (its main thread); the old one."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals to the caller
        return handler


def _lookup(config: dict, dotted: str) -> object:
    """``config["a"]["b"]`` for ``"a.b"`` (``levels.0`` indexes a list), or None
    where a key is missing."""
    for part in dotted.split("."):
        if isinstance(config, list) and part.isdigit() and int(part) < len(config):
            config = config[int(part)]
        elif isinstance(config, dict) and part in config:
            config = config[part]
        else:
            return None
    return config


def _without_runtime_keys(levels: object) -> object:
    """A resolved config's levels without their rules' RUNTIME_RULE_KEYS."""
    if not isinstance(levels, list):
        return levels
    return [
        {
            **level,
            "rule": {
                k: v
                for k, v in level.get("rule", {}).items()
                if k not in RUNTIME_RULE_KEYS
            },
        }
        if isinstance(level, dict)
        else level
        for level in levels
    ]
