"""From a config to results: build the stack, meta-train it, compare with baselines.

``run`` is what the examples and the command line call. It writes, under the run
folder, the checkpoints, ``results.json`` with every number, one PNG plot and one
text table per evaluated task and horizon.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hierarchy import distributed
from hierarchy.baselines import BASELINES, tune_learning_rate
from hierarchy.config import (
    Config,
    ConfigError,
    LevelConfig,
    RuleConfig,
    TaskConfig,
    task_with_overrides,
)
from hierarchy.distributed import Context
from hierarchy.evaluate import (
    format_table,
    optimise,
    plot_curves,
    summarise,
    write_json,
)
from hierarchy.level import Level, Task, build_stack
from hierarchy.logging import Tracker, setup_logging
from hierarchy.rules import RULES, UpdateRule
from hierarchy.trainer import CheckpointError, MetaTrainer, NonFiniteError

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
        rule: UpdateRule = BASELINES[config.kind](config.lr)
    else:
        rule = _learned_rule(config)
    rule.compile, rule.checkpoint = config.compile, config.checkpoint
    return rule


def _learned_rule(config: RuleConfig) -> UpdateRule:
    """The learned rule (``lstm`` or ``mlp``) of ``config``."""
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
    """The stack of levels described by ``config``, on its device.

    Under torchrun this process joins the process group first, and its device is
    its own GPU (``cuda:LOCAL_RANK``) or the CPU.
    """
    device = distributed.setup(resolve_device(config.device))
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
        [level.meta_batch for level in config.levels],
    )
    return top, device


@torch.no_grad()
def optimisee_rule(
    level: Level, seed: int, copies: int = 1
) -> tuple[UpdateRule, torch.Tensor]:
    """The rule that trains level 0, at the weights the levels above give it.

    With two levels that is ``level``'s rule at its own weights. Deeper, each
    level's rule trains ``copies`` fresh copies of the rule below it for its
    horizon, from their initial weights, and the weights they reach, shape
    (copies, P), are used one level further down.
    """
    generator = torch.Generator().manual_seed(seed)
    return _descend(level, level.rule.theta.detach(), copies, generator)


def stack_rule(config: Config, top: Level) -> tuple[UpdateRule, torch.Tensor]:
    """``optimisee_rule`` of a run: the seed and copies every command uses."""
    return optimisee_rule(top, _stack_seed(config), config.eval.copies)


def _stack_seed(config: Config) -> int:
    """Seed of the problems on which a run's deep stack trains its lower rules."""
    return config.seed + 5


def _descend(
    level: Level, theta: torch.Tensor, copies: int, generator: torch.Generator
) -> tuple[UpdateRule, torch.Tensor]:
    while isinstance(level.below, Level):
        problem = level.below.sample(copies, generator, "train", level.horizon)
        _, theta = optimise(level.rule, problem, level.horizon, theta=theta)
        level = level.below
    return level.rule, theta


def level_zero_steps(task: Task) -> int:
    """Optimisee steps behind one loss evaluation of one problem of ``task``.

    A level's loss unrolls ``meta_batch`` problems of the level below, evaluating
    their loss at the start and after each of ``horizon`` steps.
    """
    if not isinstance(task, Level):
        return 1
    return task.meta_batch * (task.horizon + 1) * level_zero_steps(task.below)


def meta_training_steps(config: Config, top: Level) -> int:
    """Optimisee steps that meta-training the stack of ``config`` takes in all."""
    meta = config.meta
    return meta.epochs * meta.meta_batch * level_zero_steps(top)


def two_level_config(
    config: Config, rule: RuleConfig, name: str, budget: int
) -> Config:
    """A two-level run of ``rule`` on the optimisee that takes ``budget`` steps.

    The level copies the first level's horizon and mode, takes
    ``eval.two_level_meta_batch`` problems per meta-update and unrolls them whole
    (truncation = horizon), which is how an inner level gets its gradient; the
    number of epochs makes the optimisee steps match ``budget``.
    """
    first = config.levels[0]
    meta_batch = config.eval.two_level_meta_batch
    epochs = max(1, round(budget / (meta_batch * (first.horizon + 1))))
    meta = replace(
        config.meta,
        epochs=epochs,
        meta_batch=meta_batch,
        truncation=first.horizon,
        val_every=max(1, epochs // 10),
        val_tasks=config.meta.val_tasks * first.meta_batch,
    )
    level = LevelConfig(rule=rule, horizon=first.horizon, mode=first.mode)
    return replace(
        config,
        name=f"{config.name}/{name}",
        run_dir=str(Path(config.run_dir) / name),
        levels=[level],
        meta=meta,
    )


def resume_or_start(trainer: MetaTrainer, resume: bool) -> None:
    """Load the run folder's checkpoint to resume; never train over one unasked."""
    path = trainer.checkpoint_path
    if path.exists() and resume:
        trainer.load()
    elif path.exists():
        raise CheckpointError(
            f"{path} holds the checkpoint of an earlier run; add resume=true to "
            f"continue it, or choose another run_dir (or delete that one)"
        )
    elif resume:
        logger.info("resume=true but %s holds no checkpoint: starting afresh", path)


def train_two_level(config: Config) -> tuple[UpdateRule, torch.Tensor, float]:
    """Meta-train a two-level config; its rule at the best weights, and seconds."""
    top, _ = build(config)
    trainer = MetaTrainer.from_config(top, config)
    resume_or_start(trainer, config.resume)
    history = trainer.train()
    if history.interrupted:  # Ctrl-C stops the whole command, not this run alone
        raise KeyboardInterrupt
    load_best(top, trainer.best_path)
    return top.rule, top.rule.theta.detach(), history.seconds


def compare_depths(
    config: Config, top: Level, run_dir: Path
) -> tuple[dict[str, tuple[UpdateRule, torch.Tensor]], dict]:
    """For a stack of three levels or more: what its depth buys.

    The rule below the top is trained for the top's horizon from its initial
    weights twice, by the trained top rule and by Adam at its tuned rate, on the
    same problems; its meta-loss along the way is the curve that says which
    trains it better. Then the first level's rule and the top rule are each
    meta-trained directly on the optimisee (two levels) with as many optimisee
    steps as meta-training the deep stack took. Returns the learned rules to
    compare on the optimisee, each at its trained weights, and a record.
    """
    # Known shortcoming: under torchrun every rank runs this comparison whole, on
    # the same problems (only its two-level meta-training is shared), so its time
    # does not fall with more processes.
    below, copies = top.below, config.eval.copies
    assert isinstance(below, Level)
    adam, scores = tune_learning_rate(
        "adam",
        below,
        config.eval.lr_grid,
        top.horizon,
        copies,
        seed=config.seed + 6,
    )

    # Both train the same copies on the same problems, as stack_rule does, and
    # the levels further down (if any) again see the same problems for both.
    generator = torch.Generator().manual_seed(_stack_seed(config))
    problem = below.sample(copies, generator, "train", top.horizon)
    after_first = generator.get_state()
    curves, learned = {}, {}
    by_adam = f"{below.rule.kind} by adam"
    for name, rule in (
        (f"{below.rule.kind} by {top.rule.kind}", top.rule),
        (by_adam, adam),
    ):
        curves[name], theta = optimise(rule, problem, top.horizon, desc=f"train {name}")
        generator.set_state(after_first)
        learned[name] = _descend(below, theta, copies, generator)

    plot_path = run_dir / "training_curves.png"
    if Context.current().is_main:
        plot_curves(
            curves,
            plot_path,
            f"level {below.depth - 1} rule ({below.rule.kind}) trained from its "
            f"initial weights, {copies} copies",
            xlabel=f"{below.rule.kind} training step",
            ylabel=f"{below.rule.kind} meta-loss",
        )
    steps = sorted({0, top.horizon // 4, top.horizon // 2, top.horizon})
    record = {
        "training_curves": {
            "table": format_table(curves, steps, {by_adam: adam.lr}),
            "plot": str(plot_path),
            "adam_lr": adam.lr,
            "adam_tuning_scores": {str(k): v for k, v in scores.items()},
            "mean_curves": {
                n: c.double().mean(dim=1).tolist() for n, c in curves.items()
            },
        },
        "meta_train_steps": meta_training_steps(config, top),
        "two_level": {},
    }
    logger.info(
        "%s trained for %d steps by the trained %s and by Adam at lr %.3g: "
        "meta-loss %.4g and %.4g at the end",
        below.rule.kind,
        top.horizon,
        top.rule.kind,
        adam.lr,
        *(curve[-1].mean().item() for curve in curves.values()),
    )

    if not config.eval.two_level:
        return learned, record
    for rule_config in (config.levels[0].rule, config.levels[-1].rule):
        name = f"{rule_config.kind}, 2 levels"
        if name in record["two_level"]:
            continue
        folder = re.sub(r"\W+", "_", name)
        two = two_level_config(config, rule_config, folder, record["meta_train_steps"])
        logger.info(
            "meta-training %s: %d epochs of %d problems, %d optimisee steps",
            name,
            two.meta.epochs,
            two.meta.meta_batch,
            two.meta.epochs * two.meta.meta_batch * (two.levels[0].horizon + 1),
        )
        rule, theta, seconds = train_two_level(two)
        learned[name] = (rule, theta)
        record["two_level"][name] = {
            "epochs": two.meta.epochs,
            "meta_batch": two.meta.meta_batch,
            "meta_train_seconds": seconds,
            "run_dir": two.run_dir,
        }
    return learned, record


def load_rule_weights(top: Level, path: Path) -> None:
    """Copy the weights of a rule checkpoint (``best.pt``) into the top rule."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        top.rule.theta.copy_(payload["theta"])


def load_best(top: Level, path: Path) -> None:
    """The top rule at the weights of ``path`` (``best.pt``), where it exists.

    Rank 0 wrote the file and reads it; the other ranks receive its weights, so
    they need not see rank 0's disk.
    """
    context = Context.current()
    if context.is_main and path.exists():
        load_rule_weights(top, path)
    context.broadcast_(top.rule.theta)


def evaluate_task(
    config: Config,
    task: Task,
    learned: dict[str, tuple[UpdateRule, torch.Tensor]],
    name: str,
    run_dir: Path,
) -> dict:
    """Tune the baselines on train problems and compare on held-out test problems.

    ``learned`` maps a name to a rule and its trained weights, (P,) or several
    copies (K, P). One batch of test problems is drawn for the longest horizon;
    each learned rule runs on it once, and each baseline is tuned for each horizon
    and run to it.
    """
    context = Context.current()
    longest = max(config.eval.horizons)
    generator = torch.Generator().manual_seed(config.seed + 3)
    problem = task.sample(config.eval.tasks, generator, "test", longest)
    device = problem.init().device
    learned_curves = {}
    for entry, (rule, theta) in learned.items():
        start_time = time.perf_counter()
        learned_curves[entry] = context.trajectory(
            rule, problem, longest, theta, desc=f"evaluate {entry} on {name}"
        )
        logger.info(
            "%s: %s ran %d steps on %d held-out problems in %.1fs",
            name,
            entry,
            longest,
            config.eval.tasks,
            time.perf_counter() - start_time,
        )

    results = {}
    for horizon in config.eval.horizons:
        curves = {n: c[: horizon + 1] for n, c in learned_curves.items()}
        lrs, scores = {}, {}
        for baseline in config.eval.baselines:
            tuned, scores[baseline] = tune_learning_rate(
                baseline,
                task,
                config.eval.lr_grid,
                horizon,
                config.eval.tune_tasks,
                seed=config.seed + 2,
                context=context,
            )
            lrs[baseline] = tuned.lr
            curves[baseline] = context.trajectory(tuned.to(device), problem, horizon)

        steps = sorted(
            {s for s in config.eval.report_steps if s <= horizon} | {horizon}
        )
        table = format_table(curves, steps, lrs)
        key = f"{name}_T{horizon}"
        plot_path = run_dir / f"curves_{key}.png"
        if context.is_main:
            (run_dir / f"table_{key}.txt").write_text(table + "\n")
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


def evaluate_tasks(
    config: Config,
    device: torch.device,
    learned: dict[str, tuple[UpdateRule, torch.Tensor]],
    run_dir: Path,
) -> dict:
    """``evaluate_task`` on the config's task and on each of its variations."""
    variations = [("default", config.task)] + [
        (v.name, task_with_overrides(config.task, v.task, f"eval.variations.{k}.task"))
        for k, v in enumerate(config.eval.variations)
    ]
    evaluations = {}
    for name, task_config in variations:
        task = build_task(task_config, device)
        evaluations.update(evaluate_task(config, task, learned, name, run_dir))
    return evaluations


def run(config: Config) -> dict:
    """Meta-train the stack of ``config``, then evaluate it; returns the results.

    A run stopped by SIGINT returns its history with ``interrupted`` set and
    evaluates nothing; ``resume=true`` continues it. Under torchrun every rank
    meta-trains its share and evaluates its share of the held-out problems, and
    every rank returns the same results; only rank 0 writes files and logs to
    wandb.
    """
    setup_logging(config.log_level)
    top, device = build(config)  # the device and the data are checked here
    trainer = MetaTrainer.from_config(top, config)
    resume_or_start(trainer, config.resume)  # so is the run folder
    context = Context.current()
    run_dir = Path(config.run_dir)
    resolved = OmegaConf.to_container(OmegaConf.structured(config))
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

    logger.info(
        "%d-level stack on %s: top rule %s with %d weights, optimisee of %d parameters",
        top.depth,
        device,
        top.rule.kind,
        top.rule.num_params,
        _optimisee_dim(top),
    )

    wandb_mode = config.wandb.mode if context.is_main else "disabled"
    trainer.tracker = Tracker(wandb_mode, config.wandb.project, run_dir, resolved)
    if config.meta.check_gradient:
        logger.info("%s", trainer.check_meta_gradient().summary())
    try:
        history = trainer.train()
    finally:
        trainer.tracker.finish()
    train_seconds = history.seconds
    if history.interrupted:
        return {"config": resolved, "interrupted": True, "history": asdict(history)}
    if not math.isfinite(history.best_val):
        raise NonFiniteError(
            f"no validation meta-loss was finite in {trainer.epoch} epochs, so "
            f"there is no rule to evaluate; lower meta.lr or set meta.grad_clip"
        )
    logger.info(
        "meta-training took %.1fs in all; best validation %.4g at epoch %d",
        train_seconds,
        history.best_val,
        history.best_epoch,
    )

    load_best(top, trainer.best_path)
    results = {
        "config": resolved,
        "meta_train_seconds": train_seconds,
        "history": asdict(history),
        "evaluations": {},
    }
    if top.depth >= 3:
        learned, results["depth"] = compare_depths(config, top, run_dir)
    else:
        learned = {"learned": stack_rule(config, top)}

    results["evaluations"] = evaluate_tasks(config, device, learned, run_dir)
    if context.is_main:
        write_json(run_dir / "results.json", results)
    logger.info("results written to %s", run_dir / "results.json")
    return results


def _optimisee_dim(top: Level) -> int:
    level: Task = top
    while isinstance(level, Level):
        level = level.below
    return level.dim
