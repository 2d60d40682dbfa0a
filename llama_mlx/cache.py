"""KV caches, passed into the model as arguments (`cache.update_and_fetch(k, v)`).

`KVCache` preallocates in steps and writes new keys in place; `RotatingKVCache` bounds memory
to `max_size` tokens while keeping the first `keep`; `QuantizedKVCache` stores keys and values
quantized; `DecodeView` is the fixed-capacity form a compiled decode step traces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def _reserve(self, k: mx.array, v: mx.array, needed: int) -> None:
        if self.keys is not None and needed <= self.keys.shape[2]:
            return
        B, H, _, Dk = k.shape
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, capacity, Dk), k.dtype)
        new_v = mx.zeros((B, H, capacity, v.shape[3]), v.dtype)
        if self.keys is not None and self.offset:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        start = self.offset
        self._reserve(k, v, start + k.shape[2])
        self.offset += k.shape[2]
        self.keys[..., start : self.offset, :] = k
        self.values[..., start : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, L: int):
        return "causal" if L > 1 else None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        if not arrays:
            self.keys = self.values = None
            self.offset = 0
            return
        self.keys, self.values = arrays
        self.offset = self.keys.shape[2]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class RotatingKVCache(KVCache):
    """Holds at most `max_size` tokens: the first `keep` (attention sinks) and the most recent."""

    def __init__(self, max_size: int, keep: int = 4):
        super().__init__()
        if max_size <= keep:
            raise ValueError(f"max_kv_size ({max_size}) must exceed the {keep} kept tokens")
        self.max_size = max_size
        self.keep = keep
        self._write = 0  # next ring slot, in [keep, max_size)
        self._ordered = True  # buffer is in temporal order

    def _temporal(self) -> tuple[mx.array, mx.array]:
        n = min(self.offset, self.max_size)
        k, v = self.keys[..., :n, :], self.values[..., :n, :]
        if self._ordered or n < self.max_size:
            return k, v
        order = [*range(self.keep), *range(self._write, n), *range(self.keep, self._write)]
        idx = mx.array(order)
        return k[..., idx, :], v[..., idx, :]

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        L = k.shape[2]
        if L == 1 and self.keys is not None and self.offset >= self.max_size:
            # Ring write over the oldest non-kept token; order is irrelevant to one query.
            if self._write >= self.max_size:
                self._write = self.keep
            self.keys[..., self._write : self._write + 1, :] = k
            self.values[..., self._write : self._write + 1, :] = v
            self._write += 1
            self._ordered = False
            self.offset += 1
            return self.keys[..., : self.max_size, :], self.values[..., : self.max_size, :]
        if self.offset + L <= self.max_size and (self.keys is None or self._ordered):
            out = super().update_and_fetch(k, v)
            self._write = self.offset
            return out
        # Several tokens past the window: attend over window + new, then keep sinks + most recent.
        old_k, old_v = self._temporal()
        full_k = mx.concatenate([old_k, k], axis=2)
        full_v = mx.concatenate([old_v, v], axis=2)
        tail = self.max_size - self.keep
        self.keys = mx.concatenate([full_k[..., : self.keep, :], full_k[..., -tail:, :]], axis=2)
        self.values = mx.concatenate([full_v[..., : self.keep, :], full_v[..., -tail:, :]], axis=2)
        self.offset += L
        self._write = self.max_size
        self._ordered = True
        return full_k, full_v

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return list(self._temporal())

    @state.setter
    def state(self, arrays: list[mx.array]) -> None:
        KVCache.state.fset(self, arrays)
        self._write = self.keys.shape[2] if arrays else 0
        self._ordered = True

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self._write = self.offset
        return n


class QuantizedKVCache(KVCache):
    """Keys and values stored affine-quantized (`kv_bits`), attended with quantized matmuls."""

    def __init__(self, bits: int = 8, group_size: int = 64):
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def _quantize(self, x: mx.array) -> tuple[mx.array, ...]:
        if x.shape[-1] % self.group_size:
            raise ValueError(f"kv_group_size {self.group_size} does not divide the head size {x.shape[-1]}")
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update_and_fetch(self, k: mx.array, v: mx.array):
        start, L = self.offset, k.shape[2]
        qk, qv = self._quantize(k), self._quantize(v)
        needed = start + L
        if self.keys is None or needed > self.keys[0].shape[2]:
            capacity = ((needed + self.step - 1) // self.step) * self.step

            def grow(old, new):
                B, H, _, _ = new[0].shape
                bufs = tuple(mx.zeros((B, H, capacity, a.shape[-1]), a.dtype) for a in new)
                if old is not None and start:
                    for b, o in zip(bufs, old):
                        b[..., :start, :] = o[..., :start, :]
                return bufs

            self.keys, self.values = grow(self.keys, qk), grow(self.values, qv)
        self.offset = needed
        for buf, new in zip(self.keys + self.values, qk + qv):
            buf[..., start:needed, :] = new
        return (
            tuple(a[..., :needed, :] for a in self.keys),
            tuple(a[..., :needed, :] for a in self.values),
        )

    def attention(self, q, k, v, scale, mask):
        B, n_heads, L, D = q.shape
        n_kv = k[0].shape[1]
        # (B, n_heads, L, D) -> (B, n_kv, rep, L, D): broadcast K/V heads instead of repeating them
        q = (q * scale).reshape(B, n_kv, n_heads // n_kv, L, D)
        kq = [a[:, :, None] for a in k]
        vq = [a[:, :, None] for a in v]
        scores = mx.quantized_matmul(q, *kq, transpose=True, group_size=self.group_size, bits=self.bits)
        if isinstance(mask, str):
            S = scores.shape[-1]
            mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        if mask is not None:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
        out = mx.quantized_matmul(weights, *vq, transpose=False, group_size=self.group_size, bits=self.bits)
        return out.reshape(B, n_heads, L, D)

    @property
    def state(self):
        if self.keys is None:
            return []
        return [a[..., : self.offset, :] for a in self.keys + self.values]

    @state.setter
    def state(self, arrays):
        if not arrays:
            self.keys = self.values = None
            self.offset = 0
            return
        self.keys, self.values = tuple(arrays[:3]), tuple(arrays[3:])
        self.offset = self.keys[0].shape[2]


class DecodeView:
    """A fixed-capacity cache whose offset is an array, for a compiled decode step.

    Attention runs over the whole buffer with a mask, so shapes stay constant from token to
    token and `mx.compile` traces once per capacity instead of once per position.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, k, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, v, self.offset, axes=(2,))
        return self.keys, self.values

    def make_mask(self, L: int) -> mx.array:
        positions = self.offset + mx.arange(L)[:, None]
        return mx.arange(self.keys.shape[2])[None] <= positions


def make_prompt_cache(
    num_layers: int,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    keep: int = 4,
) -> list[KVCache]:
    """One cache per layer: plain, rotating (`max_kv_size`) or quantized (`kv_bits`)."""
    if kv_bits is not None and max_kv_size is not None:
        raise ValueError("a quantized KV cache cannot also rotate: choose kv_bits or max_kv_size")
    if kv_bits is not None:
        return [QuantizedKVCache(kv_bits, kv_group_size) for _ in range(num_layers)]
    if max_kv_size is not None:
        return [RotatingKVCache(max_kv_size, keep) for _ in range(num_layers)]
    return [KVCache() for _ in range(num_layers)]


def trim_prompt_cache(cache: list[KVCache], n: int) -> int:
    """Drop the last `n` tokens from every layer; returns how many were dropped."""
    if not cache or not all(c.is_trimmable() for c in cache):
        return 0
    return [c.trim(n) for c in cache][0]


_KINDS = {cls.__name__: cls for cls in (KVCache, RotatingKVCache, QuantizedKVCache)}


def save_prompt_cache(
    path: Union[str, Path], cache: list[KVCache], tokens: list[int], metadata: Optional[dict] = None
) -> None:
    """Save a cache with the token history it holds (safetensors), atomically."""
    path = Path(path)
    arrays = {f"{i}.{j}": a for i, c in enumerate(cache) for j, a in enumerate(c.state)}
    layers = []
    for c in cache:
        info = {"kind": type(c).__name__, "n": len(c.state)}
        if isinstance(c, RotatingKVCache):
            info.update(max_size=c.max_size, keep=c.keep, offset=c.offset)
        if isinstance(c, QuantizedKVCache):
            info.update(bits=c.bits, group_size=c.group_size)
        layers.append(info)
    header = {
        "llama_mlx": json.dumps({"tokens": list(map(int, tokens)), "layers": layers}),
        "metadata": json.dumps(metadata or {}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")  # mlx appends the suffix otherwise
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_prompt_cache(path: Union[str, Path]) -> tuple[list[KVCache], list[int], dict]:
    """Load what `save_prompt_cache` wrote: (cache, tokens, metadata)."""
    arrays, header = mx.load(str(path), format="safetensors", return_metadata=True)
    info = json.loads(header["llama_mlx"])
    cache = []
    for i, layer in enumerate(info["layers"]):
        kind = _KINDS[layer["kind"]]
        if kind is RotatingKVCache:
            c = RotatingKVCache(layer["max_size"], layer["keep"])
        elif kind is QuantizedKVCache:
            c = QuantizedKVCache(layer["bits"], layer["group_size"])
        else:
            c = KVCache()
        c.state = [arrays[f"{i}.{j}"] for j in range(layer["n"])]
        if kind is RotatingKVCache:
            c.offset = layer["offset"]
        cache.append(c)
    return cache, info["tokens"], json.loads(header.get("metadata", "{}"))
