"""Quantized matmuls over several CPU threads, applied to a built model by `use_threads`.

MLX's CPU backend runs one quantized matmul on one thread; each CPU stream has a thread of its
own, so a matmul split by output rows over n streams runs on n cores. Each output row is
computed exactly as before, so results are unchanged.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..model import MLP, swiglu
from ..quant import linear_rows

__all__ = [
    "ThreadedMLP",
    "ThreadedQuantizedEmbedding",
    "ThreadedQuantizedLinear",
    "drain_thread",
    "row_parts",
    "threaded_quantized_matmul",
    "use_threads",
]

# MLX streams belong to the thread that made them: each thread running a model (a server runs one
# per model) has streams of its own.
_local = threading.local()
_drain_registered = False


def _streams(n: int) -> list:
    global _drain_registered
    _cpu_streams = getattr(_local, "streams", None)
    if _cpu_streams is None:
        _cpu_streams = _local.streams = []
    if len(_cpu_streams) >= n:
        return _cpu_streams[:n]
    if not _drain_registered:
        _drain_registered = True
        atexit.register(drain_thread)
    # A new stream starts a thread, which inherits this thread's signal mask: with SIGINT blocked
    # there, Ctrl-C always reaches the main thread (else it may wake a worker and be missed).
    blocking = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocking else None
    try:
        while len(_cpu_streams) < n:
            _cpu_streams.append(mx.new_stream(mx.cpu))
            mx.synchronize(_cpu_streams[-1])
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return _cpu_streams[:n]


def drain_thread() -> None:
    """Wait for the work this thread queued on its CPU streams to finish."""
    # Work still queued at exit (a decode step runs one token ahead) must finish before MLX tears
    # its stream threads down: a stream waiting on another one already stopped would never return.
    # (atexit runs on the main thread, which reaches only its own streams: other threads that ran
    # a model call `backends.finish_thread` before they end.)
    for stream in [mx.default_stream(mx.cpu), *getattr(_local, "streams", [])]:
        mx.synchronize(stream)


def row_parts(module: nn.Module, threads: int) -> list[tuple[int, int]]:
    """The (start, stop) row blocks of a weight for `threads` threads; none under 256 rows a block."""
    rows = module["weight"].shape[0]
    n = min(threads, rows // 256)
    return [(rows * i // n, rows * (i + 1) // n) for i in range(n)] if n >= 2 else []


def threaded_quantized_matmul(x: mx.array, module: nn.Module, threads: int) -> mx.array:
    """`x @ W.T` (+ bias) for a quantized linear or embedding, its rows spread over `threads` CPU streams."""
    parts = row_parts(module, threads)
    if not parts:
        return linear_rows(module, x)
    outs = []
    for stream, (a, b) in zip(_streams(len(parts)), parts):
        with mx.stream(stream):
            outs.append(linear_rows(module, x, a, b))
    return mx.concatenate(outs, axis=-1)


class ThreadedQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose matmul runs on several CPU threads."""

    threads = 2

    def __call__(self, x: mx.array) -> mx.array:
        return threaded_quantized_matmul(x, self, self.threads)


class ThreadedQuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose tied output head runs on several CPU threads."""

    threads = 2

    def as_linear(self, x: mx.array) -> mx.array:
        return threaded_quantized_matmul(x, self, self.threads)


class ThreadedMLP(MLP):
    """SwiGLU MLP whose gate, up and activation run per thread on matching row blocks, so only the
    activation (not gate and up) is joined: less memory than the plain MLP, on several cores."""

    threads = 2

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_proj, self.up_proj
        parts = row_parts(gate, self.threads) if isinstance(gate, nn.QuantizedLinear) else []
        if not parts or not isinstance(up, nn.QuantizedLinear):
            return super().__call__(x)
        acts = []
        for stream, (a, b) in zip(_streams(len(parts)), parts):
            with mx.stream(stream):
                acts.append(swiglu(linear_rows(gate, x, a, b), linear_rows(up, x, a, b)))
        return self.down_proj(mx.concatenate(acts, axis=-1))


_SWAP = {
    nn.QuantizedLinear: ThreadedQuantizedLinear,
    nn.QuantizedEmbedding: ThreadedQuantizedEmbedding,
    MLP: ThreadedMLP,
}


def _env_threads() -> Optional[int]:
    # Threads beyond the free cores only contend (other work on the machine): let users say.
    value = os.environ.get("LLAMA_MLX_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def use_threads(model: nn.Module, threads: Optional[int] = None) -> int:
    """Spread the model's quantized matmuls over `threads` CPU threads (default: the environment's
    LLAMA_MLX_THREADS, else the CPU count, at most 8), in place. Returns the count (1: nothing
    was changed)."""
    threads = threads or _env_threads() or min(os.cpu_count() or 1, 8)
    if threads < 2:
        return 1
    for _, module in model.named_modules():
        cls = _SWAP.get(type(module))
        if cls is not None:
            module.__class__ = cls
        if isinstance(module, tuple(_SWAP.values())):
            module.threads = threads
    return threads
