"""Speed and memory of meta-training, the learned optimiser and evaluation.

One command runs every measurement and writes a JSON file and a Markdown table.
Each speed figure is the median of several runs, and is also given as a ratio
against the plain reference of ``reference.py`` (or, for evaluation, one run per
learning rate) measured in the same process, interleaved with the library:

1. MNIST meta-training: seconds per meta-epoch (100 optimisee steps of the default
   20-unit sigmoid MLP, 15,910 parameters, truncation 20, one network), and for a
   meta-batch of 8 networks (whether batching tasks pays). The compiled rule is,
   on the CPU, the fused C++ training step.
2. Quadratic meta-training: task-steps per second at meta-batch 128.
3. The learned optimiser's step on models of about 16 thousand, 1 million and 10
   million parameters, eager and compiled (on the CPU the fused C++ kernel),
   against torch.optim.Adam.step and one forward and backward of the model; and
   the rule's matmul FLOP/s against torch.mm at its shapes.
4. Peak memory of meta-training against truncation and optimisee steps, and with
   rule checkpointing or chunked segments (``meta.checkpoint_steps``), for the
   eager and the fused rule, each point a fresh process (``epoch_cost.py``); for
   the checkpointing points also the peak of the tensors alive, without what
   the C library's heap keeps after frees.
5. Evaluation: time to tune all four baselines on the grid and run them, and the
   learned rule's time per step on the 16 held-out MNIST networks of an
   evaluation, run in place as evaluation runs it, against its out-of-place
   ``update`` and the reference one network at a time.

    python benchmarks/performance.py [--quick] [--out benchmarks/results/performance]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from epoch_cost import CONFIGS, in_subprocess
from reference import ReferenceLSTM, reference_epoch, reference_run
from torch import Tensor, nn

from hierarchy.baselines import BASELINES, tune_learning_rate
from hierarchy.config import load_config
from hierarchy.evaluate import optimise, trajectory
from hierarchy.experiment import build
from hierarchy.optim import LearnedOptimizer
from hierarchy.rules import LSTMRule
from hierarchy.trainer import MetaTrainer


def medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn ``repeats`` times (interleaved)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def trainer_for(config_name: str, overrides: list[str]) -> MetaTrainer:
    """A meta-trainer of a config with overrides, writing nothing to disk."""
    config = load_config(
        CONFIGS / f"{config_name}.yaml",
        [*overrides, "wandb.mode=disabled", "run_dir=runs/benchmark-performance"],
    )
    top, _ = build(config)
    return MetaTrainer.from_config(top, config)


def meta_training(
    config_name: str,
    overrides: list[str],
    repeats: int,
    threads: int,
    compile_rule: bool = True,
    compiled_run: bool = True,
) -> dict:
    """Seconds per meta-epoch: reference, library, and (with ``compiled_run``) the
    library with a compiled rule (eager with ``compile_rule=False``, in tests)."""
    torch.set_num_threads(threads)
    library = trainer_for(config_name, overrides)
    torch.set_num_threads(threads)  # the config's own setting is not measured
    top = library.top
    ref = ReferenceLSTM.from_rule(top.rule)
    ref_optimizer = torch.optim.Adam(
        ref.parameters(), lr=library.optimizer.defaults["lr"]
    )
    generator = torch.Generator().manual_seed(0)

    def reference() -> None:
        problem = top.below.sample(library.meta_batch, generator, "train", top.horizon)
        reference_epoch(ref, ref_optimizer, problem, top.horizon, library.truncation)

    runs = {"reference": reference, "library": library.train_epoch}
    compile_seconds = math.nan
    if compiled_run:
        compiled = trainer_for(
            config_name, [*overrides, f"levels.0.rule.compile={compile_rule}"]
        )
        torch.set_num_threads(threads)
        start = time.perf_counter()
        compiled.train_epoch()  # compiles the rule
        compile_seconds = time.perf_counter() - start
        runs["library, compiled rule"] = compiled.train_epoch
    seconds = medians(runs, repeats)
    steps = library.meta_batch * top.horizon
    return {
        "config": config_name,
        "overrides": overrides,
        "threads": threads,
        "meta_batch": library.meta_batch,
        "horizon": top.horizon,
        "truncation": library.truncation,
        "optimisee_parameters": top.below.dim,
        "repeats": repeats,
        "compile_seconds": compile_seconds,
        "seconds": seconds,
        "task_steps_per_second": {k: steps / v for k, v in seconds.items()},
        "speedup": {k: seconds["reference"] / v for k, v in seconds.items()},
    }


def square_mlp(width: int) -> nn.Sequential:
    """Two width x width layers with ReLU: 2 * (width^2 + width) parameters."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def rule_flops(rule: LSTMRule, coordinates: int) -> int:
    """Matmul FLOPs of one rule step (2 N in out per product, head included)."""
    hidden, inputs, flops = rule.hidden_size, 2, 0
    for _ in range(rule.num_layers):
        flops += 2 * coordinates * (inputs + hidden) * 4 * hidden
        inputs = hidden
    return flops + 2 * coordinates * hidden


def mm_seconds(rule: LSTMRule, coordinates: int, repeats: int) -> float:
    """Median seconds of torch.mm doing the rule's matmuls, summed over layers.

    Each product of N coordinates (N x in times in x out) is timed both
    coordinate-major, as written, and feature-major (out x in times in x N), as
    the rule computes it; the faster layout is returned, so the rule is measured
    against torch's best at these shapes. The products write into buffers
    allocated once, and at least 10 repeats are taken: with a fresh output each
    time, page faults on hundreds of MiB made the rate swing threefold.
    """
    hidden, inputs, shapes = rule.hidden_size, 2, []
    for _ in range(rule.num_layers):
        shapes.append((inputs + hidden, 4 * hidden))
        inputs = hidden
    shapes.append((hidden, 1))
    n = coordinates
    layouts = {
        "coordinate-major": lambda i, o: (torch.randn(n, i), torch.randn(i, o)),
        "feature-major": lambda i, o: (torch.randn(o, i), torch.randn(i, n)),
    }
    seconds = []
    for make in layouts.values():  # one layout in memory at a time
        pairs = [make(i, o) for i, o in shapes]
        seconds.append(_mm_median(pairs, repeats))
        del pairs
    return min(seconds)


def _mm_median(pairs: list[tuple[Tensor, Tensor]], repeats: int) -> float:
    """Median seconds of torch.mm over ``pairs``, each into an output made once."""
    products = [(a, b, torch.empty(a.shape[0], b.shape[1])) for a, b in pairs]

    def run() -> None:
        for a, b, out in products:
            torch.mm(a, b, out=out)

    run()
    return medians({"mm": run}, max(repeats, 10))["mm"]


def optimiser_step(
    width: int, repeats: int, threads: int, compile_rule: bool = True
) -> dict:
    """Learned optimiser step against Adam.step and a forward and backward."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = square_mlp(width)
    inputs, targets = torch.randn(64, width), torch.randn(64, width)
    count = sum(p.numel() for p in model.parameters())
    rule = LSTMRule()

    def forward_backward() -> None:
        model.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(inputs), targets).backward()

    forward_backward()
    learned = LearnedOptimizer(model.parameters(), rule)
    compiled_rule = LSTMRule()
    compiled_rule.load_state_dict(rule.state_dict())
    compiled_rule.compile = compile_rule
    compiled = LearnedOptimizer(model.parameters(), compiled_rule)
    adam = torch.optim.Adam(model.parameters(), lr=1e-4)
    ref = ReferenceLSTM.from_rule(rule)
    ref_state = ref.init_state(torch.zeros(count))

    @torch.no_grad()
    def reference() -> None:
        # The plain inference step: stock cells on every coordinate, written back.
        nonlocal ref_state
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        update, ref_state = ref(grads, ref_state)
        offset = 0
        for p in model.parameters():
            p.add_(update[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    runs = {
        "reference": reference,
        "LearnedOptimizer.step": learned.step,
        "LearnedOptimizer.step, compiled rule": compiled.step,
        "Adam.step": adam.step,
        "forward and backward": forward_backward,
    }
    lib, comp = "LearnedOptimizer.step", "LearnedOptimizer.step, compiled rule"
    # A third rule state of 4 x 20 floats per coordinate does not fit beside the
    # reference's temporaries at 10M parameters in this machine's memory, so
    # there the compiled rule is timed on its own once the others are freed.
    alone = runs.pop(comp) if count > 5_000_000 else None
    for step in runs.values():
        step()  # first steps allocate state (and compile)
    seconds = medians(runs, repeats)
    if alone is not None:
        del runs, learned, reference
        ref_state = None
        alone()
        seconds[comp] = medians({comp: alone}, repeats)[comp]
    learned_runs = [k for k in (lib, comp) if k in seconds]
    flops = rule_flops(rule, count)
    mm = mm_seconds(rule, count, repeats)
    return {
        "parameters": count,
        "threads": threads,
        "repeats": repeats,
        "seconds": seconds,
        "speedup": {k: seconds["reference"] / v for k, v in seconds.items()},
        "rule_matmul_flops": flops,
        "mm_seconds": mm,
        "mm_flops_per_second": flops / mm,
        "rule_flops_per_second": {k: flops / seconds[k] for k in learned_runs},
        "fraction_of_mm": {k: mm / seconds[k] for k in learned_runs},
    }


# Ways to trade time for memory in meta-training, as config overrides.
CHECKPOINTING = {
    "off": [],
    "rule": ["levels.0.rule.checkpoint=true"],
    "every 2 steps": ["meta.checkpoint_steps=2"],
}
RULES = {"eager": [], "fused": ["levels.0.rule.compile=true"]}


def memory(quick: bool, threads: int) -> dict:
    """Peak memory of MNIST meta-epochs, each point a fresh process; for the
    checkpointing points, also their time against none, interleaved in one."""
    truncations, horizons = (
        ([5, 10], [10, 20]) if quick else ([5, 10, 20, 40], [20, 40, 80, 160])
    )
    longest = max(truncations)
    common = ["meta.meta_batch=1", "run_dir=runs/benchmark-performance"]

    def point(
        horizon: int,
        truncation: int,
        rule: str = "eager",
        checkpoint: str = "off",
        epochs: int = 1,
        live: bool = False,
    ) -> dict:
        overrides = [
            *common,
            *RULES[rule],
            *CHECKPOINTING[checkpoint],
            f"levels.0.horizon={horizon}",
            f"meta.truncation={truncation}",
        ]
        row = in_subprocess(CONFIGS / "two_level_mnist.yaml", overrides, epochs)
        if live:
            alive = in_subprocess(
                CONFIGS / "two_level_mnist.yaml", overrides, epochs, True
            )
            row["live_peak_mib"] = alive["peak_mib"]
        return {
            "horizon": horizon,
            "truncation": truncation,
            "rule": rule,
            "checkpoint": checkpoint,
            **row,
        }

    point(horizons[0], truncations[0])  # warms the file caches; not reported
    trunc = 10 if quick else 20
    horizon = 20 if quick else 100
    repeats = 1 if quick else 3
    checkpoint = [
        point(horizon, trunc, rule, way, repeats, live=True)
        for rule in RULES
        for way in CHECKPOINTING
    ]
    for rule in RULES:
        seconds = checkpoint_seconds(horizon, trunc, rule, 1 if quick else 5, threads)
        rows = {row["checkpoint"]: row for row in checkpoint if row["rule"] == rule}
        for way, row in rows.items():
            row["interleaved_seconds"] = seconds[way]
            row["time_vs_off"] = seconds[way] / seconds["off"]
            row["memory_vs_off"] = row["peak_mib"] / rows["off"]["peak_mib"]
            row["live_vs_off"] = row["live_peak_mib"] / rows["off"]["live_peak_mib"]
    return {
        "by_truncation": [point(longest, t) for t in truncations],
        "by_horizon": [point(h, trunc) for h in horizons],
        "checkpoint": checkpoint,
    }


def checkpoint_seconds(
    horizon: int, truncation: int, rule: str, repeats: int, threads: int
) -> dict[str, float]:
    """Seconds per MNIST meta-epoch with each way of checkpointing, the ways
    interleaved in one process: on a shared machine, runs in separate processes
    minutes apart differ by more than the ratios measured."""
    torch.set_num_threads(threads)
    trainers = {
        way: trainer_for(
            "two_level_mnist",
            [
                "meta.meta_batch=1",
                f"levels.0.horizon={horizon}",
                f"meta.truncation={truncation}",
                *RULES[rule],
                *extra,
            ],
        )
        for way, extra in CHECKPOINTING.items()
    }
    torch.set_num_threads(threads)
    for trainer in trainers.values():
        trainer.train_epoch()  # builds the kernels, allocates the buffers
    return medians({way: t.train_epoch for way, t in trainers.items()}, repeats)


def evaluation(quick: bool, repeats: int) -> dict:
    """Tune every baseline on the grid and run it: batched grid against a loop."""
    config = load_config(CONFIGS / "two_level_quadratic.yaml", ["wandb.mode=disabled"])
    top, _ = build(config)
    task, grid = top.below, list(config.eval.lr_grid)
    horizon = 20 if quick else config.eval.horizons[0]
    tune_tasks = 8 if quick else config.eval.tune_tasks
    tasks = 16 if quick else config.eval.tasks
    problem = task.sample(tasks, torch.Generator().manual_seed(1), "test", horizon)

    def library() -> None:
        for name in BASELINES:
            tuned, _ = tune_learning_rate(name, task, grid, horizon, tune_tasks, 0)
            trajectory(tuned, problem, horizon)

    def loop() -> None:
        train = task.sample(
            tune_tasks, torch.Generator().manual_seed(0), "train", horizon
        )
        for name, baseline in BASELINES.items():
            finals = [
                trajectory(baseline(lr), train, horizon)[-1].mean().item()
                for lr in grid
            ]
            best = min(
                zip(grid, finals),
                key=lambda pair: pair[1] if math.isfinite(pair[1]) else math.inf,
            )[0]
            trajectory(baseline(best), problem, horizon)

    seconds = medians({"reference": loop, "library": library}, repeats)
    return {
        "grid": grid,
        "horizon": horizon,
        "tune_tasks": tune_tasks,
        "eval_tasks": tasks,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "seconds": seconds,
        "speedup": {k: seconds["reference"] / v for k, v in seconds.items()},
    }


def learned_evaluation(
    quick: bool, repeats: int, threads: int, compile_rule: bool = True
) -> dict:
    """Seconds per step of a learned LSTM optimising the held-out MNIST networks of
    an evaluation at once: in place (``step_``, as evaluation runs it), eager and
    compiled (eager with ``compile_rule=False``, in tests), against the unroll's
    out-of-place ``update`` and the plain reference one network at a time."""
    torch.set_num_threads(threads)
    config = load_config(CONFIGS / "two_level_mnist.yaml", ["wandb.mode=disabled"])
    top, _ = build(config)
    torch.set_num_threads(threads)
    tasks = 2 if quick else config.eval.tasks
    steps = 2 if quick else 20
    rule = top.rule
    compiled = copy.deepcopy(rule)
    compiled.compile = compile_rule
    problem = top.below.sample(tasks, torch.Generator().manual_seed(3), "test", steps)
    ref = ReferenceLSTM.from_rule(rule)

    runs = {
        "reference": lambda: reference_run(ref, problem, steps),
        "update": lambda: optimise(rule, problem, steps),
        "library": lambda: trajectory(rule, problem, steps),
        "library, compiled rule": lambda: trajectory(compiled, problem, steps),
    }
    runs["library, compiled rule"]()  # builds the kernel
    seconds = {k: v / steps for k, v in medians(runs, repeats).items()}
    return {
        "networks": tasks,
        "coordinates": tasks * top.below.dim,
        "steps": steps,
        "threads": threads,
        "repeats": repeats,
        "seconds_per_step": seconds,
        "speedup": {k: seconds["reference"] / v for k, v in seconds.items()},
    }


def machine() -> dict:
    """Where the figures come from."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
    }


def markdown(results: dict) -> str:
    """The results as Markdown tables."""
    lines = [
        "| measurement | reference | library | library, compiled rule | "
        "speedup (library / compiled) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (
        ("mnist", "MNIST meta-epoch, s"),
        ("mnist_batch", "MNIST meta-epoch of 8 networks, s"),
        ("quadratic", "quadratic meta-epoch, s"),
    ):
        row = results[key]
        s, x = row["seconds"], row["speedup"]
        comp = "library, compiled rule"
        compiled = (
            (f"{s[comp]:.3g}", f"{x['library']:.2f}x / {x[comp]:.2f}x")
            if comp in s
            else ("", f"{x['library']:.2f}x")
        )
        lines.append(
            f"| {label} | {s['reference']:.3g} | {s['library']:.3g} | "
            f"{compiled[0]} | {compiled[1]} |"
        )
    q = results["quadratic"]["task_steps_per_second"]
    lines.append(
        f"| quadratic task-steps/s (meta-batch 128) | {q['reference']:,.0f} | "
        f"{q['library']:,.0f} | {q['library, compiled rule']:,.0f} | |"
    )
    e = results["evaluation"]
    lines.append(
        f"| evaluation: tune and run 4 baselines, s | {e['seconds']['reference']:.3g}"
        f" | {e['seconds']['library']:.3g} | | {e['speedup']['library']:.2f}x |"
    )
    r = results["learned_evaluation"]
    s, x = r["seconds_per_step"], r["speedup"]
    lines.append(
        f"| evaluation: learned rule on {r['networks']} MNIST networks, s per step "
        f"(out of place {s['update']:.3g}) | {s['reference']:.3g} | "
        f"{s['library']:.3g} | {s['library, compiled rule']:.3g} | "
        f"{x['library']:.2f}x / {x['library, compiled rule']:.2f}x |"
    )
    lines += [
        "",
        "| parameters | reference step, ms | LearnedOptimizer.step, ms "
        "| compiled rule, ms"
        " | Adam.step, ms | forward+backward, ms | speedup (library / compiled) "
        "| rule GFLOP/s (library / compiled) | torch.mm GFLOP/s | fraction of mm |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lib, comp = "LearnedOptimizer.step", "LearnedOptimizer.step, compiled rule"
    for row in results["optimiser_step"]:
        s, x = row["seconds"], row["speedup"]
        rate, frac = row["rule_flops_per_second"], row["fraction_of_mm"]
        if comp not in s:
            s, x = {**s, comp: math.nan}, {**x, comp: math.nan}
            rate, frac = {**rate, comp: math.nan}, {**frac, comp: math.nan}
        lines.append(
            f"| {row['parameters']:,} | {1e3 * s['reference']:.3g} | "
            f"{1e3 * s[lib]:.3g} | {1e3 * s[comp]:.3g} | {1e3 * s['Adam.step']:.3g} | "
            f"{1e3 * s['forward and backward']:.3g} | {x[lib]:.2f}x / {x[comp]:.2f}x | "
            f"{rate[lib] / 1e9:.3g} / {rate[comp] / 1e9:.3g} | "
            f"{row['mm_flops_per_second'] / 1e9:.3g} | "
            f"{frac[lib]:.2f} / {frac[comp]:.2f} |"
        )
    m = results["memory"]
    lines += [
        "",
        "| horizon | truncation | peak growth, MiB | s/epoch |",
        "|---:|---:|---:|---:|",
    ]
    for group in ("by_truncation", "by_horizon"):
        for row in m[group]:
            lines.append(
                f"| {row['horizon']} | {row['truncation']} | "
                f"{row['peak_mib']:.0f} | {row['seconds']:.2f} |"
            )
    lines += [
        "",
        "| rule | checkpointing | peak growth, MiB | memory / off "
        "| tensors alive, MiB | alive / off "
        "| s/epoch, interleaved | time / off |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in m["checkpoint"]:
        lines.append(
            f"| {row['rule']} | {row['checkpoint']} | {row['peak_mib']:.0f} | "
            f"{row['memory_vs_off']:.3f} | {row['live_peak_mib']:.0f} | "
            f"{row['live_vs_off']:.3f} | {row['interleaved_seconds']:.2f} | "
            f"{row['time_vs_off']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat")
    parser.add_argument("--out", default="benchmarks/results/performance")
    args = parser.parse_args()
    quick = args.quick
    repeats = 1 if quick else 3
    threads = torch.get_num_threads()
    results: dict = {"machine": machine(), "quick": quick}

    short = ["levels.0.horizon=10", "meta.truncation=5"] if quick else []
    results["mnist"] = meta_training(
        "two_level_mnist", [*short, "meta.meta_batch=1"], repeats, threads
    )
    print("mnist", results["mnist"]["seconds"], flush=True)
    # Whether batching tasks pays on MNIST.
    networks = 2 if quick else 8
    results["mnist_batch"] = meta_training(
        "two_level_mnist", [*short, f"meta.meta_batch={networks}"], repeats, threads
    )
    print("mnist, batch", results["mnist_batch"]["seconds"], flush=True)
    batch = 8 if quick else 128
    results["quadratic"] = meta_training(
        "two_level_quadratic", [*short, f"meta.meta_batch={batch}"], repeats, 1
    )
    print("quadratic", results["quadratic"]["seconds"], flush=True)
    widths = [89] if quick else [89, 707, 2236]
    results["optimiser_step"] = [
        optimiser_step(width, repeats, threads) for width in widths
    ]
    print("step", [r["seconds"] for r in results["optimiser_step"]], flush=True)
    torch.set_num_threads(1)
    results["evaluation"] = evaluation(quick, repeats)
    print("evaluation", results["evaluation"]["seconds"], flush=True)
    results["learned_evaluation"] = learned_evaluation(quick, repeats, threads)
    print(
        "learned evaluation",
        results["learned_evaluation"]["seconds_per_step"],
        flush=True,
    )
    results["memory"] = memory(quick, threads)
    results["machine"]["load_average_after"] = os.getloadavg()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"written to {out}.json and {out}.md")


if __name__ == "__main__":
    main()
