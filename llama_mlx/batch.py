"""Continuous batching: several sequences decode in one forward step, joining and leaving at any step.

`cache.BatchKVCache` holds one row per sequence, each at its own length (rows right-padded). Its
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
from .cache import BatchKVCache, KVCache, QuantizedBatchKVCache, QuantizedKVCache, make_prompt_cache, row_copy
from .errors import ContextLengthError, LlamaMLXError
from .generate import Prompt, context_length, prompt_ids
from .sample import LogitsProcessor, Sampler, log_softmax
from . import sequence
from .sequence import GenerationResponse, prefill_chunk

__all__ = [
    "BatchEngine",
    "BatchRequest",
    "BatchResult",
    "KVCapacityError",
    "SequenceStats",
    "batch_generate",
]


class KVCapacityError(LlamaMLXError):
    """A request's KV cache could never fit under the engine's `max_kv_bytes`, even alone."""


def _round_up(n: int, step: int) -> int:
    return ((n + step - 1) // step) * step


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
    runs. Iterating drives the engine itself unless a thread runs `BatchEngine.serve`. Its
    sampling, stops and statistics are a `sequence.Sequence`'s (`seq`)."""

    def __init__(self, engine: "BatchEngine", uid: int, seq: sequence.Sequence,
                 prompt_cache: Optional[list[KVCache]] = None, keep_cache: bool = False):
        self.engine, self.uid, self.seq = engine, uid, seq
        self.prompt = seq.prompt
        # A warm start: per-layer caches already holding the first `cached_tokens` prompt tokens.
        self.prompt_cache = prompt_cache
        self.cached_tokens = seq.cached_tokens
        self.keep_cache = keep_cache
        self.kv_cache: Optional[list[KVCache]] = None  # with keep_cache: its row's KV once it ended
        self.kv_tokens: list[int] = []  # the tokens kv_cache holds
        self.error: Optional[BaseException] = None
        # Positions its KV may ever hold: the whole prompt and every answer token, the last one
        # included (the step after it is queued before it is read).
        self.reservation = len(self.prompt) + seq.max_tokens
        # Requests alike in prompt and warm start prefill once (`_Prefill.copies`).
        self.prefill_key = hash((self.cached_tokens, tuple(self.prompt)))
        self._queue: queue.Queue = queue.Queue()
        self._cancel = False
        self.next_input = self.prompt[-1]

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens

    @property
    def text(self) -> str:
        return self.seq.text

    @property
    def finish_reason(self) -> Optional[str]:
        return self.seq.finish_reason

    @property
    def started(self) -> Optional[float]:
        """When its prefill began (None while it waits)."""
        return self.seq.started

    @property
    def finished(self) -> Optional[float]:
        return self.seq.finished

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
        s, now = self.seq, time.perf_counter()
        first = s.first_token
        prompt_time = (first - s.started) if first and s.started else 0.0
        gen_time = ((s.finished or now) - first) if first else 0.0
        n = len(s.tokens)
        return SequenceStats(
            prompt_tokens=len(self.prompt), generation_tokens=n,
            queue_time=((s.started or now) - s.submitted),
            time_to_first_token=(first - s.submitted) if first else 0.0,
            prompt_tps=len(self.prompt) / max(prompt_time, 1e-9),
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            finish_reason=self.finish_reason,
        )

    # Called by the engine's thread only.
    def _accept(self, token: int, logprobs: mx.array) -> GenerationResponse:
        response = self.seq.accept(token, logprobs)
        self.next_input = token
        self._queue.put(response)
        if response.finish_reason:
            self._queue.put(_END)
        return response

    def _finish(self, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        self.seq.finish(reason)
        self.error = error
        self._queue.put(_END)


def _batch_cache(kv: dict, bucketed: bool = False) -> BatchKVCache:
    if kv.get("kv_bits") is not None:
        return QuantizedBatchKVCache(kv["kv_bits"], kv["kv_group_size"])
    return BatchKVCache(bucketed=bucketed)


class _Prefill:
    """Newcomers prefilling together, `todo[i]` the prompt tokens row i has still to run (its last
    one excepted: that goes in with its first decode step). One newcomer prefills into plain
    `KVCache`s, so that it can go on to decode alone; several are the rows of `BatchKVCache`s,
    each at its own length, run as one forward a chunk."""

    def __init__(self, reqs: list[BatchRequest], layers: int, kv: dict):
        # Copies of one prompt from one start (a request's n choices) prefill once, as one row: the
        # first runs it, the others (`copies`, by the first's id) take copies of its row when it joins.
        self.copies: dict[int, list[BatchRequest]] = {}
        self.reqs: list[BatchRequest] = []
        for r in reqs:
            if not self.attach(r):
                self.reqs.append(r)
        reqs = self.reqs
        self.todo = [r.prompt[r.cached_tokens : -1] for r in reqs]
        self.batched = len(reqs) > 1
        if not self.batched:
            self.cache = reqs[0].prompt_cache or make_prompt_cache(layers, **kv)
        else:
            self.cache = [_batch_cache(kv) for _ in range(layers)]
            bound = _prefill_bound(reqs)
            for i, c in enumerate(self.cache):
                c.limit = bound
                for r in reqs:
                    warm = r.prompt_cache[i] if r.prompt_cache else None
                    c.add(*((warm.keys, warm.values, warm.offset) if warm else (None, None, 0)))
        for r in self.all:
            r.prompt_cache = None

    @property
    def all(self) -> list[BatchRequest]:
        """Every request prefilling, copies included."""
        return [c for r in self.reqs for c in [r] + self.copies.get(id(r), [])]

    def attach(self, r: BatchRequest) -> bool:
        """Make `r` a copy of the row with its prompt and start, if there is one."""
        lead = next((q for q in self.reqs if q.prefill_key == r.prefill_key and q.cached_tokens == r.cached_tokens
                     and q.prompt == r.prompt), None)
        if lead is None:
            return False
        self.copies.setdefault(id(lead), []).append(r)
        r.prompt_cache = None
        return True

    def joining(self, b: int) -> list[BatchRequest]:
        """Row b's request and its copies, which join with it."""
        return [self.reqs[b]] + self.copies.pop(id(self.reqs[b]), [])

    def drop_cancelled(self) -> None:
        """Forget cancelled copies; a cancelled row's first copy left takes its row (the same KV)."""
        for b, r in enumerate(self.reqs):
            left = [c for c in self.copies.pop(id(r), []) if not c._cancel]
            if r._cancel and left:
                self.reqs[b], left = left[0], left[1:]
            if left:
                self.copies[id(self.reqs[b])] = left

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
    prefill, not one after another). How the batched step runs is the backend row's choice
    (`backends.rows_step`). kv_bits, kv_group_size: keep every sequence's keys and values
    quantized (`QuantizedKVCache`, `QuantizedBatchKVCache`: the model's graph runs them), alone
    or batched.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_kv_bytes: Optional[int] = None,
                 max_batch: int = 8, prefill_chunk: int = 512, prefill_batch: int = 8,
                 kv_bits: Optional[int] = None, kv_group_size: int = 64):
        if max_batch < 1 or prefill_chunk < 1 or prefill_batch < 1:
            raise ValueError("max_batch, prefill_chunk and prefill_batch must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_kv_bytes, self.max_batch, self.prefill_chunk = max_kv_bytes, max_batch, prefill_chunk
        self.prefill_batch = prefill_batch
        args = model.args
        dtype = model.model.compute_dtype or model.model.norm.weight.dtype
        if kv_bits is not None and args.head_dim % kv_group_size:
            raise ValueError(f"kv_group_size {kv_group_size} does not divide the head size {args.head_dim}")
        self.kv = dict(kv_bits=kv_bits, kv_group_size=kv_group_size)
        # Keys and values, every layer, one position (quantized: codes, and a scale and bias a group).
        per_head = args.head_dim * dtype.size if kv_bits is None else (
            args.head_dim * kv_bits // 8 + 2 * (args.head_dim // kv_group_size) * dtype.size)
        self.bytes_per_token = 2 * len(model.layers) * args.num_key_value_heads * per_head
        self.bucketed = kv_bits is None and backends.rows_step(model, [BatchKVCache()]).kind != "graph"
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
        ids = prompt_ids(self.tokenizer, prompt)
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
            kind = KVCache if self.kv["kv_bits"] is None else QuantizedKVCache
            if len(caches) != len(self.model.layers) or not all(type(c) is kind for c in caches) or (
                    kind is QuantizedKVCache and any(c.meta_state != caches[0].meta_state for c in caches)):
                raise ValueError(f"prompt_cache must be one {kind.__name__} per layer, as the engine's")
            if kind is QuantizedKVCache and (caches[0].bits, caches[0].group_size) != (
                    self.kv["kv_bits"], self.kv["kv_group_size"]):
                raise ValueError("prompt_cache's kv_bits and kv_group_size must be the engine's")
            if len({c.offset for c in caches}) != 1 or caches[0].offset >= len(ids):
                raise ValueError("prompt_cache must hold the same prefix, shorter than the prompt, in every layer")
        with self._lock:
            self._uid += 1
            seq = sequence.Sequence(self.tokenizer, ids, max_tokens=max_tokens, sampler=sampler,
                           processors=logits_processors or (), stop=stop or (), stop_tokens=stops, limit=limit,
                           prompt_tokens=len(ids) - (caches[0].offset if caches else 0))
            req = BatchRequest(self, self._uid, seq, prompt_cache=caches, keep_cache=keep_cache)
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
        if self.bucketed:
            reservation = _round_up(reservation, BatchKVCache.step)
        return (reservation + _round_up(prompt_tokens - 1, KVCache.step)) * self.bytes_per_token

    def warm_up(self, seconds: float = 30.0, capacities: Sequence[int] = (256, 512, 1024)) -> int:
        """Run the batched step once at each shape it will take (every bucket of rows up to
        `max_batch`, at each of `capacities`, smallest first), so that its traces and kernel builds
        happen now rather than in the first requests; stops starting new shapes after `seconds`
        and skips shapes over `max_kv_bytes`. Returns the shapes run (0 where the step is the
        model's graph, which traces nothing)."""
        if not self.bucketed or hasattr(self.model, "make_cache"):  # (a vision model's caches: not warmed)
            return 0
        deadline = time.perf_counter() + seconds
        probe = [KVCache() for _ in self.model.layers]  # the buffers' dtype and head shape, as a step makes them
        self.model(mx.array([[0]]), probe)
        _, H, _, D = probe[0].keys.shape
        dtype = probe[0].keys.dtype
        sizes = sorted({BatchKVCache(bucketed=True).rows(n) for n in range(1, self.max_batch + 1)})
        done = 0
        for cap in sorted({_round_up(c, BatchKVCache.step) for c in capacities}):
            for rows in sizes:
                if time.perf_counter() > deadline:
                    return done
                if self.max_kv_bytes is not None and rows * cap * self.bytes_per_token > self.max_kv_bytes:
                    continue
                cache = [BatchKVCache(bucketed=True) for _ in self.model.layers]
                zeros = mx.zeros((rows, H, cap, D), dtype)
                for c in cache:
                    c.add_rows(zeros, zeros, [cap - 1] * rows)
                mx.eval(backends.rows_step(self.model, cache)(mx.zeros((rows, 1), mx.uint32)))
                done += 1
                del cache, zeros
        mx.clear_cache()
        return done

    def check_capacity(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise KVCapacityError if such a request could never fit under `max_kv_bytes` (thread-safe)."""
        need = self.kv_bytes_needed(prompt_tokens, max_tokens)
        if self.max_kv_bytes is not None and need > self.max_kv_bytes:
            raise KVCapacityError(
                f"a request of {prompt_tokens} prompt tokens and up to {max_tokens} new ones needs "
                f"{need} bytes of KV cache; the engine's cap is {self.max_kv_bytes}"
            )

    def free_rows(self) -> int:
        """Rows not yet promised: `max_batch` less those running, prefilling or waiting (thread-safe)."""
        with self._lock:
            taken = len(self.running) + len(self.prefilling) + len(self.waiting) + len(self._incoming)
        return max(0, self.max_batch - taken)

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
            backends.finish_thread()

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
        return self._prefill.all if self._prefill is not None else []

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- memory ----------------------------------------------------------------------------
    def _bytes_with(self, reqs: list[BatchRequest], rows: int, limit: int) -> int:
        """Most KV bytes held while `reqs` prefill beside `rows` rows whose longest reservation is
        `limit`, and after they join them (a prefill's rows counted in whole `KVCache.step`s)."""
        longest = max([limit] + [r.reservation for r in reqs])
        if self.bucketed:  # the batch's buffers in buckets (`BatchKVCache.rows`, whole steps)
            batch = self.cache[0].rows(rows + len(reqs)) * _round_up(longest, BatchKVCache.step)
        else:
            batch = (rows + len(reqs)) * longest
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
        return sum(c.nbytes for c in self.live_caches())

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
                    r.seq.started = now
                if self.solo is not None:  # no longer alone: into the batch before the newcomers' buffers exist
                    self._batch_solo()
                self._prefill = _Prefill(group, len(self.model.layers), self.kv)
        elif self.waiting:
            # Copies of the prompt being prefilled that queued after it (n choices reaching the queue
            # a step apart) join that prefill rather than run it again, when they fit beside it.
            for r in list(self.waiting):
                if self._fits(self._prefill.all + [r]) and self._prefill.attach(r):
                    self.waiting.remove(r)
                    r.seq.started = time.perf_counter()
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
                mx.eval([c.state for c in p.cache])
                self.max_prefill_rows = max(self.max_prefill_rows, len(rows))
            else:
                prefill_chunk(self.model, p.cache, mx.array(p.todo[0][:n])[None])
            p.todo = [t[n:] for t in p.todo]
        done = [b for b, t in enumerate(p.todo) if not t]
        if done:  # join: a row's last prompt token goes in with its next decode step
            self._join(done)
            mx.clear_cache()

    def _join(self, rows: list[int]) -> None:
        p = self._prefill
        groups = [p.joining(b) for b in rows]  # a row's copies join with it, each with a copy of its KV
        reqs = [r for g in groups for r in g]
        if not p.batched:
            self._prefill = None
            cache = p.cache
            if len(reqs) == 1 and not self.running and self._alone_fits(reqs[0]):
                self.solo, self._solo_step = cache, backends.decode_step(self.model, cache)
            else:
                for layer, c in zip(self.cache, cache):
                    layer.limit = max([layer.limit or 0] + [r.reservation for r in reqs])
                    for _ in reqs:
                        layer.add(c.keys, c.values, c.offset)
                mx.eval([c.state for c in self.cache])
        else:
            # A burst usually joins whole: its buffers are then copied in as they are, not gathered first.
            whole = len(rows) == len(p.reqs) == len(reqs)
            rows = [b for b, g in zip(rows, groups) for _ in g]
            idx = mx.array(rows, dtype=mx.int32)
            for layer, c in zip(self.cache, p.cache):
                layer.limit = max([layer.limit or 0] + [r.reservation for r in reqs])
                keys, values = c.keys, c.values
                if keys is not None and not whole:
                    keys, values = (tuple(mx.take(a, idx, axis=0) for a in x) if isinstance(x, tuple)
                                    else mx.take(x, idx, axis=0) for x in (keys, values))
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
        # A compiled step traces per buffer shape: its cache's shapes come from a few buckets.
        self.cache = [_batch_cache(self.kv, self.bucketed) for _ in self.model.layers]
        self._rows_step = backends.rows_step(self.model, self.cache)

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
        # Greedy rows without processors are sampled together, the rest one by one.
        plain = [b for b, r in enumerate(self.running) if r.seq.sample.greedy]
        if len(plain) == len(self.running):
            logprobs = log_softmax(logits)
            ids = mx.argmax(logprobs, axis=-1).astype(mx.uint32)
        else:
            sampled: list = [None] * len(self.running)
            if plain:
                lp = log_softmax(logits[mx.array(plain)])
                best = mx.argmax(lp, axis=-1)
                for i, b in enumerate(plain):
                    sampled[b] = (best[i : i + 1], lp[i])
            for b, r in enumerate(self.running):
                if sampled[b] is None:
                    sampled[b] = r.seq.sample(logits[b : b + 1])
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
        quantized = caches[0].meta_state if self.kv["kv_bits"] is not None else None
        r.kv_cache = [row_copy(c.keys, c.values, b, n, quantized) for c in caches]
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
        if self._prefill is not None and any(r._cancel for r in self._prefill.all):
            for r in self._prefill.all:
                if r._cancel:
                    r._finish("cancelled")
            self._prefill.drop_cancelled()
            keep = [b for b, r in enumerate(self._prefill.reqs) if not r._cancel]
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
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
) -> BatchResult:
    """Complete every prompt (text, ids or chat messages), decoding them together (with `kv_bits`,
    over quantized KV caches, batched all the same).

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
                         prefill_batch=prefill_batch, kv_bits=kv_bits, kv_group_size=kv_group_size)
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
