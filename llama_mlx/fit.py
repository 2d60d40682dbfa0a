"""Context and KV cache sized to a memory budget, as LM Studio's AutoFit and llama.cpp's `--fit` do.

The budget is the device's memory (`device_memory`: Metal's recommended working set, a CUDA card's
memory, else the machine's RAM) or one given. Less a headroom for activations, prefill scratch and
the framework, and less the weights, what is left holds the KV cache: `Fit.context` positions of one
sequence (never more than the model's own context), `Fit.kv_budget` bytes for all sequences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import MemoryFitError

__all__ = ["HEADROOM", "MIN_CONTEXT", "Fit", "device_memory", "fit_context", "fit_model", "kv_bytes_per_token"]

HEADROOM = 0.10  # of the budget: activations, a prefill chunk's scratch, the framework's own
MIN_CONTEXT = 256  # positions below which a model is not worth serving in a budget


def device_memory() -> Optional[int]:
    """Bytes the default device can give a model, or None where unknown."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class Fit:
    """What fits: `context` positions of one sequence (the model's `model_context` at most) and
    `kv_budget` bytes of KV cache for all sequences, in `budget` bytes beside `weights` bytes."""

    context: int
    model_context: int
    budget: int
    weights: int
    kv_bytes_per_token: int
    kv_budget: int

    @property
    def limited(self) -> bool:
        """Whether memory, not the model, bounds the context."""
        return self.context < self.model_context

    def describe(self) -> str:
        gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
        bound = "what fits in memory" if self.limited else "the model's own"
        return (f"context {self.context:,} tokens ({bound}; {gb(self.kv_budget)} of KV cache in a "
                f"{gb(self.budget)} budget beside {gb(self.weights)} of weights)")


def kv_bytes_per_token(model: nn.Module, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> int:
    """Bytes of keys and values, every layer, one position (quantized: codes, and a scale and bias a group)."""
    args = model.args
    dtype = model.model.compute_dtype or model.model.norm.weight.dtype
    per_head = args.head_dim * dtype.size if kv_bits is None else (
        args.head_dim * kv_bits // 8 + 2 * (args.head_dim // kv_group_size) * dtype.size)
    return 2 * len(model.layers) * args.num_key_value_heads * per_head


def fit_context(model_context: int, weights: int, kv_per_token: int, memory: Optional[int] = None,
                headroom: float = HEADROOM) -> Fit:
    """The `Fit` of a model of `weights` bytes and `kv_per_token` KV bytes a position in `memory`
    bytes (default: `device_memory()`; unknown: no bound). Raises MemoryFitError when not even
    `MIN_CONTEXT` positions fit."""
    budget = memory if memory is not None else device_memory()
    if budget is None:
        return Fit(model_context, model_context, 0, weights, kv_per_token, 0)
    kv_budget = int(budget * (1 - headroom)) - weights
    if kv_budget < MIN_CONTEXT * kv_per_token:
        raise MemoryFitError(
            f"the model's weights ({weights / 1e9:.2f} GB) leave no room for a {MIN_CONTEXT}-token KV cache "
            f"({MIN_CONTEXT * kv_per_token / 1e9:.3f} GB) in a memory budget of {budget / 1e9:.2f} GB "
            f"({headroom:.0%} kept as headroom)")
    return Fit(min(model_context, kv_budget // kv_per_token), model_context, budget, weights, kv_per_token, kv_budget)


def fit_model(model: nn.Module, memory: Optional[int] = None, *, kv_bits: Optional[int] = None,
              kv_group_size: int = 64) -> Fit:
    """`fit_context` of a loaded model (its parameters' bytes; its KV cache's bytes a position)."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return fit_context(int(model.args.max_position_embeddings), weights,
                       kv_bytes_per_token(model, kv_bits, kv_group_size), memory)
