"""Tests for hierarchy/optim.py: a rule used as a torch.optim.Optimizer."""

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


def test_load_rule_gives_the_same_updates_and_refuses_bad_files(tmp_path) -> None:
    """A saved rule reloads to identical updates; damaged or foreign files fail."""
    import pytest

    from hierarchy.optim import load_rule
    from hierarchy.rules import MLPRule
    from hierarchy.trainer import CHECKPOINT_FORMAT

    rule = MLPRule(hidden_size=5, momenta=(0.5, 0.9))
    payload = {
        "format": CHECKPOINT_FORMAT,
        "kind": rule.kind,
        "rule_config": rule.config(),
        "theta": rule.theta.detach().clone(),
    }
    path = tmp_path / "rule.pt"
    torch.save(payload, path)
    loaded = load_rule(path)
    grad = torch.randn(2, 7)
    expected = rule.update(rule.theta, grad, rule.init_state(grad))[0]
    actual = loaded.update(loaded.theta, grad, loaded.init_state(grad))[0]
    assert torch.equal(expected, actual)

    torch.save({**payload, "format": CHECKPOINT_FORMAT + 1}, path)
    with pytest.raises(ValueError, match="format"):
        load_rule(path)
    torch.save({**payload, "kind": "adam"}, path)
    with pytest.raises(ValueError, match="'adam'"):
        load_rule(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_rule(path)


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
