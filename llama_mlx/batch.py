"""Continuous batching: several sequences decode in one forward step, joining and leaving at any step.

`BatchKVCache` holds one row per sequence, each at its own length (rows right-padded). Its
`offset` is the vector of row lengths, which `mx.fast.rope` takes as per-row positions, and its
`make_mask` hides every row's padding, so the model runs unchanged: each row sees exactly the
positions and keys it would see alone.

`BatchEngine` admits requests under a KV memory cap (`max_kv_bytes`), prefills each newcomer
alone in chunks between the others' batched decode steps, and samples and stops each row on its
own (sampler, logits processors, stop tokens and strings, max_tokens). A sequence decoding alone
keeps its own plain `KVCache`s and runs the backend's decode step (`backends.decode_step`: on
CUDA the fused decoder), so one stream is as fast as `generate`; it moves into the batch's cache
when a second sequence starts prefilling, and the last one left moves out again. `submit` returns a
`BatchRequest` whose responses can be iterated; `step` does one unit of work and is what a
server's worker thread drives. `batch_generate` runs a list of prompts through one engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from . import backends
from .cache import HandOver, KVCache
from .errors import ContextLengthError, LlamaMLXError
from .generate import GenerationResponse, Prompt, _prompt_tokens, _StopStrings, context_length
from .sample import LogitsProcessor, Sampler, apply_processors

__all__ = [
    "BatchEngine",
    "BatchKVCache",
    "BatchRequest",
    "BatchResult",
    "KVCapacityError",
    "SequenceStats",
    "batch_generate",
]


class KVCapacityError(LlamaMLXError):
    """A request's KV cache could never fit under the engine's `max_kv_bytes`, even alone."""


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _round_up(n: int, step: int) -> int:
    return ((n + step - 1) // step) * step


def _row_copy(keys: Optional[mx.array], values: Optional[mx.array], row: int, n: int) -> KVCache:
    # Copies, not views: a view would keep the whole batch buffer alive.
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
    """

    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.limit: Optional[int] = None
        self._set_lengths([])

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
        return max(needed, min(cap, self.limit)) if self.limit else cap

    def _grow(self, needed: int, like: mx.array) -> None:
        if self.keys is not None and needed <= self.keys.shape[2]:
            return
        B, H, _, D = like.shape
        cap = self._capacity(needed)
        new_k = mx.zeros((B, H, cap, D), like.dtype)
        new_v = mx.zeros((B, H, cap, D), like.dtype)
        if self.keys is not None:
            old = self.keys.shape[2]
            new_k[:, :, :old] = self.keys
            new_v[:, :, :old] = self.values
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = k.shape
        needed = max(self.lengths) + L
        self._grow(needed, k)
        # Row b writes its L new positions at lengths[b] ...
        pos = self.offset[:, None, None, None] + mx.arange(L, dtype=mx.int32)[None, None, :, None]
        idx = mx.broadcast_to(pos, (B, H, L, D))
        self.keys = mx.put_along_axis(self.keys, idx, k, axis=2)
        self.values = mx.put_along_axis(self.values, idx, v, axis=2)
        self._set_lengths([n + L for n in self.lengths])
        return self.keys[:, :, :needed], self.values[:, :, :needed]

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
        new_k = mx.zeros((B + n, H, cap, D), ref.dtype)
        new_v = mx.zeros((B + n, H, cap, D), ref.dtype)
        if self.keys is not None:
            old = self.keys.shape[2]
            new_k[:B, :, :old] = self.keys
            new_v[:B, :, :old] = self.values
        m = max(lengths)
        if keys is not None and m:
            # Past its own length a row's copy is padding: masked out, as everywhere.
            new_k[B:, :, :m] = keys[:, :, :m]
            new_v[B:, :, :m] = values[:, :, :m]
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
        cap = min(self.keys.shape[2], self._capacity(max(self.lengths) + 1))
        idx = mx.array(rows, dtype=mx.int32)
        # A gather then a contiguous copy: fresh buffers of exactly the kept size, no view of the old.
        self.keys = mx.contiguous(mx.take(self.keys, idx, axis=0)[:, :, :cap])
        self.values = mx.contiguous(mx.take(self.values, idx, axis=0)[:, :, :cap])

    def extract(self, row: int, n: Optional[int] = None) -> KVCache:
        """The first `n` positions (default: all) of row `row` as a plain `KVCache` of its own."""
        return _row_copy(self.keys, self.values, row, self.lengths[row] if n is None else n)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        S = max(self.lengths)
        return [self.keys[:, :, :S], self.values[:, :, :S]]

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


@dataclass
class SequenceStats:
    """One sequence's statistics. Times in seconds; TTFT counts from `submit` (queueing included)."""

    prompt_tokens: int
    generation_tokens: int
    queue_time: float
    time_to_first_token: float
    prompt_tps: float
    generation_tps: float
    finish_reason: Optional[str]


_END = object()


class BatchRequest:
    """A submitted sequence. Iterate it for its `GenerationResponse`s (the last has a
    `finish_reason`: "stop", "length", "context" or "cancelled"); `tokens` and `text` grow as it
    runs. Iterating drives the engine itself unless a thread runs `BatchEngine.serve`."""

    def __init__(self, engine: "BatchEngine", uid: int, ids: list[int], max_tokens: int, sampler: Optional[Sampler],
                 processors: list[LogitsProcessor], stop_tokens: set[int], stop: Sequence[str], limit: int,
                 prompt_cache: Optional[list[KVCache]] = None, keep_cache: bool = False):
        self.engine, self.uid, self.prompt = engine, uid, ids
        # A warm start: per-layer caches already holding the first `cached_tokens` prompt tokens.
        self.prompt_cache = prompt_cache
        self.cached_tokens = prompt_cache[0].offset if prompt_cache else 0
        self.keep_cache = keep_cache
        self.kv_cache: Optional[list[KVCache]] = None  # with keep_cache: its row's KV once it ended
        self.kv_tokens: list[int] = []  # the tokens kv_cache holds
        self.max_tokens, self.sampler, self.processors = max_tokens, sampler, processors
        self.stop_tokens = stop_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        # Positions its KV may ever hold: the whole prompt and every answer token, the last one
        # included (the step after it is queued before it is read).
        self.reservation = len(ids) + max_tokens
        self._limit = limit
        self._detok = engine.tokenizer.detokenizer()
        self._stops = _StopStrings(stop)
        self._queue: queue.Queue = queue.Queue()
        self._cancel = False
        self._history: Optional[mx.array] = None
        self.next_input = ids[-1]
        self.submitted = time.perf_counter()
        self.started: Optional[float] = None  # prefill began
        self.first_token: Optional[float] = None
        self.finished: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def poll(self) -> tuple[list[GenerationResponse], bool]:
        """The responses queued so far, without waiting or stepping, and whether the sequence has
        ended (a driver consuming its own `step` results calls this to keep the queue empty)."""
        out, ended = [], False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out, ended
            if item is _END:
                ended = True
            else:
                out.append(item)

    def cancel(self) -> None:
        """Stop this sequence at the engine's next step (thread-safe); it ends with "cancelled"."""
        self._cancel = True
        self.engine._wake()

    def __iter__(self) -> Iterator[GenerationResponse]:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if self.engine.driven:
                    item = self._queue.get()
                else:
                    self.engine.step()
                    continue
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self) -> str:
        """Run to the end; the whole text."""
        for _ in self:
            pass
        return self.text

    @property
    def stats(self) -> SequenceStats:
        now = time.perf_counter()
        first = self.first_token
        prompt_time = (first - self.started) if first and self.started else 0.0
        gen_time = ((self.finished or now) - first) if first else 0.0
        n = len(self.tokens)
        return SequenceStats(
            prompt_tokens=len(self.prompt), generation_tokens=n,
            queue_time=((self.started or now) - self.submitted),
            time_to_first_token=(first - self.submitted) if first else 0.0,
            prompt_tps=len(self.prompt) / max(prompt_time, 1e-9),
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            finish_reason=self.finish_reason,
        )

    # Called by the engine's thread only.
    def _sample(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        if self.processors:
            if self._history is None:
                self._history = mx.array(self.prompt)
            logits = apply_processors(self.processors, self._history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = (self.sampler or _greedy)(logprobs)
        if self.processors:
            self._history = mx.concatenate([self._history, token.astype(self._history.dtype)])
        return token, logprobs[0]

    def _accept(self, token: int, logprobs: mx.array) -> GenerationResponse:
        n = len(self.tokens)
        self.tokens.append(token)
        now = time.perf_counter()
        if n == 0:
            self.first_token = now
        finish = None
        if token in self.stop_tokens:
            text, finish = self._detok.finalize(), "stop"
            text, _ = self._stops.feed(text)
            text += self._stops.flush()
        else:
            text, hit = self._stops.feed(self._detok.add_token(token))
            if hit:
                finish = "stop"
            elif n + 1 == self.max_tokens:
                finish = "context" if len(self.prompt) + n + 1 >= self._limit else "length"
                tail, hit = self._stops.feed(self._detok.finalize())
                text += tail + ("" if hit else self._stops.flush())
        self.text += text
        self.next_input = token
        stats = self.stats
        response = GenerationResponse(
            text=text, token=token, logprobs=logprobs, prompt_tokens=len(self.prompt),
            prompt_tps=stats.prompt_tps, generation_tokens=n + 1, generation_tps=stats.generation_tps,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
            time_to_first_token=stats.time_to_first_token,
        )
        self._queue.put(response)
        if finish:
            self._finish(finish)
        return response

    def _finish(self, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        self.finish_reason, self.error = reason, error
        self.finished = time.perf_counter()
        self._queue.put(_END)


class _Prefill:
    """Newcomers prefilling together, `todo[i]` the prompt tokens row i has still to run (its last
    one excepted: that goes in with its first decode step). One newcomer prefills into plain
    `KVCache`s, so that it can go on to decode alone; several are the rows of `BatchKVCache`s,
    each at its own length, run as one forward a chunk."""

    def __init__(self, reqs: list[BatchRequest], layers: int):
        self.reqs = reqs
        self.todo = [r.prompt[r.cached_tokens : -1] for r in reqs]
        self.batched = len(reqs) > 1
        if not self.batched:
            self.cache = reqs[0].prompt_cache or [KVCache() for _ in range(layers)]
        else:
            self.cache = [BatchKVCache() for _ in range(layers)]
            bound = _prefill_bound(reqs)
            for i, c in enumerate(self.cache):
                c.limit = bound
                for r in reqs:
                    warm = r.prompt_cache[i] if r.prompt_cache else None
                    c.add(*((warm.keys, warm.values, warm.offset) if warm else (None, None, 0)))
        for r in reqs:
            r.prompt_cache = None

    def keep(self, rows: list[int]) -> None:
        self.reqs = [self.reqs[b] for b in rows]
        self.todo = [self.todo[b] for b in rows]
        for c in self.cache:
            c.keep(rows)


def _prefill_bound(reqs: Sequence[BatchRequest]) -> int:
    # Positions a row of a batched prefill may reach before its padding is trimmed.
    return max(r.cached_tokens for r in reqs) + max(len(r.prompt) - 1 - r.cached_tokens for r in reqs)


class BatchEngine:
    """Continuous batching over `model`: `submit` requests from any thread, `step` from one.

    max_kv_bytes: cap on the KV memory of all live sequences (buffers held between steps: the
    batch's, padding included, and a prefilling newcomer's). A request waits until it fits; one
    that could never fit alone is refused with `KVCapacityError`. None: no cap.
    max_batch: most sequences decoding together. prefill_chunk: prompt tokens each newcomer
    prefills per step, between two batched decode steps of the others. prefill_batch: most
    newcomers admitted together, whose prompts then run as the rows of one forward a chunk
    (requests arriving together, as a burst at a server, start decoding together after one
    prefill, not one after another). compile: how the batched step runs (`backends.rows_step`:
    None lets the backend choose, compiled on GPUs).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_kv_bytes: Optional[int] = None,
                 max_batch: int = 8, prefill_chunk: int = 512, prefill_batch: int = 8,
                 compile: Optional[bool] = None):
        if max_batch < 1 or prefill_chunk < 1 or prefill_batch < 1:
            raise ValueError("max_batch, prefill_chunk and prefill_batch must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_kv_bytes, self.max_batch, self.prefill_chunk = max_kv_bytes, max_batch, prefill_chunk
        self.prefill_batch = prefill_batch
        args = model.args
        dtype = model.model.compute_dtype or model.model.norm.weight.dtype
        # Keys and values, every layer, one position.
        self.bytes_per_token = 2 * len(model.layers) * args.num_key_value_heads * args.head_dim * dtype.size
        self._compile = compile
        self._new_batch_cache()
        # The one running sequence's own caches and step, when it runs alone (else None).
        self.solo: Optional[list[KVCache]] = None
        self._solo_step = None
        self.running: list[BatchRequest] = []
        self.waiting: deque[BatchRequest] = deque()
        self._prefill: Optional[_Prefill] = None
        # The decode step queued last (its rows, their lazy tokens and logprobs), read by the next `step`.
        self._inflight: Optional[tuple[list[BatchRequest], mx.array, Any]] = None
        self._incoming: list[BatchRequest] = []
        self._lock = threading.Condition()
        self._uid = 0
        self.driven = False
        self.steps = 0
        self.decode_steps = 0  # batched decode steps queued
        self.multi_row_steps = 0  # of those, steps decoding more than one row
        self.max_rows = 0  # most rows decoded in one step so far
        self.max_prefill_rows = 0  # most newcomers prefilled in one forward so far

    # -- any thread ------------------------------------------------------------------------
    def submit(self, prompt: Prompt, *, max_tokens: int = 256, sampler: Optional[Sampler] = None,
               logits_processors: Optional[Sequence[LogitsProcessor]] = None, stop: Optional[Sequence[str]] = None,
               stop_tokens: Optional[Iterable[int]] = None, prompt_cache: Optional[Sequence[KVCache]] = None,
               keep_cache: bool = False) -> BatchRequest:
        """Queue a sequence; returns its handle at once (thread-safe; no MLX work is done here).

        prompt: token ids (or text, or chat messages). sampler: None for greedy (such rows are
        sampled together). stop_tokens: None for the tokenizer's.
        prompt_cache: per-layer plain `KVCache`s holding the prompt's first tokens (fewer than all):
        only the rest is prefilled. keep_cache: when the sequence ends on its own (not cancelled),
        its row's KV is left in `handle.kv_cache` (per-layer `KVCache`s of `handle.kv_tokens`).
        Raises ContextLengthError (prompt fills the context) or KVCapacityError (never fits).
        """
        ids = _prompt_tokens(self.tokenizer, prompt)
        if not ids:
            raise ValueError("empty prompt")
        limit = context_length(self.model)
        if len(ids) >= limit:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; the model's context holds {limit} (leave room for the answer)"
            )
        max_tokens = min(max_tokens, limit - len(ids))
        stops = set(self.tokenizer.stop_tokens) if stop_tokens is None else {int(t) for t in stop_tokens}
        caches = list(prompt_cache) if prompt_cache else None
        if caches is not None:
            if len(caches) != len(self.model.layers) or not all(type(c) is KVCache for c in caches):
                raise ValueError("prompt_cache must be one plain KVCache per layer")
            if len({c.offset for c in caches}) != 1 or caches[0].offset >= len(ids):
                raise ValueError("prompt_cache must hold the same prefix, shorter than the prompt, in every layer")
        with self._lock:
            self._uid += 1
            req = BatchRequest(self, self._uid, ids, max_tokens, sampler,
                               list(logits_processors or []), stops, list(stop or []), limit,
                               prompt_cache=caches, keep_cache=keep_cache)
            if max_tokens < 1:
                req._finish("length")
                return req
            self.check_capacity(len(ids), max_tokens)
            self._incoming.append(req)
            self._lock.notify_all()
        return req

    def kv_bytes_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """KV bytes a request needs alone (what `submit` compares with `max_kv_bytes`)."""
        reservation = prompt_tokens + max_tokens
        return (reservation + _round_up(prompt_tokens - 1, KVCache.step)) * self.bytes_per_token

    def check_capacity(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise KVCapacityError if such a request could never fit under `max_kv_bytes` (thread-safe)."""
        need = self.kv_bytes_needed(prompt_tokens, max_tokens)
        if self.max_kv_bytes is not None and need > self.max_kv_bytes:
            raise KVCapacityError(
                f"a request of {prompt_tokens} prompt tokens and up to {max_tokens} new ones needs "
                f"{need} bytes of KV cache; the engine's cap is {self.max_kv_bytes}"
            )

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._incoming or self.waiting or self.running or self._prefill or self._inflight)

    def wait_for_work(self, timeout: Optional[float] = None) -> bool:
        """Block until a request is submitted or cancelled (or `timeout`); whether there is work."""
        with self._lock:
            if not (self._incoming or self.waiting or self.running or self._prefill):
                self._lock.wait(timeout)
        return self.has_work()

    def serve(self, stop: threading.Event, poll: float = 0.1) -> None:
        """Drive `step` on this thread until `stop` is set (a server's worker loop); handles
        iterated on other threads then block on their queues instead of stepping."""
        self.driven = True
        try:
            while not stop.is_set():
                if self.wait_for_work(poll):
                    self.step()
            # Handles still iterated must not hang: end what is left.
            self.cancel_all()
            self.step()
        finally:
            self.driven = False

    def start(self) -> None:
        """Run `serve` on a thread of the engine's own until `close`."""
        if getattr(self, "_thread", None) is not None:
            return
        self._stop = threading.Event()
        self.driven = True  # before the thread runs: no handle may step meanwhile
        self._thread = threading.Thread(target=self.serve, args=(self._stop,), name="llama-mlx-batch", daemon=True)
        self._thread.start()

    def close(self, timeout: Optional[float] = None) -> None:
        """Cancel everything and stop the thread `start` began."""
        self.cancel_all()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            self._stop.set()
            self._wake()
            thread.join(timeout)
            self._thread = None

    @property
    def prefilling(self) -> list[BatchRequest]:
        """The newcomers being prefilled now."""
        return list(self._prefill.reqs) if self._prefill is not None else []

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- memory ----------------------------------------------------------------------------
    def _bytes_with(self, reqs: list[BatchRequest], rows: int, limit: int) -> int:
        """Most KV bytes held while `reqs` prefill beside `rows` rows whose longest reservation is
        `limit`, and after they join them (a prefill's rows counted in whole `KVCache.step`s)."""
        batch = (rows + len(reqs)) * max([limit] + [r.reservation for r in reqs])
        prefill = len(reqs) * _round_up(_prefill_bound(reqs), KVCache.step)
        return (batch + prefill) * self.bytes_per_token

    def _fits(self, reqs: list[BatchRequest]) -> bool:
        if len(self.running) + len(reqs) > self.max_batch:
            return False
        if self.max_kv_bytes is None:
            return True
        limit = max((r.reservation for r in self.running), default=0)
        return self._bytes_with(reqs, len(self.running), limit) <= self.max_kv_bytes

    def live_caches(self) -> list:
        """Every KV cache holding buffers now: the batch's per-layer caches and a newcomer's prefill caches."""
        caches = list(self.solo or self.cache)
        if self._prefill is not None:
            caches += self._prefill.cache
        return caches

    def kv_bytes(self) -> int:
        """Bytes of KV buffers held now (what `max_kv_bytes` caps)."""
        return sum(c.keys.nbytes + c.values.nbytes for c in self.live_caches() if c.keys is not None)

    # -- the engine's thread ---------------------------------------------------------------
    def step(self) -> list[tuple[BatchRequest, GenerationResponse]]:
        """One unit of work: admit, prefill one chunk of a newcomer, queue one batched decode step
        of the running sequences, then read the step queued before it (so the device never waits
        on Python). Returns the responses it produced."""
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        self._drop_cancelled()
        self._retire([i for i, r in enumerate(self.running) if not r.done])
        if self._prefill is None:
            group: list[BatchRequest] = []
            while self.waiting and len(group) < self.prefill_batch and self._fits(group + [self.waiting[0]]):
                group.append(self.waiting.popleft())
            if group:
                now = time.perf_counter()
                for r in group:
                    r.started = now
                if self.solo is not None:  # no longer alone: into the batch before the newcomers' buffers exist
                    self._batch_solo()
                self._prefill = _Prefill(group, len(self.model.layers))
        if self._prefill is not None:
            try:
                self._prefill_chunk()
            except Exception as e:
                reqs = self._prefill.reqs
                self._prefill = None
                for r in reqs:
                    r._finish(None, e)
        queued = None
        if self.running:
            try:
                queued = self._queue_decode()
            except Exception as e:
                for r in self.running:
                    r._finish(None, e)
                self._retire([])
        events = self._read(self._inflight)
        self._inflight = queued
        self.steps += 1
        return events

    def _prefill_chunk(self) -> None:
        p = self._prefill
        n = min(self.prefill_chunk, max(len(t) for t in p.todo))
        if n:
            if p.batched:
                # Shorter prompts are padded; their rows then drop the padding's positions.
                rows = [t[:n] + [0] * (n - len(t[:n])) for t in p.todo]
                self.model(mx.array(rows), p.cache)
                for c in p.cache:
                    c.trim_rows([n - len(t[:n]) for t in p.todo])
                self.max_prefill_rows = max(self.max_prefill_rows, len(rows))
            else:
                self.model(mx.array(p.todo[0][:n])[None], p.cache)
            mx.eval([c.state for c in p.cache])
            p.todo = [t[n:] for t in p.todo]
        done = [b for b, t in enumerate(p.todo) if not t]
        if done:  # join: a row's last prompt token goes in with its next decode step
            self._join(done)
            mx.clear_cache()

    def _join(self, rows: list[int]) -> None:
        p = self._prefill
        reqs = [p.reqs[b] for b in rows]
        if not p.batched:
            self._prefill = None
            req, cache = reqs[0], p.cache
            if not self.running and self._alone_fits(req):
                self.solo, self._solo_step = cache, backends.decode_step(self.model, cache)
            else:
                for layer, c in zip(self.cache, cache):
                    layer.limit = max(layer.limit or 0, req.reservation)
                    layer.add(c.keys, c.values, c.offset)
                mx.eval([c.state for c in self.cache])
        else:
            # A burst usually joins whole: its buffers are then copied in as they are, not gathered first.
            whole = len(rows) == len(p.reqs)
            idx = mx.array(rows, dtype=mx.int32)
            for layer, c in zip(self.cache, p.cache):
                layer.limit = max([layer.limit or 0] + [r.reservation for r in reqs])
                keys, values = c.keys, c.values
                if keys is not None and not whole:
                    keys, values = mx.take(keys, idx, axis=0), mx.take(values, idx, axis=0)
                layer.add_rows(keys, values, [c.lengths[b] for b in rows])
            rest = [b for b in range(len(p.reqs)) if b not in rows]
            if rest:
                p.keep(rest)
            else:
                self._prefill = None
            mx.eval([c.state for c in self.cache + (p.cache if rest else [])])
        self.running.extend(reqs)

    def _alone_fits(self, req: BatchRequest) -> bool:
        # Alone, its buffers grow in whole `KVCache.step`s, past its reservation.
        if self.max_kv_bytes is None:
            return True
        return _round_up(req.reservation, KVCache.step) * self.bytes_per_token <= self.max_kv_bytes

    def _batch_solo(self) -> None:
        """Move the sequence running alone into the batch's cache."""
        for layer, c in zip(self.cache, self.solo):
            layer.limit = self.running[0].reservation
            layer.add(c.keys, c.values, c.offset)
        self.solo = self._solo_step = None
        mx.eval([c.state for c in self.cache])
        mx.clear_cache()

    def _new_batch_cache(self) -> None:
        self.cache = [BatchKVCache() for _ in self.model.layers]
        self._rows_step = backends.rows_step(self.model, self.cache, self._compile)

    def _inputs(self) -> mx.array:
        # A row's input is its token of the step queued last (still unread), or a newcomer's last
        # prompt token; while the rows stay the same the step's token array is the next input whole.
        rows, ids = self._inflight[:2] if self._inflight is not None else ([], None)
        if rows == self.running:
            return ids
        at = {id(r): b for b, r in enumerate(rows)}
        carried = [at.get(id(r)) for r in self.running]
        if all(b is not None for b in carried):
            return mx.take(ids, mx.array(carried, dtype=mx.int32))
        return mx.concatenate([ids[b : b + 1] if b is not None else mx.array([r.next_input], dtype=mx.uint32)
                               for b, r in zip(carried, self.running)])

    def _queue_decode(self) -> tuple[list[BatchRequest], mx.array, Any]:
        self.decode_steps += 1
        self.multi_row_steps += len(self.running) > 1
        self.max_rows = max(self.max_rows, len(self.running))
        tokens = self._inputs()[:, None]
        if self.solo is not None:
            logits = self._solo_step(tokens)
        else:
            logits = self._rows_step(tokens)
        # Greedy rows without processors (sampler None) are sampled together, the rest one by one.
        plain = [b for b, r in enumerate(self.running) if r.sampler is None and not r.processors]
        if len(plain) == len(self.running):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            ids = mx.argmax(logprobs, axis=-1).astype(mx.uint32)
        else:
            sampled: list = [None] * len(self.running)
            if plain:
                rows = logits[mx.array(plain)]
                lp = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
                best = mx.argmax(lp, axis=-1)
                for i, b in enumerate(plain):
                    sampled[b] = (best[i : i + 1], lp[i])
            for b, r in enumerate(self.running):
                if sampled[b] is None:
                    sampled[b] = r._sample(logits[b : b + 1])
            ids = mx.concatenate([t.astype(mx.uint32) for t, _ in sampled])
            logprobs = [lp for _, lp in sampled]
        mx.async_eval(ids, logprobs)
        return list(self.running), ids, logprobs

    def _read(self, inflight) -> list[tuple[BatchRequest, GenerationResponse]]:
        if inflight is None:
            return []
        rows, ids, logprobs = inflight
        events = []
        for b, (r, token) in enumerate(zip(rows, ids.tolist())):
            if r.done:  # finished or cancelled after this step was queued: its token is dropped
                continue
            try:
                events.append((r, r._accept(token, logprobs[b])))
                if r.keep_cache and r.finish_reason is not None:
                    self._keep_row(r)
            except Exception as e:
                r._finish(None, e)
        return events

    def _keep_row(self, r: BatchRequest) -> None:
        """Copy out the row of `r`, just ended: the step queued since fed its last token, so the row
        holds its prompt and every token it produced."""
        if r not in self.running:
            return
        b = self.running.index(r)
        held = r.prompt + r.tokens
        caches = self.solo or self.cache
        n = min(caches[0].offset if self.solo else self.cache[0].lengths[b], len(held))
        if caches[0].keys is None or n == 0:
            return
        r.kv_cache = [_row_copy(c.keys, c.values, b, n) for c in caches]
        mx.eval([c.state for c in r.kv_cache])
        r.kv_tokens = held[:n]

    def _retire(self, keep: list[int]) -> None:
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        if self.solo is not None:  # the one running alone has ended
            self.solo = self._solo_step = None
        elif len(self.running) == 1 and self._prefill is None and self._alone_fits(self.running[0]):
            # The last one left runs alone again, on a copy of its row.
            self.solo = [c.extract(keep[0]) for c in self.cache]
            self._solo_step = backends.decode_step(self.model, self.solo)
            self._new_batch_cache()
            mx.eval([c.state for c in self.solo])
        else:
            limit = max((r.reservation for r in self.running), default=None)
            for c in self.cache:
                c.limit = limit
                c.keep(keep)
            mx.eval([c.state for c in self.cache])
        mx.clear_cache()

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.waiting if r._cancel]:
            self.waiting.remove(r)
            r._finish("cancelled")
        if self._prefill is not None and any(r._cancel for r in self._prefill.reqs):
            keep = [b for b, r in enumerate(self._prefill.reqs) if not r._cancel]
            for r in self._prefill.reqs:
                if r._cancel:
                    r._finish("cancelled")
            if keep:
                self._prefill.keep(keep)
            else:
                self._prefill = None
        if any(r._cancel for r in self.running):
            for r in self.running:
                if r._cancel:
                    r._finish("cancelled")
            self._retire([i for i, r in enumerate(self.running) if not r.done])

    def cancel_all(self) -> None:
        """Cancel every queued and running sequence (thread-safe)."""
        with self._lock:
            for r in [*self._incoming, *self.waiting, *self.running, *self.prefilling]:
                r._cancel = True
            self._lock.notify_all()


@dataclass
class BatchResult:
    """`batch_generate`'s answer: per prompt, its text, its generated token ids and its statistics."""

    texts: list[str]
    tokens: list[list[int]]
    stats: list[SequenceStats]
    elapsed: float

    @property
    def generation_tps(self) -> float:
        """Generated tokens of all sequences per second of the whole run."""
        return sum(len(t) for t in self.tokens) / max(self.elapsed, 1e-9)


def batch_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_tokens: Union[int, Sequence[int]] = 256,
    sampler: Union[None, Sampler, Sequence[Optional[Sampler]]] = None,
    logits_processors: Union[None, Sequence[LogitsProcessor], Sequence[Sequence[LogitsProcessor]]] = None,
    stop: Optional[Sequence[str]] = None,
    max_kv_bytes: Optional[int] = None,
    max_batch: int = 32,
    prefill_chunk: int = 512,
    prefill_batch: int = 8,
) -> BatchResult:
    """Complete every prompt (text, ids or chat messages), decoding them together.

    `max_tokens` and `sampler` may be one for all or one per prompt; `logits_processors` one list
    for all or a list per prompt. Texts come back in the prompts' order.
    """
    n = len(prompts)
    per = lambda x: list(x) if isinstance(x, (list, tuple)) else [x] * n  # noqa: E731
    limits, samplers = per(max_tokens), per(sampler)
    procs = logits_processors
    if procs and isinstance(procs[0], (list, tuple)):
        procs = list(procs)
    else:
        procs = [procs] * n
    if not (len(limits) == len(samplers) == len(procs) == n):
        raise ValueError("per-prompt max_tokens, sampler and logits_processors need one entry per prompt")
    engine = BatchEngine(model, tokenizer, max_kv_bytes=max_kv_bytes, max_batch=max_batch, prefill_chunk=prefill_chunk,
                         prefill_batch=prefill_batch)
    start = time.perf_counter()
    reqs = [engine.submit(p, max_tokens=m, sampler=s, logits_processors=lp, stop=stop)
            for p, m, s, lp in zip(prompts, limits, samplers, procs)]
    try:
        while not all(r.done for r in reqs):
            engine.step()
    finally:
        engine.cancel_all()
    for r in reqs:
        if r.error is not None:
            raise r.error
    return BatchResult([r.text for r in reqs], [list(r.tokens) for r in reqs], [r.stats for r in reqs],
                       time.perf_counter() - start)
