"""How much of the fused LSTM training step is memory: the kernels on one block
of coordinates whose inputs stay in cache, against their share of a real step.

A real MNIST step (15,910 coordinates, hidden 20, two layers) streams its state
and activated gates through memory; one block of 1,024 coordinates, stepped over
and over on one thread, finds every input in the L2 cache. The block's time,
scaled to the blocks a thread takes in a real step, is what the step would cost
with free memory traffic. The script runs itself under a glibc setting that
keeps freed memory in the heap, so that each truncation's fresh outputs do not
fault in their pages, as they do not in steady-state meta-training.

    python benchmarks/kernel_blocks.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from hierarchy.kernels import lstm_kernels

HIDDEN, LAYERS, COORDINATES, BLOCK, TRUNCATION = 20, 2, 15_910, 1_024, 20
KEEP_HEAP = (
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
)


def _inputs(n: int, generator: torch.Generator) -> dict:
    """A step's arguments for n coordinates: raw gradients, state, weights."""

    def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    return {
        "features": draw(1, n, scale=1e-3),
        "h": [draw(HIDDEN, n, scale=0.5) for _ in range(LAYERS)],
        "c": [draw(HIDDEN, n) for _ in range(LAYERS)],
        "weights": [draw(2 + HIDDEN, 4 * HIDDEN, scale=0.2)]
        + [draw(2 * HIDDEN, 4 * HIDDEN, scale=0.2) for _ in range(LAYERS - 1)],
        "biases": [draw(4 * HIDDEN, scale=0.1) for _ in range(LAYERS)],
        "head": draw(HIDDEN, scale=0.1),
        "head_bias": torch.zeros(1),
        "grad_updates": draw(n),
    }


def _forward(kernel, x: dict, h: list, c: list) -> list[torch.Tensor]:
    return kernel.lstm_train_forward(
        x["features"],
        h,
        c,
        x["weights"],
        x["biases"],
        x["head"],
        x["head_bias"],
        0.1,
        10.0,
    )


def _backward(kernel, x: dict, h, c, out, grad_h, grad_c) -> list[torch.Tensor]:
    grads = [torch.empty_like(w) for w in x["weights"]]
    bias_grads = [torch.empty_like(b) for b in x["biases"]]
    return kernel.lstm_train_backward(
        x["features"],
        h,
        c,
        list(out[1 : 1 + LAYERS]),
        list(out[1 + LAYERS : 1 + 2 * LAYERS]),
        list(out[1 + 2 * LAYERS :]),
        x["weights"],
        x["head"],
        0.1,
        x["grad_updates"],
        grad_h,
        grad_c,
        grads,
        bias_grads,
        torch.empty(HIDDEN),
        torch.empty(1),
        False,
        10.0,
    )


def in_cache(kernel, repeats: int = 400) -> tuple[float, float]:
    """Seconds per forward and per backward of one block, inputs in cache."""
    torch.set_num_threads(1)
    x = _inputs(BLOCK, torch.Generator().manual_seed(0))
    grad_h = [torch.randn(HIDDEN, BLOCK) for _ in range(LAYERS)]
    grad_c = [torch.randn(HIDDEN, BLOCK) for _ in range(LAYERS)]
    out = _forward(kernel, x, x["h"], x["c"])
    forward, backward = [], []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            _forward(kernel, x, x["h"], x["c"])
        middle = time.perf_counter()
        for _ in range(repeats):
            _backward(kernel, x, x["h"], x["c"], out, grad_h, grad_c)
        end = time.perf_counter()
        forward.append((middle - start) / repeats)
        backward.append((end - middle) / repeats)
    return min(forward), min(backward)


def truncation(kernel, threads: int = 2, repeats: int = 7) -> tuple[float, float]:
    """Seconds per forward and per backward step of a 20-step truncation at the
    MNIST size, each step's state the last one's output, as in meta-training."""
    torch.set_num_threads(threads)
    x = _inputs(COORDINATES, torch.Generator().manual_seed(0))
    forward, backward = [], []
    for _ in range(repeats):
        h, c, tape = x["h"], x["c"], []
        start = time.perf_counter()
        for _ in range(TRUNCATION):
            out = _forward(kernel, x, h, c)
            tape.append((h, c, out))
            h, c = list(out[1 : 1 + LAYERS]), list(out[1 + LAYERS : 1 + 2 * LAYERS])
        middle = time.perf_counter()
        grad_h = grad_c = [torch.empty(0)] * LAYERS
        for h, c, out in reversed(tape):
            grads = _backward(kernel, x, h, c, out, grad_h, grad_c)
            grad_h, grad_c = list(grads[1 : 1 + LAYERS]), list(grads[1 + LAYERS :])
        end = time.perf_counter()
        forward.append((middle - start) / TRUNCATION)
        backward.append((end - middle) / TRUNCATION)
    return statistics.median(forward), statistics.median(backward)


def main() -> None:
    if KEEP_HEAP not in os.environ.get("GLIBC_TUNABLES", ""):
        tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), KEEP_HEAP]))
        env = {**os.environ, "GLIBC_TUNABLES": tunables}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    kernel = lstm_kernels()
    if kernel is None:
        raise SystemExit("the fused kernels cannot be built here")
    threads = 2
    blocks_per_thread = COORDINATES / BLOCK / threads
    block = in_cache(kernel)
    step = truncation(kernel, threads)
    for name, one, real in zip(("forward", "backward"), block, step):
        floor = one * blocks_per_thread
        print(
            f"{name}: one block in cache {one * 1e6:.0f} us, x {blocks_per_thread:.2f}"
            f" blocks a thread = {floor * 1e3:.2f} ms; real step {real * 1e3:.2f} ms"
            f" ({floor / real:.0%} of it)"
        )


if __name__ == "__main__":
    main()
