"""Tests for hierarchy.rules: preprocessing, rule shapes and batched weights."""

from __future__ import annotations

import math

import pytest
import torch

from hierarchy.rules import RULES, LSTMRule, MLPRule, UpdateRule, preprocess


def _pair(g: float, p: float = 10.0, dtype=torch.float64) -> tuple[float, float]:
    out = preprocess(torch.tensor([g], dtype=dtype), p)
    assert out.shape == (1, 2)
    return out[0, 0].item(), out[0, 1].item()


def test_preprocess_at_threshold_uses_log_branch() -> None:
    """|g| = e^-p exactly is on the log side: (log|g|/p, sign g) = (-1, +-1)."""
    threshold = math.exp(-10.0)
    first, second = _pair(threshold)
    assert first == pytest.approx(-1.0, abs=1e-12)
    assert second == 1.0
    first, second = _pair(-threshold)
    assert first == pytest.approx(-1.0, abs=1e-12)
    assert second == -1.0


def test_preprocess_at_threshold_in_float32() -> None:
    """The threshold comparison also picks the log branch for float32 inputs."""
    threshold = torch.tensor([math.exp(-10.0)], dtype=torch.float32)
    first, second = preprocess(threshold, 10.0)[0].tolist()
    assert first == pytest.approx(-1.0, abs=1e-6)
    assert second == 1.0


def test_preprocess_just_below_threshold_uses_linear_branch() -> None:
    """Just below e^-p a coordinate becomes (-1, e^p g), continuous at the edge."""
    threshold = math.exp(-10.0)
    below = math.nextafter(threshold, 0.0)
    first, second = _pair(below)
    assert first == -1.0
    assert second == pytest.approx(math.exp(10.0) * below, rel=1e-15)
    assert second == pytest.approx(1.0, abs=1e-12)
    first, second = _pair(-below)
    assert first == -1.0
    assert second == pytest.approx(-math.exp(10.0) * below, rel=1e-15)

    # Well inside the linear branch the value is e^p g, not its sign.
    first, second = _pair(0.5 * threshold)
    assert (first, second) == (-1.0, pytest.approx(0.5, rel=1e-12))


@pytest.mark.parametrize(
    "g, expected",
    [
        (1.0, (0.0, 1.0)),
        (-math.exp(-5.0), (-0.5, -1.0)),
        (0.0, (-1.0, 0.0)),
        (math.exp(3.0), (0.3, 1.0)),
        (-1.0, (0.0, -1.0)),
    ],
)
def test_preprocess_exact_values(g: float, expected: tuple[float, float]) -> None:
    """Known inputs map to their documented (log|g|/p, sign) or (-1, e^p g) pairs."""
    first, second = _pair(g)
    assert first == pytest.approx(expected[0], abs=1e-12)
    assert second == pytest.approx(expected[1], abs=1e-12)


def test_preprocess_respects_p() -> None:
    """p sets both the threshold and the log scale: p=5 at g=e^-5 gives -1."""
    assert _pair(math.exp(-5.0), p=5.0) == (pytest.approx(-1.0), 1.0)
    assert _pair(math.exp(-6.0), p=5.0) == (-1.0, pytest.approx(math.exp(-1.0)))


@pytest.mark.parametrize("shape", [(3,), (2, 5), (2, 3, 4)])
def test_preprocess_shape(shape: tuple[int, ...]) -> None:
    """The output has the input's shape plus a trailing axis of size 2."""
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = preprocess(grad)
    assert out.shape == (*shape, 2)
    assert torch.equal(out[..., 1], torch.sign(grad))  # all |g| >> e^-10


def test_preprocess_gradient_finite_at_zero() -> None:
    """Backpropagating through g = 0 gives a finite gradient (no log(0) leak)."""
    grad = torch.tensor([0.0, 1e-30, 2.0], dtype=torch.float64, requires_grad=True)
    preprocess(grad).sum().backward()
    assert torch.isfinite(grad.grad).all()
    assert grad.grad[0].item() == pytest.approx(math.exp(10.0))


def _rules() -> list[UpdateRule]:
    torch.manual_seed(0)
    return [
        LSTMRule(hidden_size=6, num_layers=2),
        MLPRule(hidden_size=6, num_layers=2, momenta=(0.5, 0.9)),
        MLPRule(hidden_size=5, num_layers=1, momenta=()),
    ]


def _state_shapes(state: tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
    return [tuple(s.shape) for s in state]


@pytest.mark.parametrize("dim", [1, 7, 15910])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["lstm", "mlp", "mlp-stateless"])
def test_rule_shapes_unbatched_and_batched(dim: int, index: int) -> None:
    """Updates are (B, D) and state keeps its shapes for theta (P,) and (B, P)."""
    rule = _rules()[index]
    batch = 3
    generator = torch.Generator().manual_seed(1)
    params = torch.randn(batch, dim, generator=generator)
    grad = torch.randn(batch, dim, generator=generator)
    state = rule.init_state(params)
    shapes = _state_shapes(state)
    for s in state:
        assert s.shape[:2] == (batch, dim)

    update, new_state = rule.update(rule.theta, grad, state)
    assert update.shape == (batch, dim)
    assert _state_shapes(new_state) == shapes

    thetas = torch.randn(batch, rule.num_params, generator=generator)
    update_b, new_state_b = rule.update(thetas, grad, state)
    assert update_b.shape == (batch, dim)
    assert _state_shapes(new_state_b) == shapes
    # Each row of a batched theta acts on its own problem only.
    for b in range(batch):
        row_update, _ = rule.update(thetas[b], grad[b : b + 1], state_row(state, b))
        torch.testing.assert_close(update_b[b : b + 1], row_update)


def state_row(state: tuple[torch.Tensor, ...], b: int) -> tuple[torch.Tensor, ...]:
    """Row b of every state tensor, keeping the batch axis."""
    return tuple(s[b : b + 1] for s in state)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["lstm", "mlp", "mlp-stateless"])
def test_batched_equal_rows_match_unbatched(index: int) -> None:
    """theta repeated over the batch gives the same updates and state as (P,)."""
    rule = _rules()[index]
    generator = torch.Generator().manual_seed(2)
    grad = torch.randn(4, 9, generator=generator) * 10.0 ** torch.randint(
        -6, 2, (4, 9), generator=generator
    )
    state = rule.init_state(grad)
    # Two steps, so that the second one sees a non-zero recurrent state.
    batched = rule.theta.detach().expand(4, -1).clone()
    u1, s1 = rule.update(rule.theta.detach(), grad, state)
    v1, t1 = rule.update(batched, grad, state)
    u2, s2 = rule.update(rule.theta.detach(), grad.flip(0), s1)
    v2, t2 = rule.update(batched, grad.flip(0), t1)
    torch.testing.assert_close(u1, v1)
    torch.testing.assert_close(u2, v2)
    for a, b in zip(s2, t2):
        torch.testing.assert_close(a, b)
    assert all(s.abs().sum() > 0 for s in s1)  # the state did carry something


def test_rule_forward_uses_own_theta() -> None:
    """rule(grad, state) equals rule.update(rule.theta, grad, state)."""
    rule = _rules()[0]
    grad = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    state = rule.init_state(grad)
    expected, _ = rule.update(rule.theta, grad, state)
    torch.testing.assert_close(rule(grad, state)[0], expected)


@pytest.mark.parametrize("kind", sorted(RULES))
def test_flatten_unflatten_round_trip(kind: str) -> None:
    """unflatten splits theta into the declared shapes and flatten inverts it."""
    rule = RULES[kind](hidden_size=4, num_layers=2)
    views = rule.unflatten(rule.theta.detach())
    assert {k: tuple(v.shape) for k, v in views.items()} == rule.shapes
    assert rule.num_params == sum(math.prod(s) for s in rule.shapes.values())
    assert torch.equal(rule.flatten(views), rule.theta.detach())
    batched = torch.arange(2 * rule.num_params, dtype=torch.float32).reshape(2, -1)
    for name, view in rule.unflatten(batched).items():
        assert view.shape == (2, *rule.shapes[name])
    assert torch.equal(rule.flatten(rule.unflatten(batched[1])), batched[1])


def test_lstm_layout_and_forget_bias() -> None:
    """The LSTM has the paper's layer sizes and a forget-gate bias offset of 1."""
    rule = LSTMRule(hidden_size=20, num_layers=2)
    assert rule.shapes["w0"] == (22, 80) and rule.shapes["w1"] == (40, 80)
    assert rule.num_params == 22 * 80 + 80 + 40 * 80 + 80 + 20 + 1
    bound = 1 / math.sqrt(20)
    views = rule.unflatten(rule.theta.detach())
    for layer in range(2):
        bias = views[f"b{layer}"]
        assert (bias[20:40] >= 1 - bound).all() and (bias[20:40] <= 1 + bound).all()
        assert bias[:20].abs().max() <= bound
    assert rule.theta.detach().abs().max() <= 1 + bound


def test_lstm_out_scale_scales_updates() -> None:
    """Doubling out_scale doubles every update, at the same weights."""
    torch.manual_seed(0)
    small = LSTMRule(hidden_size=4, num_layers=1, out_scale=0.1)
    large = LSTMRule(hidden_size=4, num_layers=1, out_scale=0.2)
    grad = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    a, _ = small.update(small.theta, grad, small.init_state(grad))
    b, _ = large.update(small.theta, grad, large.init_state(grad))
    torch.testing.assert_close(2 * a, b)


def test_mlp_state_is_running_average() -> None:
    """MLPRule's state after one step is (1 - decay) g for each decay from zero."""
    rule = MLPRule(hidden_size=4, momenta=(0.5, 0.9))
    grad = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    _, state = rule.update(rule.theta, grad, rule.init_state(grad))
    torch.testing.assert_close(state[0], 0.5 * grad)
    torch.testing.assert_close(state[1], 0.1 * grad)
    _, state = rule.update(rule.theta, grad, state)
    torch.testing.assert_close(state[0], 0.75 * grad)


@pytest.mark.parametrize("kind", sorted(RULES))
def test_rule_config_rebuilds_same_layout(kind: str) -> None:
    """A rule rebuilt from config() has the same kind, shapes and settings."""
    rule = RULES[kind](hidden_size=3, num_layers=1, out_scale=0.5, preprocess_p=7.0)
    rebuilt = RULES[kind](**rule.config())
    assert rebuilt.kind == kind
    assert rebuilt.shapes == rule.shapes
    assert rebuilt.config() == rule.config()


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
@pytest.mark.parametrize("fresh", ["init_state", "inference_state"])
@pytest.mark.parametrize("hidden", [5, 1])
def test_in_place_step_matches_update(kind: str, fresh: str, hidden: int) -> None:
    """``step_`` returns ``update``'s updates and writes its new state in place,
    on state in the training layout and in its own, down to one hidden unit
    (narrower than the two input features)."""
    torch.manual_seed(0)
    rule = RULES[kind](hidden_size=hidden).double()
    grad = torch.randn(2, 9, dtype=torch.float64) * torch.logspace(-6, 1, 9)
    state = rule.init_state(grad)
    in_place = getattr(rule, fresh)(grad)
    for _ in range(3):
        with torch.no_grad():
            expected, new_state = rule.update(rule.theta, grad, state)
            update = rule.step_(rule.theta.detach(), grad, in_place)
        torch.testing.assert_close(update, expected)
        for a, b in zip(in_place, new_state):
            torch.testing.assert_close(a, b)
        state, grad = new_state, grad.roll(1, dims=1)
    if kind == "lstm" and fresh == "inference_state":
        assert in_place[0].permute(2, 0, 1).is_contiguous()


@pytest.mark.parametrize("block", [4, 10**6])
def test_lstm_in_place_step_in_parts_matches_update(block: int, monkeypatch) -> None:
    """The eager in-place LSTM step runs the coordinates of all problems together
    when the state merges them, problem by problem when it does not (a slice of
    coordinates of several problems), and in blocks of coordinates either way:
    every arrangement gives ``update``'s updates and state."""
    import hierarchy.rules as rules

    monkeypatch.setattr(rules, "_EAGER_BLOCK", block)
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=3).double()
    theta = rule.theta.detach()
    grad = torch.randn(3, 11, dtype=torch.float64) * torch.logspace(-6, 1, 11)
    state = tuple(torch.randn_like(s) for s in rule.init_state(grad))
    together = rule.inference_state(grad)
    apart = rule.inference_state(grad)
    for target, value in [*zip(together, state), *zip(apart, state)]:
        target.copy_(value)
    coordinates = slice(2, 9)  # (B, 7, H) views whose problems do not merge
    with torch.no_grad():
        expected, new_state = rule.update(theta, grad, state)
        whole = rule.step_(theta, grad, together)
        sliced_state = tuple(s[:, coordinates] for s in apart)
        part = rule.step_(theta, grad[:, coordinates], sliced_state)
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(part, expected[:, coordinates])
    for merged, sliced, value, old in zip(together, apart, new_state, state):
        torch.testing.assert_close(merged, value)
        torch.testing.assert_close(sliced[:, coordinates], value[:, coordinates])
        assert torch.equal(sliced[:, :2], old[:, :2])  # outside the slice: as was
        assert torch.equal(sliced[:, 9:], old[:, 9:])


def test_only_the_eager_lstm_on_the_cpu_steps_faster_in_place() -> None:
    """Chunked segments' pass without a graph takes step_ where it pays: the
    eager LSTM on the CPU, not its fused kernels, another device or other rules."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    lstm = LSTMRule(hidden_size=4, num_layers=1)
    assert lstm.steps_faster_in_place(cpu)
    assert not lstm.steps_faster_in_place(gpu)
    lstm.compile = True
    assert not lstm.steps_faster_in_place(cpu)
    assert not MLPRule(hidden_size=4).steps_faster_in_place(cpu)
