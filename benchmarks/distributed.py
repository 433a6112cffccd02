"""Meta-training throughput with 1 and 2 processes under torchrun.

Each point launches ``torchrun --nproc_per_node=N`` on the two-level quadratic
example's config (LSTM rule, 100-step unrolls in segments of 20, one CPU thread
per process) with a given global meta-batch, on the loopback address with a free
port. Every rank runs one untimed epoch, then EPOCHS timed ones; an epoch's time
is rank 0's, from a barrier to the end of the epoch, whose last collective waits
for every rank. The figure is the median, as quadratic tasks per second: the
meta-batch over the median epoch seconds.

    python benchmarks/distributed.py [--processes 1 2] [--meta-batch 128 512]
                                     [--epochs 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "two_level_quadratic.yaml"


def measure(meta_batch: int, epochs: int) -> dict | None:
    """One rank's part of a point; rank 0 returns the figures, the others None."""
    import torch

    from hierarchy.config import load_config
    from hierarchy.distributed import Context, shutdown
    from hierarchy.experiment import build
    from hierarchy.trainer import MetaTrainer

    overrides = [
        f"meta.meta_batch={meta_batch}",
        "device=cpu",
        "wandb.mode=disabled",
        "log_level=WARNING",
        "run_dir=runs/benchmark-distributed",
    ]
    config = load_config(CONFIG, overrides)
    top, _ = build(config)
    context = Context.current()
    trainer = MetaTrainer.from_config(top, config)

    trainer.train_epoch()  # untimed: first calls allocate and warm caches
    seconds = []
    for _ in range(epochs):
        context.barrier()
        start = time.perf_counter()
        trainer.train_epoch()
        seconds.append(time.perf_counter() - start)
    shutdown()

    if not context.is_main:
        return None
    median = statistics.median(seconds)
    return {
        "processes": context.world_size,
        "meta_batch": meta_batch,
        "per_process": meta_batch // context.world_size,
        "horizon": config.levels[0].horizon,
        "truncation": config.meta.truncation,
        "threads_per_process": torch.get_num_threads(),
        "epochs": epochs,
        "epoch_seconds": seconds,
        "median_seconds": median,
        "tasks_per_second": meta_batch / median,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, meta_batch: int, epochs: int) -> dict:
    """Run one point under torchrun on 127.0.0.1; rank 0's figures."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        __file__,
        "--worker",
        str(meta_batch),
        str(epochs),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, check=True, cwd=ROOT
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def machine() -> dict:
    """What the figures were measured on, and how busy it was."""
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15_min": [round(x, 2) for x in load],
        "busy_processes": busy_processes(),
    }


def busy_processes(threshold: float = 20.0) -> list[str]:
    """Other processes using more than ``threshold`` % of a core (ps's average)."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid=,pcpu=,comm="], capture_output=True, text=True
        ).stdout
    except OSError:
        return ["(ps not available)"]
    busy = []
    for line in out.splitlines():
        pid, pcpu, name = line.split(None, 2)
        if int(pid) != os.getpid() and float(pcpu) > threshold:
            busy.append(f"{name.strip()} {float(pcpu):.0f}%")
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--meta-batch", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/distributed.json")
    )
    args = parser.parse_args()

    import torch

    record = {"torch": torch.__version__, "before": machine(), "points": []}
    for meta_batch in args.meta_batch:
        for processes in args.processes:
            point = launch(processes, meta_batch, args.epochs)
            record["points"].append(point)
            print(
                f"{processes} process(es), meta-batch {meta_batch} "
                f"({point['per_process']} each): median epoch "
                f"{point['median_seconds']:.2f}s, "
                f"{point['tasks_per_second']:.1f} tasks/s",
                flush=True,
            )
    record["after"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        figures = measure(int(sys.argv[2]), int(sys.argv[3]))
        if figures is not None:
            print(json.dumps(figures), flush=True)
    else:
        main()
