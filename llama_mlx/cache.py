"""KV caches, passed into the model as arguments (`cache.update_and_fetch(k, v)`).

`KVCache` preallocates in steps and writes new keys in place; `RotatingKVCache` bounds memory
to `max_size` tokens while keeping the first `keep`; `QuantizedKVCache` stores keys and values
quantized; `DecodeView` is the fixed-capacity form a compiled decode step traces. Each saves
and loads through `state` (its arrays), `meta_state` (its settings) and `from_state`.
`BatchKVCache` holds one row per sequence of a batch, each at its own length. `PromptCache` is a
model's cache together with the tokens it holds; `common_prefix` is how much of a prompt a cache
can reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Optional, Sequence, Union

import mlx.core as mx

from .errors import PromptCacheError
from .fileio import atomic_files
from .safetensors_file import check_safetensors

__all__ = [
    "BatchKVCache",
    "DecodeView",
    "HandOver",
    "KVCache",
    "PromptCache",
    "QuantizedBatchKVCache",
    "QuantizedKVCache",
    "RotatingKVCache",
    "RowsDecodeView",
    "common_prefix",
    "make_prompt_cache",
    "model_fingerprint",
    "row_copy",
]


class HandOver:
    """Buffers a compiled step takes whole: `reserve(n)`, then `hand_over()` (the cache holds
    nothing meanwhile, so the step's writes happen in place), then `take_back(keys, values, n)`.
    A cache says what advancing by n positions means (`_advance`)."""

    keys: Optional[mx.array]
    values: Optional[mx.array]

    def hand_over(self) -> tuple[mx.array, mx.array]:
        """The whole key and value buffers; the cache keeps no reference until `take_back`."""
        keys, values = self.keys, self.values
        self.keys = self.values = None
        return keys, values

    def take_back(self, keys: mx.array, values: mx.array, advance: int = 0) -> None:
        """Hold `keys` and `values` (as `hand_over` gave them, updated), `advance` positions on."""
        self.keys, self.values = keys, values
        if advance:
            self._advance(advance)

    def _advance(self, n: int) -> None:
        raise NotImplementedError


class KVCache(HandOver):
    """Keys and values [B, heads, positions, head_dim], preallocated in steps of `step` positions;
    compiled steps take its buffers whole (`HandOver`).
    """

    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def _grow(self, k: mx.array, v: mx.array, needed: int) -> None:
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
        self._grow(k, v, start + k.shape[2])
        self.offset += k.shape[2]
        self.keys[..., start : self.offset, :] = k
        self.values[..., start : self.offset, :] = v
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, L: int):
        return "causal" if L > 1 else None

    def reserve(self, n: int) -> None:
        """Room for `n` positions after `offset` in the buffers (which a first update creates)."""
        if self.keys is None:
            raise ValueError("an empty cache has no buffers to grow: update it first")
        self._grow(self.keys, self.values, self.offset + n)

    def _advance(self, n: int) -> None:
        self.offset += n

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    @property
    def meta_state(self) -> dict:
        return {}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict) -> "KVCache":
        """A cache holding what `state` and `meta_state` describe."""
        cache = cls()
        if state:
            cache.keys, cache.values = state
            cache.offset = cache.keys.shape[2]
        return cache

    def is_trimmable(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        """Bytes the cache's buffers take (their whole capacity, not only the filled positions)."""
        return sum(a.nbytes for a in _buffers(self.keys) + _buffers(self.values))

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


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

    @property
    def meta_state(self) -> dict:
        return {"max_size": self.max_size, "keep": self.keep, "offset": self.offset}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict) -> "RotatingKVCache":
        cache = cls(meta_state["max_size"], meta_state["keep"])
        if state:
            cache.keys, cache.values = state
            cache._write = cache.keys.shape[2]
        cache.offset = meta_state["offset"]
        return cache

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

    @property
    def meta_state(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict) -> "QuantizedKVCache":
        cache = cls(meta_state["bits"], meta_state["group_size"])
        if state:
            cache.keys, cache.values = tuple(state[:3]), tuple(state[3:])
            cache.offset = cache.keys[0].shape[2]
        return cache


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


class RowsDecodeView(DecodeView):
    """A `DecodeView` of B rows, row b writing its token at its own position `offset[b]` (int32 [B]).

    The model may run more rows than the buffers hold (a backend pads a batch): `offset` then has
    one entry per model row, and only the buffers' rows are written.
    """

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, H, _, D = self.keys.shape[0], *k.shape[1:]
        if k.shape[0] != B:
            k, v = k[:B], v[:B]
        at = mx.broadcast_to(self.offset[:B, None, None, None], (B, H, 1, D))
        self.keys = mx.put_along_axis(self.keys, at, k, axis=2)
        self.values = mx.put_along_axis(self.values, at, v, axis=2)
        return self.keys, self.values

    def make_mask(self, L: int) -> mx.array:
        """[B, 1, 1, capacity] booleans: row b sees its positions 0..offset[b]."""
        return (mx.arange(self.keys.shape[2])[None] <= self.offset[:, None])[:, None, None]


def _round_up(n: int, step: int) -> int:
    return ((n + step - 1) // step) * step


def row_copy(keys, values, row: int, n: int, quantized: Optional[dict] = None) -> KVCache:
    """The first `n` positions of row `row` of batch buffers [B, H, S, D] as a plain `KVCache`
    (with `quantized`, a `QuantizedKVCache`'s meta_state: tuples of its buffers, as one)."""
    # Copies, not views: a view would keep the whole batch buffer alive.
    if quantized is not None:
        if keys is None or n == 0:
            return QuantizedKVCache(quantized["bits"], quantized["group_size"])
        state = [mx.contiguous(a[row : row + 1, :, :n]) for a in (*keys, *values)]
        return QuantizedKVCache.from_state(state, quantized)
    if keys is None or n == 0:
        return KVCache()
    return KVCache.from_state([mx.contiguous(a[row : row + 1, :, :n]) for a in (keys, values)], {})


class BatchKVCache(HandOver):
    """Keys and values [B, heads, positions, head_dim] of B sequences, row b holding `lengths[b]`
    positions from position 0 (the rest is padding, masked out).

    `offset` is the per-row length vector (int32 [B]) the model passes to RoPE, made from
    `lengths` when first asked for (a compiled step reads only the first layer's). Capacity grows
    in steps of `step` positions but never past `limit` (when set), the most any row may hold.
    Compiled steps take its buffers whole (`HandOver`).

    `bucketed`: the buffers' shapes come from a few buckets, so that a compiled step traces (and
    compiles kernels) a few times, not once per batch size and request mix: capacity in whole
    `step`s (`limit` then no tighter), and `rows(B)` buffer rows for B sequences (1, 2, 4, 8,
    then multiples of 8), the rows past B padding that nothing reads.
    """

    step = 256

    def __init__(self, bucketed: bool = False):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.limit: Optional[int] = None
        self.bucketed = bucketed
        self._set_lengths([])

    def rows(self, n: int) -> int:
        """Buffer rows that hold n sequences."""
        if not self.bucketed or n <= 1:
            return n
        return 1 << (n - 1).bit_length() if n <= 8 else _round_up(n, 8)

    def _set_lengths(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self._offset: Optional[mx.array] = None

    @property
    def offset(self) -> mx.array:
        if self._offset is None:
            self._offset = mx.array(self.lengths, dtype=mx.int32)
        return self._offset

    def _capacity(self, needed: int) -> int:
        cap = _round_up(needed, self.step)
        if self.bucketed or not self.limit:
            return cap
        return max(needed, min(cap, self.limit))

    def _grow(self, needed: int, like: mx.array) -> None:
        if self.keys is not None and needed <= self.keys.shape[2]:
            return
        _, H, _, D = like.shape
        R = self.keys.shape[0] if self.keys is not None else self.rows(like.shape[0])
        cap = self._capacity(needed)
        new_k = mx.zeros((R, H, cap, D), like.dtype)
        new_v = mx.zeros((R, H, cap, D), like.dtype)
        if self.keys is not None:
            old = self.keys.shape[2]
            new_k[:, :, :old] = self.keys
            new_v[:, :, :old] = self.values
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = k.shape
        needed = max(self.lengths) + L
        self._grow(needed, k)
        offset, R = self.offset, self.keys.shape[0]
        if R > B:  # bucketed: padding rows write zeros at their position 0
            k, v = (mx.concatenate([a, mx.zeros((R - B, H, L, D), a.dtype)]) for a in (k, v))
            offset = mx.concatenate([offset, mx.zeros((R - B,), offset.dtype)])
        # Row b writes its L new positions at lengths[b] ...
        pos = offset[:, None, None, None] + mx.arange(L, dtype=mx.int32)[None, None, :, None]
        idx = mx.broadcast_to(pos, (R, H, L, D))
        self.keys = mx.put_along_axis(self.keys, idx, k, axis=2)
        self.values = mx.put_along_axis(self.values, idx, v, axis=2)
        self._set_lengths([n + L for n in self.lengths])
        return self.keys[:B, :, :needed], self.values[:B, :, :needed]

    def reserve(self, n: int) -> None:
        """Room for `n` more positions in every row (the buffers must exist: `add` made them)."""
        if self.keys is None:
            raise ValueError("an empty batch cache has no buffers to grow")
        self._grow(max(self.lengths) + n, self.keys)

    def _advance(self, n: int) -> None:
        self._set_lengths([length + n for length in self.lengths])

    def make_mask(self, L: int) -> mx.array:
        """[B, 1, L, S] booleans, True where query i of row b may attend key j (j <= lengths[b] + i)."""
        S = max(self.lengths) + L
        queries = self.offset[:, None] + mx.arange(L, dtype=mx.int32)[None]  # [B, L]
        return (mx.arange(S, dtype=mx.int32)[None, None] <= queries[..., None])[:, None]

    def add(self, keys: Optional[mx.array], values: Optional[mx.array], length: int) -> None:
        """Append a row holding the first `length` positions of `keys`/`values` [1, H, >= length, D]
        (None when `length` is 0)."""
        self.add_rows(keys, values, [length])

    def add_rows(self, keys: Optional[mx.array], values: Optional[mx.array], lengths: Sequence[int]) -> None:
        """Append len(lengths) rows, row i holding the first lengths[i] positions of keys[i] /
        values[i] ([n, H, >= max(lengths), D]; None when every length is 0)."""
        lengths = list(lengths)
        ref = keys if keys is not None else self.keys
        if ref is None:  # nothing stored anywhere yet: the first update allocates
            self._set_lengths(self.lengths + lengths)
            return
        B, n = len(self.lengths), len(lengths)
        _, H, _, D = ref.shape
        cap = max(self._capacity(max(self.lengths + lengths) + 1), 0 if self.keys is None else self.keys.shape[2])
        new_k = mx.zeros((self.rows(B + n), H, cap, D), ref.dtype)
        new_v = mx.zeros((self.rows(B + n), H, cap, D), ref.dtype)
        if self.keys is not None and B:
            old = self.keys.shape[2]
            new_k[:B, :, :old] = self.keys[:B]
            new_v[:B, :, :old] = self.values[:B]
        m = max(lengths)
        if keys is not None and m:
            # Past its own length a row's copy is padding: masked out, as everywhere.
            new_k[B : B + n, :, :m] = keys[:, :, :m]
            new_v[B : B + n, :, :m] = values[:, :, :m]
        self.keys, self.values = new_k, new_v
        self._set_lengths(self.lengths + lengths)

    def trim_rows(self, counts: Sequence[int]) -> None:
        """Drop the last counts[b] positions of row b (padding a batched prefill wrote past a
        shorter prompt's end)."""
        self._set_lengths([n - c for n, c in zip(self.lengths, counts)])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), shrinking the buffers to what they still need."""
        rows = list(rows)
        self._set_lengths([self.lengths[i] for i in rows])
        if not rows:
            self.keys = self.values = None
            return
        if self.keys is None:
            return
        cap = min(self._buffer_positions(), self._capacity(max(self.lengths) + 1))
        # (bucketed: the first kept row again as padding)
        idx = mx.array(rows + rows[:1] * (self.rows(len(rows)) - len(rows)), dtype=mx.int32)
        self.keys, self.values = self._take(self.keys, idx, cap), self._take(self.values, idx, cap)

    def _buffer_positions(self) -> int:
        return self.keys.shape[2]

    @staticmethod
    def _take(a: mx.array, idx: mx.array, cap: int) -> mx.array:
        # A gather then a contiguous copy: fresh buffers of exactly the kept size, no view of the old.
        return mx.contiguous(mx.take(a, idx, axis=0)[:, :, :cap])

    def extract(self, row: int, n: Optional[int] = None) -> KVCache:
        """The first `n` positions (default: all) of row `row` as a plain `KVCache` of its own."""
        return row_copy(self.keys, self.values, row, self.lengths[row] if n is None else n)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        B, S = len(self.lengths), max(self.lengths)
        return [self.keys[:B, :, :S], self.values[:B, :, :S]]

    @property
    def meta_state(self) -> dict:
        return {"lengths": list(self.lengths)}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict) -> "BatchKVCache":
        cache = cls()
        if state:
            cache.keys, cache.values = state
        cache._set_lengths(list(meta_state["lengths"]))
        return cache

    def is_trimmable(self) -> bool:
        return False


class QuantizedBatchKVCache(BatchKVCache):
    """A `BatchKVCache` whose keys and values are stored affine-quantized, as `QuantizedKVCache`'s
    (each a tuple: codes, scales, biases [B, heads, positions, ...]) and attended the same way: a
    batch's rows then hold `kv_bits`' share of the float cache's memory. The model's graph runs it
    (no compiled step takes tuples); `add`/`add_rows` take a `QuantizedKVCache`'s tuples."""

    def __init__(self, bits: int = 8, group_size: int = 64):
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def _grow(self, needed: int, like) -> None:
        if self.keys is not None and needed <= self.keys[0].shape[2]:
            return
        cap = self._capacity(needed)

        def grown(old, new):
            bufs = tuple(mx.zeros((a.shape[0], a.shape[1], cap, a.shape[3]), a.dtype) for a in new)
            if old is not None:
                for b, o in zip(bufs, old):
                    b[:, :, : o.shape[2]] = o
            return bufs

        self.keys, self.values = grown(self.keys, like[0]), grown(self.values, like[1])

    def update_and_fetch(self, k: mx.array, v: mx.array):
        B, H, L, _ = k.shape
        needed = max(self.lengths) + L
        qk, qv = (QuantizedKVCache._quantize(self, a) for a in (k, v))
        self._grow(needed, (qk, qv))
        pos = self.offset[:, None, None, None] + mx.arange(L, dtype=mx.int32)[None, None, :, None]
        self.keys = tuple(mx.put_along_axis(b, mx.broadcast_to(pos, new.shape), new, axis=2)
                          for b, new in zip(self.keys, qk))
        self.values = tuple(mx.put_along_axis(b, mx.broadcast_to(pos, new.shape), new, axis=2)
                            for b, new in zip(self.values, qv))
        self._set_lengths([n + L for n in self.lengths])
        return tuple(a[:, :, :needed] for a in self.keys), tuple(a[:, :, :needed] for a in self.values)

    def attention(self, q, k, v, scale, mask):
        # The batch's mask [B, 1, L, S] against scores [B, kv_heads, repeats, L, S].
        return QuantizedKVCache.attention(self, q, k, v, scale, mask[:, :, None] if mask is not None else None)

    def reserve(self, n: int) -> None:
        raise ValueError("a quantized batch cache runs the model's graph only")

    def add_rows(self, keys, values, lengths: Sequence[int]) -> None:
        """As `BatchKVCache.add_rows`, keys and values as `QuantizedKVCache` tuples."""
        lengths = list(lengths)
        ref = keys if keys is not None else self.keys
        if ref is None:
            self._set_lengths(self.lengths + lengths)
            return
        B, n = len(self.lengths), len(lengths)
        cap = max(self._capacity(max(self.lengths + lengths) + 1), 0 if self.keys is None else self.keys[0].shape[2])
        m = max(lengths)

        def joined(old, new):
            bufs = tuple(mx.zeros((B + n, a.shape[1], cap, a.shape[3]), a.dtype) for a in ref)
            for i, b in enumerate(bufs):
                if old is not None and B:
                    b[:B, :, : old[i].shape[2]] = old[i]
                if new is not None and m:
                    b[B:, :, :m] = new[i][:, :, :m]
            return bufs

        self.keys, self.values = joined(self.keys, keys), joined(self.values, values)
        self._set_lengths(self.lengths + lengths)

    def _buffer_positions(self) -> int:
        return self.keys[0].shape[2]

    @staticmethod
    def _take(parts: tuple, idx: mx.array, cap: int) -> tuple:
        return tuple(BatchKVCache._take(a, idx, cap) for a in parts)

    def extract(self, row: int, n: Optional[int] = None) -> KVCache:
        """The first `n` positions (default: all) of row `row` as a `QuantizedKVCache` of its own."""
        return row_copy(self.keys, self.values, row, self.lengths[row] if n is None else n, self.meta_state)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in _buffers(self.keys) + _buffers(self.values))

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        S = max(self.lengths)
        return [a[:, :, :S] for a in self.keys + self.values]

    @property
    def meta_state(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _buffers(x) -> list:
    return [] if x is None else list(x) if isinstance(x, tuple) else [x]


_KINDS = {cls.__name__: cls for cls in (KVCache, RotatingKVCache, QuantizedKVCache)}


class PromptCache:
    """A model's KV cache together with the tokens it holds.

    `prepare(tokens)` keeps the longest shared prefix and returns only what must be prefilled,
    so a chat re-prefills nothing but its new turn; `trim(n)` drops the last n tokens.
    """

    def __init__(self, model, *, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
                 kv_group_size: int = 64):
        self.num_layers = len(model.layers)
        self.options = dict(max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
        self._model = model  # for its fingerprint, computed when saving or loading
        self.cache = self._make()
        self.tokens: list[int] = []

    def _make(self) -> list:
        # A model with caches of its own kinds (Llama 3.2 Vision's cross-attention) makes them.
        make = getattr(self._model, "make_cache", None)
        if make is None:
            return make_prompt_cache(self.num_layers, **self.options)
        if self.options["max_kv_size"] is not None or self.options["kv_bits"] is not None:
            raise ValueError("this model's cache neither rotates nor quantizes: drop max_kv_size and kv_bits")
        return make()

    @property
    def offset(self) -> int:
        return self.cache[0].offset

    @property
    def nbytes(self) -> int:
        """Bytes of KV buffers the cache holds, over all layers."""
        return sum(c.nbytes for c in self.cache)

    def reset(self) -> None:
        self.cache = self._make()
        self.tokens = []

    def trim(self, n: int) -> int:
        """Drop the last `n` tokens; returns how many were dropped (0 once a rotating cache wrapped)."""
        if not all(c.is_trimmable() for c in self.cache):
            return 0
        n = min(n, len(self.tokens))
        for c in self.cache:
            c.trim(n)
        del self.tokens[len(self.tokens) - n :]
        return n

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        """Cut the cache back to its longest common prefix with `tokens`; returns that length.

        A rotating cache that has wrapped cannot be cut back: it starts over instead.
        """
        drop = len(self.tokens) - common_prefix(self.tokens, tokens)
        if drop and self.trim(drop) != drop:
            self.reset()
        return len(self.tokens)

    def prepare(self, tokens: Sequence[int]) -> list[int]:
        """Reuse the shared prefix; return the tokens still to prefill (always at least one)."""
        tokens = list(tokens)
        # The last prompt token must run again to give logits.
        return tokens[self.keep_prefix(tokens[:-1]):]

    def record(self, tokens: Sequence[int]) -> None:
        """Note what the cache now holds: the first `offset` of `tokens`.

        An interrupt in the middle of a forward pass can leave layers at different offsets;
        such a cache is unusable, so it starts over.
        """
        if len({c.offset for c in self.cache}) != 1:
            self.reset()
            return
        self.tokens = list(tokens)[: self.offset]

    def save(self, path: Union[str, Path, BinaryIO], metadata: Optional[dict] = None) -> None:
        """Write the cache, its tokens and the model's fingerprint to a file (safetensors), atomically.

        Only a missing path or a regular file is replaced (UnsafeOutputError otherwise). `path` may
        also be a binary file open for writing (one of `fileio.atomic_files`), written as it is.
        """
        arrays = {f"{i}.{j}": a for i, c in enumerate(self.cache) for j, a in enumerate(c.state)}
        layers = [{"kind": type(c).__name__, "n": len(c.state), **c.meta_state} for c in self.cache]
        info = {"tokens": list(map(int, self.tokens)), "layers": layers, "fingerprint": self._fingerprint}
        header = {
            "llama_mlx": json.dumps(info),
            "metadata": json.dumps({"options": self.options, **(metadata or {})}),
        }
        if not isinstance(path, (str, os.PathLike)):
            mx.save_safetensors(path, arrays, metadata=header)
            return
        with atomic_files([path]) as (f,):  # mlx writes through the file object, not by name
            mx.save_safetensors(f, arrays, metadata=header)

    @classmethod
    def load(cls, model, path: Union[str, Path]) -> tuple["PromptCache", dict]:
        """Read what `save` wrote: (prompt cache, metadata).

        Raises PromptCacheError naming the file when it is truncated, not a prompt cache, saved for
        another model, or inconsistent (token count, cache kinds and options, array shapes).
        """
        path = Path(path)
        check_safetensors(path, error=PromptCacheError)
        try:
            arrays, header = mx.load(str(path), format="safetensors", return_metadata=True)
        except (RuntimeError, ValueError, OSError) as e:
            raise PromptCacheError(f"{path}: unreadable prompt cache: {str(e).split('] ', 1)[-1]}") from None
        info = _header_json(header, "llama_mlx", path)
        metadata = _header_json(header, "metadata", path, default={})
        pc = cls(model, **_checked_options(metadata.pop("options", {}), path))
        if not isinstance(info, dict) or set(info) - {"tokens", "layers", "fingerprint"}:
            raise PromptCacheError(f"{path}: not a llama-mlx prompt cache (unexpected header)")
        if info.get("fingerprint") != pc._fingerprint:
            raise PromptCacheError(f"{path}: the prompt cache was saved for another model")
        tokens = info.get("tokens")
        vocab = model.args.vocab_size
        if not isinstance(tokens, list) or not all(_is_int(t) and 0 <= t < vocab for t in tokens):
            raise PromptCacheError(f"{path}: 'tokens' must be a list of token ids below {vocab}")
        layers = info.get("layers")
        if not isinstance(layers, list) or len(layers) != pc.num_layers:
            n = len(layers) if isinstance(layers, list) else "no"
            raise PromptCacheError(f"{path}: cache has {n} layers, the model {pc.num_layers}")
        expected = {type(c) for c in pc.cache}
        names = set()
        cache = []
        for i, layer in enumerate(layers):
            own = type(pc.cache[i])
            if own.__name__ not in _KINDS:  # the model's own kind (Llama 3.2 Vision's cross-attention)
                c = _checked_own_layer(i, layer, arrays, own, model, tokens, path)
            else:
                c = _checked_layer(i, layer, arrays, expected, pc, model, len(tokens), path)
            names |= {f"{i}.{j}" for j in range(layer["n"])}
            cache.append(c)
        own = {json.dumps(layer, sort_keys=True) for layer, c in zip(layers, cache) if type(c).__name__ not in _KINDS}
        if len(own) > 1:  # each cross-attention layer holds the same images
            raise PromptCacheError(f"{path}: the cross-attention layers hold different images")
        if set(arrays) != names:
            extra = sorted(set(arrays) - names)
            raise PromptCacheError(f"{path}: unexpected array {extra[0]!r:.40} in the prompt cache")
        pc.cache, pc.tokens = cache, tokens
        return pc, metadata

    @property
    def _fingerprint(self) -> Optional[str]:
        return model_fingerprint(self._model) if hasattr(self._model, "args") else None


def model_fingerprint(model) -> str:
    """What identifies a model to its saved caches: its shape and its final norm's weights (as bfloat16)."""
    a = model.args
    h = hashlib.sha256(json.dumps([len(model.layers), a.hidden_size, a.num_attention_heads,
                                   a.num_key_value_heads, a.head_dim, a.vocab_size]).encode())
    norm = getattr(getattr(getattr(model, "model", None), "norm", None), "weight", None)
    if norm is not None:
        h.update(memoryview(mx.contiguous(norm.astype(mx.bfloat16).view(mx.uint16))).cast("B"))
    adapter = getattr(model, "adapter_fingerprint", None)  # llama_mlx.lora: the adapter applied, if any
    if adapter is not None:
        h.update(adapter.encode())
    return h.hexdigest()[:32]


_LAYER_META = {"KVCache": set(), "RotatingKVCache": {"max_size", "keep", "offset"},
               "QuantizedKVCache": {"bits", "group_size"}}
_STATE_ARRAYS = {"KVCache": 2, "RotatingKVCache": 2, "QuantizedKVCache": 6}
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _header_json(header: dict, key: str, path: Path, default=None):
    if key not in header:
        if default is not None:
            return default
        raise PromptCacheError(f"{path}: not a llama-mlx prompt cache (no {key!r} header)")
    try:
        value = json.loads(header[key])
    except RecursionError:
        raise PromptCacheError(f"{path}: corrupt prompt cache ({key!r} nested too deeply)") from None
    except ValueError as e:
        raise PromptCacheError(f"{path}: corrupt prompt cache ({key!r}: {e})") from None
    if default is not None and not isinstance(value, dict):
        raise PromptCacheError(f"{path}: corrupt prompt cache ({key!r} is not an object)")
    return value


def _checked_options(options, path: Path) -> dict:
    if not isinstance(options, dict) or set(options) - {"max_kv_size", "kv_bits", "kv_group_size"}:
        raise PromptCacheError(f"{path}: prompt cache options {options!r:.120} are not max_kv_size/kv_bits/kv_group_size")
    size, bits, group = options.get("max_kv_size"), options.get("kv_bits"), options.get("kv_group_size", 64)
    if size is not None and not (_is_int(size) and 4 < size <= 1 << 30):
        raise PromptCacheError(f"{path}: prompt cache option max_kv_size {size!r:.40} is not a size")
    if bits is not None and not (_is_int(bits) and bits in (2, 3, 4, 5, 6, 8)):
        raise PromptCacheError(f"{path}: prompt cache option kv_bits {bits!r:.40} is not 2, 3, 4, 5, 6 or 8")
    if not (_is_int(group) and group in (32, 64, 128)):
        raise PromptCacheError(f"{path}: prompt cache option kv_group_size {group!r:.40} is not 32, 64 or 128")
    if size is not None and bits is not None:
        raise PromptCacheError(f"{path}: prompt cache options ask for a rotating and a quantized cache")
    return {"max_kv_size": size, "kv_bits": bits, "kv_group_size": group}


def _checked_own_layer(i, layer, arrays, own, model, tokens, path):
    """A layer of a cache kind the model makes itself, which checks its saved state (`from_saved`)."""
    where = f"{path}: layer {i}"
    kind = layer.get("kind") if isinstance(layer, dict) else layer
    if kind != own.__name__:
        raise PromptCacheError(f"{where}: a {kind!r:.40} where the model has a {own.__name__}")
    n = layer.get("n")
    if not _is_int(n) or not 0 <= n <= 8 or any(f"{i}.{j}" not in arrays for j in range(n)):
        raise PromptCacheError(f"{where}: {n!r:.20} arrays, or some missing")
    meta = {k: v for k, v in layer.items() if k not in ("kind", "n")}
    try:
        return own.from_saved([arrays[f"{i}.{j}"] for j in range(n)], meta, model, tokens)
    except ValueError as e:
        raise PromptCacheError(f"{where}: {e}") from None


def _checked_layer(i, layer, arrays, expected, pc, model, n_tokens, path) -> KVCache:
    where = f"{path}: layer {i}"
    if not isinstance(layer, dict) or layer.get("kind") not in _KINDS:
        raise PromptCacheError(f"{where}: unknown cache kind {layer.get('kind') if isinstance(layer, dict) else layer!r:.40}")
    kind = layer["kind"]
    cls = _KINDS[kind]
    if cls not in expected:
        raise PromptCacheError(f"{where}: a {kind} where the saved options make a {next(iter(expected)).__name__}")
    meta = {k: v for k, v in layer.items() if k not in ("kind", "n")}
    if set(meta) != _LAYER_META[kind] or not all(_is_int(v) for v in meta.values()):
        raise PromptCacheError(f"{where}: {kind} settings must be the integers {sorted(_LAYER_META[kind])}")
    n = layer.get("n")
    if n != (_STATE_ARRAYS[kind] if n_tokens else 0):
        raise PromptCacheError(f"{where}: {n!r:.20} arrays do not fit a {kind} of {n_tokens} tokens")
    state = []
    for j in range(n):
        if f"{i}.{j}" not in arrays:
            raise PromptCacheError(f"{where}: array {i}.{j} is missing")
        state.append(arrays[f"{i}.{j}"])
    o = pc.options
    a = model.args
    if kind == "RotatingKVCache":
        if meta["max_size"] != o["max_kv_size"] or meta["keep"] != 4 or meta["offset"] != n_tokens:
            raise PromptCacheError(f"{where}: rotating cache settings {meta} do not fit the options and "
                                   f"{n_tokens} tokens")
        length = min(n_tokens, meta["max_size"])
    else:
        length = n_tokens
    if kind == "QuantizedKVCache":
        if meta["bits"] != o["kv_bits"] or meta["group_size"] != o["kv_group_size"]:
            raise PromptCacheError(f"{where}: quantized cache settings {meta} do not fit the options")
        bits, group = meta["bits"], meta["group_size"]
        if a.head_dim % group or (a.head_dim * bits) % 32:
            raise PromptCacheError(f"{where}: kv_group_size {group} does not fit the head size {a.head_dim}")
        lasts = [a.head_dim * bits // 32, a.head_dim // group, a.head_dim // group] * 2
        dtypes = [(mx.uint32,), _FLOATS, _FLOATS] * 2
    else:
        lasts, dtypes = [a.head_dim] * 2, [_FLOATS] * 2
    for j, (arr, last, ok) in enumerate(zip(state, lasts, dtypes)):
        want = (1, a.num_key_value_heads, length, last)
        if tuple(arr.shape) != want or arr.dtype not in ok:
            raise PromptCacheError(f"{where}: array {i}.{j} is {arr.dtype}{list(arr.shape)}, the model and "
                                   f"{n_tokens} tokens need {list(want)}")
    return cls.from_state(state, meta)
