"""The serving engine: generation requests in, streamed events out, over one model.

    engine = Engine(lambda: load(path), max_concurrency=4, queue_size=16, prompt_cache_bytes=1 << 30)
    engine.start(); engine.wait_ready()
    job = engine.submit(GenerationRequest(prompt=ids, max_tokens=64))   # QueueFullError when full
    async for event in job: ...                                         # EngineEvent, the last has usage
    job.cancel()                                                        # stops it between tokens

One worker thread owns the model (it loads it too, so every MLX array lives on that thread). It runs
up to `max_concurrency` jobs at once; `queue_size` more wait, beyond that `submit` refuses. Jobs
wait in one queue, the engine's: a job joins the batch only when the batch has a row free for it
(`BatchEngine.free_rows`). Running jobs decode together, continuously batched
(`llama_mlx.batch.BatchEngine`): up to `decode_concurrency` rows in one forward step, a newcomer's
prefill interleaved in chunks, the KV of all live rows capped by `max_kv_bytes` (a request that
could never fit is refused with `KVCapacityError`; one that does not fit now waits). At temperature
0 each answer is the one the job gets alone. With speculative decoding (`speculative`) a job runs
alone instead, over its own prompt cache, interleaved token by token with the batch.
`PrefixCachePool` keeps prompt caches between requests, bounded in bytes, least recently used
evicted first; a batched job starts from the pool's prefix and gives its row back to it. Under
`mlx.launch` (`lockstep`, a `llama_mlx.lockstep.Leader` on rank 0) the jobs run one at a time, each
through the leader, so that every rank runs it (continuous batching across ranks is not done).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx

from . import backends
from .batch import BatchEngine, BatchRequest, KVCapacityError
from .cache import KVCache, PromptCache, common_prefix
from .errors import ImageError, LlamaMLXError
from .fit import Fit, fit_model
from .generate import context_length, stream_generate
from .sample import SamplingParams

__all__ = [
    "Engine",
    "EngineClosedError",
    "EngineEvent",
    "GenerationRequest",
    "Job",
    "KVCapacityError",
    "PrefixCachePool",
    "QueueFullError",
    "Usage",
]


class QueueFullError(LlamaMLXError):
    """Every generation slot is busy and the waiting queue is full."""


class EngineClosedError(LlamaMLXError):
    """The engine is shutting down (or failed to load) and takes no new requests."""


@dataclass
class GenerationRequest:
    """One generation: prompt ids, its `SamplingParams` (OpenAI's meanings: temperature 1 unless
    told), stop strings, and `top_logprobs`: None for no log-probabilities, else how many
    alternatives per token (0-20)."""

    prompt: list[int]
    max_tokens: int = 256
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temp=1.0))
    stop: Sequence[str] = ()
    top_logprobs: Optional[int] = None
    # Llama 3.2 Vision: the images of the prompt's <|image|> tokens, in order (a job with images runs
    # alone, not in the batch), and their content hashes, which key the prefix cache with the tokens.
    images: Sequence[Any] = ()
    image_keys: tuple[str, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int  # the whole prompt, cached part included
    completion_tokens: int  # every sampled token, a stop token included
    cached_tokens: int
    time_to_first_token: float
    generation_tps: float
    speculative: Optional[dict] = None  # a speculative job's figures (`GenerationResponse.speculative`)


@dataclass
class EngineEvent:
    """One generated token. `text` may be empty (an incomplete character or stop string held back).

    logprob / top_logprobs: when asked for (not for a stop token). The last event has
    `finish_reason` ("stop" or "length"), `usage`, and `stop_sequence` when a stop string ended it.
    """

    text: str
    token: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    stop_sequence: Optional[str] = None


class _Cancelled(Exception):
    pass


_END = object()


class PrefixCachePool:
    """Prompt caches kept between requests, at most `max_bytes` of KV buffers in all.

    `take(prompt)` finds the kept cache sharing the longest prefix with `prompt`. One that the
    prompt extends whole is handed out (and leaves the pool); one sharing at least `min_reuse`
    tokens is copied up to the shared prefix (it stays, for its other continuations); otherwise
    the cache is new. `give_back(cache)` keeps it as the most recently used, drops the kept caches
    it makes redundant (whose tokens it starts with), then evicts the least recently used until
    the total is within the bound. A cache larger than the bound is not kept.

    Images (Llama 3.2 Vision): a cache records the content hashes of the images it holds
    (`image_keys`); it is reused only for a request whose images start with those same ones (the
    `<|image|>` tokens of two different images are the same token), and a request with images
    takes only a cache that has cross-attention layers to hold them.
    """

    def __init__(self, model, max_bytes: int, *, min_reuse: int = 16, **cache_options: Any):
        self.model, self.max_bytes, self.min_reuse, self.cache_options = model, int(max_bytes), min_reuse, cache_options
        self._entries: "OrderedDict[int, tuple[PromptCache, int]]" = OrderedDict()  # least recent first
        self._lock = threading.Lock()
        self.nbytes = 0
        self.evictions = 0
        self.hits = 0
        self.misses = 0

    def take(self, prompt: Sequence[int], image_keys: Sequence[str] = ()) -> PromptCache:
        head = list(prompt)[:-1]  # the last prompt token always runs again
        image_keys = tuple(image_keys)
        with self._lock:
            best, best_len = None, 0
            for key, (pc, _) in self._entries.items():
                held = getattr(pc, "image_keys", ())
                if held != image_keys[: len(held)] or (image_keys and not _holds_images(pc)):
                    continue
                n = common_prefix(pc.tokens, head)
                if n > best_len:
                    best, best_len = key, n
            if best is not None and best_len == len(self._entries[best][0].tokens):
                pc, size = self._entries.pop(best)
                self.nbytes -= size
                self.hits += 1
                return pc
            if best is not None and best_len >= self.min_reuse and _copyable(self._entries[best][0]):
                self._entries.move_to_end(best)
                self.hits += 1
                return _copy_prefix(self._entries[best][0], best_len, self.model)
            self.misses += 1
        return PromptCache(self.model, **self.cache_options)

    def give_back(self, pc: PromptCache) -> None:
        size = pc.nbytes
        with self._lock:
            if not pc.tokens or size > self.max_bytes:
                return
            keys = getattr(pc, "image_keys", ())
            for key, (other, other_size) in list(self._entries.items()):
                held = getattr(other, "image_keys", ())
                if (len(other.tokens) <= len(pc.tokens) and pc.tokens[: len(other.tokens)] == other.tokens
                        and held == keys[: len(held)]):
                    del self._entries[key]
                    self.nbytes -= other_size
            self._entries[id(pc)] = (pc, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self.nbytes -= old
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"bytes": self.nbytes, "max_bytes": self.max_bytes, "entries": len(self._entries),
                    "tokens": sum(len(pc.tokens) for pc, _ in self._entries.values()),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def _holds_images(pc: PromptCache) -> bool:
    return any(hasattr(c, "spans") for c in pc.cache)  # a vision model's cross-attention caches


# Load-time bound on tracing the batched step's shapes (`BatchEngine.warm_up`).
WARM_UP_SECONDS = 30.0


def _copyable(pc: PromptCache) -> bool:
    return all(type(c) is KVCache for c in pc.cache)


def _copy_prefix(pc: PromptCache, n: int, model) -> PromptCache:
    """A new prompt cache holding the first `n` tokens of `pc` (its first update moves them into new buffers)."""
    out = PromptCache(model, **pc.options)
    out.cache = [KVCache.from_state([a[..., :n, :] for a in c.state], c.meta_state) for c in pc.cache]
    mx.eval([c.state for c in out.cache])
    out.tokens = list(pc.tokens[:n])
    return out


class Job:
    """A submitted request: an async iterator of `EngineEvent`s; `cancel()` stops it between tokens."""

    def __init__(self, engine: "Engine", request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.engine, self.request, self._loop = engine, request, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._steps: Optional[Iterator[EngineEvent]] = None
        self._done = False
        self.cancelled = False
        self._batch: Optional[BatchRequest] = None  # its row, when it runs in the batch
        self._tokens: list[int] = []
        self._cached = 0
        self._finished = False  # its last event went out (a cancel after it is the reader letting go)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens read from the prefix cache (known once the first event has come)."""
        return self._cached

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.engine._forget_waiting(self)
            # The reader ends now, not after the step in flight (a drain's cut must beat uvicorn's own).
            self._push(_END)

    def __aiter__(self) -> "Job":
        return self

    async def __anext__(self) -> EngineEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    # -- worker side

    def _push(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.cancelled = True

    def _step(self) -> bool:
        """Run one token; False once the job is over."""
        try:
            if self.cancelled:
                raise _Cancelled
            if self._steps is None:
                self._steps = self.engine._generate(self)
            event = next(self._steps)
        except (StopIteration, _Cancelled):
            self._close()
            return False
        except Exception as e:  # noqa: BLE001 - handed to the request's handler
            self._close(e)
            return False
        self._push(event)
        if event.finish_reason is not None:
            self._finished = True
            self._close()
            return False
        return True

    def _close(self, error: Optional[BaseException] = None) -> None:
        if self._steps is not None:
            self._steps.close()
        self._push(error if error is not None else _END)


class Engine:
    """Runs generation requests on one worker thread (see the module's docstring).

    loader: called on the worker thread, returns (model, tokenizer).
    prompt_cache_bytes: bound of the prefix cache pool (0: keep nothing between requests).
    decode_concurrency: most rows decoded in one batched step. max_kv_bytes: cap on the KV of
    all batched rows (None: no cap). speculative: called on the worker thread after loading,
    returns `stream_generate`'s speculative keywords (draft_model=..., or prompt_lookup=...);
    with it every job runs alone, speculatively. lockstep: rank 0's `llama_mlx.lockstep.Leader`
    of a distributed group: every job runs alone, one at a time (max_concurrency becomes 1), on
    every rank; the worker sends the other ranks home when it stops.
    fit: size the context and the KV cache to `memory_budget` bytes (default: the device's memory;
    `llama_mlx.fit`): `context_length` is then what fits (a longer request is refused) and the
    batch's KV cap, unless `max_kv_bytes` sets one, what is left beside the weights. `self.fit`
    says what it found (None with fit off). warm_up (an attribute, True by default): read the
    weights and trace the batched steps at load, before the first request (False for a load that a
    request already waits on: the warm-up would only add to its TTFT).
    """

    def __init__(self, loader: Callable[[], tuple[Any, Any]], *, max_concurrency: int = 8, queue_size: int = 16,
                 prompt_cache_bytes: int = 1 << 30, prefill_step_size: int = 512,
                 cache_options: Optional[dict] = None, decode_concurrency: int = 8,
                 max_kv_bytes: Optional[int] = None, speculative: Optional[Callable[[], dict]] = None,
                 lockstep=None, fit: bool = True, memory_budget: Optional[int] = None):
        if max_concurrency < 1 or queue_size < 0 or prompt_cache_bytes < 0 or decode_concurrency < 1:
            raise ValueError("need max_concurrency >= 1, decode_concurrency >= 1, queue_size >= 0 and "
                             "prompt_cache_bytes >= 0")
        if max_kv_bytes is not None and max_kv_bytes < 1:
            raise ValueError("max_kv_bytes must be positive")
        self._loader = loader
        self.max_concurrency, self.queue_size = max_concurrency, queue_size
        self.prompt_cache_bytes, self.prefill_step_size = prompt_cache_bytes, prefill_step_size
        self.decode_concurrency, self.max_kv_bytes = decode_concurrency, max_kv_bytes
        self.cache_options = dict(cache_options or {})
        self._fit, self.memory_budget = fit, memory_budget
        self.fit: Optional[Fit] = None
        self._speculative_loader = speculative
        self.speculative: dict = {}
        self.lockstep = lockstep
        self.warm_up = True
        if lockstep is not None:
            self.max_concurrency = 1  # every rank runs each job: one at a time
        self.model = self.tokenizer = self.pool = self.batch = None
        self.load_error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._calls: list[tuple[Callable, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}

    # -- lifecycle

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="llama-mlx-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Wait for the model to load; raises what the loader raised."""
        done = self._ready.wait(timeout)
        if self.load_error is not None:
            raise self.load_error
        return done

    @property
    def context_length(self) -> int:
        """Positions a request may fill: the model's context, or less where memory bounds it (`fit`)."""
        return self.fit.context if self.fit is not None else context_length(self.model)

    @property
    def batched(self) -> bool:
        """Whether jobs decode together (False: speculative decoding or lockstep, each job alone)."""
        return not self.speculative and self.lockstep is None

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no new requests, let the running and waiting ones finish, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request (call from the event loop that will read the job's events).

        Raises QueueFullError, EngineClosedError, or KVCapacityError (it could never fit under
        max_kv_bytes)."""
        job = Job(self, request, asyncio.get_running_loop())
        with self._cond:
            if self._closing or not self.ready:
                raise EngineClosedError("the server is shutting down" if self._closing else "the model is not loaded")
            if self.batch is not None and self.batched:
                try:
                    self.batch.check_capacity(len(request.prompt), request.max_tokens)
                except KVCapacityError:
                    self.counters["rejected"] += 1
                    raise
            if len(self._active) + len(self._waiting) >= self.max_concurrency + self.queue_size:
                self.counters["rejected"] += 1
                raise QueueFullError(f"the server is busy: {len(self._active)} requests running and "
                                     f"{len(self._waiting)} waiting; try again later")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    async def call(self, fn: Callable[[Any, Any], Any]) -> Any:
        """Run `fn(model, tokenizer)` on the worker thread, between steps (the model's arrays live
        there), and return what it returns or raise what it raises. Raises EngineClosedError."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._closing or not self.ready:
                raise EngineClosedError("the server is shutting down" if self._closing else "the model is not loaded")
            self._calls.append((fn, loop, future))
            self._cond.notify_all()
        return await future

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        for fn, loop, future in calls:
            try:
                result, error = fn(self.model, self.tokenizer), None
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                result, error = None, e

            def settle(future=future, result=result, error=error):
                if not future.done():
                    future.set_exception(error) if error is not None else future.set_result(result)

            loop.call_soon_threadsafe(settle)

    def _forget_waiting(self, job: Job) -> None:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                self._cond.notify_all()  # running: the worker sees the flag
                return
            self.counters["cancelled"] += 1
        job._push(_END)

    def stats(self) -> dict:
        with self._cond:
            out = {"loaded": self.ready, "active": len(self._active), "waiting": len(self._waiting),
                   "max_concurrency": self.max_concurrency, "queue_size": self.queue_size, **self.counters}
        out["prompt_cache"] = self.pool.stats() if self.pool is not None else None
        b = self.batch
        out["batch"] = None if b is None else {
            "enabled": self.batched, "decode_concurrency": self.decode_concurrency,
            "max_kv_bytes": self.max_kv_bytes, "kv_bytes": _kv_bytes(b), "rows": len(b.running),
            "waiting": len(b.waiting), "decode_steps": b.decode_steps, "multi_row_steps": b.multi_row_steps,
            "max_rows": b.max_rows}
        out["speculative"] = sorted(k for k in self.speculative if k in ("draft_model", "prompt_lookup"))
        out["ranks"] = 1 if self.lockstep is None else self.lockstep.group.size()
        out["fit"] = None if self.fit is None else {**asdict(self.fit), "limited": self.fit.limited}
        return out

    # -- worker thread

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            if self.lockstep is not None and self.model is not None:
                self.lockstep.shutdown()  # (a failed load failed on every rank: nobody waits then)
            backends.finish_thread()

    def _serve(self) -> None:
        try:
            self.model, self.tokenizer = self._loader()
            if self._fit:
                self.fit = fit_model(self.model, self.memory_budget, kv_bits=self.cache_options.get("kv_bits"),
                                     kv_group_size=self.cache_options.get("kv_group_size", 64))
                if self.max_kv_bytes is None and self.fit.kv_budget:
                    self.max_kv_bytes = self.fit.kv_budget
            self.pool = PrefixCachePool(self.model, self.prompt_cache_bytes, **self.cache_options)
            # A quantized KV cache (kv_bits) batches too: its rows are QuantizedBatchKVCache's.
            self.batch = BatchEngine(self.model, self.tokenizer, max_kv_bytes=self.max_kv_bytes,
                                     max_batch=self.decode_concurrency, prefill_chunk=self.prefill_step_size,
                                     kv_bits=self.cache_options.get("kv_bits"),
                                     kv_group_size=self.cache_options.get("kv_group_size", 64))
            self.batch.driven = True  # this thread steps it; nobody iterates its handles
            if self.fit is not None and self.fit.kv_budget and self.batched:
                # A request joining the batch holds its prefill's buffer and its row at once: the
                # context is what such a request may fill in the KV budget.
                lo, hi = 1, self.fit.context
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    fits = self.batch.kv_bytes_needed(mid - 1, 1) <= self.fit.kv_budget
                    lo, hi = (mid, hi) if fits else (lo, mid - 1)
                self.fit = replace(self.fit, context=lo)
            if self._speculative_loader is not None:
                self.speculative = dict(self._speculative_loader() or {})
            if self.warm_up:
                self._warm_up()
        except BaseException as e:  # noqa: BLE001 - reported by wait_ready
            self.load_error = e
            self._closing = True
            self._ready.set()
            return
        self._ready.set()
        with backends.wired_limit(self.model):
            self._loop()

    def _warm_up(self) -> None:
        # Read the (lazily loaded) weights and trace the steps now, not in the first request's TTFT.
        generate = self.lockstep.stream_generate if self.lockstep is not None else stream_generate
        for _ in generate(self.model, self.tokenizer, [0, 0, 0], 2, prompt_cache=PromptCache(self.model)):
            pass
        if self.batched:
            # Rows join one a step and all overlap, so batch sizes 1..n each run once.
            n = backends.warmup_batch_sizes(min(self.decode_concurrency, self.max_concurrency))
            try:
                for _ in range(n):
                    self.batch.submit([0, 0, 0], max_tokens=n + 1, stop_tokens=())
            except KVCapacityError:  # a cap this small: fewer rows then
                pass
            while self.batch.has_work():
                self.batch.step()
            self.batch.decode_steps = self.batch.multi_row_steps = self.batch.max_rows = 0
            # Every bucket of rows at the first capacities, bounded: no first-request traces.
            self.batch.warm_up(seconds=WARM_UP_SECONDS)

    def _loop(self) -> None:
        while True:
            if self._calls:
                self._run_calls()
            with self._cond:
                # One queue: a job waits here until it can run, and a batched one joins the batch
                # only while the batch has a row for it (it may still wait there for KV room).
                free = self.batch.free_rows() if self.batched else len(self._waiting)
                while len(self._active) < self.max_concurrency and self._waiting and free > 0:
                    self._active.append(self._waiting.popleft())
                    free -= 1
                idle = not self._active
                if idle and not (self.batch.has_work()):
                    if self._calls:
                        continue
                    if self._closing:
                        return
                    self._cond.wait()
                    continue
                active = list(self._active)
            if idle:  # rows just ended: drop them (and their KV) now, not at the next request
                self.batch.step()
                continue
            self._step_all(active)

    def _step_all(self, active: list[Job]) -> None:
        """One batched step for the jobs in the batch (joining it first), one token for each job alone."""
        alone = []
        for job in active:
            if not self.batched or job.request.images:  # (the batch takes no images)
                alone.append(job)
            elif job._batch is None:
                self._join_batch(job)
            elif job.cancelled and not job._batch.done:
                job._batch.cancel()
        if self.batched and self.batch.has_work():
            self.batch.step()
            for job in active:
                if job._batch is not None:
                    self._deliver(job)
        for job in alone:
            cancelled = job.cancelled
            if not job._step():
                self._retire(job, (cancelled or job.cancelled) and not job._finished)

    def _retire(self, job: Job, cancelled: bool, failed: bool = False) -> None:
        with self._cond:
            self._active.remove(job)
            self.counters["failed" if failed else "cancelled" if cancelled else "completed"] += 1

    def _join_batch(self, job: Job) -> None:
        """Submit a job's row to the batch, warm-started from the prefix cache pool."""
        req = job.request
        if job.cancelled:
            job._push(_END)
            self._retire(job, True)
            return
        try:
            params = req.params
            pc = self.pool.take(req.prompt)
            cache = None
            if _copyable(pc) and pc.tokens:
                pc.prepare(req.prompt)
                cache = pc.cache if pc.offset else None
            job._cached = pc.offset if cache is not None else 0
            job._batch = self.batch.submit(req.prompt, max_tokens=req.max_tokens,
                                           sampler=None if params.greedy else params.sampler(),
                                           logits_processors=params.processors(self.tokenizer, req.max_tokens),
                                           stop=list(req.stop) or None,
                                           prompt_cache=cache,
                                           keep_cache=self.pool.max_bytes > 0 and self.batch.kv["kv_bits"] is None)
        except Exception as e:  # noqa: BLE001 - handed to the request's handler
            job._push(e)
            self._retire(job, False, failed=True)

    def _deliver(self, job: Job) -> None:
        """Hand a batched job the responses its row produced in the last step."""
        req, row = job.request, job._batch
        responses, ended = row.poll()
        for r in responses:
            job._tokens.append(r.token)
            event = self._event(req, r, job._tokens, job._cached)
            if not job.cancelled:
                job._push(event)
        if not ended:
            return
        if row.kv_cache is not None:
            pc = PromptCache(self.model, **self.cache_options)
            pc.cache, pc.tokens = row.kv_cache, row.kv_tokens
            row.kv_cache = None
            self.pool.give_back(pc)
        cancelled = job.cancelled or row.finish_reason == "cancelled"
        job._push(row.error if row.error is not None else _END)
        self._retire(job, cancelled, failed=row.error is not None)

    def _event(self, req: GenerationRequest, r, tokens: list[int], cached: int) -> EngineEvent:
        """The event of one generated token `r` (a `GenerationResponse`); `tokens` so far, this one included."""
        stops = self.tokenizer.stop_tokens
        event = EngineEvent(r.text, r.token)
        if req.top_logprobs is not None and r.token not in stops:
            event.logprob, event.top_logprobs = _logprobs(r.logprobs, r.token, req.top_logprobs)
        if r.finish_reason is not None:
            event.finish_reason = "length" if r.finish_reason == "context" else r.finish_reason
            if event.finish_reason == "stop" and r.token not in stops:
                event.stop_sequence = _which_stop(self.tokenizer.decode(tokens), req.stop)
            event.usage = Usage(len(req.prompt), r.generation_tokens, cached, r.time_to_first_token, r.generation_tps,
                                getattr(r, "speculative", None))
        return event

    def _generate(self, job: Job) -> Iterator[EngineEvent]:
        req, tokenizer = job.request, self.tokenizer

        def progress(done: int, total: int) -> None:
            if job.cancelled:
                raise _Cancelled

        pc = self.pool.take(req.prompt, req.image_keys)
        common = {"stop": list(req.stop) or None, "prompt_cache": pc, "prefill_step_size": self.prefill_step_size,
                  "prompt_progress": progress}
        if req.images:
            if self.lockstep is not None:
                raise ImageError("images are not served under mlx.launch (the ranks run text prompts only)")
            common["images"] = list(req.images)
        if self.lockstep is not None:  # every rank builds the sampler and processors from the params
            stream = self.lockstep.stream_generate(self.model, tokenizer, req.prompt, req.max_tokens,
                                                   params=req.params, **common)
        else:
            stream = stream_generate(self.model, tokenizer, req.prompt, req.max_tokens, sampler=req.params.sampler(),
                                     logits_processors=req.params.processors(tokenizer, req.max_tokens), **common,
                                     **self.speculative)
        tokens: list[int] = []
        try:
            for r in stream:
                tokens.append(r.token)
                job._cached = r.cached_tokens
                yield self._event(req, r, tokens, r.cached_tokens)
        finally:
            stream.close()
            held = next((len(c.spans) for c in pc.cache if hasattr(c, "spans")), 0)  # images attached
            pc.image_keys = tuple(req.image_keys[:held])
            self.pool.give_back(pc)


def _kv_bytes(batch: BatchEngine) -> int:
    try:  # read from another thread while the worker changes the batch: a near value will do
        return batch.kv_bytes()
    except (TypeError, AttributeError):
        return -1


def _logprobs(logprobs: mx.array, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    logprobs = logprobs.astype(mx.float32)
    chosen = float(logprobs[token].item())
    if k <= 0:
        return chosen, []
    top = mx.argsort(-logprobs)[:k]
    values = logprobs[top].tolist()
    return chosen, list(zip(top.tolist(), values))


def _which_stop(text: str, stops: Sequence[str]) -> Optional[str]:
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits)[1] if hits else None
