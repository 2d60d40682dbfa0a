"""Lockstep generation over a distributed group: rank 0 has the input, every rank runs the model.

Each layer of a sharded model takes part in collectives (all-sums, sends), so every rank must make
the same model calls with the same shapes, while only rank 0 reads a terminal or an HTTP port.
Rank 0, the leader, sends each generation job to the others: the prompt's token ids, its
`SamplingParams` as plain values (a seed included), the stop strings and tokens. Every rank
then runs the same `_execute` on it, so the computations agree by construction. After each
prefill chunk and each token but the last, rank 0 sends one flag, go on or stop, so that its own
decisions (Ctrl-C, a client gone, a stream closed early) stop every rank at the same step. The
other ranks loop in `follow` until rank 0 sends "shutdown" (`Leader.shutdown`, or leaving its
`with` block).

    leader = Leader(group)                                   # rank 0
    with leader:
        for r in leader.stream_generate(model, tokenizer, ids, 64, params=SamplingParams(temp=0.7)): ...
    follow(model, tokenizer, group)                          # every other rank, until shutdown

A job and a flag travel as all-sums from rank 0 (the others add zeros): a length, then the job as
JSON bytes. Each rank keeps its own prompt cache (the leader's is its caller's: a chat's, a pool
entry of a server; a follower keeps the last job's); before a job the ranks agree on the prefix
they all hold and reuse only that much, so the prefill has one shape everywhere. Prefill chunks
are of fixed size (no `prefill_seconds`: timing differs between ranks).
"""

from __future__ import annotations

import json
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx

from .cache import PromptCache, common_prefix
from .errors import LlamaMLXError
from .generate import check_token_ids, prompt_ids, stream_generate
from .sample import SamplingParams
from .sequence import GenerationResponse

__all__ = ["Leader", "follow"]


class _Stop(Exception):
    """Rank 0 said stop during the prefill."""


def _prepare(tokenizer, job: dict) -> tuple:
    """The job's (sampler, logits processors), built alike on every rank."""
    missing = set(job["stop_tokens"]) - set(tokenizer.stop_tokens)
    if missing:  # rank 0's tokenizer was given more stop tokens (e.g. --extra-eos-token)
        tokenizer.add_stop_tokens(sorted(missing))
    params = SamplingParams.from_dict(job["params"])
    return params.sampler(), params.processors(tokenizer, job["max_tokens"])


# -- what travels


def _broadcast(job: Optional[dict], g) -> dict:
    """Rank 0's job (the others pass None) on every rank."""
    data = json.dumps(job, separators=(",", ":")).encode() if g.rank() == 0 else b""
    n = int(mx.distributed.all_sum(mx.array([len(data)], mx.int32), group=g).item())
    buf = mx.array(memoryview(data)) if data else mx.zeros((n,), mx.uint8)
    return json.loads(bytes(memoryview(mx.distributed.all_sum(buf, group=g))))


def _flag(go: bool, g) -> bool:
    """Rank 0's go-on (True) or stop (False), on every rank."""
    mine = int(go) if g.rank() == 0 else 0
    return bool(mx.distributed.all_sum(mx.array([mine], mx.int32), group=g).item())


def _agree_prefix(pc: PromptCache, ids: Sequence[int], g) -> None:
    """Cut every rank's cache to the longest prefix of the prompt that all of them hold."""
    mine = common_prefix(pc.tokens, ids[:-1])  # the last prompt token always runs again
    keep = int(mx.distributed.all_gather(mx.array([mine], mx.int32), group=g).min().item())
    drop = len(pc.tokens) - keep
    if drop and pc.trim(drop) != drop:
        pc.reset()  # a rotating cache that wrapped cannot be cut back
    held = mx.distributed.all_gather(mx.array([len(pc.tokens) == keep], mx.int32), group=g)
    if not bool(held.min().item()):
        pc.reset()  # one of them could not keep it: all start over


# -- the one executor every rank runs


def _execute(model, tokenizer, job: dict, pc: PromptCache, g, sampler, processors: list,
             prompt_progress: Optional[Callable[[int, int], None]] = None) -> Iterator[GenerationResponse]:
    """Run `job` (its sampler and processors from `_prepare`) on this rank, yielding its responses.
    On rank 0, `prompt_progress` is the caller's (an exception it raises stops every rank, then
    propagates), and closing the generator before the last response stops every rank."""
    ids = job["prompt"]
    _agree_prefix(pc, ids, g)

    def progress(done: int, total: int) -> None:
        error = None
        if prompt_progress is not None:
            try:
                prompt_progress(done, total)
            except BaseException as e:  # noqa: BLE001 - rank 0 stops; the others are told first
                error = e
        if not _flag(error is None, g):
            raise error if error is not None else _Stop

    stream = stream_generate(model, tokenizer, ids, job["max_tokens"], sampler=sampler, logits_processors=processors,
                             stop=job["stop"] or None, prompt_cache=pc, prefill_step_size=job["prefill_step_size"],
                             prompt_progress=progress)
    try:
        for response in stream:
            if response.finish_reason is not None:
                yield response  # the last: every rank knows it is, no flag follows
                return
            try:
                yield response
            except BaseException:  # closed (or thrown into) on rank 0: tell the others to stop
                _flag(False, g)
                raise
            if not _flag(True, g):
                return
    except _Stop:
        return
    finally:
        stream.close()


# -- rank 0


class Leader:
    """Rank 0's side: `stream_generate` sends each job to the other ranks and runs it here too;
    `shutdown()` (or leaving a `with` block) sends them home. One job at a time."""

    def __init__(self, group):
        if group.size() > 1 and group.rank() != 0:
            raise ValueError(f"rank {group.rank()} follows (llama_mlx.lockstep.follow); only rank 0 leads")
        self.group = group
        self.closed = False
        self._open: Optional[Iterator] = None

    def stream_generate(self, model, tokenizer, prompt, max_tokens: int = 256, *,
                        params: Optional[SamplingParams] = None, stop: Optional[Sequence[str]] = None,
                        prompt_cache: Optional[PromptCache] = None, prefill_step_size: int = 512,
                        prompt_progress: Optional[Callable[[int, int], None]] = None) -> Iterator[GenerationResponse]:
        """`llama_mlx.stream_generate` on every rank at once, with the sampler and logits processors
        given as `params` (a `SamplingParams`, sent as plain values, built alike on every rank;
        unseeded, rank 0 draws a seed from MLX's global random state). Close the stream to stop
        every rank.
        Like stream_generate, nothing runs (or is checked) before the first step is asked for."""
        if self.closed:
            raise LlamaMLXError("the other ranks were sent home (shutdown): no more generation")
        if self._open is not None:
            raise LlamaMLXError("one generation at a time under mlx.launch: close the running stream first")
        ids = prompt_ids(tokenizer, prompt)
        if not ids:
            raise ValueError("empty prompt")
        check_token_ids(ids, model)
        params = params.to_dict() if params is not None else SamplingParams().to_dict()
        if params["temp"] > 0 and params["seed"] is None:
            params["seed"] = int(mx.random.randint(0, 2**31 - 1, (1,)).item())
        pc = prompt_cache if prompt_cache is not None else PromptCache(model)
        job = {"op": "generate", "prompt": ids, "max_tokens": int(max_tokens), "params": params,
               "stop": list(stop or []),
               "stop_tokens": sorted(tokenizer.stop_tokens), "prefill_step_size": int(prefill_step_size),
               "cache": pc.options}
        built = _prepare(tokenizer, job)  # a bad recipe is refused here, before anything is sent
        if self.group.size() == 1:
            yield from _execute(model, tokenizer, job, pc, self.group, *built, prompt_progress)
            return
        _broadcast(job, self.group)
        steps = _execute(model, tokenizer, job, pc, self.group, *built, prompt_progress)
        self._open = steps
        try:
            yield from steps
        finally:
            steps.close()
            self._open = None

    def shutdown(self) -> None:
        """Send the other ranks home (their `follow` returns); a running stream is stopped first."""
        if self.closed:
            return
        self.closed = True
        if self._open is not None:
            self._open.close()
        if self.group.size() > 1:
            try:
                _broadcast({"op": "shutdown"}, self.group)
            except RuntimeError:  # the others are gone already (the ring lost its peers)
                pass

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


# -- every other rank


def follow(model, tokenizer, group) -> int:
    """On a rank other than 0: run rank 0's jobs until it sends shutdown; returns how many ran.

    An error a job raises here (a LlamaMLXError or ValueError: a bad request, a prompt longer than
    the context) was raised on rank 0 at the same point, so the loop goes on; any other escapes.
    """
    if group.rank() == 0:
        raise ValueError("rank 0 leads (llama_mlx.lockstep.Leader); the other ranks follow")
    pc: Optional[PromptCache] = None
    done = 0
    while True:
        job = _broadcast(None, group)
        if job.get("op") == "shutdown":
            return done
        if pc is None or pc.options != job["cache"]:
            pc = PromptCache(model, **job["cache"])
        try:
            for _ in _execute(model, tokenizer, job, pc, group, *_prepare(tokenizer, job)):
                pass
        except (LlamaMLXError, ValueError):
            pass
        done += 1
