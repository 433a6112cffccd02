"""Tests for hierarchy.trainer: determinism, truncation, checkpoints and resume."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import torch

import hierarchy.trainer as trainer_module
from hierarchy.config import Config
from hierarchy.experiment import build
from hierarchy.level import Level
from hierarchy.rules import MLPRule
from hierarchy.trainer import MetaTrainer, save_atomic
from hierarchy.unroll import start, unroll
from tasks.quadratic import QuadraticTask


def _trainer(config: Config, run_dir: Path, **changes) -> MetaTrainer:
    """The stack of ``config`` and its MetaTrainer, in ``run_dir``, with changes."""
    top, _ = build(config)
    trainer = MetaTrainer.from_config(top, config)
    trainer.run_dir = Path(run_dir)
    for name, value in changes.items():
        setattr(trainer, name, value)
    return trainer


def _theta(trainer: MetaTrainer) -> torch.Tensor:
    return trainer.top.rule.theta.detach().clone()


def test_same_seed_bit_identical(tiny_config, tmp_path: Path) -> None:
    """Two trainings with one seed give identical theta and losses; others differ."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        config = tiny_config(f"seed={seed}")
        trainer = _trainer(config, tmp_path / name)
        history = trainer.train()
        runs[name] = (_theta(trainer), history.train_loss, history.val_loss)

    assert len(runs["a"][1]) == 3
    assert torch.equal(runs["a"][0], runs["b"][0])
    assert runs["a"][1] == runs["b"][1] and runs["a"][2] == runs["b"][2]
    assert not torch.equal(runs["a"][0], runs["c"][0])
    assert runs["a"][1] != runs["c"][1]


def test_training_changes_theta_and_records_history(tiny_config, tmp_path) -> None:
    """Training moves theta, logs one loss per epoch and validates on schedule."""
    trainer = _trainer(tiny_config("meta.epochs=4"), tmp_path)
    before = _theta(trainer)
    history = trainer.train()
    assert not torch.equal(before, _theta(trainer))
    assert len(history.train_loss) == 4 and trainer.epoch == 4
    assert history.val_epochs == [2, 4]
    assert history.best_val == min(history.val_loss)
    assert (
        history.best_epoch
        == history.val_epochs[history.val_loss.index(history.best_val)]
    )


def test_validation_uses_fixed_problems(tiny_config, tmp_path: Path) -> None:
    """validate() is repeatable and does not advance the training stream."""
    trainer = _trainer(tiny_config(), tmp_path)
    state = trainer.generator.get_state()
    first = trainer.validate()
    assert trainer.validate() == first
    assert torch.equal(trainer.generator.get_state(), state)
    assert first > 0


def test_checkpoints_written_atomically(tiny_config, tmp_path: Path) -> None:
    """After training there are checkpoint.pt and best.pt and no *.tmp files."""
    trainer = _trainer(tiny_config(), tmp_path)
    trainer.train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "checkpoint.pt"]
    payload = torch.load(trainer.checkpoint_path, weights_only=True)
    assert payload["epoch"] == 3
    assert torch.equal(payload["rule"]["theta"], _theta(trainer))
    best = torch.load(trainer.best_path, weights_only=True)
    assert best["kind"] == "lstm" and best["epoch"] == trainer.history.best_epoch


def test_save_atomic_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    """If writing fails midway, the previous checkpoint is still intact."""
    path = tmp_path / "checkpoint.pt"
    save_atomic({"value": torch.tensor([1.0])}, path)

    def broken_save(payload, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"value": torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert torch.equal(
        torch.load(path, weights_only=True)["value"], torch.tensor([1.0])
    )


def test_resume_matches_uninterrupted_run(tiny_config, tmp_path: Path) -> None:
    """4 epochs in one go equal 2 epochs, then load() in a new trainer, then 2 more."""
    config = tiny_config("meta.epochs=4")
    straight = _trainer(config, tmp_path / "straight")
    straight.train()

    first = _trainer(config, tmp_path / "resumed", epochs=2)
    first.train()
    second = _trainer(config, tmp_path / "resumed")
    assert not torch.equal(_theta(second), _theta(first))  # fresh weights first
    second.load()
    assert second.epoch == 2 and torch.equal(_theta(second), _theta(first))
    history = second.train()

    assert torch.equal(_theta(second), _theta(straight))
    assert history.train_loss == straight.history.train_loss
    assert history.val_loss == straight.history.val_loss
    assert second.epoch == 4


def test_load_refuses_other_rule_kind(tiny_config, tmp_path: Path) -> None:
    """A checkpoint of an lstm rule is refused by an mlp trainer, naming both."""
    _trainer(tiny_config("meta.epochs=1"), tmp_path).train()
    other = _trainer(tiny_config("levels.0.rule.kind=mlp"), tmp_path)
    before = _theta(other)
    with pytest.raises(ValueError) as info:
        other.load()
    assert "'lstm'" in str(info.value) and "'mlp'" in str(info.value)
    assert torch.equal(_theta(other), before)


def test_load_refuses_other_kind_of_equal_size(tiny_config, tmp_path) -> None:
    """The kind is checked on its own: an mlp with as many weights is refused."""
    _trainer(tiny_config("meta.epochs=1"), tmp_path).train()
    other = _trainer(
        tiny_config(
            "levels.0.rule.kind=mlp",
            "levels.0.rule.momenta=[]",
            "levels.0.rule.hidden_size=29",
        ),
        tmp_path,
    )
    assert (
        other.top.rule.num_params
        == 117
        == torch.load(tmp_path / "checkpoint.pt", weights_only=True)["rule"][
            "theta"
        ].numel()
    )
    with pytest.raises(ValueError, match="'lstm'.*'mlp'"):
        other.load()


def test_load_refuses_other_rule_size(tiny_config, tmp_path: Path) -> None:
    """Same kind but a different number of weights is refused too: by the key
    that changed, or, where the checkpoint records no config, by the counts."""
    _trainer(tiny_config("meta.epochs=1"), tmp_path).train()
    other = _trainer(tiny_config("levels.0.rule.hidden_size=5"), tmp_path)
    with pytest.raises(ValueError, match="levels.0.rule.hidden_size = 4"):
        other.load()
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**payload, "config": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=str(other.top.rule.num_params)):
        other.load()


def test_load_refuses_other_format(tiny_config, tmp_path: Path) -> None:
    """A checkpoint of another format version is refused."""
    trainer = _trainer(tiny_config("meta.epochs=1"), tmp_path)
    trainer.train()
    payload = torch.load(trainer.checkpoint_path, weights_only=True)
    payload["format"] = 99
    torch.save(payload, trainer.checkpoint_path)
    with pytest.raises(ValueError, match="format"):
        trainer.load()


class _CountingStep:
    """Wraps an optimizer's step and counts the calls."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.step, self.calls = optimizer.step, 0
        optimizer.step = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.step(*args, **kwargs)


@pytest.mark.parametrize("truncation, steps", [(5, 2), (4, 3), (10, 1), (1, 10)])
def test_one_optimizer_step_per_segment(tiny_config, tmp_path, truncation, steps):
    """Horizon 10 in segments of `truncation` takes ceil(10 / truncation) steps."""
    trainer = _trainer(tiny_config(f"meta.truncation={truncation}"), tmp_path)
    counter = _CountingStep(trainer.optimizer)
    trainer.train_epoch()
    assert counter.calls == steps
    trainer.train_epoch()
    assert counter.calls == 2 * steps


def test_segments_start_from_detached_carry(tiny_config, tmp_path, monkeypatch):
    """Every segment starts from a carry with no graph, at the right step."""
    trainer = _trainer(tiny_config("meta.truncation=4"), tmp_path)
    seen = []

    def spy(rule, theta, problem, carry, steps, *args):
        seen.append((carry.step, steps, [carry.params, carry.grad, *carry.state]))
        return unroll(rule, theta, problem, carry, steps, *args)

    monkeypatch.setattr(trainer_module, "unroll", spy)
    trainer.train_epoch()
    assert [(step, steps) for step, steps, _ in seen] == [(0, 4), (4, 4), (8, 2)]
    for _, _, tensors in seen:
        assert all(t.grad_fn is None for t in tensors)


def test_gradient_comes_from_last_segment_only(tiny_config, tmp_path) -> None:
    """theta.grad after an epoch is the last segment's gradient from a cut carry."""
    config = tiny_config()
    trainer = _trainer(config, tmp_path)
    trainer.optimizer = torch.optim.SGD([trainer.top.rule.theta], lr=0.0)
    theta = _theta(trainer)
    trainer.train_epoch()
    assert torch.equal(_theta(trainer), theta)  # lr 0: theta unchanged

    top = trainer.top
    generator = torch.Generator().manual_seed(config.seed)
    problem = top.below.sample(config.meta.meta_batch, generator, "train", 10)
    carry = start(problem, top.rule, top.mode)
    with torch.no_grad():
        _, carry = unroll(top.rule, theta, problem, carry, 5, top.mode)
    leaf = theta.clone().requires_grad_(True)
    loss, _ = unroll(top.rule, leaf, problem, carry.detach(), 5, top.mode)
    loss.mean().backward()
    torch.testing.assert_close(top.rule.theta.grad, leaf.grad)

    # Backpropagating through both segments would give a different gradient.
    whole = theta.clone().requires_grad_(True)
    problem = top.below.sample(
        config.meta.meta_batch, torch.Generator().manual_seed(config.seed), "train", 10
    )
    _, mid = unroll(
        top.rule, whole, problem, start(problem, top.rule, top.mode), 5, top.mode
    )
    loss, _ = unroll(top.rule, whole, problem, mid, 5, top.mode)
    loss.mean().backward()
    assert not torch.allclose(whole.grad, leaf.grad)


def test_grad_clip_bounds_update(tmp_path: Path) -> None:
    """With grad_clip, the meta-gradient norm at each step is at most the clip."""
    torch.manual_seed(0)
    top = Level(
        MLPRule(hidden_size=3, num_layers=1), QuadraticTask(3), 4, "first_order"
    )
    trainer = MetaTrainer(
        top,
        tmp_path,
        optimizer="sgd",
        lr=1.0,
        meta_batch=2,
        truncation=4,
        grad_clip=1e-3,
        seed=0,
    )
    theta = _theta(trainer)
    trainer.train_epoch()
    assert top.rule.theta.grad.norm().item() == pytest.approx(1e-3, rel=1e-4)
    assert (_theta(trainer) - theta).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_trainer_rejects_bad_options(tmp_path: Path) -> None:
    """Unknown optimizer names and truncations outside 1..horizon are refused."""
    top = Level(MLPRule(hidden_size=3), QuadraticTask(2), 5, "first_order")
    with pytest.raises(ValueError, match="lbfgs"):
        MetaTrainer(top, tmp_path, optimizer="lbfgs")
    for truncation in (0, 6):
        with pytest.raises(ValueError, match="truncation"):
            MetaTrainer(top, tmp_path, truncation=truncation)


def test_load_refuses_truncated_checkpoint(tiny_config, tmp_path: Path) -> None:
    """A damaged checkpoint is a CheckpointError naming the file, not a torch error."""
    trainer = _trainer(tiny_config("meta.epochs=1"), tmp_path)
    trainer.train()
    data = trainer.checkpoint_path.read_bytes()
    trainer.checkpoint_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(trainer_module.CheckpointError, match="checkpoint.pt"):
        _trainer(tiny_config("meta.epochs=1"), tmp_path).load()


def test_load_refuses_a_changed_structural_key(tiny_config, tmp_path: Path) -> None:
    """Resuming with another task is refused naming the key; more epochs are fine."""
    from omegaconf import OmegaConf

    def resolved(config):
        return OmegaConf.to_container(OmegaConf.structured(config))

    def trainer(*overrides: str) -> MetaTrainer:
        config = tiny_config(*overrides)
        made = _trainer(config, tmp_path)
        made.config = resolved(config)
        return made

    trainer("meta.epochs=1").train()
    trainer("meta.epochs=3").load()
    changed_trainer = trainer("meta.epochs=3", "task.dim=4")
    with pytest.raises(trainer_module.CheckpointError, match="task.dim = 3.* 4;"):
        changed_trainer.load()

    # Within a list, the first key that differs is named, not the whole lists,
    # also where the rule's shape changes.
    for override, message in [
        ("levels.0.rule.preprocess_p=5", "levels.0.rule.preprocess_p = 10.0, but"),
        ("levels.0.rule.hidden_size=5", "levels.0.rule.hidden_size = 4, but"),
        (
            "levels=[{rule: {kind: lstm, hidden_size: 4, num_layers: 1}}, "
            "{rule: {kind: lstm, hidden_size: 4, num_layers: 1}}]",
            "levels of length = 1, but the config now has 2;",
        ),
    ]:
        with pytest.raises(trainer_module.CheckpointError, match=message):
            trainer("meta.epochs=3", override).load()


def test_resuming_may_switch_the_fused_kernel_with_a_warning(
    tiny_config, caplog, tmp_path: Path
) -> None:
    """compile and checkpoint change how the rule computes, not what: a resume
    may switch them, and is told the numbers will round differently."""
    from omegaconf import OmegaConf

    def trainer(*overrides: str) -> MetaTrainer:
        config = tiny_config(*overrides)
        made = _trainer(config, tmp_path)
        made.config = OmegaConf.to_container(OmegaConf.structured(config))
        return made

    trainer("meta.epochs=1").train()
    with caplog.at_level(logging.WARNING, logger="hierarchy.trainer"):
        trainer("meta.epochs=2", "levels.0.rule.compile=true").load()
    assert "levels.0.rule.compile = True where the checkpoint had False" in (
        caplog.text
    )


def test_resuming_past_the_epochs_asked_for_says_so(
    tiny_config, caplog, tmp_path: Path
) -> None:
    """A checkpoint further on than meta.epochs trains nothing, with a warning."""
    _trainer(tiny_config("meta.epochs=2"), tmp_path).train()
    fewer = _trainer(tiny_config("meta.epochs=1"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="hierarchy.trainer"):
        fewer.load()
    assert "at epoch 2, past meta.epochs = 1: nothing is trained" in caplog.text


def test_history_keeps_training_time_across_resume(tiny_config, tmp_path) -> None:
    """Meta-training seconds accumulate over a resumed run instead of restarting."""
    first = _trainer(tiny_config("meta.epochs=1"), tmp_path)
    first.train()
    second = _trainer(tiny_config("meta.epochs=2"), tmp_path)
    second.load()
    assert second.history.seconds == first.history.seconds > 0
    second.train()
    assert second.history.seconds > first.history.seconds


def test_validating_at_the_first_epoch_makes_the_run_folder(tiny_config, tmp_path):
    """best.pt can be written before the first checkpoint, into a new folder."""
    trainer = _trainer(tiny_config("meta.epochs=1"), tmp_path / "new" / "run")
    trainer.val_every = 1
    trainer.train()
    assert trainer.best_path.is_file() and trainer.checkpoint_path.is_file()


@pytest.mark.parametrize(
    "argument", ["epochs", "meta_batch", "val_every", "val_tasks", "max_bad_updates"]
)
def test_counts_that_would_train_or_check_nothing_are_refused(argument) -> None:
    """MetaTrainer(epochs=0) and the like name the argument instead of training
    nothing."""
    from hierarchy.level import build_stack
    from hierarchy.rules import MLPRule
    from tasks.quadratic import QuadraticTask

    top = build_stack(QuadraticTask(2), [MLPRule(hidden_size=2)], [2], ["first_order"])
    with pytest.raises(ValueError, match=f"{argument} must be a positive integer"):
        MetaTrainer(top, "unused", truncation=1, **{argument: 0})


def _interrupted_trainer(tiny_config, epochs: int, when: str, at: int) -> MetaTrainer:
    """A trainer that sends itself SIGINT in epoch ``at``: while it trains
    (``train_epoch``) or while it validates (``validate``)."""
    config = tiny_config(f"meta.epochs={epochs}", "meta.val_every=1")
    top, _ = build(config)
    trainer = MetaTrainer.from_config(top, config)
    original = getattr(trainer, when)

    def interrupted(*args, **kwargs):
        out = original(*args, **kwargs)
        running = trainer.epoch + 1 if when == "train_epoch" else trainer.epoch
        if running == at:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    setattr(trainer, when, interrupted)
    return trainer


@pytest.mark.parametrize(
    "epochs, when, at",
    [(2, "train_epoch", 2), (2, "validate", 2), (3, "validate", 1)],
)
def test_sigint_stops_after_the_epoch_it_came_in(
    tiny_config, caplog, epochs: int, when: str, at: int
) -> None:
    """Ctrl-C stops after the epoch in progress, the last one too (evaluation is
    left to resume=true), and both messages name that epoch, also when it comes
    while the epoch validates."""
    trainer = _interrupted_trainer(tiny_config, epochs, when, at)
    with caplog.at_level(logging.WARNING, logger="hierarchy.trainer"):
        history = trainer.train()
    assert history.interrupted and trainer.epoch == at
    messages = [record.getMessage() for record in caplog.records]
    assert f"SIGINT: stopping after epoch {at}" in messages
    stopped = f"stopped at epoch {at} of {epochs} on SIGINT"
    assert any(m.startswith(stopped) for m in messages)
