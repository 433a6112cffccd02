"""The examples run end to end, as a user runs them, with tiny budgets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY_EVAL = [
    "wandb.mode=disabled",
    "device=cpu",
    "meta.epochs=2",
    "meta.val_every=1",
    "meta.val_tasks=2",
    "eval.tasks=4",
    "eval.horizons=[6]",
    "eval.report_steps=[3,6]",
    "eval.tune_tasks=2",
    "eval.lr_grid=[0.01,0.1]",
]

EXAMPLES = {
    "two_level_quadratic": [
        "task.dim=3",
        "levels.0.rule.hidden_size=4",
        "levels.0.horizon=6",
        "meta.meta_batch=2",
        "meta.truncation=3",
    ],
    "two_level_mnist": [
        "task.hidden=[4]",
        "task.batch_size=8",
        "levels.0.rule.hidden_size=4",
        "levels.0.horizon=6",
        "meta.truncation=3",
        "eval.variations=[]",
    ],
    "three_level_quadratic": [
        "task.dim=3",
        "levels.0.rule.hidden_size=3",
        "levels.0.horizon=3",
        "levels.0.meta_batch=2",
        "levels.1.rule.hidden_size=4",
        "levels.1.rule.num_layers=1",
        "levels.1.horizon=4",
        "meta.meta_batch=2",
        "meta.truncation=2",
        "eval.copies=2",
        "eval.two_level_meta_batch=4",
    ],
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_and_prints_its_comparison(name: str, tmp_path: Path) -> None:
    """Each example meta-trains, evaluates, prints its tables and writes its files."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "examples" / f"{name}.py"),
        *TINY_EVAL,
        *EXAMPLES[name],
        f"run_dir={run_dir}",
    ]
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]

    for baseline in ("sgd", "nag", "rmsprop", "adam"):
        assert f"\n{baseline} " in done.stdout
    assert (run_dir / "results.json").exists()
    assert (run_dir / "curves_default_T6.png").exists()
    if name.startswith("three"):
        for entry in ("mlp by lstm", "mlp by adam", "mlp, 2 levels", "lstm, 2 levels"):
            assert f"\n{entry} " in done.stdout
        assert (run_dir / "training_curves.png").exists()
    else:
        assert "\nlearned " in done.stdout
