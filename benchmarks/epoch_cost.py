"""Wall time and peak memory of meta-epochs of a config, in a fresh process.

The other benchmarks call ``in_subprocess`` once per point so that peaks do not
mix. On the CPU the peak is the growth of the process's peak resident memory over
what it held before training (on Linux the high-water mark is reset first, so
that loading the data does not hide it); on CUDA it is torch's peak allocation.
No warm-up epoch runs first: it would raise the high-water mark the epochs are
compared with. The time is the median over the epochs, the peak is over all of them.
``in_subprocess(..., live=True)`` measures the peak of the tensors alive instead,
without what glibc's heap keeps after frees (``LIVE_TUNABLE``).

    python benchmarks/epoch_cost.py EPOCHS CONFIG [key=value ...]  # one JSON line
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def measure(config_path: Path, overrides: list[str], epochs: int = 1) -> dict:
    """Seconds and peak MiB of meta-epochs of ``config_path`` with overrides."""
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
        before = _reset_peak_rss()
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        trainer.train_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        # Linux updates a process's memory counters in batches, so the
        # high-water mark can read a fraction of a MiB below the resident memory
        # read just before: no growth at all.
        peak = max(_peak_rss() - before, 0)

    return {
        "config": config_path.stem,
        "levels": len(config.levels),
        "horizons": [level.horizon for level in config.levels],
        "modes": [level.mode for level in config.levels],
        "truncation": config.meta.truncation,
        "meta_batch": config.meta.meta_batch,
        "optimisee_steps": config.meta.meta_batch * level_zero_steps(top),
        "device": str(device),
        "epochs": epochs,
        "seconds": statistics.median(seconds),
        "peak_mib": peak / 2**20,
    }


def _reset_peak_rss() -> int:
    """Reset this process's peak resident memory where Linux allows; bytes held."""
    status = Path("/proc/self/status")
    if not status.exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    """Peak resident memory of this process since the last reset, in bytes."""
    if Path("/proc/self/status").exists():
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# glibc keeps freed memory in its heap and hands it out again, so the resident
# memory's high-water mark also counts what fragmentation holds. With its mmap
# threshold fixed at 256 KiB, every block that large (every tensor of 64 Ki
# floats or more) is a mapping of its own, returned to the system when freed:
# the high-water mark then follows the tensors alive. Slower (each such tensor's
# pages fault in afresh), so its times are not compared.
LIVE_TUNABLE = "glibc.malloc.mmap_threshold=262144"


def in_subprocess(
    config_path: Path, overrides: list[str], epochs: int = 1, live: bool = False
) -> dict:
    """``measure`` in a fresh Python process; its result. With ``live``, under
    ``LIVE_TUNABLE`` (glibc only; elsewhere it reads as without)."""
    env = dict(os.environ)
    if live:
        tunables = [env.get("GLIBC_TUNABLES"), LIVE_TUNABLE]
        env["GLIBC_TUNABLES"] = ":".join(t for t in tunables if t)
    out = subprocess.run(
        [sys.executable, __file__, str(epochs), str(config_path), *overrides],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[2]), sys.argv[3:], int(sys.argv[1]))))
