"""Generation in layers: `generate_step` yields token ids, `stream_generate` yields
`GenerationResponse`s, `generate` returns the text.

Decode queues step n+1 (`mx.async_eval`) before step n's token reaches the caller. Which step
runs (the model's graph, or a compiled one) is the backend seam's choice (`backends.decode_step`).
With a draft model or prompt lookup, `stream_generate` decodes speculatively (`speculative`).
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from . import backends
from .backends import Step
from .cache import PromptCache, RotatingKVCache, make_prompt_cache
from .errors import ContextLengthError, TokenIdError
from .sample import LogitsProcessor, Sampler, apply_processors, make_sampler
from .speculative import check_draft, speculative_generate_step

__all__ = ["GenerationResponse", "Prompt", "PromptCache", "check_keywords", "check_token_ids", "context_length",
           "generate", "generate_step", "stream_generate", "verbose_stats"]

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class GenerationResponse:
    """One streamed step: the new text and token, and running statistics.

    text: the new text segment (may be empty while a character or stop string is incomplete).
    prompt_tokens: tokens prefilled for this request (those reused from a prompt cache excluded).
    cached_tokens: prompt tokens reused from the prompt cache.
    peak_memory: peak memory so far, in GB.
    finish_reason: None while generating, then "stop", "length" or "context".
    from_draft: this token is a draft token the target accepted (speculative decoding).
    draft_tokens, accepted_tokens: draft tokens proposed and accepted so far (0 without speculation).
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    cached_tokens: int = 0
    time_to_first_token: float = 0.0
    from_draft: bool = False
    draft_tokens: int = 0
    accepted_tokens: int = 0


def context_length(model: nn.Module) -> int:
    return int(model.args.max_position_embeddings)


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = 512,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    compile: Optional[bool] = None,
    prompt_progress: Optional[Callable[[int, int], None]] = None,
    step: Optional[Step] = None,
    prefill_seconds: Optional[float] = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token id, log-probabilities) for up to `max_tokens` new tokens.

    `prompt` holds the token ids not yet in `prompt_cache` (a per-layer cache list, made here
    when not given). Prefill runs in chunks of `prefill_step_size` tokens to bound memory.
    `step` (`step(tokens[B, L]) -> logits[B, vocab]`, over `prompt_cache`) runs the rest; by
    default `backends.decode_step(model, cache, compile)` picks it. `prefill_seconds`: size the
    chunks (at most `prefill_step_size`) to take about this long each, so that `prompt_progress`,
    where a caller may stop, comes back that often even on a slow or busy device.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt must be a non-empty 1-D array of token ids")
    check_token_ids(prompt, model)
    if step is not None and prompt_cache is None:
        raise ValueError("a step runs over a given cache: pass that prompt_cache too")
    sampler = sampler or make_sampler()
    processors = list(logits_processors or [])
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(
        len(model.layers), max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size
    )
    if step is None:
        step = backends.decode_step(model, cache, compile)
    history = prompt if processors else None

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        if processors:
            logits = apply_processors(processors, history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        if processors:
            history = mx.concatenate([history, token])
        return token, logprobs[0]

    total = prompt.size
    chunk = prefill_step_size if prefill_seconds is None else min(prefill_step_size, 8)
    while prompt.size > 1:
        n = min(chunk, prompt.size - 1)
        started = time.perf_counter()
        model(prompt[None, :n], cache)
        mx.eval([c.state for c in cache])
        if prefill_seconds is not None:  # grow at most 8x a chunk: one quick chunk may be luck
            per_token = max(time.perf_counter() - started, 1e-6) / n
            chunk = max(1, min(prefill_step_size, 8 * n, int(prefill_seconds / per_token)))
        prompt = prompt[n:]
        if prompt_progress:
            prompt_progress(total - prompt.size, total)
        mx.clear_cache()

    token, logprobs = sample(step(prompt[None]))
    mx.async_eval(token, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            # Queue the next step before handing this token over: the device never waits on Python.
            next_token, next_logprobs = sample(step(token[None]))
            mx.async_eval(next_token, next_logprobs)
        yield token.item(), logprobs
        if n + 1 < max_tokens:
            token, logprobs = next_token, next_logprobs
        if n % 256 == 255:
            mx.clear_cache()


def check_token_ids(ids: Union[mx.array, Sequence[int]], model: nn.Module) -> None:
    """Raise TokenIdError unless every id is in [0, vocab_size): MLX's gather does not check bounds."""
    vocab = int(model.args.vocab_size)
    if isinstance(ids, mx.array):
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise TokenIdError(f"token ids must be integers, found {ids.dtype}")
        low, high = mx.min(ids).item(), mx.max(ids).item()
    else:
        if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise TokenIdError("token ids must be integers")
        low, high = min(ids), max(ids)
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise TokenIdError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")


def _prompt_tokens(tokenizer: Any, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=tokenizer.add_bos and tokenizer.bos_id is not None)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return [int(t) for t in prompt]


class _StopStrings:
    """Holds back text that may be the start of a stop string, so none of it is ever streamed."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    stop: Optional[Sequence[str]] = None,
    prompt_cache: Optional[PromptCache] = None,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    prefill_step_size: int = 512,
    compile: Optional[bool] = None,
    prompt_progress: Optional[Callable[[int, int], None]] = None,
    draft_model: Optional[nn.Module] = None,
    draft_tokenizer: Any = None,
    draft_cache: Optional[PromptCache] = None,
    num_draft_tokens: Optional[int] = None,
    prompt_lookup: Optional[int] = None,
    prefill_seconds: Optional[float] = None,
) -> Generator[GenerationResponse, None, None]:
    """Stream a completion of `prompt` (text, token ids, or chat messages).

    Ends on a stop token (`finish_reason="stop"`), a stop string (never streamed, "stop"),
    `max_tokens` ("length") or the model's context ("context"). With a `prompt_cache`, only the
    tokens after the prefix it already holds are prefilled, and it holds the answer afterwards.

    Speculative decoding (off by default; `speculative.speculative_generate_step`): `draft_model`
    drafts `num_draft_tokens` a round (its tokenizer, when given as `draft_tokenizer`, must equal
    the target's: else `DraftModelError`; `draft_cache` is its PromptCache, kept across turns like
    `prompt_cache`), or `prompt_lookup=n` drafts from the last n-gram (n..1) found earlier in the
    prompt and answer; `num_draft_tokens=None` takes the backend's (`backends.draft_tokens`). The
    tokens are distributed as without it (greedy: the same tokens).
    """
    ids = _prompt_tokens(tokenizer, prompt)
    if not ids:
        raise ValueError("empty prompt")
    check_token_ids(ids, model)
    pc = prompt_cache or PromptCache(model, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    rotating = isinstance(pc.cache[0], RotatingKVCache)
    limit = context_length(model)
    if not rotating and len(ids) >= limit:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens; the model's context holds {limit} (leave room for the answer)"
        )
    if not rotating:
        max_tokens = min(max_tokens, limit - len(ids))
    todo = pc.prepare(ids)
    cached = len(ids) - len(todo)
    stops = set(tokenizer.stop_tokens)
    detok = tokenizer.detokenizer()
    stop_strings = _StopStrings(stop or [])
    emitted: list[int] = []  # every token handed out, stop token included

    start = time.perf_counter()
    prompt_time = 0.0
    tps = 0.0
    draft_pc = None
    if draft_model is not None or prompt_lookup is not None:
        if draft_model is not None:
            check_draft(model, tokenizer, draft_model, draft_tokenizer)
            draft_pc = draft_cache or PromptCache(draft_model, kv_bits=kv_bits, kv_group_size=kv_group_size)
        steps = speculative_generate_step(
            mx.array(todo), model, draft_model=draft_model, num_draft_tokens=num_draft_tokens,
            prompt_lookup=prompt_lookup, max_tokens=max_tokens, sampler=sampler,
            logits_processors=logits_processors, prompt_cache=pc.cache,
            draft_cache=draft_pc.cache if draft_pc else None,
            draft_prompt=mx.array(draft_pc.prepare(ids)) if draft_pc else None, context=ids[:cached],
            prefill_step_size=prefill_step_size, compile=compile, prompt_progress=prompt_progress,
        )
    else:
        steps = generate_step(
            mx.array(todo), model, max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
            prompt_cache=pc.cache, prefill_step_size=prefill_step_size, compile=compile,
            prompt_progress=prompt_progress, prefill_seconds=prefill_seconds,
        )
    accepted = 0
    try:
        for n, (token, logprobs, *speculated) in enumerate(steps):
            from_draft, drafted = speculated or (False, 0)
            accepted += from_draft
            emitted.append(token)
            if n == 0:
                prompt_time = time.perf_counter() - start
                start = time.perf_counter()
            else:
                tps = n / (time.perf_counter() - start)
            finish = None
            if token in stops:
                text, finish = detok.finalize(), "stop"
                text, _ = stop_strings.feed(text)
                text += stop_strings.flush()
            else:
                text, hit = stop_strings.feed(detok.add_token(token))
                if hit:
                    finish = "stop"
                elif n + 1 == max_tokens:
                    finish = "context" if not rotating and len(ids) + n + 1 >= limit else "length"
                    tail, hit = stop_strings.feed(detok.finalize())
                    text += tail + ("" if hit else stop_strings.flush())
            yield GenerationResponse(
                text=text, token=token, logprobs=logprobs, prompt_tokens=len(todo),
                prompt_tps=len(todo) / max(prompt_time, 1e-9), generation_tokens=n + 1,
                generation_tps=tps, peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
                cached_tokens=cached, time_to_first_token=prompt_time, from_draft=from_draft,
                draft_tokens=drafted, accepted_tokens=accepted,
            )
            if finish:
                break
    finally:
        steps.close()
        # The step after each handed-out token is already queued, so the cache holds it too.
        pc.record(ids + emitted)
        if draft_pc is not None:
            draft_pc.record(ids + emitted)


def check_keywords(name: str, kwargs: dict, target: Callable) -> None:
    """TypeError naming `name` (the function the user called) for a keyword `target` does not take."""
    accepted = inspect.signature(target).parameters
    for key in kwargs:
        if key not in accepted:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")


def generate(model: nn.Module, tokenizer: Any, prompt: Prompt, max_tokens: int = 256, *,
             verbose: Union[bool, Callable[[str], None]] = False, **kwargs) -> str:
    """Generate and return the completion text (see `stream_generate` for the options).

    verbose: as in mlx-lm, True writes the text as it streams and then the statistics to
    `sys.stdout`; a callable receives those same pieces of text instead (the library writes
    nowhere else, and nowhere unless asked).
    """
    check_keywords("generate", kwargs, stream_generate)
    write = verbose if callable(verbose) else (_write_stdout if verbose else None)
    if write is not None:
        write("=" * 10 + "\n")
    pieces, last = [], None
    for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        last = response
        pieces.append(response.text)
        if write is not None and response.text:
            write(response.text)
    text = "".join(pieces)
    if write is not None:
        write("\n" + "=" * 10 + "\n")
        if not text or last is None:
            write("No text generated for this prompt\n")
        else:
            write(verbose_stats(last))
    return text


def verbose_stats(r: GenerationResponse) -> str:
    """mlx-lm's statistics lines (Prompt, Generation, Peak memory) for a final response."""
    return (f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
            f"Peak memory: {r.peak_memory:.3f} GB\n")


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
