"""The benchmark harness runs end to end on tiny sizes, so that it cannot rot.

The compiled variants run eagerly here (compiling takes longer than the test).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import performance  # noqa: E402
from epoch_cost import CONFIGS, measure  # noqa: E402

from hierarchy.rules import LSTMRule  # noqa: E402

TINY = ["levels.0.horizon=4", "meta.truncation=2", "meta.meta_batch=2"]


@pytest.fixture(autouse=True)
def _run_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_harness_pieces_on_tiny_sizes() -> None:
    """Every section gives positive times and ratios, and the table is written."""
    threads = torch.get_num_threads()
    quadratic = performance.meta_training(
        "two_level_quadratic", TINY, 1, 1, compile_rule=False
    )
    eager_only = performance.meta_training(
        "two_level_quadratic", TINY, 1, 1, compiled_run=False
    )
    assert set(eager_only["seconds"]) == {"reference", "library"}
    step = performance.optimiser_step(8, 1, 1, compile_rule=False)
    assert all(v > 0 for v in quadratic["seconds"].values())
    assert quadratic["speedup"]["reference"] == 1.0
    assert step["parameters"] == 2 * (8 * 8 + 8)
    assert step["mm_flops_per_second"] > 0
    memory = {"by_truncation": [], "by_horizon": [], "checkpoint": []}
    evaluation = performance.evaluation(quick=True, repeats=1)
    assert evaluation["seconds"]["library"] > 0
    learned = performance.learned_evaluation(True, 1, 1, compile_rule=False)
    assert set(learned["seconds_per_step"]) == {
        "reference",
        "update",
        "library",
        "library, compiled rule",
    }
    assert all(v > 0 for v in learned["seconds_per_step"].values())
    torch.set_num_threads(threads)
    table = performance.markdown(
        {
            "mnist": quadratic,
            "mnist_batch": eager_only,
            "quadratic": quadratic,
            "optimiser_step": [step],
            "evaluation": evaluation,
            "learned_evaluation": learned,
            "memory": memory,
        }
    )
    assert "| 144 |" in table
    assert "learned rule on 2 MNIST networks" in table


def test_checkpointing_times_come_from_one_process() -> None:
    """Each way of checkpointing gets a time, measured side by side."""
    seconds = performance.checkpoint_seconds(4, 2, "eager", 1, 1)
    assert set(seconds) == set(performance.CHECKPOINTING)
    assert all(value > 0 for value in seconds.values())


def test_rule_flops_count_every_matmul() -> None:
    """2 N in out per product: two fused LSTM layers of 20 units and the head."""
    n = 10
    expected = 2 * n * (22 * 80 + 40 * 80) + 2 * n * 20
    assert performance.rule_flops(LSTMRule(), n) == expected


def test_epoch_cost_measures_a_tiny_epoch() -> None:
    """One meta-epoch in this process: time and peak memory are reported."""
    row = measure(CONFIGS / "two_level_quadratic.yaml", TINY, epochs=1)
    assert row["seconds"] > 0 and row["peak_mib"] >= 0
    assert row["optimisee_steps"] == 2 * 5


def test_live_memory_runs_under_the_tunable(monkeypatch) -> None:
    """The tensors-alive peak is the same measurement in a process whose glibc
    returns every large block when it is freed; a tunable the user set stays."""
    import epoch_cost

    seen = {}

    def run(command, **kwargs):
        seen.update(kwargs["env"])
        return subprocess.CompletedProcess(command, 0, stdout='{"peak_mib": 1.0}\n')

    monkeypatch.setattr(epoch_cost.subprocess, "run", run)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    epoch_cost.in_subprocess(CONFIGS / "two_level_quadratic.yaml", TINY, live=True)
    assert (
        seen["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=1:{epoch_cost.LIVE_TUNABLE}"
    )
    epoch_cost.in_subprocess(CONFIGS / "two_level_quadratic.yaml", TINY)
    assert seen["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1"


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not Path("/proc/self/statm").exists(),
    reason="glibc's tunables and Linux's /proc",
)
def test_live_memory_leaves_out_what_the_heap_keeps() -> None:
    """A process that frees a large tensor and then allocates small ones keeps
    the freed pages resident by default, not under the tunable."""
    import epoch_cost

    script = (
        "import os, torch\n"
        "from pathlib import Path\n"
        "first = torch.ones(1_000_000)\n"
        "del first\n"  # freed, this 4 MB mapping raises glibc's threshold past it
        "blocks = [torch.ones(100_000) for _ in range(400)]\n"  # 160 MB in 400 KB
        "del blocks[::2]\n"
        "pages = int(Path('/proc/self/statm').read_text().split()[1])\n"
        "print(pages * os.sysconf('SC_PAGE_SIZE') >> 20)\n"
    )
    rss = {}
    for live in (False, True):
        env = dict(os.environ)
        if live:
            env["GLIBC_TUNABLES"] = epoch_cost.LIVE_TUNABLE
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True
        )
        rss[live] = int(out.stdout.strip())
    assert rss[False] - rss[True] > 50  # MiB: the freed half stays only in the heap
