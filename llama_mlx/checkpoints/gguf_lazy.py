"""GGUF tensors read lazily: each one memory-mapped and converted when asked for, then unmapped.

So loading holds the weights once and converting holds about one tensor at a time, never the file.
A quantized tensor becomes three (weight, scales, biases), decoded together: reading the weight
then its scales and biases (as the writer and the model do) decodes the blocks once.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from . import gguf_quants as Q
from .base import Checkpoint, Tensor, dtype_name
from .plan import Item

__all__ = ["conversion_summary", "gguf_tensors", "read_float", "track_conversion_error"]

_FLOATS = {"F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16)}


def _map(path: Path, offset: int, dtype, shape) -> np.memmap:
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_float(path: Path, info) -> mx.array:
    """An F32 / F16 / BF16 tensor, copied out of a map of its bytes only (BF16 exactly, not via float16)."""
    np_dtype, dtype = _FLOATS[info.type]
    raw = _map(path, info.offset, np_dtype, info.shape)
    try:
        a = mx.array(raw)
    finally:
        del raw
    return a.view(mx.bfloat16) if dtype == mx.bfloat16 else a


class _Quantized:
    """One quantized GGUF tensor as MLX's affine triple, decoded once for its three parts."""

    def __init__(self, path: Path, info, scale_dtype: mx.Dtype):
        self.path, self.info, self.scale_dtype = path, info, scale_dtype
        self.kind = info.type
        self.rows, self.cols = math.prod(info.shape[:-1]), info.shape[-1]
        self.bits = Q.TARGET_BITS[self.kind]
        self.measure = False
        self.error: Q.ConversionError | None = None  # set by a measured read
        self._parts: dict[str, mx.array] = {}

    def outputs(self) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
        groups = self.cols // Q.GROUP_SIZE
        return {"weight": ((self.rows, self.cols * self.bits // 32), mx.uint32),
                "scales": ((self.rows, groups), self.scale_dtype),
                "biases": ((self.rows, groups), self.scale_dtype)}

    def _raw(self) -> np.memmap:
        """A map of the tensor's blocks (bytes as stored)."""
        per, nbytes = Q.BLOCKS[self.kind]
        return _map(self.path, self.info.offset, np.uint8, (self.rows * self.cols // per * nbytes,))

    def values(self) -> np.ndarray:
        """The source's values, float32 and flat, as llama.cpp dequantizes them."""
        raw = self._raw()
        try:
            return Q.dequantize(self.kind, raw)
        finally:
            del raw

    def read(self, part: str) -> mx.array:
        # Scales and biases of the last decode wait for their read; the weight is never kept, so
        # parts read in another order cost a second decode, never a second copy.
        if part in self._parts:
            return self._parts.pop(part)
        raw = self._raw()
        try:
            try:
                *triple, exact = Q.to_affine(self.kind, raw, self.rows, self.scale_dtype, with_exact=True)
            except Q.NonFiniteScaleError as e:
                raise CheckpointError(f"{self.path}: tensor {self.info.name!r}: {e}") from None
            if self.measure:
                self.error = Q.measure(self.kind, Q.dequantize(self.kind, raw), triple, exact, self.scale_dtype)
        finally:
            del raw
        parts = dict(zip(("weight", "scales", "biases"), triple))
        out = parts.pop(part)
        parts.pop("weight", None)
        self._parts = parts
        return out


class _Part:
    def __init__(self, source: _Quantized, part: str):
        self.source, self.part = source, part

    def __call__(self) -> mx.array:
        return self.source.read(self.part)


def gguf_tensors(path: Path, info, name: str, scale_dtype: mx.Dtype = mx.float16) -> dict[str, Tensor]:
    """Lazy Tensors of one GGUF tensor under HF `name` (`...weight`); a quantized one adds .scales/.biases."""
    if info.type in _FLOATS:
        dtype = _FLOATS[info.type][1]
        return {name: Tensor(tuple(info.shape), dtype, path, lambda: read_float(path, info))}
    per = Q.BLOCKS[info.type][0]
    if len(info.shape) < 2 or info.shape[-1] % per:
        raise CheckpointError(f"{path}: tensor {info.name!r} of shape {list(info.shape)} has rows that are not "
                              f"whole {info.type} blocks of {per}")
    source = _Quantized(path, info, scale_dtype)
    module = name[: -len(".weight")]
    return {f"{module}.{part}": Tensor(shape, dtype, path, _Part(source, part))
            for part, (shape, dtype) in source.outputs().items()}


def _sources(ckpt: Checkpoint) -> list[_Quantized]:
    seen: dict[int, _Quantized] = {}
    for t in ckpt.tensors.values():
        if isinstance(t.reader, _Part):
            seen.setdefault(id(t.reader.source), t.reader.source)
    return list(seen.values())


def track_conversion_error(ckpt: Checkpoint, items: list[Item]) -> list[Item]:
    """The planned items, made to measure each GGUF quantized tensor's conversion error as written.

    A tensor carried over as its affine triple is measured as it is decoded (counting the groups
    held exactly); one re-quantized or written as floats, from what is written, dequantized in
    float32, against the source's values.
    """
    out = []
    for item in items:
        t = ckpt.tensors.get(item.name)
        source = t.reader.source if t is not None and isinstance(t.reader, _Part) else None
        if source is None:
            out.append(item)
            continue
        module = item.name[: -len(".weight")]
        carried = [(f"{module}.{p}", shape, dtype) for p, (shape, dtype) in source.outputs().items()]
        if [(n, tuple(shape), dtype) for n, shape, dtype in item.outputs] == carried:
            source.measure = True
            out.append(item)
        else:
            out.append(dataclasses.replace(item, produce=_measured(item.produce, source, module)))
    return out


def _measured(produce, source: _Quantized, module: str):
    def run() -> dict[str, mx.array]:
        arrays = produce()
        w, scales = arrays[module + ".weight"], arrays.get(module + ".scales")
        if scales is None:
            ours, target = w, f"{dtype_name(w.dtype)} weights"
        else:
            gs, bits = source.cols // scales.shape[-1], w.shape[-1] * 32 // source.cols
            ours = mx.dequantize(w, scales.astype(mx.float32), arrays[module + ".biases"].astype(mx.float32),
                                 group_size=gs, bits=bits)
            target = f"{bits}-bit group {gs} ({dtype_name(scales.dtype)} scales)"
        source.error = Q.compare(source.kind, target, source.values(), ours)
        return arrays

    return run


def conversion_summary(ckpt: Checkpoint) -> dict[tuple[str, str], Q.ConversionError]:
    """Conversion error per (GGUF type, what it was written as), over the tensors written by items
    from `track_conversion_error`."""
    summary: dict[tuple[str, str], Q.ConversionError] = {}
    for s in _sources(ckpt):
        if s.error is not None:
            key = (s.kind, s.error.target)
            summary.setdefault(key, Q.ConversionError(*key)).add(s.error)
    return summary
