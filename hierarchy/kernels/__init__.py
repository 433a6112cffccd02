"""Fused CPU kernels, compiled on first use with torch's C++ extension loader.

The LSTM optimiser's inference step runs as one C++ kernel (``lstm_step.cpp``)
when a rule has ``compile`` set: each tile of coordinates goes through both
layers and the head in cache, where eager torch makes a dozen passes over memory.
Building needs a C++ compiler and ninja; the first build takes about 30 s and is
cached by torch (``TORCH_EXTENSIONS_DIR``). Where it cannot be built the rule
runs its eager step, with one warning.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lstm_step.cpp")

# Instruction sets by torch's reading of this CPU. The name carries the choice,
# so that machines sharing a home folder do not load each other's builds.
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


@functools.cache
def lstm_step_kernel() -> ModuleType | None:
    """The compiled LSTM step module, or None (logged once) if it cannot build."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    flags = _FLAGS.get(capability, [])
    try:
        return cpp_extension.load(
            name=f"hierarchy_lstm_step_{capability.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, a failed build
        logger.warning(
            "the fused LSTM step could not be built (%s: %s); running the eager "
            "step. Building it takes a C++ compiler and ninja (pip install ninja)",
            type(error).__name__,
            _cause(str(error)),
        )
        return None


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
