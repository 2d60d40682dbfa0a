"""Quantized linears and embeddings (affine; 4 or 8 bits; groups of 32, 64 or 128).

Two entry points: `prepare_quantized(model, weights)` swaps in quantized modules wherever the
checkpoint carries `<path>.scales`, so quantized weights load straight in without a float copy;
`quantize(model, bits, group_size)` quantizes a float model and returns the config entry
(mlx-lm's form) that describes it. The converter's mixed recipe lives in `checkpoints.plan`.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

__all__ = ["inferred_params", "linear_rows", "prepare_quantized", "quantize"]


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[-1]


def inferred_params(module: nn.Module, weight_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> dict:
    """Bits and group size of an affine-quantized tensor, read off its packed shapes."""
    in_features = _in_features(module)
    group_size = in_features // scales_shape[-1]
    bits = weight_shape[-1] * 32 // in_features
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def _shape(weights, name: str) -> tuple[int, ...]:
    # A lazy checkpoint (`checkpoints.LazyWeights`) knows its shapes without decoding the tensor.
    shape_of = getattr(weights, "shape_of", None)
    return tuple(shape_of(name) if shape_of is not None else weights[name].shape)


def prepare_quantized(model: nn.Module, weights: dict[str, mx.array]) -> Optional[dict]:
    """Quantize exactly the modules whose weights arrive quantized; returns their config entry."""
    found: dict[str, dict] = {}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        params = inferred_params(module, _shape(weights, f"{path}.weight"), _shape(weights, f"{path}.scales"))
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


def linear_rows(linear: nn.Module, x: mx.array, start: Optional[int] = None, stop: Optional[int] = None) -> mx.array:
    """Output features start..stop (all by default) of a float or affine-quantized linear (or a
    quantized embedding used as one), from row views of its weight: nothing is copied."""

    def rows(name: str) -> mx.array:
        return linear[name] if start is None else linear[name][start:stop]

    if "scales" in linear:
        y = mx.quantized_matmul(
            x, rows("weight"), scales=rows("scales"), biases=rows("biases") if "biases" in linear else None,
            transpose=True, group_size=linear.group_size, bits=linear.bits, mode=linear.mode,
        )
    else:
        y = x @ rows("weight").T
    return y + rows("bias") if "bias" in linear else y
