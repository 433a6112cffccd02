"""A trained update rule as a ``torch.optim.Optimizer`` for any model.

The rule is coordinatewise, so it applies to every parameter of any shape: all
gradients of a parameter group are flattened into one batch of coordinates, the
rule proposes an update for each, and the updates are written back in place. The
rule's recurrent state lives in ``self.state[param]`` like Adam's moments, so
``state_dict`` / ``load_state_dict`` carry it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from hierarchy.rules import RULES, UpdateRule
from hierarchy.trainer import CHECKPOINT_FORMAT


def load_rule(path: str | Path) -> UpdateRule:
    """Rebuild a trained rule from a rule checkpoint (``best.pt``, ``rule.pt``).

    The file holds the rule's kind, its constructor arguments and its weights; it
    is read with ``weights_only=True``, so loading runs no pickled code.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"rule checkpoint {path} cannot be read: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise ValueError(
            f"rule checkpoint {path} has format {found!r}; this version reads "
            f"{CHECKPOINT_FORMAT}"
        )
    if payload.get("kind") not in RULES:
        raise ValueError(
            f"rule checkpoint {path} holds a {payload.get('kind')!r} rule; "
            f"learned rules are {sorted(RULES)}"
        )
    rule = RULES[payload["kind"]](**payload["rule_config"])
    if payload["theta"].shape != rule.theta.shape:
        raise ValueError(
            f"rule checkpoint {path} has {payload['theta'].numel()} weights; its "
            f"configuration builds {rule.num_params}"
        )
    with torch.no_grad():
        rule.theta.copy_(payload["theta"])
    return rule


class LearnedOptimizer(torch.optim.Optimizer):
    """Apply a trained ``rule`` to model parameters, one step per ``step()``.

    Args:
        params: the model's parameters or parameter groups, as for any optimiser.
        rule: a trained update rule; a frozen copy of it is used.
        chunk_size: coordinates per rule evaluation; the rule's temporaries (the
            LSTM's gates are 4 x hidden floats per coordinate) then stay bounded on
            large models instead of growing with the parameter count.
    """

    def __init__(
        self, params: Iterable, rule: UpdateRule, chunk_size: int = 2**18
    ) -> None:
        if not isinstance(rule, UpdateRule):
            raise TypeError(
                f"rule must be a hierarchy UpdateRule, got {type(rule).__name__}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        super().__init__(params, defaults={})
        self.chunk_size = chunk_size
        self.rule = copy.deepcopy(rule).requires_grad_(False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(params)
        return loss

    def _step_group(self, params: list[Tensor]) -> None:
        """One rule evaluation over all coordinates of ``params``, as a batch of 1."""
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"a parameter group of LearnedOptimizer must sit on one device, "
                f"got {sorted(map(str, devices))}; use one group per device"
            )
        sizes = [p.numel() for p in params]
        grad = rearrange(torch.cat([p.grad.reshape(-1) for p in params]), "n -> 1 n")
        theta = self.rule.theta.to(grad)

        for p in params:
            if "rule_state" not in self.state[p]:
                flat = rearrange(p.detach().reshape(-1), "n -> 1 n").to(grad)
                self.state[p]["rule_state"] = self.rule.init_state(flat)
        # Per-coordinate state (1, n, ...) is joined across parameters; a state
        # shared by all coordinates (such as Adam's step count) is taken once.
        state = tuple(
            torch.cat(parts, dim=1) if parts[0].dim() >= 2 else parts[0]
            for parts in zip(*(self.state[p]["rule_state"] for p in params))
        )

        update, state = self._chunked_step(theta, grad, state)

        pieces = [
            s.split(sizes, dim=1) if s.dim() >= 2 else [s] * len(params) for s in state
        ]
        for k, (p, delta) in enumerate(zip(params, update.split(sizes, dim=1))):
            p.add_(delta.reshape(p.shape).to(p.dtype))
            self.state[p]["rule_state"] = tuple(piece[k].clone() for piece in pieces)

    def _chunked_step(self, theta: Tensor, grad: Tensor, state: tuple) -> tuple:
        """The rule over ``chunk_size`` coordinates at a time; same result."""
        if grad.shape[1] <= self.chunk_size:
            return self.rule.step(theta, grad, state)
        updates, states = [], []
        for start in range(0, grad.shape[1], self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            part = tuple(s[:, rows] if s.dim() >= 2 else s for s in state)
            update, new = self.rule.step(theta, grad[:, rows], part)
            updates.append(update)
            states.append(new)
        # A state shared by all coordinates comes out equal from every chunk.
        joined = tuple(
            torch.cat(parts, dim=1) if parts[0].dim() >= 2 else parts[-1]
            for parts in zip(*states)
        )
        return torch.cat(updates, dim=1), joined
