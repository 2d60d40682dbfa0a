"""What the writer writes: each module's tensors cast, kept quantized, or (re)quantized as asked.

Planning needs only shapes and dtypes, so shard layout and headers are known before any data is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from ..errors import ConfigError
from .base import Checkpoint, is_float, module_quantization

__all__ = [
    "GROUP_SIZES",
    "HIGH_PRECISION",
    "Item",
    "MLX_BITS",
    "RECIPES",
    "check_options",
    "main_dtype",
    "plan",
]

MLX_BITS = (2, 3, 4, 5, 6, 8)  # affine bit widths mx.quantize supports
GROUP_SIZES = (32, 64, 128)
RECIPES = ("uniform", "mixed")
HIGH_PRECISION = ("model.embed_tokens", "lm_head")  # the mixed recipe keeps these at 8 bits


@dataclass
class Item:
    """One module's output tensors, produced together (a quantized weight yields three)."""

    name: str  # the module's weight name, for progress
    outputs: list[tuple[str, tuple[int, ...], mx.Dtype]]
    produce: Callable[[], dict[str, mx.array]]
    parameters: int  # logical (unquantized) parameter count

    @property
    def nbytes(self) -> int:
        return sum(_size(shape) * dtype.size for _, shape, dtype in self.outputs)


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _order(name: str):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if "embed_tokens" in name else 2, 0, name)


def check_options(bits: int, group_size: int, recipe: str | None) -> None:
    """Validate quantization options against what MLX supports."""
    if bits not in MLX_BITS:
        raise ConfigError(f"--bits {bits} is not supported by MLX: choose one of {', '.join(map(str, MLX_BITS))}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size} is not supported: choose 32, 64 or 128")
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"unknown quantization recipe {recipe!r}: choose {' or '.join(RECIPES)}")


def main_dtype(ckpt: Checkpoint) -> mx.Dtype:
    """The checkpoint's float dtype: that of its embedding (or of the embedding's scales)."""
    for name in ("model.embed_tokens.scales", "model.embed_tokens.weight"):
        t = ckpt.tensors.get(name)
        if t is not None and is_float(t.dtype):
            return t.dtype
    return mx.float16


def plan(ckpt: Checkpoint, *, dtype: mx.Dtype | None = None, quantize: bool = False, bits: int = 4,
         group_size: int = 64, recipe: str | None = None, dequantize: bool = False,
         update: tuple[set[str], Callable[[str, mx.array], mx.array]] | None = None,
         ) -> tuple[list[Item], dict | None]:
    """Output items in writing order, and the output config's `quantization` entry (None if none);
    `dequantize`: a quantized source's weights are written as floats (unless `quantize`).
    update: (modules, fn): those modules' float weights become fn(module, weight) before they are cast
    or quantized (an adapter fused in, `lora.weight_updater`); kept-quantized ones are quantized again
    with their own bits and group size."""
    changed, fn = update or (set(), None)
    dtype = dtype or main_dtype(ckpt)
    source_q = ckpt.config.get("quantization")
    modules = sorted({n.rpartition(".")[0] for n in ckpt.tensors}, key=_order)
    items: list[Item] = []
    out_q: dict = {"group_size": group_size, "bits": bits} if quantize else ({} if dequantize else dict(source_q or {}))
    for module in modules:
        weight = ckpt.tensors[module + ".weight"]
        scales = ckpt.tensors.get(module + ".scales")
        src = module_quantization(source_q, module) if scales is not None else None
        if src is not None and "mode" in (source_q or {}):
            src["mode"] = source_q["mode"]
        in_dim = scales.shape[-1] * src["group_size"] if src else weight.shape[-1]
        logical = (weight.shape[0], in_dim) if src else weight.shape
        target = None
        if quantize and len(logical) == 2 and in_dim % group_size == 0:
            target = {"group_size": group_size, "bits": bits}
            if recipe == "mixed" and module in HIGH_PRECISION:
                target = {"group_size": group_size, "bits": 8}
            if target is not None and target["bits"] != bits:
                out_q[module] = target
        elif not quantize and src is not None and not dequantize:
            if module not in changed:
                items.append(_keep_quantized(ckpt, module, dtype, _size(logical)))
                continue
            if src.get("mode", "affine") != "affine":
                raise ConfigError(f"{module}: an adapter fuses into affine-quantized weights only, "
                                  f"not {src['mode']!r} (convert with --dequantize)")
            target = {"group_size": src["group_size"], "bits": src["bits"]}
        items.append(_float_or_quantized(ckpt, module, logical, src, target, dtype,
                                         (lambda w, m=module: fn(m, w)) if module in changed else None))
    return items, (out_q if _quantized_any(items) else None)


def _quantized_any(items: list[Item]) -> bool:
    return any(name.endswith(".scales") for item in items for name, _, _ in item.outputs)


def _cast(a: mx.array, dtype: mx.Dtype) -> mx.array:
    return a.astype(dtype) if is_float(a.dtype) and a.dtype != dtype else a


def _keep_quantized(ckpt: Checkpoint, module: str, dtype: mx.Dtype, parameters: int) -> Item:
    names = [f"{module}.{s}" for s in ("weight", "scales", "biases")]
    tensors = [ckpt.tensors[n] for n in names]
    outputs = [(n, t.shape, dtype if is_float(t.dtype) else t.dtype) for n, t in zip(names, tensors)]

    def produce():
        return {n: _cast(t.read(), dtype) for n, t in zip(names, tensors)}

    return Item(names[0], outputs, produce, parameters)


def _float_or_quantized(ckpt: Checkpoint, module: str, logical: tuple, src: dict | None,
                        target: dict | None, dtype: mx.Dtype,
                        update: Callable[[mx.array], mx.array] | None = None) -> Item:
    name = module + ".weight"

    def weight() -> mx.array:
        w = ckpt.tensors[name].read()
        if src is not None:  # dequantize first: re-quantizing or writing floats
            s, b = ckpt.tensors[module + ".scales"].read(), ckpt.tensors[module + ".biases"].read()
            # float32: float16 scale*code + bias loses low bits (an update, as mlx_lm.fuse, works in the source's)
            if src.get("mode", "affine") == "affine" and update is None:
                s, b = s.astype(mx.float32), b.astype(mx.float32)
            w = mx.dequantize(w, s, b, group_size=src["group_size"], bits=src["bits"],
                              mode=src.get("mode", "affine"))
        if update is not None:
            w = update(w)
        return _cast(w, dtype)

    if target is None:
        out_dtype = dtype if (src is not None or is_float(ckpt.tensors[name].dtype)) else ckpt.tensors[name].dtype
        return Item(name, [(name, logical, out_dtype)], lambda: {name: weight()}, _size(logical))

    gs, bits = target["group_size"], target["bits"]
    out, inp = logical
    outputs = [(name, (out, inp * bits // 32), mx.uint32),
               (module + ".scales", (out, inp // gs), dtype),
               (module + ".biases", (out, inp // gs), dtype)]

    def produce():
        wq, s, b = mx.quantize(weight(), group_size=gs, bits=bits)
        return {name: wq, module + ".scales": s, module + ".biases": b}

    return Item(name, outputs, produce, _size(logical))
