"""Training the top level with a hand-designed optimiser and truncated BPTT.

Each meta-epoch samples a meta-batch of fresh problems from the level below the
top, unrolls them for the top level's horizon in segments of ``truncation``
steps, and after each segment takes one optimiser step on the segment's
meta-loss, then detaches the unroll and carries on. The rule with the best
validation meta-loss is kept beside the latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hierarchy.config import Config
from hierarchy.level import Level
from hierarchy.unroll import start, unroll

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the run's config."""


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
        meta_batch: problems unrolled side by side in each epoch.
        truncation: steps per segment of truncated backpropagation.
        grad_clip: clip the meta-gradient to this norm, or None.
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
        if not 1 <= truncation <= top.horizon:
            raise ValueError(
                f"truncation {truncation} must be between 1 and the horizon "
                f"{top.horizon}"
            )
        self.top = top
        self.run_dir = Path(run_dir)
        self.optimizer = OPTIMIZERS[optimizer]([top.rule.theta], lr=lr)
        self.epochs, self.meta_batch = epochs, meta_batch
        self.truncation, self.grad_clip = truncation, grad_clip
        self.val_every, self.val_tasks = val_every, val_tasks
        self.config = config or {}
        self.tracker = tracker
        self.generator = torch.Generator().manual_seed(seed)
        self.val_seed = seed + 1_000_003
        self.epoch = 0
        self.history = History()

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
        """One unroll of a fresh meta-batch; returns its mean loss per step."""
        top = self.top
        problem = top.below.sample(
            self.meta_batch, self.generator, "train", top.horizon
        )
        carry = start(problem, top.rule, top.mode)
        total = 0.0

        for _ in range(math.ceil(top.horizon / self.truncation)):
            steps = min(self.truncation, top.horizon - carry.step)
            meta_loss, carry = unroll(
                top.rule, top.rule.theta, problem, carry, steps, top.mode
            )
            loss = meta_loss.mean()

            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([top.rule.theta], self.grad_clip)
            self.optimizer.step()

            carry = carry.detach()
            total += loss.item()

        return total / top.horizon

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss per step of the current rule on fixed validation problems."""
        top = self.top
        generator = torch.Generator().manual_seed(self.val_seed)
        problem = top.below.sample(self.val_tasks, generator, "val", top.horizon)
        carry = start(problem, top.rule, top.mode)
        theta = top.rule.theta.detach()
        meta_loss, _ = unroll(
            top.rule, theta, problem, carry, top.horizon, "first_order"
        )
        return meta_loss.mean().item() / top.horizon

    def train(self) -> History:
        """Meta-train up to ``epochs``, validating and checkpointing as it goes."""
        bar = tqdm(
            range(self.epoch, self.epochs),
            desc="meta-train",
            unit="epoch",
            initial=self.epoch,
            total=self.epochs,
            leave=False,
            disable=None,
        )
        for epoch in bar:
            start_time = time.perf_counter()
            train_loss = self.train_epoch()
            self.history.seconds += time.perf_counter() - start_time
            self.history.train_loss.append(train_loss)
            self.epoch = epoch + 1
            metrics = {"meta/train_loss": train_loss}

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
            if self.tracker is not None:
                self.tracker.log(metrics, step=self.epoch)
        return self.history

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
        """Write everything needed to resume exactly, atomically."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "rule": self.rule_payload(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": vars(self.history),
            "config": self.config,
        }
        save_atomic(payload, self.checkpoint_path)
        logger.debug("checkpoint written to %s", self.checkpoint_path)

    def _check_config(self, saved: dict) -> None:
        """Refuse to resume when a key that shapes the training has changed."""
        for key in STRUCTURAL_KEYS:
            old, new = _lookup(saved, key), _lookup(self.config, key)
            if old is not None and new is not None and old != new:
                raise CheckpointError(
                    f"checkpoint {self.checkpoint_path} was written with {key} = "
                    f"{old!r}, but the config now has {new!r}; resume with the "
                    f"original value, or use a new run_dir"
                )

    def load(self) -> None:
        """Resume from the latest checkpoint in ``run_dir``."""
        try:
            payload = torch.load(
                self.checkpoint_path, map_location="cpu", weights_only=True
            )
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} cannot be read ({error}); "
                f"delete it to start afresh, or point run_dir elsewhere"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} has format "
                f"{payload.get('format')!r}; this version reads {CHECKPOINT_FORMAT}"
            )
        rule = payload["rule"]
        expected = self.top.rule
        if rule["kind"] != expected.kind or rule["theta"].shape != expected.theta.shape:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} holds a {rule['kind']!r} rule with "
                f"{rule['theta'].numel()} weights; the config builds a "
                f"{self.top.rule.kind!r} rule with {self.top.rule.num_params}"
            )
        self._check_config(payload.get("config", {}))
        with torch.no_grad():
            self.top.rule.theta.copy_(rule["theta"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.generator.set_state(payload["generator"])
        self.history = History(**payload["history"])
        self.epoch = payload["epoch"]
        logger.info("resumed from %s at epoch %d", self.checkpoint_path, self.epoch)


def _lookup(config: dict, dotted: str) -> object:
    """``config["a"]["b"]`` for ``"a.b"``, or None where a key is missing."""
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config
