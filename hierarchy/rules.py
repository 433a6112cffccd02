"""Coordinatewise update rules: the learned optimisers that every level owns.

A rule maps the gradient of each coordinate (and a recurrent state per coordinate)
to an update for that coordinate, with one set of weights shared by all
coordinates. Its weights live in one flat vector ``theta`` so that the rule can be
evaluated at any tensor: its own ``nn.Parameter`` when it is the top level, or a
point on another level's unroll when a learned meta-optimiser trains it.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import ModuleType

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hierarchy.kernels import LSTMTrainStep, kernel_weights, lstm_kernels

logger = logging.getLogger(__name__)

Params = Tensor
"""Flat parameters of a batch of problems, shape (B, D)."""

Updates = Tensor
"""Proposed parameter changes, same shape as the parameters, (B, D)."""

State = tuple[Tensor, ...]
"""Recurrent state of a rule: a tuple of tensors of shape (B, D, ...)."""


def preprocess(grad: Tensor, p: float = 10.0, dim: int = -1) -> Tensor:
    """Gradient preprocessing of Andrychowicz et al. (2016), appendix A.

    Each coordinate g becomes (log|g| / p, sign g) when |g| >= e^-p, else
    (-1, e^p g), so that gradients spanning many orders of magnitude reach the
    network on a common scale. The two features are stacked as a new dimension
    at ``dim``: shape ``grad.shape + (2,)`` for the default ``dim=-1``.
    """
    threshold = math.exp(-p)
    magnitude = grad.abs()
    large = magnitude >= threshold

    # The clamp keeps log away from zero in the branch torch.where discards, so
    # that its gradient stays finite in the second-order unroll.
    log_part = torch.log(magnitude.clamp_min(threshold)) / p
    first = torch.where(large, log_part, -1.0)
    second = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack([first, second], dim=dim)


class UpdateRule(nn.Module, ABC):
    """A coordinatewise update rule m(grad, state; theta) -> (update, state).

    All weights live in one flat vector ``theta`` so that the level above can
    train them. The minimum a new rule writes (see examples/custom_level.py):

    - ``__init__``: ``super().__init__(shapes)`` with the named shapes of the
      weights, then initial values written into ``self.theta``;
    - ``init_state(params)``: fresh state for parameters (B, D), a tuple of
      tensors (B, D, ...) per coordinate, a 0-dim tensor for a value shared by
      all coordinates (a step count), or ``()`` for a stateless rule;
    - ``update(theta, grad, state)``: updates (B, D) and the new state. ``theta``
      is (P,) when one rule serves every problem, or (B, P) when each problem has
      weights of its own (a rule trained by a learned level above);
      ``self.unflatten(theta)`` reads named weights from either.

    A class attribute ``kind`` and ``config()`` (the constructor arguments) let
    ``save_rule`` write the rule and ``load_rule(path, rules={kind: cls})`` read it.
    """

    kind: str = "rule"

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = dict(shapes)
        self.sizes = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self.theta = nn.Parameter(torch.empty(sum(self.sizes.values())))
        self.compile = False
        """Run the rule through its fused kernels where it has them (the LSTM's
        training and inference steps on the CPU), else ``update`` through
        torch.compile; eager again where either cannot be built. Updates and
        gradients agree with the eager rule's to float rounding."""
        self.checkpoint = False
        """Recompute the rule's activations in backward instead of keeping them."""
        self._compiled: Callable | None = None

    def __getstate__(self) -> dict:
        # A compiled function is neither copied nor pickled; copies compile anew.
        return {**super().__getstate__(), "_compiled": None}

    def step(self, theta: Tensor, grad: Tensor, state: State) -> tuple[Updates, State]:
        """``update`` as the unroll runs it: compiled and checkpointed if asked.

        Both options give the same updates and gradients as plain ``update``; they
        change only how fast it runs and how much memory its graph keeps.
        """
        fn = self._fast_update if self.compile else self.update
        # Checkpointing drops only the rule's activations; the optimisee's graph
        # and the rule state of every step stay, so the peak falls to about half the
        # plain one on MNIST; meta.checkpoint_steps (chunked segments) reaches 0.24.
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, theta, grad, state, use_reentrant=False)
        return fn(theta, grad, state)

    def steps_faster_in_place(self, device: torch.device) -> bool:
        """Whether ``step_`` runs faster than ``step`` on ``device`` where no graph
        is kept, so that a pass without one (chunked segments' first) should take
        it. Not this version's, which is ``step`` plus a copy."""
        return False

    def inference_state(self, params: Params) -> State:
        """Fresh state for ``step_``: ``init_state``'s values, in whatever memory
        layout ``step_`` runs fastest on."""
        return self.init_state(params)

    def step_(self, theta: Tensor, grad: Tensor, state: State) -> Updates:
        """Updates for ``grad`` with no graph, advancing ``state`` in place.

        The inference path of ``LearnedOptimizer``: call it under ``torch.no_grad``
        with state tensors that nothing else reads. This version runs ``step`` and
        copies the new state over the old; a rule overrides it to skip the
        temporaries of its out-of-place ``update``. The updates equal ``update``'s
        to float rounding, not bit for bit.
        """
        update, new = self.step(theta, grad, state)
        for old, value in zip(state, new):
            old.copy_(value)
        return update

    def _fast_update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State]:
        """``update`` by the rule's fused kernel where one applies, else by
        torch.compile."""
        fused = self._fused_update(theta, grad, state)
        return self._compiled_update()(theta, grad, state) if fused is None else fused

    def _fused_update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State] | None:
        """``update`` by a fused kernel of the rule's own, or None where it has
        none that applies (this default: none)."""
        return None

    def _compiled_update(self) -> Callable:
        """torch.compile of ``update``, falling back to eager on a compile error."""
        if self._compiled is None:
            compiled = torch.compile(self.update)

            def run(theta: Tensor, grad: Tensor, state: State):
                try:
                    return compiled(theta, grad, state)
                except Exception as error:  # inductor raises many kinds
                    logger.warning(
                        "torch.compile of the %s rule failed (%s: %s); running it "
                        "eagerly",
                        self.kind,
                        type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "",
                    )
                    self._compiled = self.update
                    return self.update(theta, grad, state)

            self._compiled = run
        return self._compiled

    @property
    def num_params(self) -> int:
        """Length of the flat weight vector theta."""
        return self.theta.numel()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat (P,) or batched (B, P) weight vector into named views."""
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            size = self.sizes[name]
            flat = theta[..., offset : offset + size]
            views[name] = flat.reshape(*theta.shape[:-1], *shape)
            offset += size
        return views

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Inverse of ``unflatten`` for unbatched weights."""
        return torch.cat([tensors[name].reshape(-1) for name in self.shapes])

    @abstractmethod
    def init_state(self, params: Params) -> State:
        """Fresh recurrent state for a batch of parameters of shape (B, D)."""

    @abstractmethod
    def update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State]:
        """Propose updates for every coordinate of ``grad`` (B, D) at weights theta."""

    def forward(self, grad: Tensor, state: State) -> tuple[Updates, State]:
        return self.update(self.theta, grad, state)

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the rule from a checkpoint."""
        return {}


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x (B, N, I) times weight (I, O) or (B, I, O), plus bias (O,) or (B, O)."""
    return x @ weight + bias.unsqueeze(-2)


class NetworkRule(UpdateRule):
    """A rule computed by a small network: layer widths, depth and output scale.

    Subclasses build their weight shapes from these settings; the settings are
    also the rule's ``config``.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        hidden_size: int,
        num_layers: int,
        out_scale: float,
        preprocess_p: float,
    ) -> None:
        super().__init__(shapes)
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.out_scale = out_scale
        self.preprocess_p = preprocess_p

    def config(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "out_scale": self.out_scale,
            "preprocess_p": self.preprocess_p,
        }


class LSTMRule(NetworkRule):
    """The coordinatewise LSTM optimiser of Andrychowicz et al. (2016).

    Each coordinate's preprocessed gradient runs through a stack of LSTM layers
    with weights shared across coordinates; a linear head reads the update, which
    is multiplied by ``out_scale`` (0.1 in the paper) to keep early steps small.
    Each layer's input and hidden gate products are fused into one matmul.
    """

    kind = "lstm"

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        out_scale: float = 0.1,
        preprocess_p: float = 10.0,
    ) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        in_size = 2
        for layer in range(num_layers):
            shapes[f"w{layer}"] = (in_size + hidden_size, 4 * hidden_size)
            shapes[f"b{layer}"] = (4 * hidden_size,)
            in_size = hidden_size
        shapes["w_out"] = (hidden_size, 1)
        shapes["b_out"] = (1,)
        super().__init__(shapes, hidden_size, num_layers, out_scale, preprocess_p)
        self._kernel_weights: tuple | None = None
        self.reset_parameters()

    def __getstate__(self) -> dict:
        # The fused kernel's weights are derived again by a copy.
        return {**super().__getstate__(), "_kernel_weights": None}

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) like torch's LSTM, forget bias 1."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.theta.uniform_(-bound, bound, generator=generator)
            views = self.unflatten(self.theta)
            hidden = self.hidden_size
            for layer in range(self.num_layers):
                views[f"b{layer}"][hidden : 2 * hidden] += 1.0

    def init_state(self, params: Params) -> State:
        zeros = params.new_zeros(*params.shape, self.hidden_size)
        return tuple(zeros.clone() for _ in range(2 * self.num_layers))

    def update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State]:
        weights = self.unflatten(theta)
        x = preprocess(grad, self.preprocess_p)
        new_state: list[Tensor] = []

        for layer in range(self.num_layers):
            h, c = state[2 * layer], state[2 * layer + 1]
            gates = _linear(
                torch.cat([x, h], dim=-1), weights[f"w{layer}"], weights[f"b{layer}"]
            )
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            new_state += [h, c]
            x = h

        out = _linear(x, weights["w_out"], weights["b_out"])
        return rearrange(out, "b n 1 -> b n") * self.out_scale, tuple(new_state)

    def _fused_update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State] | None:
        """``update`` by ``LSTMTrainStep``, or None where it does not apply
        (float32 on the CPU and one set of weights, see ``_kernels_for``).

        The state goes in and comes out as (B, D, H) views of (H, B * D) rows,
        each unit's values over all coordinates of all problems in one row padded
        to whole 16-float vectors; a state in another layout is copied into this
        one first.
        """
        kernel = _kernels_for(theta, grad, state) if grad.numel() > 0 else None
        if kernel is None or state[0].shape[:2] != grad.shape:
            return None  # the eager update says what does not fit

        batch, coordinates = grad.shape
        count = batch * coordinates
        if grad.requires_grad and torch.is_grad_enabled():  # a second-order unroll
            features = preprocess(grad, self.preprocess_p, dim=0).reshape(2, count)
        else:  # preprocessed inside the kernel
            features = grad.reshape(1, count).contiguous()
        updates, *new_state = LSTMTrainStep.apply(
            kernel,
            self.out_scale,
            self.preprocess_p,
            theta,
            features,
            *state,
        )
        return updates, tuple(new_state)

    def steps_faster_in_place(self, device: torch.device) -> bool:
        # Eagerly on the CPU, step_ takes a third of update's time on an MNIST
        # network (3.6 against 12 ms). The fused training step's forward is as
        # fast as the fused step_ there, and a pass in place also copies its
        # starting state. Not measured on a GPU, where step_'s blocks of
        # coordinates would each launch kernels of their own.
        return device.type == "cpu" and not self.compile

    def inference_state(self, params: Params) -> State:
        # Unit-major: each (B, D, H) state is a view of a contiguous (H, B, D), the
        # layout of the training kernel, so that each hidden unit's values over all
        # coordinates of all problems are one row and ``step_`` runs every problem
        # in one product. ``update`` keeps the coordinate-major layout it was
        # trained in: the two round differently.
        batch, coordinates = params.shape
        zeros = params.new_zeros(self.hidden_size, batch, coordinates)
        return tuple(zeros.clone().permute(1, 2, 0) for _ in range(2 * self.num_layers))

    def step_(self, theta: Tensor, grad: Tensor, state: State) -> Updates:
        """The LSTM step written in place: each layer's input is copied into one
        buffer, its gates into another, and the activations, c and h are written
        over those buffers and the state; no temporaries the size of the gates.

        The coordinates of all problems run as one set when the state's (B, D)
        dimensions merge (``inference_state``'s layout does; a slice of the
        coordinates of several problems does not, and runs problem by problem). A
        compiled rule (``compile``) runs the fused C++ kernel of
        ``hierarchy.kernels`` for float32 on the CPU and its compiled ``update``
        on other devices. On the CPU without the kernel (float64, or no compiler)
        it runs this eager step, which is faster there than compiled ``update``.
        """
        on_cpu = grad.device.type == "cpu"
        if theta.dim() != 1 or (self.compile and not on_cpu):
            return super().step_(theta, grad, state)

        updates = grad.new_empty(grad.shape)  # contiguous, whatever grad's layout
        parts = _unit_rows(grad, state, updates)
        kernel = None
        if self.compile and all(_kernel_layout(rows) for _, rows, _ in parts):
            kernel = _kernels_for(theta, grad, state)
        if kernel is None:
            # In blocks whose gates stay in the cache: one pass over all
            # coordinates of 16 MNIST networks ran 1.4x slower.
            weights = self.unflatten(theta)
            for features, rows, out in parts:
                for at in range(0, len(features), _EAGER_BLOCK):
                    block = slice(at, at + _EAGER_BLOCK)
                    self._rows_step_(
                        weights,
                        features[block],
                        [r[:, block] for r in rows],
                        out[block],
                    )
            return updates.mul_(self.out_scale)

        # The kernel writes the state behind autograd's back: refuse what an
        # in-place op would refuse, and bump the versions as one would.
        if not torch.is_inference_mode_enabled() and any(
            s.is_inference() for s in state
        ):
            raise RuntimeError(
                "the LSTM state was made under torch.inference_mode and is stepped "
                "outside it; step it under inference_mode, or start a fresh state"
            )
        # The kernel's weights are derived again whenever theta's values change
        # (compared in full: a few thousand numbers, and an edit through .data
        # leaves no other trace).
        cached = getattr(self, "_kernel_weights", None)
        if cached is None or not torch.equal(cached[0], theta):
            frozen = theta.detach().clone()
            derived = kernel_weights(
                self.unflatten(frozen), self.num_layers, self.hidden_size
            )
            cached = self._kernel_weights = (frozen, *derived)
        _, matrices, biases, head, head_bias = cached
        for grad_rows, rows, out in parts:
            kernel.lstm_step(
                preprocess(grad_rows, self.preprocess_p, dim=0).contiguous(),
                rows[0::2],
                rows[1::2],
                matrices,
                biases,
                head,
                head_bias,
                self.out_scale,
                out,
            )
        for s in state:
            if not s.is_inference():
                torch.autograd.graph.increment_version(s)
        return updates

    def _rows_step_(
        self,
        weights: dict[str, Tensor],
        grad: Tensor,
        rows: list[Tensor],
        updates: Tensor,
    ) -> None:
        """The eager in-place step over N coordinates at ``unflatten``'s weights:
        ``grad`` (N,), the state as (H, N) rows (h and c of each layer), the
        updates (before ``out_scale``) written into ``updates`` (N,)."""
        hidden, coordinates = self.hidden_size, grad.shape[-1]
        inputs = grad.new_empty(max(2, hidden) + hidden, coordinates)
        gates = grad.new_empty(4 * hidden, coordinates)
        squashed = grad.new_empty(hidden, coordinates)

        x = preprocess(grad, self.preprocess_p, dim=0)
        for layer in range(self.num_layers):
            h, c = rows[2 * layer], rows[2 * layer + 1]
            fan_in = x.shape[0] + hidden
            joined = inputs[:fan_in]
            joined[: x.shape[0]].copy_(x)
            joined[x.shape[0] :].copy_(h)
            torch.addmm(
                weights[f"b{layer}"].unsqueeze(-1),
                weights[f"w{layer}"].T,
                joined,
                out=gates,
            )
            i, f, g, o = gates.chunk(4, dim=0)
            gates[: 2 * hidden].sigmoid_()
            g.tanh_()
            o.sigmoid_()
            c.mul_(f).addcmul_(i, g)
            torch.mul(o, torch.tanh(c, out=squashed), out=h)
            x = h
        torch.addmm(
            weights["b_out"].unsqueeze(-1),
            weights["w_out"].T,
            x,
            out=updates.unsqueeze(0),
        )


_EAGER_BLOCK = 16384  # coordinates per block of the eager in-place LSTM step


def _unit_rows(
    grad: Tensor, state: State, updates: Tensor
) -> list[tuple[Tensor, list[Tensor], Tensor]]:
    """The problems of an in-place LSTM step as parts (gradient (N,), the state as
    (H, N) rows, updates (N,)): one part of all B * D coordinates when every state
    tensor's (B, D) dimensions merge into one (``inference_state``'s layout), else
    one part per problem."""
    units = [s.permute(2, 0, 1) for s in state]  # (H, B, D)
    batch, coordinates = grad.shape
    merges = batch == 1 or all(u.stride(1) == coordinates * u.stride(2) for u in units)
    if merges:
        rows = [u.reshape(u.shape[0], batch * coordinates) for u in units]
        return [(grad.reshape(-1), rows, updates.view(-1))]
    return [(grad[b], [u[:, b] for u in units], updates[b]) for b in range(batch)]


def _kernel_layout(rows: list[Tensor]) -> bool:
    """Whether state rows are as the fused kernel reads them: each row contiguous,
    all rows one stride apart."""
    return all(r.stride(-1) == 1 and r.stride(-2) == rows[0].stride(-2) for r in rows)


def _kernels_for(theta: Tensor, grad: Tensor, state: State) -> ModuleType | None:
    """The fused LSTM kernels where they apply (float32 on the CPU, one contiguous
    set of weights, and a compiler to build them), else None."""
    usable = (
        grad.device.type == "cpu"
        and theta.dim() == 1
        and theta.is_contiguous()
        and all(t.dtype == torch.float32 for t in (theta, grad, *state))
    )
    return lstm_kernels() if usable else None


class MLPRule(NetworkRule):
    """A coordinatewise MLP optimiser over the gradient and its running averages.

    Features per coordinate are the preprocessed gradient and the preprocessed
    exponential moving averages of the gradient at each decay in ``momenta``; the
    averages are the rule's only state, so with no decays it is stateless.
    """

    kind = "mlp"

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        out_scale: float = 0.1,
        preprocess_p: float = 10.0,
        momenta: tuple[float, ...] = (0.9,),
    ) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        in_size = 2 * (1 + len(momenta))
        for layer in range(num_layers):
            shapes[f"w{layer}"] = (in_size, hidden_size)
            shapes[f"b{layer}"] = (hidden_size,)
            in_size = hidden_size
        shapes["w_out"] = (in_size, 1)
        shapes["b_out"] = (1,)
        super().__init__(shapes, hidden_size, num_layers, out_scale, preprocess_p)
        self.momenta = tuple(float(m) for m in momenta)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer, like nn.Linear."""
        with torch.no_grad():
            views = self.unflatten(self.theta)
            for name, view in views.items():
                fan_in = self.shapes[name.replace("b", "w", 1)][0]
                bound = 1.0 / math.sqrt(fan_in)
                view.uniform_(-bound, bound, generator=generator)

    def init_state(self, params: Params) -> State:
        return tuple(torch.zeros_like(params) for _ in self.momenta)

    def update(
        self, theta: Tensor, grad: Tensor, state: State
    ) -> tuple[Updates, State]:
        weights = self.unflatten(theta)
        averages = tuple(
            decay * m + (1.0 - decay) * grad for decay, m in zip(self.momenta, state)
        )
        features = [preprocess(v, self.preprocess_p) for v in (grad, *averages)]
        x = torch.cat(features, dim=-1)

        for layer in range(self.num_layers):
            x = torch.relu(_linear(x, weights[f"w{layer}"], weights[f"b{layer}"]))

        out = _linear(x, weights["w_out"], weights["b_out"])
        return rearrange(out, "b n 1 -> b n") * self.out_scale, averages

    def config(self) -> dict:
        return {**super().config(), "momenta": list(self.momenta)}


RULES: dict[str, type[UpdateRule]] = {"lstm": LSTMRule, "mlp": MLPRule}
