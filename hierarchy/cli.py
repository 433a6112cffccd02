"""Command-line entry points: train a config, evaluate a trained rule, report results.

``hierarchy train CONFIG [key=value ...]`` meta-trains and evaluates a config;
``hierarchy evaluate CHECKPOINT [key=value ...]`` evaluates a trained rule (a
pretrained name, a rule file or a run folder) against tuned baselines;
``hierarchy report RESULTS`` prints a results.json as Markdown;
``hierarchy pretrained`` lists the rules shipped in the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from hierarchy.config import Config, ConfigError, RuleConfig, load_config
from hierarchy.rules import UpdateRule

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_config(config_path: str | Path, overrides: list[str]) -> int:
    """Load, meta-train, evaluate, and print each results table; returns exit code.

    Under torchrun every rank runs this and rank 0 alone prints.
    """
    from hierarchy import distributed
    from hierarchy.experiment import run
    from hierarchy.trainer import CheckpointError, NonFiniteError
    from tasks.mnist_data import DataError

    failure, config = None, None
    try:
        config = load_config(config_path, overrides)
        results = run(config)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as error:
        failure = f"error: {error}"
    except OSError as error:
        failure = f"error: cannot write the run folder: {error}"
    except KeyboardInterrupt:  # a second Ctrl-C, or one during evaluation
        results = {"interrupted": True}
    finally:
        main_rank = distributed.prints()
        distributed.shutdown()

    if failure is not None:
        if main_rank:
            print(failure, file=sys.stderr)
        return 2
    if results.get("interrupted") and config is None:
        return 130
    if results.get("interrupted"):
        if main_rank and (Path(config.run_dir) / "checkpoint.pt").exists():
            print(
                f"interrupted: the last checkpoint in {config.run_dir} stands; add "
                f"resume=true to the same command to continue",
                file=sys.stderr,
            )
        elif main_rank:
            print(
                "interrupted before the first checkpoint; run the same command "
                "again to start afresh",
                file=sys.stderr,
            )
        return 130
    if not main_rank:
        return 0
    if "depth" in results:
        print_depth(results["depth"])
    print_evaluations(results, Path(config.run_dir))
    return 0


def print_evaluations(results: dict, run_dir: Path) -> None:
    """Print each evaluation's table and plot, then where results.json went."""
    for evaluation in results["evaluations"].values():
        print(
            f"\n{evaluation['task']}: mean loss +- standard error over "
            f"{evaluation['tasks']} held-out problems, {evaluation['horizon']} steps"
        )
        print(evaluation["table"])
        print(f"plot: {evaluation['plot']}")
    print(f"\nall numbers: {run_dir / 'results.json'}")


def resolve_checkpoint(
    checkpoint: str, config_file: str | None
) -> tuple[UpdateRule, Path, str]:
    """The rule that ``checkpoint`` names, the config to evaluate it with, a name.

    ``checkpoint`` is a run folder (its ``best.pt``, else ``rule.pt``), a rule
    file, or the name of a pretrained rule; a path that exists wins over a name.
    The config is ``config_file`` when given, else the run's ``config.yaml``
    beside the rule, else the config recorded with the pretrained rule.
    """
    from hierarchy.checkpoint import CheckpointError, load_rule
    from hierarchy.pretrained import available, config_path, load_pretrained

    path = Path(checkpoint)
    if path.is_dir():
        candidates = [path / "best.pt", path / "rule.pt"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CheckpointError(
                f"run folder {str(path)!r} holds neither best.pt nor rule.pt"
            )
        rule, config, name = load_rule(found[0]), path / "config.yaml", path.name
    elif path.is_file():
        rule = load_rule(path)
        config, name = path.parent / "config.yaml", path.parent.name or path.stem
    elif checkpoint in available():
        rule, config = load_pretrained(checkpoint), config_path(checkpoint)
        name = checkpoint
    else:
        raise CheckpointError(
            f"checkpoint {checkpoint!r} is not a rule file, a run folder or the name "
            f"of a pretrained rule ({', '.join(available())})"
        )

    if config_file is not None:
        config = Path(config_file)
    elif not config.is_file():
        raise ConfigError(
            f"no config.yaml beside {checkpoint!r} to take the task and evaluation "
            f"settings from; pass --config FILE"
        )
    return rule, config, name


def evaluate_rule(config: Config, rule: UpdateRule, source: str) -> dict:
    """Evaluate ``rule`` on the config's task and variations; returns the results.

    The rule is the top of the config's stack. With one level it trains the
    optimisee directly, and the config's own rule settings are not used; deeper,
    the config must build a rule of the same kind and settings, and the rule the
    stack hands down to level 0 is evaluated, as after ``hierarchy train``.
    Writes the config, tables, plots and results.json into ``config.run_dir``.
    """
    import torch
    from omegaconf import OmegaConf

    from hierarchy.checkpoint import CheckpointError
    from hierarchy.evaluate import write_json
    from hierarchy.experiment import build, evaluate_tasks, stack_rule
    from hierarchy.logging import setup_logging
    from hierarchy.trainer import RUNTIME_RULE_KEYS

    setup_logging(config.log_level)
    top, device = build(config)
    logger.info(
        "evaluating %s: a %s rule %s at the top of a %d-level stack, task %s",
        source,
        rule.kind,
        rule.config(),
        top.depth,
        config.task.name,
    )
    name = "learned"
    if top.depth == 2:
        # The file's rule, run as the config asks (``compile``, ``checkpoint``).
        evaluated, theta = rule, rule.theta.detach().to(device)
        for key in RUNTIME_RULE_KEYS:
            setattr(evaluated, key, getattr(config.levels[0].rule, key))
    elif (top.rule.kind, top.rule.config()) != (rule.kind, rule.config()):
        raise CheckpointError(
            f"{source} holds a {rule.kind!r} rule {rule.config()}; the top level of "
            f"the config's {top.depth}-level stack is a {top.rule.kind!r} rule "
            f"{top.rule.config()}"
        )
    else:
        with torch.no_grad():
            top.rule.theta.copy_(rule.theta)
        evaluated, theta = stack_rule(config, top)
        name = f"{evaluated.kind} by {top.rule.kind}"  # as a run of the stack says

    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(OmegaConf.structured(config))
    if top.depth == 2:
        # The rule evaluated is the file's: the config.yaml written says so, with
        # the defaults for what its kind does not read, so that it loads again.
        recorded = resolved["levels"][0]["rule"]
        defaults = dataclasses.asdict(RuleConfig())
        given = {"kind": rule.kind, **rule.config()}
        given |= {
            key: defaults[key]
            for key in defaults
            if key not in given and key not in RUNTIME_RULE_KEYS
        }
        unused = {k: recorded[k] for k, v in given.items() if recorded.get(k) != v}
        if unused:
            logger.warning(
                "%s holds a %s rule %s; the config's rule settings %s are not used",
                source,
                rule.kind,
                rule.config(),
                unused,
            )
        recorded.update(given)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    learned = {name: (evaluated, theta)}
    results = {
        "checkpoint": source,
        "rule": {"kind": rule.kind, "rule_config": rule.config()},
        "config": resolved,
        "evaluations": evaluate_tasks(config, device, learned, run_dir),
    }
    write_json(run_dir / "results.json", results)
    return results


def evaluate_checkpoint(
    checkpoint: str, overrides: list[str], config_file: str | None = None
) -> int:
    """Evaluate a trained rule against tuned baselines and print the tables."""
    from hierarchy.checkpoint import CheckpointError
    from tasks.mnist_data import DataError

    try:
        rule, config_source, name = resolve_checkpoint(checkpoint, config_file)
        default_dir = f"run_dir=runs/evaluate-{name}"
        try:
            config = load_config(config_source, [default_dir, *overrides])
        except ConfigError as error:
            raise ConfigError(f"{error} (config from {config_source})") from None
        results = evaluate_rule(config, rule, checkpoint)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write the evaluation folder: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the evaluation stopped; nothing was lost", file=sys.stderr)
        return 130

    print_evaluations(results, Path(config.run_dir))
    return 0


def print_pretrained() -> int:
    """List the pretrained rules with what they are and the command that made them."""
    from hierarchy.pretrained import available, info

    for name in available():
        metadata = info(name)
        print(f"{name}\n  {metadata['description']}\n  made by: {metadata['command']}")
    return 0


def print_depth(depth: dict) -> None:
    """What a stack of three levels or more buys: training curves and budgets."""
    curves = depth["training_curves"]
    print(
        "\nthe rule below the top, trained from its initial weights: its meta-loss "
        "(mean +- s.e. over copies) at each of its training steps"
    )
    print(curves["table"])
    print(f"plot: {curves['plot']}")
    if not depth["two_level"]:
        return
    print(
        f"\nmeta-training the stack took {depth['meta_train_steps']:,} optimisee "
        f"steps; each two-level run below took as many:"
    )
    for name, record in depth["two_level"].items():
        print(
            f"  {name}: {record['epochs']} epochs of {record['meta_batch']} "
            f"problems in {record['meta_train_seconds']:.0f}s"
        )


def print_report(path: Path) -> int:
    """Print the Markdown summary of a run's results at each evaluated horizon."""
    import json

    from hierarchy.evaluate import markdown_summary

    if path.is_dir():
        path = path / "results.json"  # a run folder
    if not path.is_file():
        print(f"error: results file {str(path)!r} does not exist", file=sys.stderr)
        return 2
    try:
        evaluations = json.loads(path.read_text())["evaluations"]
        horizons = sorted({e["horizon"] for e in evaluations.values()})
        table = markdown_summary(evaluations, horizons)
    except (ValueError, KeyError, TypeError, AttributeError):
        print(
            f"error: {str(path)!r} is not a results.json written by hierarchy "
            f"train or evaluate (no evaluations with tables in it)",
            file=sys.stderr,
        )
        return 2
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``hierarchy train|evaluate|report|pretrained``; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="hierarchy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="meta-train and evaluate a config")
    train.add_argument(
        "config", nargs="?", help="a YAML file, or the name of one in configs/"
    )
    train.add_argument("overrides", nargs="*", help="key=value, e.g. meta.epochs=50")
    evaluate = commands.add_parser(
        "evaluate", help="evaluate a trained rule against tuned baselines"
    )
    evaluate.add_argument(
        "checkpoint",
        nargs="?",
        help="a pretrained rule's name, a rule file or a run folder",
    )
    evaluate.add_argument(
        "overrides", nargs="*", help="key=value, e.g. eval.tasks=16 run_dir=out"
    )
    evaluate.add_argument(
        "--config", help="take the task and evaluation settings from this YAML file"
    )
    report = commands.add_parser("report", help="Markdown table of a results.json")
    report.add_argument(
        "results", help="a results.json written by a run, or the run's folder"
    )
    commands.add_parser("pretrained", help="list the pretrained rules")
    # Overrides may also follow --config: argparse leaves those to the extras.
    args, extras = parser.parse_known_args(argv)
    strays = [extra for extra in extras if extra.startswith("-") or "=" not in extra]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if hasattr(args, "overrides"):
        args.overrides += extras
    # Optional in argparse's eyes only so that its message does not call the
    # overrides required too.
    needed = {"train": "config", "evaluate": "checkpoint"}.get(args.command)
    if needed and getattr(args, needed) is None:
        parser.error(f"{args.command} needs {needed.upper()}; see --help")

    if args.command == "report":
        return print_report(Path(args.results))
    if args.command == "pretrained":
        return print_pretrained()
    if args.command == "evaluate":
        config = None if args.config is None else str(config_file(args.config))
        return evaluate_checkpoint(args.checkpoint, args.overrides, config)
    return run_config(config_file(args.config), args.overrides)


def config_file(name: str) -> Path:
    """The YAML file ``name`` names: a path that exists, else a shipped config in
    configs/ by its name (``two_level_mnist``, with or without .yaml)."""
    path = Path(name)
    if path.exists() or path.parent != Path("."):
        return path  # load_config says if it does not exist
    for shipped in (CONFIGS / path.name, CONFIGS / f"{path.name}.yaml"):
        if shipped.is_file():
            return shipped
    return path


if __name__ == "__main__":
    raise SystemExit(main())
