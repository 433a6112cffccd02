"""Wall time and peak memory of one meta-epoch of a config, in a fresh process.

The other benchmarks call ``in_subprocess`` once per point so that peaks do not
mix. On the CPU the peak is the growth of the process's peak resident memory over
what it held before training; on CUDA it is torch's peak allocation. No warm-up
epoch runs first: it would raise the high-water mark the epoch is compared with.

    python benchmarks/epoch_cost.py CONFIG [key=value ...]   # prints one JSON line
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def measure(config_path: Path, overrides: list[str]) -> dict:
    """Seconds and peak MiB of one meta-epoch of ``config_path`` with overrides."""
    import torch

    from hierarchy.config import load_config
    from hierarchy.experiment import build, level_zero_steps
    from hierarchy.trainer import MetaTrainer

    config = load_config(config_path, [*overrides, "wandb.mode=disabled"])
    top, device = build(config)
    trainer = MetaTrainer.from_config(top, config)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    trainer.train_epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before

    return {
        "config": config_path.stem,
        "levels": len(config.levels),
        "horizons": [level.horizon for level in config.levels],
        "modes": [level.mode for level in config.levels],
        "truncation": config.meta.truncation,
        "meta_batch": config.meta.meta_batch,
        "optimisee_steps": config.meta.meta_batch * level_zero_steps(top),
        "device": str(device),
        "seconds": seconds,
        "peak_mib": peak / 2**20,
    }


def in_subprocess(config_path: Path, overrides: list[str]) -> dict:
    """``measure`` in a fresh Python process; its result."""
    out = subprocess.run(
        [sys.executable, __file__, str(config_path), *overrides],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), sys.argv[2:])))
