"""Tests for hierarchy/optim.py: a rule used as a torch.optim.Optimizer."""

import math

import pytest
import torch
from torch import nn

from hierarchy.baselines import Adam
from hierarchy.optim import LearnedOptimizer
from hierarchy.rules import LSTMRule


def _regression() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=generator)
    return x, x @ torch.randn(5, 1, generator=generator)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))


def test_hand_adam_through_learned_optimizer_matches_torch_adam() -> None:
    """The Adam rule run by LearnedOptimizer equals torch.optim.Adam step for step."""
    x, y = _regression()
    ours, reference = _model(), _model()
    optimizer = LearnedOptimizer(ours.parameters(), Adam(0.05))
    torch_adam = torch.optim.Adam(reference.parameters(), lr=0.05)

    for _ in range(10):
        for model, opt in ((ours, optimizer), (reference, torch_adam)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    for a, b in zip(ours.parameters(), reference.parameters()):
        # The rule stores log(lr) in float32, so rates differ in the last bits.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_continues_identically() -> None:
    """Saving and loading the recurrent state continues bit-identically."""
    x, y = _regression()
    rule = LSTMRule(hidden_size=6, num_layers=2)

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        return closure

    straight = _model()
    opt = LearnedOptimizer(straight.parameters(), rule)
    for _ in range(6):
        opt.step(closure_for(straight, opt))

    first = _model()
    opt_first = LearnedOptimizer(first.parameters(), rule)
    for _ in range(3):
        opt_first.step(closure_for(first, opt_first))
    saved_model, saved_opt = first.state_dict(), opt_first.state_dict()

    second = _model()
    second.load_state_dict(saved_model)
    opt_second = LearnedOptimizer(second.parameters(), rule)
    opt_second.load_state_dict(saved_opt)
    for _ in range(3):
        opt_second.step(closure_for(second, opt_second))

    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)
    state = opt_second.state[next(second.parameters())]["rule_state"]
    assert len(state) == 4 and state[0].shape == (1, 8 * 5, 6)


def test_parameters_without_gradient_are_left_alone() -> None:
    """A parameter whose grad is None is neither updated nor given state."""
    model = _model()
    frozen = model[0].weight
    before = frozen.detach().clone()
    optimizer = LearnedOptimizer(model.parameters(), LSTMRule(hidden_size=4))
    x, y = _regression()
    ((model(x) - y) ** 2).mean().backward()
    frozen.grad = None
    optimizer.step()
    assert torch.equal(frozen, before)
    assert frozen not in optimizer.state
    assert not torch.equal(model[2].weight.grad, torch.zeros_like(model[2].weight))
    assert len(optimizer.state) == 3


def test_groups_apply_their_own_scale_and_stay_coordinatewise() -> None:
    """A group's scale multiplies its updates; splitting groups changes nothing else."""
    x, y = _regression()
    rule = LSTMRule(hidden_size=5)
    one, two = _model(), _model()
    whole = LearnedOptimizer(one.parameters(), rule)
    split = LearnedOptimizer(
        [
            {"params": two[0].parameters()},
            {"params": two[2].parameters(), "scale": 0.5},
        ],
        rule,
    )
    before = [p.detach().clone() for p in one.parameters()]
    for model, optimizer in ((one, whole), (two, split)):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()

    deltas_one = [p - b for p, b in zip(one.parameters(), before)]
    deltas_two = [p - b for p, b in zip(two.parameters(), before)]
    for k, (a, b) in enumerate(zip(deltas_one, deltas_two)):
        factor = 1.0 if k < 2 else 0.5
        torch.testing.assert_close(b, factor * a, rtol=1e-5, atol=1e-7)
        assert not torch.equal(a, torch.zeros_like(a))
    assert [g["scale"] for g in split.param_groups] == [1.0, 0.5]


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_is_refused(scale: float) -> None:
    with pytest.raises(ValueError, match=f"scale must be a positive finite.*{scale}"):
        LearnedOptimizer(_model().parameters(), LSTMRule(hidden_size=2), scale=scale)


def test_bad_scale_in_a_group_and_a_non_rule_are_refused() -> None:
    model = _model()
    with pytest.raises(TypeError, match="scale must be a number, got str"):
        LearnedOptimizer(
            [{"params": model.parameters(), "scale": "1"}], LSTMRule(hidden_size=2)
        )
    with pytest.raises(TypeError, match="got Adam"):
        LearnedOptimizer(model.parameters(), torch.optim.Adam(model.parameters()))


def test_parameters_of_any_shape_get_state_of_their_own() -> None:
    """Scalars, vectors and conv kernels are updated; each keeps (1, n, H) state."""
    scalar = nn.Parameter(torch.tensor(2.0))
    conv = nn.Conv2d(2, 3, kernel_size=3)
    params = [scalar, *conv.parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = LearnedOptimizer(params, LSTMRule(hidden_size=4, num_layers=1))
    images = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        optimizer.zero_grad()
        (scalar * conv(images)).pow(2).mean().backward()
        optimizer.step()

    for p, b in zip(params, before):
        assert p.shape == b.shape and not torch.equal(p, b)
        h, c = optimizer.state[p]["rule_state"]
        assert h.shape == c.shape == (1, p.numel(), 4)
        assert h.grad_fn is None and not h.requires_grad
    assert optimizer.rule.theta.grad is None


def test_rule_state_follows_the_parameters_device_and_dtype() -> None:
    """State is made on the parameters' device and in their dtype (float64 here).

    The meta device stands in for CUDA: a tensor left on the CPU would show.
    """
    meta = nn.Parameter(torch.empty(3, 4, device="meta"))
    meta.grad = torch.empty(3, 4, device="meta")
    optimizer = LearnedOptimizer([meta], LSTMRule(hidden_size=3))
    optimizer.step()
    assert {s.device.type for s in optimizer.state[meta]["rule_state"]} == {"meta"}

    double = nn.Parameter(torch.randn(5, dtype=torch.float64))
    double.grad = torch.randn(5, dtype=torch.float64)
    optimizer = LearnedOptimizer([double], LSTMRule(hidden_size=3))
    optimizer.step()
    assert double.dtype == torch.float64
    assert {s.dtype for s in optimizer.state[double]["rule_state"]} == {torch.float64}


def test_low_precision_parameters_run_the_rule_in_float32() -> None:
    """bfloat16 parameters keep their dtype; the rule sees float32 gradients."""
    rule = LSTMRule(hidden_size=3)
    half = nn.Parameter(torch.randn(6).to(torch.bfloat16))
    half.grad = torch.randn(6).to(torch.bfloat16)
    full = nn.Parameter(half.detach().float().clone())
    full.grad = half.grad.float()
    for p in (half, full):
        LearnedOptimizer([p], rule).step()
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full.to(torch.bfloat16).float())


def test_loaded_state_moves_to_the_parameters_device() -> None:
    """A state saved on the CPU loads onto parameters elsewhere (meta here)."""
    rule = LSTMRule(hidden_size=3)
    cpu = nn.Parameter(torch.randn(3, 4))
    cpu.grad = torch.randn(3, 4)
    saving = LearnedOptimizer([cpu], rule)
    saving.step()

    meta = nn.Parameter(torch.empty(3, 4, device="meta"))
    loading = LearnedOptimizer([meta], rule)
    loading.load_state_dict(saving.state_dict())
    assert {s.device.type for s in loading.state[meta]["rule_state"]} == {"meta"}


def test_state_written_under_another_rule_is_refused() -> None:
    model = _model()
    x, y = _regression()
    optimizer = LearnedOptimizer(model.parameters(), LSTMRule(hidden_size=4))
    ((model(x) - y) ** 2).mean().backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert state["rule"]["kind"] == "lstm"

    other = LearnedOptimizer(model.parameters(), LSTMRule(hidden_size=4))
    with pytest.raises(ValueError, match="written under a 'lstm' rule"):
        other.load_state_dict(state)


def test_sparse_gradients_are_refused() -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    optimizer = LearnedOptimizer(embedding.parameters(), LSTMRule(hidden_size=2))
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"dense gradients; .*\(10, 3\)"):
        optimizer.step()


def test_pretrained_rule_trains_a_model_like_adam_would() -> None:
    """The shipped MNIST rule, in a plain loop, lowers a classifier's loss."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 10, generator=generator) * 2
    labels = torch.randint(3, (256,), generator=generator)
    inputs = centres[labels] + torch.randn(256, 10, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Sigmoid(), nn.Linear(16, 3))
    optimizer = LearnedOptimizer.from_pretrained("lstm-mnist", model.parameters())

    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]


def test_chunked_step_matches_one_rule_evaluation() -> None:
    """Evaluating the rule over chunks of coordinates changes no update or state."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=4)
    models = [torch.nn.Linear(7, 5) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    whole = LearnedOptimizer(models[0].parameters(), rule)
    chunked = LearnedOptimizer(models[1].parameters(), rule, chunk_size=6)
    inputs = torch.randn(3, 7)
    for _ in range(3):
        for model, optimizer in zip(models, (whole, chunked)):
            optimizer.zero_grad()
            model(inputs).pow(2).sum().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


def test_chunks_advance_a_shared_step_count_once() -> None:
    """A rule state shared by all coordinates (Adam's count) steps once per step."""
    models = [_model() for _ in range(2)]
    whole = LearnedOptimizer(models[0].parameters(), Adam(0.05))
    chunked = LearnedOptimizer(models[1].parameters(), Adam(0.05), chunk_size=4)
    x, y = _regression()
    for _ in range(4):
        for model, optimizer in zip(models, (whole, chunked)):
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
    state = chunked.state
    assert {state[p]["rule_state"][2].item() for p in models[1].parameters()} == {4.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizer_follows_the_rules_plain_update(dtype: torch.dtype) -> None:
    """The in-place, chunked inference path gives the plain ``update``'s steps."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=6).to(dtype)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    optimizer = LearnedOptimizer(model.parameters(), rule, chunk_size=10)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    plain = flat.clone().unsqueeze(0)
    state = rule.init_state(plain)
    x, y = (t.to(dtype) for t in _regression())

    for _ in range(4):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        optimizer.step()
        with torch.no_grad():
            update, state = rule.update(rule.theta, grad.unsqueeze(0), state)
        plain = plain + update

    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(ours, plain.squeeze(0))
    joined = [
        torch.cat([optimizer.state[p]["rule_state"][k] for p in model.parameters()], 1)
        for k in range(len(state))
    ]
    for a, b in zip(joined, state):
        torch.testing.assert_close(a, b)


def test_a_changing_set_of_parameters_keeps_one_joint_state_each() -> None:
    """Parameters without a gradient drop out of a step and come back; their state
    carries over, and joint states that no longer match are not kept."""
    torch.manual_seed(0)
    model = _model()
    optimizer = LearnedOptimizer(model.parameters(), LSTMRule(hidden_size=3))
    x, y = _regression()
    first = next(model.parameters())
    for step in range(4):
        optimizer.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        if step == 1:
            first.grad = None
        before = optimizer.state[first].get("rule_state", (torch.zeros(()),))[0].clone()
        optimizer.step()
        after = optimizer.state[first]["rule_state"][0]
        assert torch.equal(before, after) == (step == 1)
    assert len(optimizer._joint) == 1


def test_a_copied_optimizer_continues_like_the_original() -> None:
    """copy.deepcopy (and pickling) keeps the rule, the chunk size and the state."""
    import copy

    x, y = _regression()
    model = _model()
    rule = LSTMRule(hidden_size=3)
    pairs = [(model, LearnedOptimizer(model.parameters(), rule, chunk_size=7))]
    for step in range(6):
        if step == 3:
            pairs.append(copy.deepcopy(pairs[0]))
            assert pairs[1][1].chunk_size == 7 and pairs[1][1].rule.hidden_size == 3
        for model, optimizer in pairs:
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()
    for a, b in zip(pairs[0][0].parameters(), pairs[1][0].parameters()):
        torch.testing.assert_close(a, b)
    assert not torch.equal(a, _model().state_dict()["2.bias"])


def test_skipped_gradients_neither_rewind_a_shared_count_nor_keep_old_state() -> None:
    """A parameter that sits a step out keeps a compact state of its own, and the
    step count shared by a group continues from where it was."""
    for order in ("ab", "ba"):
        a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
        params = [a, b] if order == "ab" else [b, a]
        optimizer = LearnedOptimizer(params, Adam(0.1))
        for pattern in ["ab", "a", "a", "a", "ab"]:
            a.grad = torch.ones(3) if "a" in pattern else None
            b.grad = torch.ones(2) if "b" in pattern else None
            optimizer.step()
            if pattern == "a":
                first = optimizer.state[b]["rule_state"][0]
                assert first.untyped_storage().nbytes() == first.numel() * 4
        assert optimizer.state[a]["rule_state"][2].item() == 5.0


def test_loading_keeps_the_rule_state_dtype_of_low_precision_parameters() -> None:
    """torch would cast the state to bf16 like the parameters; h, c and the count
    stay float32, so a resumed run goes on like an uninterrupted one."""
    torch.manual_seed(0)
    models = [_model().to(torch.bfloat16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    rule = LSTMRule(hidden_size=3)
    optimizers = [LearnedOptimizer(m.parameters(), rule) for m in models]
    x, y = (t.to(torch.bfloat16) for t in _regression())
    for step in range(5):
        if step == 2:
            fresh = LearnedOptimizer(models[1].parameters(), rule)
            fresh.load_state_dict(optimizers[1].state_dict())
            optimizers[1] = fresh
            state = fresh.state[next(models[1].parameters())]["rule_state"]
            assert all(s.dtype == torch.float32 for s in state)
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_bad_chunk_sizes_and_foreign_states_are_refused() -> None:
    model = _model()
    with pytest.raises(
        TypeError, match="chunk_size must be a positive integer, got 2.0"
    ):
        LearnedOptimizer(model.parameters(), LSTMRule(), chunk_size=2.0)
    adam = torch.optim.Adam(model.parameters())
    optimizer = LearnedOptimizer(model.parameters(), LSTMRule(hidden_size=3))
    with pytest.raises(ValueError, match="no 'rule' entry"):
        optimizer.load_state_dict(adam.state_dict())

    small, large = nn.Linear(2, 1), nn.Linear(3, 1)
    for layer in (small, large):
        layer(torch.ones(1, layer.in_features)).sum().backward()
    source = LearnedOptimizer(small.parameters(), LSTMRule(hidden_size=3))
    source.step()
    target = LearnedOptimizer(large.parameters(), source.rule)
    with pytest.raises(ValueError, match=r"shape \(1, 3\).*another model"):
        target.load_state_dict(source.state_dict())
    assert not target.state  # refused before anything was replaced


def test_compile_option_sets_the_optimizers_copy_and_refuses_non_booleans() -> None:
    """``compile`` switches the optimiser's copy of the rule, not the caller's;
    None keeps the rule's own setting."""
    rule, model = LSTMRule(hidden_size=4), _model()
    optimizer = LearnedOptimizer(model.parameters(), rule, compile=True)
    assert optimizer.rule.compile and not rule.compile
    again = LearnedOptimizer(model.parameters(), optimizer.rule, compile=False)
    assert not again.rule.compile
    assert LearnedOptimizer(model.parameters(), optimizer.rule).rule.compile
    with pytest.raises(TypeError, match="compile must be True, False or None"):
        LearnedOptimizer(model.parameters(), rule, compile="yes")


class _ConcreteStateRule(LSTMRule):
    """A rule whose init_state reads values, which the meta device cannot give."""

    def init_state(self, params):
        assert math.isfinite(float(params.sum()))
        return super().init_state(params)


def test_loading_checks_shapes_for_rules_that_cannot_run_on_the_meta_device() -> None:
    model, rule = _model(), _ConcreteStateRule(hidden_size=4)
    x, y = _regression()
    optimizer = LearnedOptimizer(model.parameters(), rule)
    ((model(x) - y) ** 2).mean().backward()
    optimizer.step()
    again = LearnedOptimizer(model.parameters(), rule)
    again.load_state_dict(optimizer.state_dict())
    state = again.state[next(model.parameters())]["rule_state"]
    assert [tuple(s.shape) for s in state] == [(1, 40, 4)] * 4
