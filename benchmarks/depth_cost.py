"""What depth costs: one meta-epoch of two- and three-level stacks against horizons.

On random quadratics, with the three-level example's settings: the two-level
LSTM against its horizon, and the three-level stack (MLP under an LSTM) against
the horizon at each level, in first-order and in higher mode. Each point is a
process of its own running three meta-epochs (see ``epoch_cost.py``); the
figures are the median seconds per epoch, optimisee steps per second and the
growth of peak memory.

    python benchmarks/depth_cost.py [--device cpu] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from epoch_cost import CONFIGS, in_subprocess

HORIZONS = [10, 20, 40]
EPOCHS = 3


def points(device: str) -> list[tuple[str, list[str]]]:
    """(config name, overrides) for every measured stack."""
    common = [f"device={device}", "run_dir=runs/benchmark-depth"]
    rows = []
    for horizon in HORIZONS:
        rows.append(
            (
                "two_level_quadratic",
                [*common, f"levels.0.horizon={horizon}", f"meta.truncation={horizon}"],
            )
        )
    for below in HORIZONS:
        rows.append(("three_level_quadratic", [*common, f"levels.0.horizon={below}"]))
    for top in HORIZONS:
        rows.append(("three_level_quadratic", [*common, f"levels.1.horizon={top}"]))
    for mode in ("higher",):
        rows.append(("three_level_quadratic", [*common, f"levels.0.mode={mode}"]))
        rows.append(("three_level_quadratic", [*common, f"levels.1.mode={mode}"]))
    return rows


def markdown(rows: list[dict]) -> str:
    """One table row per measured stack."""
    lines = [
        "| levels | horizons (level 1, 2) | modes | truncation | meta-batch "
        "| optimisee steps | seconds | steps/s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['levels'] + 1} | {', '.join(map(str, row['horizons']))} "
            f"| {', '.join(row['modes'])} | {row['truncation']} | {row['meta_batch']} "
            f"| {row['optimisee_steps']:,} | {row['seconds']:.2f} "
            f"| {row['optimisee_steps'] / row['seconds']:,.0f} "
            f"| {row['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/depth_cost.json")
    args = parser.parse_args()

    # The first pass warms the machine's file caches; it is not reported.
    in_subprocess(CONFIGS / "two_level_quadratic.yaml", [f"device={args.device}"])
    rows = [
        in_subprocess(CONFIGS / f"{name}.yaml", overrides, epochs=EPOCHS)
        for name, overrides in points(args.device)
    ]

    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(f"written to {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
