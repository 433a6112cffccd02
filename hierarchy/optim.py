"""A trained update rule as a ``torch.optim.Optimizer`` for any model.

The rule is coordinatewise, so it applies to every parameter of any shape: all
gradients of a parameter group are flattened into one batch of coordinates, the
rule proposes an update for each, and the updates are written back in place. The
rule's recurrent state lives in ``self.state[param]`` like Adam's moments, on the
parameter's device, so ``state_dict`` / ``load_state_dict`` carry it.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterable

import torch
from einops import rearrange
from torch import Tensor

from hierarchy.checkpoint import load_rule, rule_payload
from hierarchy.rules import State, UpdateRule

__all__ = ["LearnedOptimizer", "load_rule"]


class LearnedOptimizer(torch.optim.Optimizer):
    """Apply a trained ``rule`` to model parameters, one step per ``step()``.

    It is used like Adam: ``zero_grad()``, ``loss.backward()``, ``step()``. The
    rule runs without a graph (under ``torch.no_grad``), on the device of each
    group's parameters, in float32 (float64 for float64 parameters).

    Args:
        params: the model's parameters or parameter groups, as for any optimiser.
        rule: a trained update rule; a frozen copy of it is used.
        scale: multiplies the rule's proposed update; 1.0 applies the rule as it
            was trained. A parameter group may set its own ``scale``.
        chunk_size: coordinates per rule evaluation. The rule's temporaries (the
            LSTM's gates are 4 x hidden floats per coordinate) then stay bounded on
            large models, and the default keeps them in a CPU's cache.
        compile: step with the rule's compiled path: for the LSTM in float32 on
            the CPU a fused C++ kernel, built on first use (about 30 s, then
            cached), and torch.compile of the rule on other devices. Its updates
            equal the eager ones to float rounding. Without a compiler it warns
            once and runs eagerly. None keeps the rule's own ``compile``.
    """

    def __init__(
        self,
        params: Iterable,
        rule: UpdateRule,
        scale: float = 1.0,
        chunk_size: int = 2**15,
        compile: bool | None = None,
    ) -> None:
        if not isinstance(rule, UpdateRule):
            raise TypeError(
                f"rule must be a hierarchy UpdateRule, got {type(rule).__name__}"
            )
        try:
            if isinstance(chunk_size, bool):
                raise TypeError
            chunk_size = operator.index(chunk_size)
        except TypeError:
            raise TypeError(
                f"chunk_size must be a positive integer, got {chunk_size!r}"
            ) from None
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.rule = copy.deepcopy(rule).requires_grad_(False)
        if compile is not None:
            if not isinstance(compile, bool):
                raise TypeError(f"compile must be True, False or None, got {compile!r}")
            self.rule.compile = compile
        self._theta: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._joint: dict[tuple[int, ...], tuple] = {}
        super().__init__(params, defaults={"scale": scale})

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles and copies only its defaults, state and
        # groups; the rule and the chunk size go too. Caches are rebuilt.
        return {
            **super().__getstate__(),
            "rule": self.rule,
            "chunk_size": self.chunk_size,
            "_theta": {},
            "_joint": {},
        }

    @classmethod
    def from_pretrained(
        cls, name: str, params: Iterable, **options: float | int | bool | None
    ) -> LearnedOptimizer:
        """An optimiser running the pretrained rule ``name`` shipped in the package.

        ``hierarchy.pretrained.available()`` lists the names; ``options`` are the
        constructor's keyword arguments (``scale``, ``chunk_size``, ``compile``).
        """
        from hierarchy.pretrained import load_pretrained

        return cls(params, load_pretrained(name), **options)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its ``scale``, as torch optimisers check lr."""
        scale = param_group.get("scale", self.defaults["scale"])
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a number, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        super().add_param_group(param_group)

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
                self._step_group(params, group["scale"])
        return loss

    def state_dict(self) -> dict:
        """torch's optimiser state plus the rule (kind, settings, weights).

        The rule's recurrent state only means something under the rule that wrote
        it, so ``load_state_dict`` refuses a state written under another rule.
        """
        state = super().state_dict()
        state["rule"] = rule_payload(self.rule)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict``; refuse one written under another rule.

        torch casts loaded state to each parameter's dtype; the rule state keeps
        its own (float32 beside bf16 parameters), as a cast would round the LSTM's
        h and c and a step count.
        """
        saved = state_dict.get("rule")
        if saved is None:
            raise ValueError(
                "this state_dict has no 'rule' entry, so it was not written by "
                "LearnedOptimizer.state_dict(); load the state of a LearnedOptimizer"
            )
        mine = rule_payload(self.rule)
        same = (
            saved.get("kind") == mine["kind"]
            and saved.get("rule_config") == mine["rule_config"]
            and isinstance(saved.get("theta"), Tensor)
            and torch.equal(saved["theta"].cpu(), mine["theta"])
        )
        if not same:
            raise ValueError(
                f"this optimiser state was written under a {saved.get('kind')!r} "
                f"rule {saved.get('rule_config')} with other weights than this "
                f"optimiser's {mine['kind']!r} rule {mine['rule_config']}; "
                f"build the optimiser with the rule that wrote the state"
            )
        # Check every parameter's rule state against a fresh one (on the meta
        # device, no memory) before torch replaces anything.
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        loaded = {}
        for index, p in zip(ids, params):
            rule_state = state_dict["state"].get(index, {}).get("rule_state")
            if rule_state is not None:
                _check_saved_state(p, rule_state, self._fresh_state(p.numel()))
                loaded[p] = rule_state

        rest = {key: value for key, value in state_dict.items() if key != "rule"}
        super().load_state_dict(rest)
        for p, rule_state in loaded.items():
            self.state[p]["rule_state"] = tuple(
                s.to(device=p.device) for s in rule_state
            )

    def _fresh_state(self, coordinates: int) -> State:
        """A fresh rule state's shapes for ``coordinates``, on the meta device (no
        memory), or on the CPU for a rule whose ``init_state`` cannot run there."""
        try:
            return self.rule.init_state(torch.empty(1, coordinates, device="meta"))
        except (NotImplementedError, RuntimeError):
            return self.rule.init_state(torch.zeros(1, coordinates))

    def _step_group(self, params: list[Tensor], scale: float) -> None:
        """One rule evaluation over all coordinates of ``params``, as a batch of 1."""
        _check_parameters(params)
        dtype = torch.promote_types(
            torch.float32, _common_dtype([p.grad.dtype for p in params])
        )
        grad = torch.cat([p.grad.reshape(-1).to(dtype) for p in params])
        grad = rearrange(grad, "n -> 1 n")

        state = self._joint_state(params, grad)
        update = self._chunked_step(self._weights(grad), grad, state)
        if scale != 1.0:
            update = update * scale

        sizes = [p.numel() for p in params]
        for p, delta in zip(params, update.split(sizes, dim=1)):
            p.add_(delta.reshape(p.shape).to(p.dtype))

    def _joint_state(self, params: list[Tensor], grad: Tensor) -> State:
        """The rule state of ``params`` as one state over all their coordinates.

        Each parameter's ``rule_state`` is a view into this joint state, so the
        rule advances every parameter in place and no step joins or splits state.
        The joint state is rebuilt from the parameters' own states when they were
        replaced (``load_state_dict``), the group changed, or the dtype changed.
        """
        key = tuple(id(p) for p in params)
        joint = self._joint.get(key)
        if joint is not None and joint[0] == (grad.device, grad.dtype):
            views = joint[2]
            if all(self.state[p].get("rule_state") is v for p, v in zip(params, views)):
                return joint[1]

        # A fresh state in the rule's own layout, with each parameter's saved
        # state copied in. A state shared by all coordinates is a step count: the
        # largest saved one, that of the parameters that kept stepping.
        state = self.rule.inference_state(grad)
        sizes = [p.numel() for p in params]
        pieces = [
            s.split(sizes, dim=1) if s.dim() >= 2 else [s] * len(params) for s in state
        ]
        views, counted = [], False
        for k, p in enumerate(params):
            own = tuple(piece[k] for piece in pieces)
            saved = self.state[p].get("rule_state")
            if saved is not None:
                _check_saved_state(p, saved, own)
                for target, value in zip(own, saved):
                    if target.dim() >= 2 or not counted:
                        target.copy_(value)
                    else:
                        torch.maximum(target, value.to(target), out=target)
                counted = True
            self.state[p]["rule_state"] = own
            views.append(own)

        # Joint states that held any of these parameters are stale now. Their
        # other parameters get compact copies of their views, so that an old
        # joint state is not kept alive (nor saved whole) for their sake.
        for old_key, (_, _, old_views, old_params) in list(self._joint.items()):
            if set(old_key) & set(key):
                del self._joint[old_key]
                for p, view in zip(old_params, old_views):
                    if id(p) not in key and self.state[p].get("rule_state") is view:
                        self.state[p]["rule_state"] = tuple(s.clone() for s in view)
        self._joint[key] = ((grad.device, grad.dtype), state, views, list(params))
        return state

    def _weights(self, like: Tensor) -> Tensor:
        """The rule's weights on the device and in the dtype of ``like``, cached."""
        key = (like.device, like.dtype)
        if key not in self._theta:
            self._theta[key] = self.rule.theta.detach().to(like)
        return self._theta[key]

    def _chunked_step(self, theta: Tensor, grad: Tensor, state: State) -> Tensor:
        """The rule over ``chunk_size`` coordinates at a time, state in place.

        A state shared by all coordinates (a step count) must advance once per
        step, so every chunk starts from its value before the step.
        """
        shared = [(s, s.clone()) for s in state if s.dim() < 2]
        updates = torch.empty_like(grad)
        for start in range(0, grad.shape[1], self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            for s, before in shared:
                s.copy_(before)
            part = tuple(s[:, rows] if s.dim() >= 2 else s for s in state)
            updates[:, rows] = self.rule.step_(theta, grad[:, rows], part)
        return updates


def _check_saved_state(param: Tensor, saved: State, fresh: State) -> None:
    """Refuse a parameter's saved rule state that does not fit the parameter."""
    shapes = [tuple(s.shape) for s in saved]
    expected = [tuple(s.shape) for s in fresh]
    if shapes != expected:
        raise ValueError(
            f"the rule state of a parameter of shape {tuple(param.shape)} has "
            f"shapes {shapes}, expected {expected}; was it saved for another model "
            f"or another rule, or was the parameter resized?"
        )


def _check_parameters(params: list[Tensor]) -> None:
    """Refuse what the rule cannot update: sparse or complex gradients, two devices."""
    for p in params:
        if p.grad.is_sparse:
            raise ValueError(
                f"LearnedOptimizer takes dense gradients; a parameter of shape "
                f"{tuple(p.shape)} has a sparse one"
            )
        if p.is_complex():
            raise ValueError(
                f"LearnedOptimizer takes real parameters; one of shape "
                f"{tuple(p.shape)} is {p.dtype}"
            )
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(
            f"a parameter group of LearnedOptimizer must sit on one device, "
            f"got {sorted(map(str, devices))}; use one group per device"
        )


def _common_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    common = dtypes[0]
    for dtype in dtypes[1:]:
        common = torch.promote_types(common, dtype)
    return common
