"""Command-line entry points: run an experiment config with key=value overrides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hierarchy.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_config(config_path: str | Path, overrides: list[str]) -> int:
    """Load, meta-train, evaluate, and print each results table; returns exit code.

    Under torchrun every rank runs this and rank 0 alone prints.
    """
    from hierarchy import distributed
    from hierarchy.experiment import run
    from hierarchy.trainer import CheckpointError, NonFiniteError
    from tasks.mnist_data import DataError

    try:
        config = load_config(config_path, overrides)
        results = run(config)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write the run folder: {error}", file=sys.stderr)
        return 2
    finally:
        main_rank = distributed.Context.current().is_main
        distributed.shutdown()

    if results.get("interrupted"):
        if main_rank:
            print(
                f"interrupted: checkpoint in {config.run_dir}; add resume=true to "
                f"the same command to continue",
                file=sys.stderr,
            )
        return 130
    if not main_rank:
        return 0
    if "depth" in results:
        print_depth(results["depth"])
    for key, evaluation in results["evaluations"].items():
        print(
            f"\n{evaluation['task']}: mean loss +- standard error over "
            f"{evaluation['tasks']} held-out problems, {evaluation['horizon']} steps"
        )
        print(evaluation["table"])
        print(f"plot: {evaluation['plot']}")
    print(f"\nall numbers: {Path(config.run_dir) / 'results.json'}")
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

    if not path.is_file():
        print(f"error: results file {str(path)!r} does not exist", file=sys.stderr)
        return 2
    evaluations = json.loads(path.read_text())["evaluations"]
    horizons = sorted({e["horizon"] for e in evaluations.values()})
    print(markdown_summary(evaluations, horizons))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``hierarchy train CONFIG [key=value ...]`` or ``hierarchy report RESULTS``."""
    parser = argparse.ArgumentParser(prog="hierarchy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="meta-train and evaluate a config")
    train.add_argument("config", help="a YAML file, or the name of one in configs/")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. meta.epochs=50")
    report = commands.add_parser("report", help="Markdown table of a results.json")
    report.add_argument("results", help="a results.json written by a run")
    args = parser.parse_args(argv)

    if args.command == "report":
        return print_report(Path(args.results))
    config = Path(args.config)
    if not config.exists() and (CONFIGS / f"{args.config}.yaml").exists():
        config = CONFIGS / f"{args.config}.yaml"
    return run_config(config, args.overrides)


if __name__ == "__main__":
    raise SystemExit(main())
