"""Tests for hierarchy/kernels: the fused LSTM step against the rule's update.

Building the kernel takes about 30 s the first time (torch caches the build);
where no C++ compiler or ninja is found, the tests that need it are skipped with
that reason and the fallback tests still run.
"""

import copy
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hierarchy import kernels
from hierarchy.optim import LearnedOptimizer
from hierarchy.rules import LSTMRule


@pytest.fixture(scope="module")
def kernel():
    module = kernels.lstm_kernels()
    if module is None:
        pytest.skip("the fused LSTM step cannot be built here (no compiler or ninja)")
    return module


def _gradients(batch: int, coordinates: int, seed: int) -> torch.Tensor:
    """Gradients over ten orders of magnitude, with zeros and both signs, so that
    both branches of the preprocessing are taken."""
    generator = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-9, 2, (batch, coordinates), generator=generator)
    grad = torch.randn(batch, coordinates, generator=generator) * scale
    grad[:, ::17] = 0.0
    return grad


@pytest.mark.parametrize(
    ("hidden", "layers", "coordinates"), [(20, 2, 1000), (7, 1, 64), (5, 3, 131)]
)
def test_fused_step_matches_update(kernel, hidden, layers, coordinates) -> None:
    """Over several steps, from a random state, for tile-sized and ragged numbers
    of coordinates and two problems: the kernel's updates and state are the
    plain ``update``'s to float rounding."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=hidden, num_layers=layers)
    fused = LSTMRule(hidden_size=hidden, num_layers=layers)
    fused.load_state_dict(rule.state_dict())
    fused.compile = True
    theta = rule.theta.detach()

    grad = _gradients(2, coordinates, seed=1)
    plain = tuple(torch.randn_like(s) for s in rule.init_state(grad))
    in_place = fused.inference_state(grad)
    for target, value in zip(in_place, plain):
        target.copy_(value)

    for step in range(4):
        grad = _gradients(2, coordinates, seed=10 + step)
        with torch.no_grad():
            expected, plain = rule.update(theta, grad, plain)
            update = fused.step_(theta, grad, in_place)
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-7)
        for ours, theirs in zip(in_place, plain):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_saturated_gates_stay_finite_and_as_accurate_as_torch(kernel) -> None:
    """Weights twenty times too large saturate the gates (clamped exponentials in
    the kernel) and magnify rounding. Measured against the plain update in
    float64, the kernel's error stays within a small multiple of the error of
    torch's own float32 update."""
    torch.manual_seed(0)
    rule = LSTMRule()
    with torch.no_grad():
        rule.theta.mul_(20.0)
    fused = copy.deepcopy(rule)
    fused.compile = True
    exact = copy.deepcopy(rule).double()
    grad = _gradients(1, 300, seed=3) * 1e3
    plain, truth = rule.init_state(grad), exact.init_state(grad.double())
    in_place = fused.inference_state(grad)

    def error(ours: tuple, theirs: tuple) -> float:
        return max((a.double() - b).abs().max().item() for a, b in zip(ours, theirs))

    for _ in range(3):
        with torch.no_grad():
            expected, plain = rule.update(rule.theta, grad, plain)
            correct, truth = exact.update(exact.theta, grad.double(), truth)
            update = fused.step_(fused.theta.detach(), grad, in_place)
        assert torch.isfinite(update).all()
        torch_error = error((expected, *plain), (correct, *truth))
        assert error((update, *in_place), (correct, *truth)) <= 3 * torch_error


def test_compiled_learned_optimizer_follows_the_eager_one(kernel, monkeypatch) -> None:
    """LearnedOptimizer with a compiled rule (the kernel, in chunks) trains a
    model like the eager rule, and its weights follow a change of theta."""
    calls, fused_step = [], kernel.lstm_step
    monkeypatch.setattr(kernel, "lstm_step", lambda *a: calls.append(fused_step(*a)))
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 1))]
    models.append(nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 1)))
    models[1].load_state_dict(models[0].state_dict())
    rule = LSTMRule()
    optimizers = [
        LearnedOptimizer(models[0].parameters(), rule, chunk_size=100),
        LearnedOptimizer(models[1].parameters(), rule, chunk_size=100, compile=True),
    ]
    x = torch.randn(32, 6)
    y = x.sum(dim=1, keepdim=True)

    for step in range(6):
        if step == 3:  # new weights, even through .data, reach the kernel
            for optimizer in optimizers:
                optimizer.rule.theta.data.mul_(0.5)
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(calls) == 6 * 4  # 6 steps of 321 coordinates in chunks of 100


def test_what_the_kernel_cannot_take_runs_the_eager_step(kernel, monkeypatch) -> None:
    """float64, a coordinate-major state and weights per problem fall back."""
    calls = []
    monkeypatch.setattr(kernel, "lstm_step", lambda *args: calls.append(args))
    rule = LSTMRule(hidden_size=4)
    rule.compile = True
    rule._compiled = rule.update  # weights per problem: no torch.compile in a test
    grad = _gradients(2, 30, seed=0)
    with torch.no_grad():
        rule.double().step_(rule.theta, grad.double(), rule.init_state(grad.double()))
        rule.float()
        rule.step_(rule.theta, grad, rule.init_state(grad))
        theta = rule.theta.detach().expand(2, -1)
        rule.step_(theta, grad, rule.inference_state(grad))
        assert calls == []
        rule.step_(rule.theta, grad, rule.inference_state(grad))
    assert len(calls) == 1  # both problems in one call


def test_a_failed_build_warns_once_and_steps_eagerly(monkeypatch, caplog) -> None:
    """Without a compiler the compiled rule's step equals the eager one's."""

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    kernels.lstm_kernels.cache_clear()
    try:
        rule = LSTMRule(hidden_size=4)
        fused = LSTMRule(hidden_size=4)
        fused.load_state_dict(rule.state_dict())
        fused.compile = True
        grad = _gradients(1, 50, seed=2)
        states = [rule.inference_state(grad), fused.inference_state(grad)]
        with caplog.at_level(logging.WARNING), torch.no_grad():
            for _ in range(2):
                expected = rule.step_(rule.theta, grad, states[0])
                update = fused.step_(fused.theta, grad, states[1])
                torch.testing.assert_close(update, expected)
    finally:
        kernels.lstm_kernels.cache_clear()
    warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1
    assert "Ninja is required" in warnings[0].getMessage()


def test_kernel_weights_are_transposed_and_scaled_to_base_two() -> None:
    rule = LSTMRule(hidden_size=3, num_layers=2)
    weights = rule.unflatten(rule.theta.detach())
    matrices, biases, head, head_bias = kernels.kernel_weights(weights, 2, 3)
    log2e = math.log2(math.e)
    scale = torch.tensor([-log2e] * 6 + [-2 * log2e] * 3 + [-log2e] * 3)
    assert [tuple(m.shape) for m in matrices] == [(12, 5), (12, 6)]
    torch.testing.assert_close(matrices[1], weights["w1"].T * scale[:, None])
    torch.testing.assert_close(biases[0], weights["b0"] * scale)
    torch.testing.assert_close(head, weights["w_out"].reshape(-1))
    assert head_bias == weights["b_out"].item()


def test_the_kernel_guards_state_as_an_in_place_op_would(kernel) -> None:
    """A state made under inference_mode cannot be stepped outside it (as in
    eager torch), and a stepped state's version counter moves."""
    rule = LSTMRule(hidden_size=4)
    rule.compile = True
    grad = _gradients(1, 100, seed=4)
    with torch.inference_mode():
        frozen = rule.inference_state(grad)
        rule.step_(rule.theta.detach(), grad, frozen)
    with torch.no_grad(), pytest.raises(RuntimeError, match="inference_mode"):
        rule.step_(rule.theta, grad, frozen)

    state = rule.inference_state(grad)
    before = [s._version for s in state]
    with torch.no_grad():
        rule.step_(rule.theta, grad, state)
    assert all(s._version > v for s, v in zip(state, before))


def test_build_errors_are_summarised_by_their_telling_line() -> None:
    message = (
        "Error building extension 'x': [1/2] c++ -MMD -MF lstm_step.o.d -O3 -c a.cpp\n"
        "FAILED: lstm_step.o\n/bin/sh: 1: c++: not found\nninja: build stopped"
    )
    assert kernels._cause(message) == "/bin/sh: 1: c++: not found"
    assert kernels._cause("Ninja is required to load C++ extensions") == (
        "Ninja is required to load C++ extensions"
    )


def test_a_non_contiguous_gradient_gives_the_eager_step(kernel) -> None:
    rule = LSTMRule(hidden_size=6)
    grad = _gradients(130, 2, seed=5).T  # (2, 130), columns contiguous
    states = [rule.inference_state(grad), rule.inference_state(grad)]
    with torch.no_grad():
        expected = rule.step_(rule.theta, grad, states[0])
        rule.compile = True
        update = rule.step_(rule.theta, grad, states[1])
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-7)


def _unroll_gradients(rule: LSTMRule, grads: list, state: tuple, fused: bool):
    """Updates over a few steps, then the gradient of a random functional of the
    updates and the last state in theta, the first state and each gradient."""
    theta, start = rule.theta, state
    step = rule._fused_update if fused else rule.update
    total = 0.0
    for grad in grads:
        update, state = step(theta, grad, state)
        total = total + (update * torch.cos(grad * 1e3)).sum()
    total = total + sum((s * (k + 1)).sin().sum() for k, s in enumerate(state))
    return update, state, torch.autograd.grad(total, (theta, *grads, *start))


@pytest.mark.parametrize(
    ("batch", "hidden", "layers", "coordinates"),
    [(1, 20, 2, 1000), (3, 7, 1, 16), (2, 5, 3, 13), (1, 1, 2, 5), (1, 4, 2, 1)],
)
def test_fused_training_step_matches_update(
    kernel, batch, hidden, layers, coordinates
) -> None:
    """The fused training step's updates, state, and gradients in theta, in the
    gradient it reads (a second-order unroll) and in the starting state, over
    three steps, are the plain ``update``'s to float rounding. Weights 3x their
    initial scale saturate some gates."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=hidden, num_layers=layers)
    with torch.no_grad():
        rule.theta.mul_(3.0)
    grads = [
        _gradients(batch, coordinates, seed=20 + k).requires_grad_(True)
        for k in range(3)
    ]
    start = tuple(
        (torch.randn(batch, coordinates, hidden) * 0.5).requires_grad_(True)
        for _ in range(2 * layers)
    )

    plain = _unroll_gradients(rule, grads, start, fused=False)
    fused = _unroll_gradients(rule, grads, start, fused=True)

    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(fused[1], plain[1]):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(fused[2], plain[2]):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)


def test_fused_training_step_state_layout(kernel) -> None:
    """The new state is (B, D, H) views of (H, B * D) rows that start on whole
    16-float vectors, which the next step reads without a copy; a plain (B, D, H)
    state is accepted too."""
    rule = LSTMRule(hidden_size=4)
    grad = torch.randn(2, 9)
    with torch.no_grad():
        _, state = rule._fused_update(rule.theta, grad, rule.init_state(grad))
        assert state[0].shape == (2, 9, 4)
        assert state[0].permute(2, 0, 1).stride() == (32, 9, 1)  # 18 rounded up
        assert all(s.data_ptr() % 64 == 0 for s in state)
        expected, _ = rule.update(rule.theta, grad, tuple(s.clone() for s in state))
        update, _ = rule._fused_update(rule.theta, grad, state)
    torch.testing.assert_close(update, expected)


def test_fused_training_step_of_no_problems_has_zero_gradients(kernel) -> None:
    """A batch of no problems steps and differentiates to a zero gradient in
    theta and empty ones in the state, where it once divided by zero in C++."""
    rule = LSTMRule(hidden_size=4, num_layers=1)
    theta = rule.theta.detach().clone().requires_grad_(True)
    state = [torch.zeros(0, 5, 4, requires_grad=True) for _ in range(2)]
    out = kernels.LSTMTrainStep.apply(
        kernel, 0.1, 10.0, theta, torch.zeros(1, 0), *state
    )
    assert out[0].shape == (0, 5) and out[1].shape == (0, 5, 4)
    (out[0].sum() + out[1].sum()).backward()
    assert torch.equal(theta.grad, torch.zeros_like(theta))
    assert state[0].grad.shape == (0, 5, 4)


def test_fused_training_step_names_a_theta_that_does_not_fit(kernel) -> None:
    """A state whose hidden size is not the weights' gets one line that gives
    theta's expected length, not an error from inside the kernel."""
    theta = LSTMRule(hidden_size=4, num_layers=1).theta.detach()
    state = [torch.zeros(2, 5, 3) for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"contiguous float32 \(76,\) tensor"):
        kernels.LSTMTrainStep.apply(
            kernel, 0.1, 10.0, theta, torch.zeros(1, 10), *state
        )


def test_fused_training_step_names_bad_features_and_theta_types(kernel) -> None:
    """Features of the wrong rank or width and a theta of another dtype, given
    to the autograd Function directly, get one line naming the value and what
    fits."""
    theta = LSTMRule(hidden_size=4, num_layers=1).theta.detach()
    state = [torch.zeros(2, 5, 4) for _ in range(2)]
    cases = [
        (theta, torch.zeros(10), r"B \* D = 10 columns.*not \[10\]"),
        (theta, torch.zeros(1, 7), r"B \* D = 10 columns.*not \[1, 7\]"),
        (
            theta,
            torch.zeros(3, 10),
            r"\(2, n\) preprocessed or \(1, n\) raw.*\[3, 10\]",
        ),
        (theta.double(), torch.zeros(1, 10), r"float32 \(117,\) tensor.*not Double"),
    ]
    for weights, features, message in cases:
        with pytest.raises(RuntimeError, match=message):
            kernels.LSTMTrainStep.apply(kernel, 0.1, 10.0, weights, features, *state)


def test_fused_training_step_refuses_a_state_of_another_shape(kernel) -> None:
    """A state that is not (B, D, H) for the gradient's (B, D), even with as many
    coordinates, gets the eager update's error; layers of different shapes get
    the kernel's one line naming both."""
    rule = LSTMRule(hidden_size=3, num_layers=2)
    rule.compile = True
    grad = torch.randn(2, 6)
    transposed = tuple(torch.zeros(6, 2, 3) for _ in range(4))
    with pytest.raises(RuntimeError) as eager:
        rule.update(rule.theta, grad, transposed)
    with pytest.raises(RuntimeError) as fused:
        rule.step(rule.theta, grad, transposed)
    assert str(fused.value) == str(eager.value)

    mixed = (*rule.init_state(grad)[:2], torch.zeros(6, 2, 3), torch.zeros(6, 2, 3))
    with pytest.raises(RuntimeError, match="every state tensor must be"):
        kernels.LSTMTrainStep.apply(
            kernel, 0.1, 10.0, rule.theta, grad.reshape(1, -1), *mixed
        )


def test_fused_training_step_differentiates_saturated_cells_like_torch(kernel) -> None:
    """Where tanh(c') rounds to about 1, its derivative 1 - tanh^2 is below float
    rounding. The fused backward's gradient of the starting cell stays within
    two float32 spacings at 1 of float64's there (torch's own, within one), and
    never takes the wrong sign (an approximate tanh an ulp past -1 once did, and
    tanh(c') read back as h' / o once did both)."""
    for seed in range(5):
        torch.manual_seed(seed)
        rule = LSTMRule(hidden_size=1, num_layers=1)
        exact = copy.deepcopy(rule).double()
        grad = torch.randn(1, 4096)
        for start in (20.0, 10.0, -9.0, -20.0):
            gradients = {}
            for name, step, theta, dtype in (
                ("fused", rule._fused_update, rule.theta, torch.float32),
                ("exact", exact.update, exact.theta, torch.float64),
            ):
                shape = (1, 4096, 1)
                cell = torch.full(shape, start, dtype=dtype, requires_grad=True)
                hidden = torch.zeros(shape, dtype=dtype)
                _, (h, _) = step(theta, grad.to(dtype), (hidden, cell))
                gradients[name] = torch.autograd.grad(h.sum(), cell)[0].double()
            fused, truth = gradients["fused"], gradients["exact"]
            assert (fused - truth).abs().max() <= 2 * torch.finfo().eps, (seed, start)
            assert (fused * truth >= 0).all(), (seed, start)


@pytest.mark.parametrize("coordinates", [1, 37])
def test_fused_training_step_takes_any_state_layout(kernel, coordinates) -> None:
    """Broadcast, transposed and single-coordinate states, and the broadcast
    gradient of a plain sum, give the plain rule's values and gradients."""
    torch.manual_seed(1)
    rule = LSTMRule(hidden_size=5)
    grad = torch.randn(1, coordinates)
    layouts = {
        "broadcast units": lambda: torch.randn(1, coordinates, 1).expand(-1, -1, 5),
        "broadcast coordinates": lambda: torch.randn(1, 1, 5).expand(
            -1, coordinates, -1
        ),
        "transposed": lambda: torch.randn(1, 5, coordinates).mT,
    }
    for name, make in layouts.items():
        state = tuple(make().requires_grad_(True) for _ in range(4))
        results = []
        for step in (rule.update, rule._fused_update):
            update, new = step(rule.theta, grad, state)
            loss = update.sum() + sum(s.sum() for s in new)
            results.append((update, *torch.autograd.grad(loss, (rule.theta, *state))))
        for ours, theirs in zip(results[1], results[0]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_training_step_preprocesses_like_torch(kernel) -> None:
    """A gradient without a graph is preprocessed inside the kernel: zeros, values
    either side of the threshold e^-p, denormals, the largest floats, infinities
    and NaN give the plain rule's updates, state and meta-gradient."""
    torch.manual_seed(2)
    rule = LSTMRule(hidden_size=6)
    edge = math.exp(-10.0)
    special = [0.0, -0.0, 1e-30, edge, -edge, edge * (1 - 1e-7), edge * (1 + 1e-7)]
    special += [1e-40, 3e38, -3e38, math.inf, -math.inf, math.nan, 1.0, -0.5, 7e4]
    spread = torch.randn(2000) * torch.logspace(-12, 4, 2000)
    grad = torch.cat([torch.tensor(special), spread]).unsqueeze(0)
    results = []
    for step in (rule.update, rule._fused_update):
        update, state = step(rule.theta, grad, rule.init_state(grad))
        finite = torch.isfinite(update)
        loss = update[finite].sum() + sum(s[finite].sum() for s in state)
        (meta_grad,) = torch.autograd.grad(loss, rule.theta)
        results.append((update, *state, meta_grad))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_fused_training_step_applies_only_where_it_can(kernel) -> None:
    """float64, weights per problem, or no coordinates: the caller's fallback."""
    rule = LSTMRule(hidden_size=4)
    grad = torch.randn(2, 5)
    state = rule.init_state(grad)
    assert rule._fused_update(rule.theta, grad, state) is not None
    assert rule._fused_update(rule.theta.expand(2, -1), grad, state) is None
    double = LSTMRule(hidden_size=4).double()
    assert (
        double._fused_update(
            double.theta, grad.double(), double.init_state(grad.double())
        )
        is None
    )
    strided = torch.stack([rule.theta.detach()] * 2, dim=1)[:, 0]
    assert rule._fused_update(strided, grad, state) is None
    empty = torch.zeros(2, 0)
    assert rule._fused_update(rule.theta, empty, rule.init_state(empty)) is None


def test_fused_training_step_is_differentiable_once_only(kernel) -> None:
    """Its backward is hand-written: differentiating it again is refused with
    torch's message, not answered with a wrong number."""
    rule = LSTMRule(hidden_size=3)
    grad = torch.randn(1, 6)
    update, _ = rule._fused_update(rule.theta, grad, rule.init_state(grad))
    (meta_grad,) = torch.autograd.grad(
        update.pow(2).sum(), rule.theta, create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        meta_grad.sum().backward()


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
THREE_LEVELS = [
    "levels.0.horizon=3",
    "levels.0.meta_batch=2",
    "levels.1.horizon=4",
    "meta.truncation=2",
    "meta.meta_batch=2",
]


@pytest.mark.parametrize(
    ("option", "overrides"),
    [
        ("plain", []),
        ("rule", ["levels.0.rule.checkpoint=true"]),
        ("segments", ["meta.checkpoint_steps=2"]),
        ("higher", ["levels.0.mode=higher"]),
        ("three levels", THREE_LEVELS),
    ],
)
def test_compiled_rule_trains_like_the_plain_one(
    kernel, tiny_config, tmp_path, option, overrides
) -> None:
    """Meta-training with the fused step (``compile`` on the top rule) takes the
    plain rule's steps to float rounding: alone, with the rule's activations or
    whole segments recomputed in backward, in a second-order unroll, and as the
    LSTM on top of three levels (the MLP below runs per-problem weights)."""
    from hierarchy.config import load_config
    from hierarchy.experiment import build
    from hierarchy.trainer import MetaTrainer

    top_rule = "levels.1.rule" if option == "three levels" else "levels.0.rule"
    thetas = []
    for compiled in ([], [f"{top_rule}.compile=true"]):
        if option == "three levels":
            config = load_config(
                CONFIGS / "three_level_quadratic.yaml",
                [*overrides, *compiled, f"run_dir={tmp_path}", "wandb.mode=disabled"],
            )
        else:
            config = tiny_config(*overrides, *compiled)
        top, _ = build(config)
        trainer = MetaTrainer.from_config(top, config)
        for _ in range(3):
            trainer.train_epoch()
        thetas.append(top.rule.theta.detach().clone())
    torch.testing.assert_close(thetas[1], thetas[0], rtol=1e-5, atol=1e-6)


def test_loading_the_kernels_does_not_warn_of_a_missing_cuda_runtime(tmp_path):
    """torch warns, on importing its extension loader, when a CUDA folder exists
    but no GPU does; the kernels are for the CPU, so their import keeps quiet."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}

    def stderr_of(code: str) -> str:
        command = [sys.executable, "-c", f"import logging; {code}"]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stderr

    plain = stderr_of("import torch.utils.cpp_extension")
    assert "No CUDA runtime" in plain  # the setting makes torch warn
    ours = stderr_of(
        "logging.basicConfig(); from hierarchy.kernels import _cpp_extension; "
        "_cpp_extension()"
    )
    assert "No CUDA runtime" not in ours
