"""Faults: non-finite meta-updates, kills and interrupts, bad input, long runs."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hierarchy.cli import main
from hierarchy.config import ConfigError, load_config
from hierarchy.experiment import build, run
from hierarchy.trainer import MetaTrainer, NonFiniteError
from tests.conftest import TINY_QUADRATIC

ROOT = Path(__file__).resolve().parent.parent


def _trainer(config, **changes) -> MetaTrainer:
    top, _ = build(config)
    trainer = MetaTrainer.from_config(top, config)
    for name, value in changes.items():
        setattr(trainer, name, value)
    return trainer


def _poison_epochs(trainer: MetaTrainer, epochs: set[int], monkeypatch) -> None:
    """Make the problems of the given epochs (from 1) explode at their first row."""
    task = trainer.top.below
    original = task.sample
    calls = []

    def sample(batch_size, generator, split, horizon):
        problem = original(batch_size, generator, split, horizon)
        if split == "train":
            calls.append(problem)
            if len(calls) in epochs:
                problem.w[0] = math.inf
        return problem

    monkeypatch.setattr(task, "sample", sample)


# Numerical faults


def test_non_finite_meta_loss_is_skipped_counted_and_logged(
    tiny_config, monkeypatch, caplog
) -> None:
    """One exploding problem at epoch 2: no step, counted, logged; then training
    carries on, and the checkpoint holds the good weights."""
    trainer = _trainer(tiny_config("meta.epochs=1", "meta.val_every=1"))
    _poison_epochs(trainer, {2}, monkeypatch)
    trainer.train()
    after_first = trainer.top.rule.theta.detach().clone()
    optimizer_state = trainer.optimizer.state_dict()["state"][0]["step"].clone()

    trainer.epochs = 2
    with caplog.at_level(logging.WARNING, logger="hierarchy.trainer"):
        history = trainer.train()
    assert torch.equal(trainer.top.rule.theta.detach(), after_first)
    assert torch.equal(
        trainer.optimizer.state_dict()["state"][0]["step"], optimizer_state
    )
    assert history.skipped_epochs == [2] and math.isnan(history.train_loss[1])
    assert trainer.bad_updates == 1
    message = caplog.text
    assert "epoch 2: non-finite meta-loss" in message
    assert "1 of 4 problems diverged" in message and "task seed 0" in message
    saved = torch.load(trainer.checkpoint_path, weights_only=True)
    assert saved["epoch"] == 2 and torch.equal(saved["rule"]["theta"], after_first)

    trainer.epochs = 3
    trainer.train()
    assert not torch.equal(trainer.top.rule.theta.detach(), after_first)
    assert trainer.bad_updates == 0 and trainer.history.skipped_epochs == [2]


def test_non_finite_meta_gradient_is_skipped(tiny_config, monkeypatch) -> None:
    """A finite meta-loss with a non-finite gradient takes no step either."""
    trainer = _trainer(tiny_config("meta.epochs=1"))
    before = trainer.top.rule.theta.detach().clone()
    trainer.top.rule.theta.register_hook(lambda grad: grad * math.nan)
    history = trainer.train()
    assert history.skipped_epochs == [1]
    assert torch.equal(trainer.top.rule.theta.detach(), before)


def test_too_many_failures_in_a_row_stop_with_last_good_checkpoint(
    tiny_config, monkeypatch
) -> None:
    """After max_bad_updates skipped updates in a row the run stops, naming the
    checkpoint, which holds the last good weights."""
    config = tiny_config("meta.epochs=10", "meta.max_bad_updates=3")
    trainer = _trainer(config)
    _poison_epochs(trainer, {3, 4, 5, 6}, monkeypatch)
    with pytest.raises(NonFiniteError, match="3 meta-updates in a row") as error:
        trainer.train()
    assert str(trainer.checkpoint_path) in str(error.value)
    assert "resume=true" in str(error.value)
    saved = torch.load(trainer.checkpoint_path, weights_only=True)
    assert saved["epoch"] == 4 and torch.isfinite(saved["rule"]["theta"]).all()
    assert torch.equal(saved["rule"]["theta"], trainer.top.rule.theta.detach())


def test_epoch_problems_redraws_a_reported_epoch(tiny_config, monkeypatch) -> None:
    """epoch_problems(e) gives exactly the problems training drew at epoch e."""
    trainer = _trainer(tiny_config("meta.epochs=3"))
    drawn = []
    original = trainer.top.below.sample

    def sample(batch_size, generator, split, horizon):
        problem = original(batch_size, generator, split, horizon)
        if split == "train":
            drawn.append(problem)
        return problem

    monkeypatch.setattr(trainer.top.below, "sample", sample)
    trainer.train()
    monkeypatch.undo()
    for epoch in range(3):
        again = trainer.epoch_problems(epoch)
        assert torch.equal(again.w, drawn[epoch].w)
        assert torch.equal(again.x0, drawn[epoch].x0)


# Diagnostics


@pytest.mark.parametrize("mode", ["higher", "first_order"])
def test_meta_gradient_check(tiny_config, mode: str) -> None:
    """The one-call check agrees with finite differences in higher mode (float64)
    and reports the dropped second-order terms in first_order mode."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trainer = _trainer(tiny_config(f"levels.0.mode={mode}"))
        check = trainer.check_meta_gradient(directions=3)
    finally:
        torch.set_default_dtype(default)
    assert check.mode == mode and len(check.analytic) == 3
    if mode == "higher":
        assert check.max_relative_error < 1e-5
    else:
        assert check.max_relative_error > 1e-4
        assert "drops second-order terms" in check.summary()


def test_gradient_check_in_a_run_is_logged(tiny_config, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="hierarchy.experiment"):
        run(tiny_config("meta.check_gradient=true", "meta.epochs=1"))
    assert "meta-gradient check, first_order mode" in caplog.text


def test_gradient_norms_per_level(tiny_config) -> None:
    """log_grad_norms records, each epoch, the top meta-gradient's norm and the
    gradient norm each level's rule sees, for every level of the stack."""
    overrides = [
        "levels=[{rule: {kind: mlp, hidden_size: 3, num_layers: 1}, horizon: 3, "
        "meta_batch: 2}, {rule: {kind: lstm, hidden_size: 4, num_layers: 1}, "
        "horizon: 4}]",
        "meta.truncation=2",
        "meta.epochs=2",
        "meta.log_grad_norms=true",
    ]
    history = _trainer(tiny_config(*overrides)).train()
    assert len(history.grad_norms) == 2
    assert set(history.grad_norms[0]) == {
        "level 2 meta-gradient",
        "level 2 (lstm) input",
        "level 1 (mlp) input",
    }
    for norms in history.grad_norms:
        assert all(math.isfinite(v) and v > 0 for v in norms.values())

    # Chunks rebuilt in backward rerun the levels below; the norms stay those of
    # the forward unroll, as the meta-gradient does.
    chunked = _trainer(tiny_config(*overrides, "meta.checkpoint_steps=1")).train()
    for plain, split in zip(history.grad_norms, chunked.grad_norms):
        assert split == pytest.approx(plain, rel=1e-5)


# Crash safety

SLOW_CLI = """
import sys, time
from hierarchy.cli import main
from hierarchy.trainer import MetaTrainer

original = MetaTrainer.train_epoch

def slow(self):
    loss = original(self)
    time.sleep(0.1)
    return loss

MetaTrainer.train_epoch = slow
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _start(tmp_path: Path, overrides: list[str]) -> subprocess.Popen:
    """``hierarchy train`` on the tiny config, each epoch slowed down by 0.1 s."""
    script = tmp_path / "slow_cli.py"
    script.write_text(textwrap.dedent(SLOW_CLI))
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(config), *overrides],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_epoch(path: Path, epoch: int, process: subprocess.Popen) -> int:
    """Poll a checkpoint until it holds at least ``epoch``; the epoch it holds."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists():
            try:
                saved = torch.load(path, weights_only=True)["epoch"]
            except Exception:  # being replaced this instant: read again
                continue
            if saved >= epoch:
                return saved
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached epoch {epoch}")


CRASH_RUN = [*TINY_QUADRATIC, "meta.epochs=20", "meta.val_every=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The tiny run's results when nothing stops it."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run(load_config(None, [*CRASH_RUN, f"run_dir={run_dir}"]))


def _check_same(results: dict, uninterrupted: dict) -> None:
    assert results["history"]["train_loss"] == uninterrupted["history"]["train_loss"]
    assert results["history"]["val_loss"] == uninterrupted["history"]["val_loss"]
    for key, evaluation in uninterrupted["evaluations"].items():
        resumed = results["evaluations"][key]["mean_curves"]
        assert resumed == evaluation["mean_curves"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, uninterrupted: dict
) -> None:
    """kill -9 mid-run, then resume=true: the same numbers as a run never killed."""
    run_dir = tmp_path / "run"
    process = _start(tmp_path, [*CRASH_RUN, f"run_dir={run_dir}"])
    killed_at = _wait_for_epoch(run_dir / "checkpoint.pt", 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and killed_at < 20

    resumed = run(load_config(None, [*CRASH_RUN, f"run_dir={run_dir}", "resume=true"]))
    _check_same(resumed, uninterrupted)


def test_sigint_stops_cleanly_with_a_checkpoint(
    tmp_path: Path, uninterrupted: dict
) -> None:
    """Ctrl-C: the epoch finishes, its checkpoint is written, exit code 130, and
    resume=true finishes the run with the uninterrupted numbers."""
    run_dir = tmp_path / "run"
    process = _start(tmp_path, [*CRASH_RUN, f"run_dir={run_dir}"])
    _wait_for_epoch(run_dir / "checkpoint.pt", 3, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "resume=true" in stderr
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert 3 <= saved["epoch"] < 20
    assert not (run_dir / "results.json").exists()

    resumed = run(load_config(None, [*CRASH_RUN, f"run_dir={run_dir}", "resume=true"]))
    _check_same(resumed, uninterrupted)


# Bad input: a clear message before any work starts

BAD_INPUTS = [
    (["meta.epochz=3"], "'meta.epochz' does not exist"),
    (["meta.epochs=three"], "meta.epochs"),
    (["levels.0.horizon=0"], "'levels.0.horizon' = 0: expected a positive integer"),
    (["meta.truncation=50"], "'meta.truncation' = 50"),
    (["levels=[]"], "'levels' = []"),
    (["levels.0.rule.kind=adamw"], "'levels.0.rule.kind' = 'adamw'"),
    (["task.name=cifar"], "'task.name' = 'cifar'"),
    (["device=cuda:0"] if not torch.cuda.is_available() else [], "CUDA"),
    (["task.name=mnist", "task.data_root=DATA"], "MNIST root"),
    (["meta.lr=inf"], "'meta.lr' = inf: expected a positive finite number"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS)
def test_bad_input_fails_before_work_with_its_message(
    tmp_path: Path, capsys, overrides: list[str], message: str
) -> None:
    """Each bad input exits with code 2 and one line naming it; nothing is run."""
    if not overrides:
        pytest.skip("CUDA is available here")
    (tmp_path / "data").mkdir()
    overrides = [o.replace("DATA", str(tmp_path / "data")) for o in overrides]
    run_dir = tmp_path / "run"
    code = main(
        ["train", _file(tmp_path), *TINY_QUADRATIC, f"run_dir={run_dir}", *overrides]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert "Traceback" not in error
    assert not run_dir.exists()


def test_corrupt_idx_file_fails_before_work(tmp_path: Path, idx_root, capsys) -> None:
    root, _ = idx_root
    (root / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            _file(tmp_path),
            *TINY_QUADRATIC,
            "task.name=mnist",
            f"task.data_root={root}",
            f"run_dir={run_dir}",
        ]
    )
    assert code == 2 and "train-labels-idx1-ubyte" in capsys.readouterr().err
    assert not run_dir.exists()


def test_checkpoint_of_another_config_is_refused(tmp_path: Path, capsys) -> None:
    """resume=true with a changed task is refused, naming the key, before work."""
    overrides = [*TINY_QUADRATIC, f"run_dir={tmp_path / 'run'}", "meta.epochs=1"]
    assert main(["train", _file(tmp_path), *overrides]) == 0
    changed = [*overrides, "resume=true", "task.dim=4", "meta.epochs=2"]
    assert main(["train", _file(tmp_path), *changed]) == 2
    assert "written with task.dim = 3, but the config now has 4" in (
        capsys.readouterr().err
    )


def _file(folder: Path) -> str:
    """A config file that sets nothing beyond the overrides."""
    path = folder / "tiny.yaml"
    path.write_text("name: tiny\n")
    return str(path)


# Long runs


MEMORY_PROBE = """
import resource, sys
import torch
from hierarchy.config import load_config
from hierarchy.experiment import build
from hierarchy.trainer import MetaTrainer

torch.set_num_threads(1)
config = load_config(None, sys.argv[1:])
top, _ = build(config)
trainer = MetaTrainer.from_config(top, config)
for _ in range(5):
    trainer.train_epoch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(60):
    trainer.train_epoch()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


def test_memory_stays_flat_over_many_truncations(tmp_path: Path) -> None:
    """600 truncation segments after a warm-up add less than 8 MiB of peak memory
    (0.25 MiB measured; keeping each segment's carry with its graph adds 75 MiB)."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(MEMORY_PROBE))
    overrides = [
        *TINY_QUADRATIC,
        "task.dim=10",
        "levels.0.horizon=50",
        "meta.truncation=5",
        "meta.meta_batch=32",
    ]
    done = subprocess.run(
        [sys.executable, str(script), *overrides, f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    growth_mib = float(done.stdout.strip().splitlines()[-1])
    assert growth_mib < 8, growth_mib


# Property: any override loads or fails with the project's own error

KEYS = [
    "name",
    "seed",
    "device",
    "threads",
    "log_level",
    "resume",
    "task.name",
    "task.dim",
    "task.hidden",
    "task.activation",
    "task.batch_size",
    "task.data_source",
    "levels",
    "levels.0.horizon",
    "levels.0.mode",
    "levels.0.meta_batch",
    "levels.0.rule.kind",
    "levels.0.rule.hidden_size",
    "levels.0.rule.num_layers",
    "levels.0.rule.out_scale",
    "levels.0.rule.momenta",
    "levels.1.horizon",
    "meta.optimizer",
    "meta.lr",
    "meta.epochs",
    "meta.meta_batch",
    "meta.truncation",
    "meta.grad_clip",
    "meta.max_bad_updates",
    "eval.tasks",
    "eval.horizons",
    "eval.report_steps",
    "eval.baselines",
    "eval.lr_grid",
    "eval.copies",
    "eval.variations",
    "wandb.mode",
    "meta.epochz",
    "task",
    "levels.0.rule",
    "",
]

VALUES = st.one_of(
    st.integers(-5, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "lstm",
            "mlp",
            "adam",
            "higher",
            "first_order",
            "cpu",
            "cuda",
            "auto",
            "mnist",
            "quadratic",
            "null",
            "true",
            "[]",
            "[1, 2]",
            "[-1]",
            "{}",
            "{a: 1}",
            "[{rule: {kind: mlp}, horizon: 3}]",
            "[{horizon: -1}]",
            "'",
            "[",
            ": :",
        ]
    ),
    st.text(max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_random_overrides_load_or_fail_with_config_error(pairs) -> None:
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        config = load_config(None, overrides)
    except ConfigError as error:
        assert str(error)
    else:
        assert config.levels and config.meta.truncation <= config.levels[-1].horizon


def test_resume_with_another_rate_warns_and_uses_it(tiny_config, caplog) -> None:
    """meta.lr may change on resume, with a warning; the new rate is the one used."""
    run(tiny_config("meta.epochs=1"))
    config = tiny_config("meta.epochs=2", "resume=true", "meta.lr=0.5")
    trainer = _trainer(config)
    with caplog.at_level(logging.WARNING, logger="hierarchy.trainer"):
        trainer.load()
    assert "meta.lr = 0.5 where the checkpoint had 0.003" in caplog.text
    assert trainer.optimizer.param_groups[0]["lr"] == 0.5


def test_a_run_folder_with_a_checkpoint_is_not_trained_over(
    tmp_path: Path, capsys
) -> None:
    """Without resume=true an earlier run's checkpoint stays untouched."""
    overrides = [*TINY_QUADRATIC, f"run_dir={tmp_path / 'run'}", "meta.epochs=1"]
    assert main(["train", _file(tmp_path), *overrides]) == 0
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert main(["train", _file(tmp_path), *overrides, "seed=3"]) == 2
    assert "add resume=true" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_an_infinite_rate_never_reaches_the_weights(tiny_config) -> None:
    """A finite meta-gradient times an infinite rate: the step is undone, counted,
    and the run stops after max_bad_updates with finite weights."""
    config = tiny_config("meta.epochs=10", "meta.max_bad_updates=2")
    trainer = _trainer(config, epochs=10)
    for group in trainer.optimizer.param_groups:
        group["lr"] = math.inf
    before = trainer.top.rule.theta.detach().clone()
    with pytest.raises(NonFiniteError):
        trainer.train()
    assert torch.equal(trainer.top.rule.theta.detach(), before)
    assert trainer.history.skipped_epochs == [1, 2]


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "the file is empty"), (b"\x8a\x0b" * 40, "cannot be read: ")],
)
def test_unreadable_checkpoint_gives_one_line(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    from hierarchy.checkpoint import CheckpointError, load_rule

    path = tmp_path / "rule.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as error:
        load_rule(path)
    assert "\n" not in str(error.value)


def test_report_refuses_a_file_that_is_not_results(tmp_path: Path, capsys) -> None:
    for content in ("not json", "{}", "[1, 2]"):
        path = tmp_path / "results.json"
        path.write_text(content)
        assert main(["report", str(path)]) == 2
        assert "is not a results.json" in capsys.readouterr().err


def test_overrides_may_follow_options(tmp_path: Path, capsys) -> None:
    """``hierarchy evaluate NAME --config FILE key=value`` takes the override."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "task: {dim: 10}\nlevels: [{horizon: 5}]\nmeta: {truncation: 5}\n"
    )
    code = main(
        [
            "evaluate",
            "lstm-quadratic",
            "--config",
            str(config),
            "eval.tasks=3",
            "eval.horizons=[4]",
            "eval.report_steps=[4]",
            "eval.tune_tasks=2",
            "eval.lr_grid=[0.1]",
            f"run_dir={tmp_path / 'out'}",
        ]
    )
    assert code == 0 and "over 3 held-out problems" in capsys.readouterr().out
