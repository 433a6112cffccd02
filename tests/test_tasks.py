"""Tests for tasks.quadratic and tasks.mnist: losses, layouts, splits, seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rows_match
from torch import nn

from hierarchy import kernels
from tasks.mnist import MLPProblem, MNISTTask
from tasks.quadratic import QuadraticTask

N_TRAIN, N_TEST = 50, 13


def _images(seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.rand(N_TRAIN, 784, generator=generator),
        torch.randint(10, (N_TRAIN,), generator=generator),
        torch.rand(N_TEST, 784, generator=generator),
        torch.randint(10, (N_TEST,), generator=generator),
    )


def _task(**kwargs) -> MNISTTask:
    return MNISTTask(*_images(), **kwargs)


def test_quadratic_loss_is_squared_residual() -> None:
    """QuadraticProblem.loss(x) is ||W x - y||^2 for each problem of the batch."""
    task = QuadraticTask(4)
    problem = task.sample(3, torch.Generator().manual_seed(0), "train", 10)
    assert problem.w.shape == (3, 4, 4) and problem.y.shape == (3, 4)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    expected = torch.stack(
        [(problem.w[b] @ x[b] - problem.y[b]).pow(2).sum() for b in range(3)]
    )
    torch.testing.assert_close(problem.loss(x, 0), expected)
    assert torch.equal(problem.loss(x, 0), problem.loss(x, 7))  # no step dependence


def test_quadratic_init_is_a_fresh_copy() -> None:
    """init() returns x0 each time; changing the result leaves the problem alone."""
    problem = QuadraticTask(3).sample(2, torch.Generator().manual_seed(0), "train", 1)
    x = problem.init()
    x.add_(5.0)
    assert torch.equal(problem.init(), problem.x0)
    assert not torch.equal(x, problem.x0)


def test_quadratic_seeded_sampling() -> None:
    """The same seed draws the same quadratics; another seed draws others."""
    task = QuadraticTask(3)
    a, b, c = (
        task.sample(2, torch.Generator().manual_seed(s), "test", 5) for s in (0, 0, 1)
    )
    for name in ("w", "y", "x0"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))


def test_quadratic_rejects_bad_dim() -> None:
    """A dimension below 1 is refused."""
    with pytest.raises(ValueError, match="dim"):
        QuadraticTask(0)


def test_mnist_dim_for_paper_network() -> None:
    """One hidden layer of 20 units has 784*20+20 + 20*10+10 = 15910 parameters."""
    assert _task(hidden=(20,)).dim == 15910
    assert _task(hidden=(20, 20)).dim == 15910 + 20 * 20 + 20
    assert _task(hidden=(4,)).dim == 784 * 4 + 4 + 4 * 10 + 10


def _sequential(task: MNISTTask, params: torch.Tensor, act: nn.Module) -> nn.Sequential:
    """An nn.Sequential holding one network's weights, built independently."""
    layers, offset = [], 0
    for fan_in, fan_out in task.layers:
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            weight = params[offset : offset + fan_in * fan_out]
            linear.weight.copy_(weight.reshape(fan_in, fan_out).T)
            offset += fan_in * fan_out
            linear.bias.copy_(params[offset : offset + fan_out])
            offset += fan_out
        layers += [linear, act]
    assert offset == len(params)
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize(
    "hidden, activation, act",
    [
        ((20,), "sigmoid", nn.Sigmoid()),
        ((20, 20), "sigmoid", nn.Sigmoid()),
        ((20,), "relu", nn.ReLU()),
        ((20, 20), "relu", nn.ReLU()),
        ((20,), "tanh", nn.Tanh()),
    ],
)
def test_mnist_forward_matches_sequential(hidden, activation, act) -> None:
    """The batched forward on flat params equals nn.Sequential with those weights."""
    task = _task(hidden=hidden, activation=activation)
    generator = torch.Generator().manual_seed(0)
    params = task.init_params(3, generator)
    assert params.shape == (3, task.dim)
    x = torch.rand(3, 6, 784, generator=generator)
    logits = task.forward(params, x)
    assert logits.shape == (3, 6, 10)
    for b in range(3):
        expected = _sequential(task, params[b], act)(x[b])
        torch.testing.assert_close(logits[b], expected, rtol=1e-5, atol=1e-5)


def test_mnist_loss_is_cross_entropy_on_step_minibatch() -> None:
    """loss(params, step) is the mean cross-entropy on that step's minibatch."""
    task = _task(hidden=(5,), batch_size=7)
    problem = task.sample(2, torch.Generator().manual_seed(0), "train", 4)
    assert problem.batches.shape == (5, 2, 7)
    params = problem.init()
    for step in (0, 3):
        loss = problem.loss(params, step)
        for b in range(2):
            index = problem.batches[step, b]
            logits = task.forward(params[b : b + 1], task.data["train"][0][index][None])
            expected = F.cross_entropy(logits[0], task.data["train"][1][index])
            torch.testing.assert_close(loss[b], expected)
    assert not torch.equal(problem.loss(params, 0), problem.loss(params, 1))


@pytest.fixture(params=["eager", "compiled"])
def value_and_grad_path(request, monkeypatch):
    """How MLPProblem.value_and_grad runs: by torch calls from Python, or by the
    built kernels' ``mlp_value_and_grad``; returns the calls of the one taken."""
    calls = []

    def counted(function):
        def run(*args):
            calls.append(args)
            return function(*args)

        return run

    if request.param == "eager":
        monkeypatch.setattr(kernels, "built", lambda: None)
        eager = MLPProblem.value_and_grad_eager
        monkeypatch.setattr(MLPProblem, "value_and_grad_eager", counted(eager))
        return calls
    module = kernels.lstm_kernels()
    if module is None:
        pytest.skip("the fused kernels cannot be built here (no compiler or ninja)")
    monkeypatch.setattr(
        module, "mlp_value_and_grad", counted(module.mlp_value_and_grad)
    )
    return calls


@pytest.mark.parametrize(
    "hidden, activation",
    [
        ((5,), "sigmoid"),
        ((5, 4), "sigmoid"),
        ((5, 4), "relu"),
        ((5,), "tanh"),
        ((), "sigmoid"),
    ],
)
def test_mnist_value_and_grad_is_autograds_to_the_bit(
    hidden, activation, value_and_grad_path
) -> None:
    """The hand-written backpropagation, from Python and from C++, gives
    autograd's loss and gradient bit for bit, for the whole batch and for
    selected and repeated problems, and for a linear classifier (no hidden
    layer)."""
    task = _task(hidden=hidden, activation=activation, batch_size=7)
    problem = task.sample(3, torch.Generator().manual_seed(0), "train", 4)
    generator = torch.Generator().manual_seed(1)
    for case in (problem, problem.select(slice(1, 3)), problem.repeat(2)):
        params = case.init() + 0.3 * torch.randn(case.init().shape, generator=generator)
        for step in (0, 2, -1, 9, 2**63):  # steps wrap round the 5 minibatches
            leaf = params.clone().requires_grad_(True)
            expected = case.loss(leaf, step)
            (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
            loss, grad = case.value_and_grad(params.requires_grad_(step > 0), step)
            assert not loss.requires_grad and not grad.requires_grad
            assert torch.equal(loss, expected.detach())
            assert torch.equal(grad, expected_grad)
    assert len(value_and_grad_path) == 3 * 5


def test_value_and_grad_does_not_build_the_kernels(monkeypatch) -> None:
    """Where no rule has built the kernels, value_and_grad runs from Python: it
    neither starts a build nor warns that one failed."""

    def refuse(*args, **kwargs):
        raise AssertionError("value_and_grad started a build")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", refuse)
    kernels.lstm_kernels.cache_clear()
    try:
        assert kernels.built() is None
        problem = _task(hidden=(3,)).sample(2, torch.Generator(), "train", 2)
        loss, grad = problem.value_and_grad(problem.init(), 0)
        assert loss.shape == (2,) and grad.shape == problem.init().shape
    finally:
        kernels.lstm_kernels.cache_clear()


def test_mnist_test_split_uses_test_images_only() -> None:
    """Problems of split 'test' see test images only; train and val never do."""
    train_x, train_y, test_x, test_y = _images()
    poisoned = MNISTTask(
        torch.full_like(train_x, float("nan")),
        train_y,
        test_x,
        test_y,
        hidden=(4,),
        batch_size=8,
    )
    test_problem = poisoned.sample(3, torch.Generator().manual_seed(0), "test", 20)
    assert test_problem.images is poisoned.data["test"][0]
    assert int(test_problem.batches.max()) < N_TEST
    for step in range(21):
        assert torch.isfinite(test_problem.loss(test_problem.init(), step)).all()
    for split in ("train", "val"):
        problem = poisoned.sample(3, torch.Generator().manual_seed(0), split, 20)
        assert torch.isnan(problem.loss(problem.init(), 0)).all()

    # And the other way round: train problems never touch the test images.
    clean = MNISTTask(
        train_x,
        train_y,
        torch.full_like(test_x, float("nan")),
        test_y,
        hidden=(4,),
        batch_size=8,
    )
    problem = clean.sample(3, torch.Generator().manual_seed(0), "train", 20)
    for step in range(21):
        assert torch.isfinite(problem.loss(problem.init(), step)).all()


def test_mnist_same_seed_same_init_and_minibatches() -> None:
    """One seed gives identical init and minibatch indices; another differs."""
    task = _task(hidden=(4,), batch_size=8)
    a, b, c = (
        task.sample(2, torch.Generator().manual_seed(s), "train", 6) for s in (3, 3, 4)
    )
    assert torch.equal(a.init(), b.init()) and torch.equal(a.batches, b.batches)
    assert not torch.equal(a.init(), c.init())
    assert not torch.equal(a.batches, c.batches)
    # Problems within one batch differ from each other.
    assert not torch.equal(a.init()[0], a.init()[1])
    assert not torch.equal(a.batches[:, 0], a.batches[:, 1])


def test_mnist_init_bounds_like_linear() -> None:
    """Initial weights lie in U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer."""
    task = _task(hidden=(20,))
    params = task.init_params(2, torch.Generator().manual_seed(0))
    first = params[:, : 784 * 20 + 20]
    second = params[:, 784 * 20 + 20 :]
    assert first.abs().max() <= 784**-0.5 and first.abs().max() > 0.9 * 784**-0.5
    assert second.abs().max() <= 20**-0.5 and second.abs().max() > 0.9 * 20**-0.5


def test_mnist_rejects_bad_arguments() -> None:
    """Unknown activations and non-positive sizes are refused."""
    with pytest.raises(ValueError, match="swish"):
        _task(activation="swish")
    with pytest.raises(ValueError, match="positive"):
        _task(batch_size=0)
    with pytest.raises(ValueError, match="positive"):
        _task(hidden=(0,))


def test_mnist_build_task_from_idx_root(idx_root) -> None:
    """experiment.build_task with task.data_root uses the IDX files under it."""
    from hierarchy.config import load_config
    from hierarchy.experiment import build_task

    root, arrays = idx_root
    config = load_config(
        None,
        [
            "task.name=mnist",
            f"task.data_root={root}",
            "task.hidden=[4]",
            "task.batch_size=5",
        ],
    )
    task = build_task(config.task, torch.device("cpu"))
    assert isinstance(task, MNISTTask) and task.dim == 784 * 4 + 4 + 50
    for split in ("train", "test"):
        images, labels = task.data[split]
        expected = torch.from_numpy(arrays[f"{split}_images"]).reshape(-1, 784)
        torch.testing.assert_close(images, expected.float() / 255.0, rtol=0, atol=0)
        assert torch.equal(labels, torch.from_numpy(arrays[f"{split}_labels"]).long())
    problem = task.sample(2, torch.Generator().manual_seed(0), "test", 3)
    assert problem.images.shape == (len(arrays["test_images"]), 784)


@pytest.mark.parametrize("task", [QuadraticTask(3), _task(hidden=(4,), batch_size=5)])
def test_selected_rows_are_those_problems_of_the_batch(task) -> None:
    """A share of a batch (for one process of several) keeps its problems' data."""
    problem = task.sample(6, torch.Generator().manual_seed(1), "train", 4)
    for rows in (slice(0, 3), slice(3, 6), slice(2, 5)):
        assert_rows_match(problem, rows)
