"""Peak memory of one meta-epoch against truncation length and optimisee steps.

Truncated backpropagation keeps the graph of one segment at a time, so the peak
should grow with the truncation and stay flat as the horizon grows. Each point
runs in a fresh process (see ``epoch_cost.py``).

    python benchmarks/memory.py [--task mnist] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from epoch_cost import CONFIGS, in_subprocess

TRUNCATIONS = [5, 10, 20, 40]
HORIZONS = [20, 40, 80, 160]


def point(task: str, horizon: int, truncation: int, device: str) -> dict:
    """One meta-epoch of one problem of the two-level config of ``task``."""
    row = in_subprocess(
        CONFIGS / f"two_level_{task}.yaml",
        [
            f"levels.0.horizon={horizon}",
            f"meta.truncation={truncation}",
            f"device={device}",
            "meta.meta_batch=1",
            "run_dir=runs/benchmark-memory",
        ],
    )
    return {"task": task, "horizon": horizon, "truncation": truncation, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist", choices=["mnist", "quadratic"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()

    # The first pass warms the machine's file caches; it is not reported.
    point(args.task, 20, 20, args.device)
    by_truncation = [
        point(args.task, max(TRUNCATIONS), t, args.device) for t in TRUNCATIONS
    ]
    by_horizon = [point(args.task, h, 20, args.device) for h in HORIZONS]

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
