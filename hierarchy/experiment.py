"""From a config to results: build the stack, meta-train it, compare with baselines.

``run`` is what the examples and the command line call. It writes, under the run
folder, the checkpoints, ``results.json`` with every number, one PNG plot and one
text table per evaluated task and horizon.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hierarchy.baselines import BASELINES, tune_learning_rate
from hierarchy.config import (
    Config,
    ConfigError,
    RuleConfig,
    TaskConfig,
    task_with_overrides,
)
from hierarchy.evaluate import (
    format_table,
    plot_curves,
    summarise,
    trajectory,
    write_json,
)
from hierarchy.level import Level, Task, build_stack
from hierarchy.logging import Tracker, setup_logging
from hierarchy.rules import RULES, UpdateRule
from hierarchy.trainer import MetaTrainer
from hierarchy.unroll import start, unroll

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'device' = {name!r}: CUDA is not available "
            f"here; use 'auto' or 'cpu'"
        )
    return device


@lru_cache(maxsize=4)
def _mnist(root: str | None, source: str):
    from tasks.mnist_data import load_mnist

    return load_mnist(root=root, source=source)


def build_task(config: TaskConfig, device: torch.device) -> Task:
    """The level-0 task named by ``config.name``: ``quadratic`` or ``mnist``."""
    if config.name == "quadratic":
        from tasks.quadratic import QuadraticTask

        return QuadraticTask(config.dim, device=device)

    if config.name == "mnist":
        from tasks.mnist import MNISTTask

        data = _mnist(config.data_root, config.data_source)
        task = MNISTTask(
            data.train_images,
            data.train_labels,
            data.test_images,
            data.test_labels,
            hidden=tuple(config.hidden),
            activation=config.activation,
            batch_size=config.batch_size,
        )
        return task.to(device)

    raise ConfigError(
        f"config key 'task.name' = {config.name!r}: expected one of "
        f"['mnist', 'quadratic']"
    )


def build_rule(config: RuleConfig) -> UpdateRule:
    """A learned rule (``lstm``, ``mlp``) or a hand-designed one (a baseline name)."""
    if config.kind in BASELINES:
        return BASELINES[config.kind](config.lr)
    common = dict(
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        out_scale=config.out_scale,
        preprocess_p=config.preprocess_p,
    )
    if config.kind == "mlp":
        return RULES["mlp"](**common, momenta=tuple(config.momenta))
    return RULES[config.kind](**common)


def build(config: Config) -> tuple[Level, torch.device]:
    """The stack of levels described by ``config``, on its device."""
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    task = build_task(config.task, device)
    rules = [build_rule(level.rule).to(device) for level in config.levels]
    top = build_stack(
        task,
        rules,
        [level.horizon for level in config.levels],
        [level.mode for level in config.levels],
    )
    return top, device


@torch.no_grad()
def optimisee_rule(top: Level, seed: int) -> tuple[UpdateRule, torch.Tensor]:
    """The rule that trains level 0, at the weights the stack gives it.

    In a two-level stack that is the top rule as trained. Deeper, each level's
    rule is run from its fresh start under the trained rule above it for its
    horizon, and the weights it reaches are used one level further down.
    """
    level, theta = top, top.rule.theta.detach()
    generator = torch.Generator().manual_seed(seed)
    while isinstance(level.below, Level):
        problem = level.below.sample(1, generator, "train", level.horizon)
        carry = start(problem, level.rule, level.mode)
        _, carry = unroll(
            level.rule, theta, problem, carry, level.horizon, "first_order"
        )
        level, theta = level.below, carry.params[0].detach()
    return level.rule, theta


def load_rule_weights(top: Level, path: Path) -> None:
    """Copy the weights of a rule checkpoint (``best.pt``) into the top rule."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        top.rule.theta.copy_(payload["theta"])


def evaluate_task(
    config: Config,
    task: Task,
    rule: UpdateRule,
    theta: torch.Tensor,
    name: str,
    run_dir: Path,
) -> dict:
    """Tune the baselines on train problems and compare on held-out test problems.

    One batch of test problems is drawn for the longest horizon; the learned rule
    runs on it once, and each baseline is tuned for each horizon and run to it.
    """
    longest = max(config.eval.horizons)
    generator = torch.Generator().manual_seed(config.seed + 3)
    problem = task.sample(config.eval.tasks, generator, "test", longest)
    start_time = time.perf_counter()
    learned = trajectory(
        rule, problem, longest, desc=f"evaluate learned on {name}", theta=theta
    )
    logger.info(
        "%s: learned rule ran %d steps on %d held-out problems in %.1fs",
        name,
        longest,
        config.eval.tasks,
        time.perf_counter() - start_time,
    )

    results = {}
    for horizon in config.eval.horizons:
        curves, lrs, scores = {"learned": learned[: horizon + 1]}, {}, {}
        for baseline in config.eval.baselines:
            tuned, scores[baseline] = tune_learning_rate(
                baseline,
                task,
                config.eval.lr_grid,
                horizon,
                config.eval.tune_tasks,
                seed=config.seed + 2,
            )
            lrs[baseline] = tuned.lr
            curves[baseline] = trajectory(tuned.to(theta.device), problem, horizon)

        steps = sorted(
            {s for s in config.eval.report_steps if s <= horizon} | {horizon}
        )
        table = format_table(curves, steps, lrs)
        key = f"{name}_T{horizon}"
        (run_dir / f"table_{key}.txt").write_text(table + "\n")
        plot_path = run_dir / f"curves_{key}.png"
        plot_curves(
            curves,
            plot_path,
            f"{name}, {horizon} steps, {config.eval.tasks} held-out problems",
        )
        logger.info(
            "%s, horizon %d: baselines tuned and run; plot %s", name, horizon, plot_path
        )

        results[key] = {
            "task": name,
            "horizon": horizon,
            "tasks": config.eval.tasks,
            "table": table,
            "plot": str(plot_path),
            "learning_rates": lrs,
            "tuning_scores": {
                b: {str(k): v for k, v in s.items()} for b, s in scores.items()
            },
            "summary": {
                n: {str(s): list(v) for s, v in summarise(c, steps).items()}
                for n, c in curves.items()
            },
            "mean_curves": {
                n: c.double().mean(dim=1).tolist() for n, c in curves.items()
            },
        }
    return results


def run(config: Config) -> dict:
    """Meta-train the stack of ``config``, then evaluate it; returns the results."""
    setup_logging(config.log_level)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(OmegaConf.structured(config))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

    top, device = build(config)
    logger.info(
        "%d-level stack on %s: top rule %s with %d weights, optimisee of %d parameters",
        top.depth,
        device,
        top.rule.kind,
        top.rule.num_params,
        _optimisee_dim(top),
    )

    tracker = Tracker(config.wandb.mode, config.wandb.project, run_dir, resolved)
    trainer = MetaTrainer.from_config(top, config, tracker)
    if config.resume and trainer.checkpoint_path.exists():
        trainer.load()
    elif config.resume:
        logger.info("resume=true but %s holds no checkpoint: starting afresh", run_dir)
    history = trainer.train()
    train_seconds = history.seconds
    logger.info(
        "meta-training took %.1fs in all; best validation %.4g at epoch %d",
        train_seconds,
        history.best_val,
        history.best_epoch,
    )

    if trainer.best_path.exists():
        load_rule_weights(top, trainer.best_path)
    rule, theta = optimisee_rule(top, config.seed + 4)

    results = {
        "config": resolved,
        "meta_train_seconds": train_seconds,
        "history": asdict(history),
        "evaluations": {},
    }
    variations = [("default", config.task)] + [
        (v.name, task_with_overrides(config.task, v.task, f"eval.variations.{k}.task"))
        for k, v in enumerate(config.eval.variations)
    ]
    for name, task_config in variations:
        task = build_task(task_config, device)
        results["evaluations"].update(
            evaluate_task(config, task, rule, theta, name, run_dir)
        )

    write_json(run_dir / "results.json", results)
    tracker.finish()
    logger.info("results written to %s", run_dir / "results.json")
    return results


def _optimisee_dim(top: Level) -> int:
    level: Task = top
    while isinstance(level, Level):
        level = level.below
    return level.dim
