"""One sequence's state and its per-token work, shared by every token loop.

`stream_generate`, the batch engine's rows, speculative decoding and lockstep all run a
`Sequence`: logits -> logits processors -> log-probabilities (`sample.log_softmax`) -> sampler
(`sample`), then each token handed out is accepted (`accept`): detokenized, checked against stop
tokens, stop strings, `max_tokens` and the context, and turned into a `GenerationResponse` with
the running statistics. `prefill` runs a prompt into a cache in chunks, the same way everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence as Seq

import mlx.core as mx
import mlx.nn as nn

from .sample import LogitsProcessor, Sampler, apply_processors, log_softmax

__all__ = ["GenerationResponse", "Sampling", "Sequence", "StopStrings", "prefill", "prefill_chunk"]


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
    speculative: with speculation, the adaptive controller's figures so far (None without):
    drafted, accepted, rounds, rounds_off (rounds it drafted nothing), k (drafts it chose last),
    k_min/k_max (over rounds that drafted), acceptance (its running estimate per draft token) and
    speedup (its estimate over plain decoding: tokens a second against a plain step's time).
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
    speculative: Optional[dict] = None


class StopStrings:
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


def prefill_chunk(model: nn.Module, cache: list, tokens: mx.array) -> None:
    """Run prompt tokens [B, n] into `cache` (no logits kept) and wait for it."""
    model(tokens, cache)
    mx.eval([c.state for c in cache])


def prefill(model: nn.Module, cache: list, prompt: mx.array, step_size: int = 512,
            progress: Optional[Callable[[int, int], None]] = None, seconds: Optional[float] = None) -> mx.array:
    """Run all of `prompt` (1-D ids) but its last token into `cache`, `step_size` tokens a chunk;
    returns what is left (the last token). `progress(done, total)` follows each chunk (it may
    raise to stop). `seconds`: size the chunks (at most `step_size`) to take about this long each,
    so that `progress` comes back that often even on a slow or busy device."""
    total = prompt.size
    chunk = step_size if seconds is None else min(step_size, 8)
    while prompt.size > 1:
        n = min(chunk, prompt.size - 1)
        started = time.perf_counter()
        prefill_chunk(model, cache, prompt[None, :n])
        if seconds is not None:  # grow at most 8x a chunk: one quick chunk may be luck
            per_token = max(time.perf_counter() - started, 1e-6) / n
            chunk = max(1, min(step_size, 8 * n, int(seconds / per_token)))
        prompt = prompt[n:]
        if progress:
            progress(total - prompt.size, total)
        mx.clear_cache()
    return prompt


class Sampling:
    """logits -> processors -> log-probabilities -> sampler, for one sequence: `sampling(logits
    [1, vocab]) -> (token [1], log-probabilities [vocab])`. The processors see `history` (the
    prompt tokens given) and every token sampled since. sampler None: greedy."""

    def __init__(self, sampler: Optional[Sampler], processors: Seq[LogitsProcessor] = (), history: Seq[int] = ()):
        self.sampler, self.processors = sampler, list(processors)
        self._start = history
        self.history: Optional[mx.array] = None

    @property
    def greedy(self) -> bool:
        """The argmax of the raw logits: no processors, and no sampler or a greedy one."""
        return not self.processors and (self.sampler is None or getattr(self.sampler, "greedy", False))

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        if self.processors:
            if self.history is None:
                start = self._start
                self.history = start if isinstance(start, mx.array) else mx.array(list(start))
            logits = apply_processors(self.processors, self.history, logits)
        logprobs = log_softmax(logits)
        token = self.sampler(logprobs) if self.sampler is not None else mx.argmax(logprobs, axis=-1)
        if self.processors:
            self.history = mx.concatenate([self.history, token.astype(self.history.dtype)])
        return token, logprobs[0]


class Sequence:
    """A sequence being generated: its sampling (`sample`, a `Sampling` over the whole prompt) and
    what each token it hands out does (`accept`).

    prompt: the whole prompt's ids; prompt_tokens: how many of them are prefilled (the rest came
    from a prompt cache: `cached_tokens`). limit: the model's context, or None (a rotating cache
    never fills it). submitted: when the request arrived (TTFT counts from there).
    """

    def __init__(self, tokenizer: Any, prompt: Seq[int], *, max_tokens: int, sampler: Optional[Sampler] = None,
                 processors: Seq[LogitsProcessor] = (), stop: Seq[str] = (),
                 stop_tokens: Optional[Iterable[int]] = None, limit: Optional[int] = None,
                 prompt_tokens: Optional[int] = None, submitted: Optional[float] = None):
        self.prompt = list(prompt)
        self.max_tokens, self.limit = max_tokens, limit
        self.sample = Sampling(sampler, processors, self.prompt)
        self.stop_tokens = set(tokenizer.stop_tokens if stop_tokens is None else stop_tokens)
        self.prompt_tokens = len(self.prompt) if prompt_tokens is None else prompt_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.drafted = self.accepted = 0
        self.speculative: Optional[dict] = None
        self._detok = tokenizer.detokenizer()
        self._stops = StopStrings(stop)
        self.submitted = time.perf_counter() if submitted is None else submitted
        self.started: Optional[float] = None  # prefill began
        self.first_token: Optional[float] = None
        self.finished: Optional[float] = None

    @property
    def cached_tokens(self) -> int:
        return len(self.prompt) - self.prompt_tokens

    def accept(self, token: int, logprobs: mx.array, from_draft: bool = False, drafted: int = 0,
               speculative: Optional[dict] = None) -> GenerationResponse:
        """Hand out `token`: its text (stop strings held back), the finish reason if it ends the
        sequence ("stop", "length" or "context"), and the statistics so far."""
        n = len(self.tokens)
        self.tokens.append(token)
        now = time.perf_counter()
        if n == 0:
            self.first_token = now
            self.started = self.started if self.started is not None else self.submitted
        self.accepted += from_draft
        self.drafted = max(self.drafted, drafted)
        self.speculative = speculative or self.speculative
        text, finish = self._text(token, n)
        self.text += text
        if finish is not None:
            self.finish(finish)
        prompt_time = max(self.first_token - self.started, 1e-9)
        return GenerationResponse(
            text=text, token=token, logprobs=logprobs, prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tokens / prompt_time, generation_tokens=n + 1,
            generation_tps=n / (now - self.first_token) if n and now > self.first_token else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, cached_tokens=self.cached_tokens,
            time_to_first_token=self.first_token - self.submitted, from_draft=from_draft,
            draft_tokens=self.drafted, accepted_tokens=self.accepted, speculative=self.speculative,
        )

    def _text(self, token: int, n: int) -> tuple[str, Optional[str]]:
        if token in self.stop_tokens:
            text, _ = self._stops.feed(self._detok.finalize())
            return text + self._stops.flush(), "stop"
        text, hit = self._stops.feed(self._detok.add_token(token))
        if hit:
            return text, "stop"
        if n + 1 == self.max_tokens:
            full = self.limit is not None and len(self.prompt) + n + 1 >= self.limit
            tail, hit = self._stops.feed(self._detok.finalize())
            return text + tail + ("" if hit else self._stops.flush()), "context" if full else "length"
        return text, None

    def finish(self, reason: Optional[str]) -> None:
        """End the sequence (reason None: by an error)."""
        self.finish_reason = reason
        self.finished = time.perf_counter()
