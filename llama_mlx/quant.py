"""Quantized linears and embeddings (affine; 4 or 8 bits; groups of 32, 64 or 128).

Two entry points: `prepare_quantized(model, weights)` swaps in quantized modules wherever the
checkpoint carries `<path>.scales`, so quantized weights load straight in without a float copy;
`quantize(model, bits, group_size)` quantizes a float model and returns the config entry
(mlx-lm's form) that describes it. The converter's mixed recipe lives in `checkpoints.plan`.
"""

from __future__ import annotations

import atexit
import os
import signal
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .model import MLP, linear_rows, swiglu


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[-1]


def inferred_params(module: nn.Module, weight: mx.array, scales: mx.array) -> dict:
    """Bits and group size of an affine-quantized tensor, read off its packed shapes."""
    in_features = _in_features(module)
    group_size = in_features // scales.shape[-1]
    bits = weight.shape[-1] * 32 // in_features
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def prepare_quantized(model: nn.Module, weights: dict[str, mx.array]) -> Optional[dict]:
    """Quantize exactly the modules whose weights arrive quantized; returns their config entry."""
    found: dict[str, dict] = {}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        params = inferred_params(module, weights[f"{path}.weight"], weights[f"{path}.scales"])
        found[path] = params
        return params

    nn.quantize(model, class_predicate=predicate)
    return _config_entry(found) if found else None


def quantize(model: nn.Module, bits: int = 4, group_size: int = 64) -> dict:
    """Quantize a float model in place (rows that do not split into whole groups stay float)."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"unsupported bits {bits}: MLX affine quantization takes 2, 3, 4, 5, 6 or 8")
    if group_size not in (32, 64, 128):
        raise ValueError(f"unsupported group size {group_size}: use 32, 64 or 128")
    def predicate(path: str, module: nn.Module) -> bool:
        if not hasattr(module, "to_quantized") or isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return False
        return _in_features(module) % group_size == 0  # otherwise the row does not split into whole groups

    nn.quantize(model, group_size=group_size, bits=bits, mode="affine", class_predicate=predicate)
    return {"group_size": group_size, "bits": bits}


def _config_entry(per_module: dict[str, dict]) -> dict:
    """mlx-lm's `quantization` entry: the commonest setting plus an entry for each module that differs."""
    counts: dict[tuple, int] = {}
    for p in per_module.values():
        key = (p["group_size"], p["bits"])
        counts[key] = counts.get(key, 0) + 1
    group_size, bits = max(counts, key=counts.get)
    default = {"group_size": group_size, "bits": bits}
    entry: dict = dict(default)
    for path, p in per_module.items():
        if (p["group_size"], p["bits"]) != (default["group_size"], default["bits"]):
            entry[path] = {"group_size": p["group_size"], "bits": p["bits"]}
    return entry


# ------------------------------------------------------------------------------------------------
# CPU threads. MLX's CPU backend runs one quantized matmul on one thread; each CPU stream has a
# thread of its own, so a matmul split by output rows over n streams runs on n cores.

_cpu_streams: list = []


def _streams(n: int) -> list:
    if len(_cpu_streams) >= n:
        return _cpu_streams[:n]
    if not _cpu_streams:
        atexit.register(_drain)
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


def _drain() -> None:
    # Work still queued at exit (a decode step runs one token ahead) must finish before MLX tears
    # its stream threads down: a stream waiting on another one already stopped would never return.
    for stream in [mx.default_stream(mx.cpu), *_cpu_streams]:
        mx.synchronize(stream)


def _row_parts(module: nn.Module, threads: int) -> list[tuple[int, int]]:
    rows = module["weight"].shape[0]
    n = min(threads, rows // 256)
    return [(rows * i // n, rows * (i + 1) // n) for i in range(n)] if n >= 2 else []


def threaded_quantized_matmul(x: mx.array, module: nn.Module, threads: int) -> mx.array:
    """`x @ W.T` (+ bias) for a quantized linear or embedding, its rows spread over `threads` CPU streams."""
    parts = _row_parts(module, threads)
    if not parts:
        return linear_rows(module, x)
    outs = []
    for stream, (a, b) in zip(_streams(len(parts)), parts):
        with mx.stream(stream):
            outs.append(linear_rows(module, x, a, b))
    return mx.concatenate(outs, axis=-1)


class ThreadedQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose matmul runs on several CPU threads (`use_cpu_threads`)."""

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
        gate, up = self.get("gate_proj"), self.get("up_proj")
        parts = _row_parts(gate, self.threads) if isinstance(gate, nn.QuantizedLinear) else []
        if not parts or not isinstance(up, nn.QuantizedLinear):
            return super().__call__(x)
        acts = []
        for stream, (a, b) in zip(_streams(len(parts)), parts):
            with mx.stream(stream):
                acts.append(swiglu(linear_rows(gate, x, a, b), linear_rows(up, x, a, b)))
        return self.down_proj(mx.concatenate(acts, axis=-1))


def use_cpu_threads(model: nn.Module, threads: Optional[int] = None) -> int:
    """Spread the model's quantized matmuls over `threads` CPU threads (default: the CPU count, at
    most 8). Results are unchanged: each output row is computed exactly as before. Returns the count."""
    threads = threads or min(os.cpu_count() or 1, 8)
    if threads < 2:
        return 1
    swap = {nn.QuantizedLinear: ThreadedQuantizedLinear, nn.QuantizedEmbedding: ThreadedQuantizedEmbedding,
            MLP: ThreadedMLP}
    for _, module in model.named_modules():
        cls = swap.get(type(module))
        if cls is not None:
            module.__class__ = cls
            module.threads = threads
    return threads
