"""Decode steps: `step(tokens[B, L]) -> logits[B, vocab]` of the last position, over a cache
(`AllPositionsStep`: of every position, for checking drafts).

`GraphStep` runs the model's own graph. `CompiledStep` runs single tokens through a decoder
class's compiled graph over the cache's whole buffers (handed over, so updates happen in place)
and anything else through the model; over a batch's cache (`BatchKVCache`) each row's token goes
to its own position. `CompiledCheckStep` runs a few positions of one sequence through one
compiled graph the same way, every position's logits (a speculative check). Decoder classes
(`MaskedDecoder`, `RowsDecoder` here, the CUDA wing's in `cuda/`) carry `kind` (a label for
reports), `supported(model)` and `max_batch`; the backend table chooses among them. Compiled
graphs are kept per model and decoder class in `GRAPHS`, holding the model weakly.
"""

from __future__ import annotations

import weakref
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..cache import DecodeView, RowsDecodeView

__all__ = [
    "GRAPHS", "AllPositionsStep", "CompiledCheckStep", "CompiledStep", "GraphStep", "MaskedDecoder", "RowsDecoder",
]


class GraphStep:
    """The model's graph on any tokens."""

    kind = "graph"
    # Whether `at(tokens, position)` may write at a position other than the cache's offset
    # (compiled steps taking it as a device array): speculative rounds may then be queued ahead.
    positioned = False

    def __init__(self, model: nn.Module, cache: list):
        self.model, self.cache = model, cache

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.model(tokens, self.cache)[:, -1, :]

    def at(self, tokens: mx.array, position: mx.array) -> mx.array:
        """As calling it; `position` (the first token's, on the device) must be the cache's offset
        unless the step is `positioned`."""
        return self(tokens)


class AllPositionsStep(GraphStep):
    """The model's graph, logits of every position: `step(tokens[B, L]) -> logits[B, L, vocab]`."""

    kind = "verify"

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.model(tokens, self.cache)


class CompiledStep(GraphStep):
    """Single tokens through a decoder class's compiled graph, `graph(tokens, position, *kv_buffers)
    -> (logits, *kv_buffers)`, over the cache's whole buffers; anything else through the model.

    The decoder class (`MaskedDecoder`, `RowsDecoder`, or the CUDA wing's) says how its position
    is given (`position(offset)`; a batch's cache gives one per row) and how many rows it takes
    (`max_batch`). `short`: a `CompiledCheckStep` over the same cache that a few tokens of one
    sequence go through (their last position's logits), as a draft model catching up on two
    tokens after a round it got all right. Prompts and empty caches take the graph.
    """

    def __init__(self, model: nn.Module, cache: list, decoder: type, short: "CompiledCheckStep | None" = None):
        super().__init__(model, cache)
        self.decoder, self.short = decoder, short
        self.graph = GRAPHS.get(model, decoder)

    @property
    def kind(self) -> str:
        return self.decoder.kind

    @property
    def positioned(self) -> bool:
        return self.short is not None and self.decoder.max_batch == 1

    def at(self, tokens: mx.array, position: mx.array) -> mx.array:
        """As calling it on 1 to `short.max_rows` tokens of one sequence, the first written at
        `position` (int32 [1], on the device) rather than at the cache's offset, which advances as
        usual; the caller trims the cache back to what is valid once it knows."""
        if not self.positioned:
            return self(tokens)
        if tokens.shape[1] > 1:
            return self.short.at(tokens, position)[:, -1, :]
        return _over_buffers(self.cache, self.graph, tokens, position, 1)

    def __call__(self, tokens: mx.array) -> mx.array:
        B, L = tokens.shape
        offset = self.cache[0].offset
        rows = isinstance(offset, mx.array)  # a batch's cache: a position per row
        empty = self.cache[0].keys is None if rows else offset == 0
        if self.short is not None and B == 1 and 1 < L <= self.short.max_rows and not empty:
            return self.short(tokens)[:, -1, :]
        if L != 1 or empty or B > self.decoder.max_batch:
            return super().__call__(tokens)
        if not rows:
            return _over_buffers(self.cache, self.graph, tokens, self.decoder.position(offset), 1)
        R = self.cache[0].keys.shape[0]
        if R > B:  # a bucketed cache's padding rows: token 0 at position 0, logits dropped
            tokens = mx.concatenate([tokens, mx.zeros((R - B, 1), tokens.dtype)])
            offset = mx.concatenate([offset, mx.zeros((R - B,), offset.dtype)])
        logits = _over_buffers(self.cache, self.graph, tokens, offset, 1)
        return logits[:B] if R > B else logits


def _over_buffers(cache: list, graph: Callable, tokens: mx.array, position: mx.array, n: int) -> mx.array:
    # The cache's buffers handed to `graph` whole (updated in place), taken back n positions on.
    buffers = []
    for c in cache:
        c.reserve(n)
        buffers += c.hand_over()
    try:
        logits, *buffers = graph(tokens, position, *buffers)
    except BaseException:
        for i, c in enumerate(cache):
            c.take_back(buffers[2 * i], buffers[2 * i + 1])
        raise
    for i, c in enumerate(cache):
        c.take_back(buffers[2 * i], buffers[2 * i + 1], advance=n)
    return logits


class CompiledCheckStep(AllPositionsStep):
    """Up to `decoder.max_rows` tokens of one sequence through a check decoder's compiled graph,
    `graph(tokens[1, L], position, *kv_buffers) -> (logits[1, L, vocab], *kv_buffers)` (position:
    int32 [1]; traced once per L and capacity); other shapes and empty caches take the graph."""

    positioned = True

    def __init__(self, model: nn.Module, cache: list, decoder: type):
        super().__init__(model, cache)
        self.decoder, self.max_rows = decoder, decoder.max_rows
        self.graph = GRAPHS.get(model, decoder)

    @property
    def kind(self) -> str:
        return self.decoder.kind

    def at(self, tokens: mx.array, position: mx.array) -> mx.array:
        """As calling it, the first token written at `position` (int32 [1], on the device) rather
        than at the cache's offset, which advances by L as usual (`CompiledStep.at`)."""
        B, L = tokens.shape
        if B != 1 or L > self.max_rows or self.cache[0].offset == 0:
            raise ValueError(f"a positioned check takes 1 to {self.max_rows} tokens of one sequence after others")
        return _over_buffers(self.cache, self.graph, tokens, position, L)

    def __call__(self, tokens: mx.array) -> mx.array:
        B, L = tokens.shape
        offset = self.cache[0].offset
        if B != 1 or L > self.max_rows or offset == 0:
            return super().__call__(tokens)
        return _over_buffers(self.cache, self.graph, tokens, mx.array([offset], dtype=mx.int32), L)


class MaskedDecoder:
    """`decoder(tokens[B, 1], offset, *kv_buffers) -> (logits[B, vocab], *kv_buffers)`: the model's
    graph attending over whole fixed-capacity buffers with a mask, for `mx.compile` (traced once
    per capacity). Holds the model weakly."""

    kind = "compiled"
    view = DecodeView
    max_batch = 1 << 30

    @staticmethod
    def supported(model: nn.Module) -> bool:
        return True

    @staticmethod
    def position(offset: int) -> mx.array:
        return mx.array(offset, dtype=mx.int32)

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def pad(self, tokens: mx.array, offset: mx.array) -> tuple[mx.array, mx.array]:
        """Extra rows the model runs beside the buffers' (a backend's choice; none here)."""
        return tokens, offset

    def __call__(self, tokens: mx.array, offset: mx.array, *buffers: mx.array):
        B = tokens.shape[0]
        tokens, offset = self.pad(tokens, offset)
        views = [self.view(buffers[i], buffers[i + 1], offset) for i in range(0, len(buffers), 2)]
        logits = self._model()(tokens, views)[:, -1, :]
        if logits.shape[0] != B:
            logits = logits[:B]
        return (logits, *[a for v in views for a in (v.keys, v.values)])


class RowsDecoder(MaskedDecoder):
    """`MaskedDecoder` over a batch's buffers [B, heads, capacity, head_dim], row b's token going to
    position offset[b] (int32 [B]); traced once per batch size and capacity."""

    kind = "rows"
    view = RowsDecodeView


class _PerModel:
    """Compiled graphs per model, by identity, dropped with the model.

    A `WeakKeyDictionary` cannot hold modules (MLX modules are dicts: unhashable), so entries are
    keyed by `id` and removed by a weak reference's callback. The graphs hold the model weakly.
    """

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, dict]] = {}

    def get(self, model: nn.Module, decoder: type) -> Callable:
        key = id(model)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not model:

            def drop(ref, key=key):
                if self._entries.get(key, (None,))[0] is ref:
                    del self._entries[key]

            entry = self._entries[key] = (weakref.ref(model, drop), {})
        graphs = entry[1]
        if decoder not in graphs:
            graphs[decoder] = mx.compile(decoder(model))
        return graphs[decoder]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every compiled graph (they are traced again when next asked for)."""
        self._entries.clear()


GRAPHS = _PerModel()
