"""Generation in layers: `generate_step` yields token ids, `stream_generate` yields
`GenerationResponse`s, `generate` returns the text.

Decode queues step n+1 (`mx.async_eval`) before step n's token reaches the caller. Which step
runs (the model's graph, or a compiled one) is the backend row's choice (`backends.decode_step`).
With a draft model or prompt lookup, `stream_generate` decodes speculatively (`speculative`).
The per-token work (sampling, stops, statistics) is a `sequence.Sequence`'s.
"""

from __future__ import annotations

import inspect
import sys
import time
from typing import Any, Callable, Generator, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from . import backends
from .cache import PromptCache, RotatingKVCache, make_prompt_cache
from .errors import ContextLengthError, TokenIdError
from .sample import LogitsProcessor, Sampler, make_sampler
from .sequence import GenerationResponse, Sampling, Sequence as _Sequence, prefill
from .speculative import check_draft, describe, speculative_generate_step

__all__ = ["GenerationResponse", "Prompt", "PromptCache", "check_keywords", "check_token_ids", "context_length",
           "generate", "generate_step", "prompt_ids", "stream_generate", "verbose_stats"]

Prompt = Union[str, Sequence[int], Sequence[dict]]


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
    prompt_progress: Optional[Callable[[int, int], None]] = None,
    prefill_seconds: Optional[float] = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token id, log-probabilities) for up to `max_tokens` new tokens.

    `prompt` holds the token ids not yet in `prompt_cache` (a per-layer cache list, made here
    when not given). Prefill runs in chunks of `prefill_step_size` tokens to bound memory
    (`sequence.prefill`; `prefill_seconds` sizes them by time, so that `prompt_progress`, where a
    caller may stop, comes back that often); the backend row's step (`backends.decode_step`)
    runs the rest.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt must be a non-empty 1-D array of token ids")
    check_token_ids(prompt, model)
    sample = Sampling(sampler or make_sampler(), logits_processors or (), prompt)
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(
        len(model.layers), max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size
    )
    step = backends.decode_step(model, cache)
    last = prefill(model, cache, prompt, prefill_step_size, prompt_progress, prefill_seconds)

    token, logprobs = sample(step(last[None]))
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


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=tokenizer.add_bos and tokenizer.bos_id is not None)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return [int(t) for t in prompt]


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
    prompt_progress: Optional[Callable[[int, int], None]] = None,
    draft_model: Optional[nn.Module] = None,
    draft_tokenizer: Any = None,
    draft_cache: Optional[PromptCache] = None,
    num_draft_tokens: Optional[int] = None,
    prompt_lookup: Optional[int] = None,
    adaptive: bool = True,
    prefill_seconds: Optional[float] = None,
    images: Optional[Sequence[Any]] = None,
) -> Generator[GenerationResponse, None, None]:
    """Stream a completion of `prompt` (text, token ids, or chat messages).

    images: for Llama 3.2 Vision, the conversation's images in order (paths, bytes or Pillow
    images), one per message: image parts of the messages, or the last user message's when they
    have none (`vision.prompt.image_prompt_ids`); each is encoded once per `prompt_cache`.

    Ends on a stop token (`finish_reason="stop"`), a stop string (never streamed, "stop"),
    `max_tokens` ("length") or the model's context ("context"). With a `prompt_cache`, only the
    tokens after the prefix it already holds are prefilled, and it holds the answer afterwards.

    Speculative decoding (off by default; `speculative.speculative_generate_step`): `draft_model`
    drafts `num_draft_tokens` a round (its tokenizer, when given as `draft_tokenizer`, must equal
    the target's: else `DraftModelError`; `draft_cache` is its PromptCache, kept across turns like
    `prompt_cache`), or `prompt_lookup=n` drafts from the last n-gram (n..1) found earlier in the
    prompt and answer; `num_draft_tokens=None` takes the backend row's (`backends.draft_tokens`).
    How many drafts a round adapts to what pays, none when nothing does (`adaptive=False`: always
    `num_draft_tokens`); `GenerationResponse.speculative` reports it. The tokens are distributed
    as without it (greedy: the same tokens).
    """
    started = time.perf_counter()
    if images is not None:
        from .vision.prompt import image_prompt_ids

        ids = image_prompt_ids(model, tokenizer, prompt, images)
    else:
        ids = prompt_ids(tokenizer, prompt)
    if not ids:
        raise ValueError("empty prompt")
    check_token_ids(ids, model)
    pc = prompt_cache or PromptCache(model, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    rotating = isinstance(pc.cache[0], RotatingKVCache)
    limit = None if rotating else context_length(model)
    if limit is not None and len(ids) >= limit:
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens; the model's context holds {limit} (leave room for the answer)"
        )
    if limit is not None:
        max_tokens = min(max_tokens, limit - len(ids))
    if images:
        from .vision.prompt import attach_new_images

        attach_new_images(model, tokenizer, pc.cache, images)
    todo = pc.prepare(ids)
    seq = _Sequence(tokenizer, ids, max_tokens=max_tokens, stop=stop or (), limit=limit, prompt_tokens=len(todo),
                    submitted=started)
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
            draft_prompt=mx.array(draft_pc.prepare(ids)) if draft_pc else None, context=ids[: seq.cached_tokens],
            prefill_step_size=prefill_step_size, prompt_progress=prompt_progress, adaptive=adaptive,
        )
    else:
        steps = generate_step(
            mx.array(todo), model, max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
            prompt_cache=pc.cache, prefill_step_size=prefill_step_size, prompt_progress=prompt_progress,
            prefill_seconds=prefill_seconds,
        )
    with backends.wired_limit(model):
        try:
            for token, logprobs, *speculated in steps:
                response = seq.accept(token, logprobs, *speculated)
                yield response
                if response.finish_reason:
                    break
        finally:
            steps.close()
            # The step after each handed-out token is already queued, so the cache holds it too.
            pc.record(ids + seq.tokens)
            if draft_pc is not None:
                draft_pc.record(ids + seq.tokens)


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
    """mlx-lm's statistics lines (Prompt, Generation, Peak memory) for a final response; with
    speculative decoding, one more (`speculative.describe`)."""
    return (f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
            f"Peak memory: {r.peak_memory:.3f} GB\n"
            + (describe(r.speculative) + "\n" if r.speculative else ""))


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
