"""Peak memory of one meta-epoch against truncation length and optimisee steps.

Truncated backpropagation keeps the graph of one segment at a time, so the peak
should grow with the truncation and stay flat as the horizon grows. Each point
runs in a fresh process so that peaks do not mix; on the CPU the figure is the
growth of the process's peak resident memory over what it held before training,
on CUDA it is torch's peak allocation. No warm-up epoch runs first: it would
raise the high-water mark that the measured epoch is compared against.

    python benchmarks/memory.py [--task mnist] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

TRUNCATIONS = [5, 10, 20, 40]
HORIZONS = [20, 40, 80, 160]


def measure(task: str, horizon: int, truncation: int, device: str) -> dict:
    """Peak memory (MiB) and seconds of one meta-epoch, in this process."""
    import torch

    from hierarchy.config import load_config
    from hierarchy.experiment import build
    from hierarchy.trainer import MetaTrainer

    config = load_config(
        Path(__file__).resolve().parent.parent / "configs" / f"two_level_{task}.yaml",
        [
            f"levels.0.horizon={horizon}",
            f"meta.truncation={truncation}",
            f"device={device}",
            "meta.meta_batch=1",
            "wandb.mode=disabled",
        ],
    )
    top, device_ = build(config)
    trainer = MetaTrainer(
        top, "runs/benchmark-memory", truncation=truncation, meta_batch=1, seed=0
    )

    if device_.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    trainer.train_epoch()
    seconds = time.perf_counter() - start
    if device_.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "task": task,
        "horizon": horizon,
        "truncation": truncation,
        "device": str(device_),
        "peak_mib": peak / 2**20,
        "seconds": seconds,
    }


def in_subprocess(task: str, horizon: int, truncation: int, device: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--point",
            task,
            str(horizon),
            str(truncation),
            device,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist", choices=["mnist", "quadratic"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--point", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.point:
        task, horizon, truncation, device = args.point
        print(json.dumps(measure(task, int(horizon), int(truncation), device)))
        return

    # The first pass warms the machine's file caches; it is not reported.
    in_subprocess(args.task, 20, 20, args.device)
    by_truncation = [
        in_subprocess(args.task, max(TRUNCATIONS), t, args.device) for t in TRUNCATIONS
    ]
    by_horizon = [in_subprocess(args.task, h, 20, args.device) for h in HORIZONS]

    print(f"{'horizon':>8}{'truncation':>12}{'peak MiB':>10}{'seconds':>9}")
    for row in by_truncation + by_horizon:
        print(
            f"{row['horizon']:>8}{row['truncation']:>12}{row['peak_mib']:>10.1f}"
            f"{row['seconds']:>9.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"by_truncation": by_truncation, "by_horizon": by_horizon}, indent=2)
        + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
