"""Fused CPU kernels, compiled on first use with torch's C++ extension loader.

Two C++ kernels serve an LSTM rule that has ``compile`` set. Its inference step
(``lstm_step.cpp``) takes each tile of coordinates through both layers and the
head in cache, where eager torch makes a dozen passes over memory. Its training
step (``lstm_train.cpp``, wrapped in ``LSTMTrainStep``) does the same for blocks
of coordinates in forward and in a hand-written backward. Once they are built,
``mlp.cpp`` also serves the MNIST optimisee's loss and gradient (``built``).
Building needs a C++ compiler and ninja; the first build takes about 40 s and is
cached by torch (``TORCH_EXTENSIONS_DIR``). Where it cannot be built the rule runs
its eager inference step and torch.compile of ``update``, with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(f"{part}.cpp")
    for part in ("lstm_step", "lstm_train", "mlp")
]
HEADERS = [Path(__file__).with_name("vec.h")]

# Instruction sets by torch's reading of this CPU. The name carries the choice,
# so that machines sharing a home folder do not load each other's builds, and a
# digest of the sources and headers, as torch looks at the sources only when it
# decides whether a cached build is current.
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


@functools.cache
def lstm_kernels() -> ModuleType | None:
    """The compiled module of both LSTM kernels, or None (logged once) if it
    cannot be built."""
    cpp_extension = _cpp_extension()
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _FLAGS.get(capability, [])
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS))
    try:
        return cpp_extension.load(
            name=f"hierarchy_lstm_{capability.lower()}_{digest.hexdigest()[:10]}",
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, a failed build
        logger.warning(
            "the fused LSTM kernels could not be built (%s: %s); running the "
            "eager step. Building them takes a C++ compiler and ninja (pip "
            "install ninja)",
            type(error).__name__,
            _cause(str(error)),
        )
        return None


def built() -> ModuleType | None:
    """The compiled module if ``lstm_kernels`` has built it in this process, else
    None, without building it: for code that runs faster with the kernels but
    should not start a build, or warn, where no rule asked for them."""
    if lstm_kernels.cache_info().currsize == 0:
        return None
    return lstm_kernels()


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its warning that no CUDA
    runtime is found (on a CPU machine with a CUDA folder): these kernels are
    built for the CPU alone, and the warning only puzzles their users."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        torch_logger.setLevel(level)
    return cpp_extension


def _cause(message: str) -> str:
    """The telling line of a build error: torch's first line is the compile
    command, and the compiler's or the shell's complaint comes later."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    telling = [
        line
        for line in lines[1:]
        if "error" in line.lower() or "not found" in line.lower()
    ]
    return (telling or lines or [""])[0]


def kernel_weights(
    weights: dict[str, Tensor], num_layers: int, hidden: int
) -> tuple[list[Tensor], list[Tensor], Tensor, float]:
    """The LSTM rule's named weights as ``lstm_step`` reads them: each layer's
    (K, 4H) weight and bias transposed to (4H, K) and scaled so that the gate
    sums come out as base-2 exponents of exp(-z) (-log2(e) z for i, f, o and
    -2 log2(e) z for g), then the head's (H,) weights and its bias."""
    log2e = math.log2(math.e)
    scale = torch.full((4 * hidden,), -log2e, dtype=torch.float32)
    scale[2 * hidden : 3 * hidden] = -2.0 * log2e
    matrices, biases = [], []
    for layer in range(num_layers):
        matrices.append((weights[f"w{layer}"].T * scale[:, None]).contiguous())
        biases.append((weights[f"b{layer}"] * scale).contiguous())
    head = weights["w_out"].reshape(-1).contiguous()
    return matrices, biases, head, float(weights["b_out"])


class LSTMTrainStep(torch.autograd.Function):
    """One step of the LSTM rule by ``lstm_rule_forward``, differentiable once.

    Takes the flat weights ``theta`` (P,) in the order of ``LSTMRule.shapes``, the
    gradient of n = B * D coordinates as ``features`` (the preprocessed (2, n),
    or the raw (1, n), which the kernel preprocesses with ``preprocess_p``: no
    gradient reaches it then) and the state as (B, D, H) tensors (h, c of each
    layer in turn); returns the updates (B, D) and the new state in the same
    order, (B, D, H) views of the (H, n) rows the kernel writes. The kernel
    slices theta and changes layouts itself, so that autograd records no view
    of them and a step dispatches few calls: a state already in that layout is
    read in place, another is copied. Backward is hand-written in
    ``lstm_train_backward`` and cannot itself be differentiated again.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        kernel: ModuleType,
        scale: float,
        preprocess_p: float,
        theta: Tensor,
        features: Tensor,
        *state: Tensor,
    ) -> tuple[Tensor, ...]:
        out = kernel.lstm_rule_forward(
            theta, features, list(state), scale, preprocess_p
        )
        returned = 1 + len(state)
        ctx.save_for_backward(theta, features, *out[returned:])
        ctx.kernel, ctx.scale, ctx.preprocess_p = kernel, scale, preprocess_p
        ctx.shape = tuple(state[0].shape[:2])
        ctx.set_materialize_grads(False)
        return tuple(out[:returned])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_updates: Tensor | None,
        *grads: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        theta, features, *saved = ctx.saved_tensors
        grad_theta, grad_features, *grad_state = ctx.kernel.lstm_rule_backward(
            theta,
            features,
            saved,
            grad_updates,
            list(grads),
            *ctx.shape,
            ctx.scale,
            ctx.needs_input_grad[4],
            ctx.preprocess_p,
        )
        return (None, None, None, grad_theta, grad_features, *grad_state)
