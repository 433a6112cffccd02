"""Tests for hierarchy.distributed: data-parallel meta-training over processes.

The two-process tests start torchrun on the loopback address with gloo. This file
is also the script each of those processes runs (see ``_worker``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_QUADRATIC

from hierarchy import distributed
from hierarchy.config import ConfigError, load_config
from hierarchy.distributed import Context, backend_for, rows_of
from tasks.quadratic import QuadraticTask

ROOT = Path(__file__).resolve().parent.parent

# The run the processes make: meta_batch is global, so two ranks unroll 8 each.
# Five validation problems do not split evenly, on purpose. The top optimiser is
# SGD, whose step is proportional to the meta-gradient: Adam's step hardly depends
# on its scale, and a sum over ranks in place of the mean would go unnoticed.
DISTRIBUTED_RUN = [
    "meta.optimizer=sgd",
    "meta.lr=0.001",
    "meta.meta_batch=16",
    "meta.epochs=4",
    "meta.val_every=2",
    "meta.val_tasks=5",
]


def test_backend_follows_the_device() -> None:
    """NCCL for a GPU, gloo for the CPU."""
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_one_process_starts_nothing_and_changes_nothing(monkeypatch) -> None:
    """Without WORLD_SIZE > 1 no group starts, and every operation is the identity."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert not dist.is_initialized()

    context = Context.current()
    assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
    problem = object()
    assert context.share(problem, 16) is problem
    assert context.mean(2.5) == 2.5
    param = torch.zeros(3, requires_grad=True)
    param.grad = torch.tensor([1.0, 2.0, 3.0])
    context.average_gradients([param])
    assert param.grad.tolist() == [1.0, 2.0, 3.0]


def test_rows_split_a_batch_into_disjoint_contiguous_shares() -> None:
    """The ranks' rows cover 0..total once, in order, differing in size by <= 1."""
    for world_size in (1, 2, 3, 4):
        for total in (0, 1, 5, 16, 17):
            shares = [rows_of(r, world_size, total) for r in range(world_size)]
            covered = [i for share in shares for i in range(share.start, share.stop)]
            assert covered == list(range(total))
            sizes = [share.stop - share.start for share in shares]
            assert max(sizes) - min(sizes) <= 1


def test_meta_batch_must_be_a_multiple_of_the_processes(monkeypatch) -> None:
    """Under torchrun with 3 processes a meta-batch of 16 is refused by name."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"'meta.meta_batch' = 16.*\(3\)"):
        load_config(None, ["meta.meta_batch=16"])
    assert load_config(None, ["meta.meta_batch=15"]).meta.meta_batch == 15


def test_setup_asks_for_torchrun_when_its_variables_are_missing(monkeypatch) -> None:
    """WORLD_SIZE alone is not enough to join a group; the error says what is."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="RANK.*torchrun"):
        distributed.setup(torch.device("cpu"))
    assert not dist.is_initialized()


def test_setup_warns_of_a_rank_left_in_a_single_process(monkeypatch, caplog) -> None:
    """A RANK or LOCAL_RANK other than 0 without WORLD_SIZE runs one process,
    and says so, as the variables are likely left from another launch."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with caplog.at_level("WARNING", logger="hierarchy.distributed"):
        assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert "RANK=3 is set but WORLD_SIZE is unset" in caplog.text
    assert not dist.is_initialized()

    caplog.clear()
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level("WARNING", logger="hierarchy.distributed"):
        distributed.setup(torch.device("cpu"))
    assert caplog.text == ""


@pytest.mark.parametrize(
    "name, value",
    [
        ("RANK", "abc"),
        ("RANK", "2"),  # not below WORLD_SIZE: the group would wait for ever
        ("LOCAL_RANK", "abc"),
        ("LOCAL_RANK", "-1"),
        ("MASTER_PORT", "abc"),
        ("MASTER_PORT", "70000"),
    ],
)
def test_setup_refuses_a_launch_variable_torchrun_would_not_set(
    monkeypatch, name: str, value: str
) -> None:
    """Each bad variable is named with what is accepted, before any group starts."""
    launch = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    launch |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", name: value}
    for key, setting in launch.items():
        monkeypatch.setenv(key, setting)
    with pytest.raises(ConfigError, match=f"{name} = '{value}': expected an integer"):
        distributed.setup(torch.device("cpu"))
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "world_size, rank, prints",
    [
        (None, "1", True),
        ("1", "3", True),
        ("abc", "1", True),
        ("2", "abc", True),  # the error about it must be seen
        ("2", "5", True),
        ("2", "1", False),
    ],
)
def test_a_process_alone_prints_whatever_rank_it_was_left(
    monkeypatch, world_size: str | None, rank: str, prints: bool
) -> None:
    """Only ranks other than 0 of a real launch stay quiet; a RANK left over in a
    single process's environment does not silence its errors and tables."""
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", rank)
    assert distributed.prints() is prints


def test_a_config_error_is_printed_with_a_leftover_rank(monkeypatch, capsys) -> None:
    """The error of a single process reaches the user whatever RANK it was left."""
    from hierarchy.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "two_level_quadratic", "meta.epochz=1"]) == 2
    assert "'meta.epochz' does not exist" in capsys.readouterr().err


def test_a_process_computes_on_its_own_gpu_or_the_cpu() -> None:
    """A GPU named by index must be this process's LOCAL_RANK; the CPU stays."""
    assert distributed._local_device(torch.device("cpu"), 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="'cuda:1'.*LOCAL_RANK 0.*'cuda' or 'auto'"):
        distributed._local_device(torch.device("cuda", 1), 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in two CPU processes with gloo on 127.0.0.1, a free port."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
        GLOO_SOCKET_IFNAME="lo",
        CUDA_VISIBLE_DEVICES="",
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        *args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, cwd=cwd
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _train_one_process(overrides: list[str]) -> tuple[torch.Tensor, dict]:
    """Meta-train in this process alone; the top rule's weights and the history."""
    from hierarchy.experiment import build
    from hierarchy.trainer import MetaTrainer

    config = load_config(None, overrides)
    top, _ = build(config)
    trainer = MetaTrainer.from_config(top, config)
    if config.resume:
        trainer.load()
    history = trainer.train()
    return top.rule.theta.detach().clone(), vars(history)


def test_two_processes_match_one_with_the_whole_meta_batch(tiny_overrides, tmp_path):
    """Two gloo ranks of 8 problems: identical weights on both ranks, and the
    weights, losses and resumed run of one process with 16 over the same tasks."""
    out = tmp_path / "ranks"
    _torchrun(Path(__file__), str(out), *tiny_overrides, cwd=tmp_path)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    assert [rank["world_size"] for rank in ranks] == [2, 2]
    generator = torch.Generator().manual_seed(0)
    whole = QuadraticTask(3).sample(16, generator, "train", 10).init()
    assert torch.equal(ranks[0]["first_batch"], whole[:8])
    assert torch.equal(ranks[1]["first_batch"], whole[8:])
    for phase in ("trained", "resumed"):
        assert torch.equal(ranks[0][phase], ranks[1][phase])
    for key in ("train_loss", "val_loss", "best_val", "best_epoch"):
        assert ranks[0]["history"][key] == ranks[1]["history"][key]

    alone = [o for o in tiny_overrides if not o.startswith("run_dir=")]
    alone += [f"run_dir={tmp_path / 'alone'}", *DISTRIBUTED_RUN]
    theta, history = _train_one_process(alone)
    torch.testing.assert_close(ranks[0]["trained"], theta, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ranks[0]["initial"], theta)
    for key in ("train_loss", "val_loss"):
        assert ranks[0]["history"][key] == pytest.approx(history[key], rel=1e-5)
    assert ranks[0]["history"]["best_epoch"] == history["best_epoch"]

    theta, _ = _train_one_process([*alone, "meta.epochs=6"])
    torch.testing.assert_close(ranks[0]["resumed"], theta, rtol=1e-4, atol=1e-6)

    # A share that diverged on one rank makes every rank skip the same update.
    for rank in ranks:
        assert rank["skipped"] == [7]
        assert torch.equal(rank["after_poison"], rank["resumed"])

    assert {Path(p).name for p in ranks[0]["written"]} == {"best.pt", "checkpoint.pt"}
    assert ranks[1]["written"] == []

    # Leaving the group stops its threads: one left running can abort the
    # process at exit, when it releases a tensor after Python has finalised.
    for rank in ranks:
        before, after = rank["native_threads"]
        assert after == before


def test_example_runs_unchanged_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 examples/two_level_quadratic.py`` meta-trains,
    evaluates on both ranks and prints one table, with the numbers of one process.
    """
    from hierarchy.experiment import run

    # Five held-out problems, split 2 and 3 between the ranks.
    overrides = [
        *TINY_QUADRATIC,
        "meta.epochs=2",
        "eval.tasks=5",
        "eval.horizons=[6]",
        "eval.report_steps=[3,6]",
        "levels.0.horizon=6",
        "meta.truncation=3",
    ]
    example = ROOT / "examples" / "two_level_quadratic.py"
    done = _torchrun(example, *overrides, f"run_dir={tmp_path / 'two'}", cwd=tmp_path)

    assert done.stdout.count("\nlearned ") == 1
    assert done.stdout.count("all numbers: ") == 1
    assert (tmp_path / "two" / "curves_default_T6.png").exists()
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    two = results["evaluations"]["default_T6"]

    config_path = ROOT / "configs" / "two_level_quadratic.yaml"
    one_dir = f"run_dir={tmp_path / 'one'}"
    one = run(load_config(config_path, [*overrides, one_dir]))["evaluations"]
    one = one["default_T6"]
    assert two["learning_rates"] == one["learning_rates"]
    for name, curve in one["mean_curves"].items():
        assert two["mean_curves"][name] == pytest.approx(curve, rel=1e-4)


def _worker(out: Path, overrides: list[str]) -> None:
    """One rank of the two-process test: train, save, resume, record its writes."""
    import hierarchy.trainer as trainer_module
    from hierarchy.experiment import build
    from hierarchy.trainer import MetaTrainer

    native_before = _native_threads()
    written = []
    save_atomic = trainer_module.save_atomic

    def recording(payload: dict, path: Path) -> None:
        written.append(str(path))
        save_atomic(payload, path)

    trainer_module.save_atomic = recording
    unrolled = []  # the initial parameters of every batch the trainer starts
    start = trainer_module.start

    def starting(problem, *args, **kwargs):
        unrolled.append(problem.init())
        return start(problem, *args, **kwargs)

    trainer_module.start = starting
    config = load_config(None, [*overrides, *DISTRIBUTED_RUN])
    top, _ = build(config)
    context = Context.current()
    initial = top.rule.theta.detach().clone()
    trainer = MetaTrainer.from_config(top, config)
    history = trainer.train()
    trained = top.rule.theta.detach().clone()
    rank_written = list(written)

    config = load_config(None, [*overrides, *DISTRIBUTED_RUN, "meta.epochs=6"])
    top, _ = build(config)
    trainer = MetaTrainer.from_config(top, config)
    trainer.load()
    trainer.train()
    resumed = top.rule.theta.detach().clone()

    # Problem 8 explodes: only rank 1's share sees it, and both ranks must skip.
    sample = top.below.sample

    def poisoned(batch_size, generator, split, horizon):
        problem = sample(batch_size, generator, split, horizon)
        if split == "train":
            problem.w[8] = float("inf")
        return problem

    top.below.sample = poisoned
    trainer.epochs = 7
    trainer.train()

    out.mkdir(parents=True, exist_ok=True)
    record = {
        "world_size": context.world_size,
        "initial": initial,
        "trained": trained,
        "resumed": resumed,
        "after_poison": top.rule.theta.detach().clone(),
        "skipped": trainer.history.skipped_epochs,
        "history": vars(history),
        "written": rank_written,
        "first_batch": unrolled[0],
    }
    distributed.shutdown()
    record["native_threads"] = (native_before, _native_threads())
    torch.save(record, out / f"rank{context.rank}.pt")


def _native_threads() -> int:
    """Threads of this process that Python did not start: gloo's, among others."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), sys.argv[2:])
