"""The benchmark harness runs end to end on tiny sizes, so that it cannot rot.

The compiled variants run eagerly here (compiling takes longer than the test).
"""

from __future__ import annotations

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
