"""Samplers and logits processors, as closures (`make_sampler`, `make_logits_processors`), and a
request's sampling as plain values (`SamplingParams`), which builds both.

A sampler maps log-probabilities `[B, vocab]` to token ids `[B]`. Two orders:
- "mlx" (mlx-lm's): top-k / top-p / min-p filter the untempered distribution, the
  temperature applies at the draw.
- "meta" (Meta's reference `generate`): softmax(logits / temperature), then top-p on that.

Each sampler made by `make_sampler` also carries `distribution(logprobs) -> log-probabilities`
of exactly what it draws from (filters and temperature applied), `next_key()` (its next random
key, None when unseeded) and `greedy`: speculative decoding needs them to accept or reject drafts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx

from .errors import ArgumentError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

NEG_INF = float("-inf")

__all__ = [
    "LogitsProcessor", "Sampler", "SamplingParams", "apply_min_p", "apply_processors", "apply_top_k", "apply_top_p",
    "log_softmax", "make_logit_bias", "make_logits_processors", "make_penalties", "make_repetition_penalty",
    "make_sampler",
]


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities from logits over the last axis (the one place they are normalised)."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the `k` most likely tokens."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]
    return mx.where(logprobs >= kth, logprobs, NEG_INF)


def apply_min_p(logprobs: mx.array, min_p: float, min_keep: int = 1) -> mx.array:
    """Keep tokens at least `min_p` times as likely as the most likely one."""
    if min_p <= 0:
        return logprobs
    threshold = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p, logprobs.dtype))
    kth = mx.sort(logprobs, axis=-1)[..., -min_keep][..., None]
    return mx.where((logprobs >= threshold) | (logprobs >= kth), logprobs, NEG_INF)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (Meta's rule)."""
    if top_p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.softmax(sorted_lp, axis=-1)
    # A token is dropped when the mass before it already exceeds top_p; the first always stays.
    drop = (mx.cumsum(probs, axis=-1) - probs) > top_p
    kept_sorted = mx.where(drop, NEG_INF, sorted_lp)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(kept_sorted, inverse, axis=-1)


def sample_inverse_cdf(probs: mx.array, u: mx.array) -> mx.array:
    """The token whose cumulative probability first exceeds `u * total` (what multinomial does)."""
    cdf = mx.cumsum(probs, axis=-1)
    target = u[..., None] * cdf[..., -1:]
    return mx.minimum((cdf <= target).sum(axis=-1), probs.shape[-1] - 1)


def meta_top_p(probs: mx.array, top_p: float, u: mx.array) -> mx.array:
    """Meta's `sample_top_p`, drawing with the uniform numbers `u` instead of torch.multinomial."""
    order = mx.argsort(-probs, axis=-1)
    sorted_p = mx.take_along_axis(probs, order, axis=-1)
    drop = (mx.cumsum(sorted_p, axis=-1) - sorted_p) > top_p
    sorted_p = mx.where(drop, 0.0, sorted_p)
    pick = sample_inverse_cdf(sorted_p, u)
    return mx.take_along_axis(order, pick[..., None], axis=-1)[..., 0]


MIN_TEMP = 1e-5  # temperatures below it sample greedily


def _finite(**values) -> None:
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ArgumentError(f"{name} must be a finite number, found {v!r:.40}")


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    *,
    order: str = "mlx",
    seed: Optional[int] = None,
) -> Sampler:
    """A sampler closure: greedy at temp 0 (below MIN_TEMP); `seed` (0 <= seed < 2**64) makes the draws reproducible.

    The closure carries `distribution`, `next_key` and `greedy` (see the module docstring).
    Raises ArgumentError (a ValueError) for an option out of its range.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ArgumentError(f"seed must be an integer from 0 to 2**64 - 1, found {seed!r:.40}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
               for x in (temp, top_p, min_p)) or isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ArgumentError("temp, top_p and min_p must be finite numbers and top_k an integer")
    if temp < 0 or not 0 < top_p <= 1 or top_k < 0 or not 0 <= min_p <= 1:
        raise ArgumentError("need temp >= 0, 0 < top_p <= 1, top_k >= 0 and 0 <= min_p <= 1")
    if order not in ("mlx", "meta"):
        raise ArgumentError(f"unknown sampling order {order!r}: use 'mlx' or 'meta'")
    if temp < MIN_TEMP:  # 1/temp past float32's range: the draw is the argmax (or NaN, past it)

        def greedy(logprobs: mx.array) -> mx.array:
            return mx.argmax(logprobs, axis=-1)

        def one_hot(logprobs: mx.array) -> mx.array:
            best = mx.argmax(logprobs, axis=-1, keepdims=True)
            hit = mx.arange(logprobs.shape[-1]) == best
            return mx.where(hit, 0.0, NEG_INF).astype(logprobs.dtype)

        return _described(greedy, one_hot, lambda: None, greedy=True)

    state = [mx.random.key(seed) if seed is not None else None]

    def next_key():
        if state[0] is None:
            return None
        state[0], key = mx.random.split(state[0])
        return key

    if order == "meta":

        def sample_meta(logprobs: mx.array) -> mx.array:
            probs = mx.softmax(logprobs.astype(mx.float32) / temp, axis=-1)
            u = mx.random.uniform(shape=probs.shape[:-1], key=next_key())
            if top_p < 1.0:
                return meta_top_p(probs, top_p, u)
            return sample_inverse_cdf(probs, u)

        def meta_distribution(logprobs: mx.array) -> mx.array:
            # Meta's top-p on the tempered probabilities is apply_top_p's rule on their logs.
            tempered = logprobs.astype(mx.float32) / temp
            return log_softmax(apply_top_p(log_softmax(tempered), top_p))

        return _described(sample_meta, meta_distribution, next_key)

    def filtered(logprobs: mx.array) -> mx.array:
        logprobs = apply_top_k(logprobs, top_k)
        logprobs = apply_top_p(logprobs, top_p)
        return apply_min_p(logprobs, min_p, min_tokens_to_keep)

    def sample(logprobs: mx.array) -> mx.array:
        return mx.random.categorical(filtered(logprobs) * (1 / temp), key=next_key())

    def distribution(logprobs: mx.array) -> mx.array:
        return log_softmax(filtered(logprobs) * (1 / temp))

    return _described(sample, distribution, next_key)


def _described(sample: Callable, distribution: Callable, next_key: Callable, greedy: bool = False) -> Sampler:
    sample.distribution, sample.next_key, sample.greedy = distribution, next_key, greedy
    return sample


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Scale down the logits of tokens among the last `context_size` (CTRL's rule)."""
    _finite(repetition_penalty=penalty)
    if penalty <= 0:
        raise ArgumentError(f"repetition penalty must be positive, got {penalty}")

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[-context_size:]
        selected = logits[:, recent]
        selected = mx.where(selected < 0, selected * penalty, selected / penalty)
        logits[:, recent] = selected
        return logits

    return process


def make_logit_bias(bias: dict[int, float]) -> LogitsProcessor:
    """Add a fixed bias to chosen token ids."""
    ids = mx.array(list(bias.keys()))
    values = mx.array(list(bias.values()))

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, ids].add(values.astype(logits.dtype))

    return process


def make_penalties(presence: float = 0.0, frequency: float = 0.0) -> LogitsProcessor:
    """OpenAI's presence and frequency penalties over the tokens generated so far (the prompt's are
    not counted): a fresh processor per generation, as it counts what it has seen."""
    _finite(presence_penalty=presence, frequency_penalty=frequency)
    state: dict = {"counts": None, "seen": 0}

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        n = int(tokens.size)
        if state["counts"] is None:  # the first call sees the prompt: not counted
            state["counts"], state["seen"] = mx.zeros((logits.shape[-1],), mx.float32), n
        elif n > state["seen"]:
            state["counts"] = state["counts"].at[tokens[state["seen"] :]].add(1.0)
            state["seen"] = n
        counts = state["counts"]
        penalty = frequency * counts + presence * (counts > 0)
        return logits - penalty.astype(logits.dtype)

    return process


def make_logits_processors(
    logit_bias: Optional[dict[int, float]] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
) -> list[LogitsProcessor]:
    """The processors the options ask for, in the order they apply."""
    processors: list[LogitsProcessor] = []
    if logit_bias:
        processors.append(make_logit_bias(logit_bias))
    if repetition_penalty and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors


def apply_processors(
    processors: Sequence[LogitsProcessor], tokens: mx.array, logits: mx.array
) -> mx.array:
    for process in processors:
        logits = process(tokens, logits)
    return logits


@dataclass
class SamplingParams:
    """A request's sampling and logits processing as plain values: what the CLI's options, a
    server request and a lockstep job each become. `sampler()` and `processors(tokenizer)` build
    the closures; `to_dict` / `from_dict` carry it as JSON (to the other ranks of a group).

    temp, top_p, top_k, min_p, min_tokens_to_keep, order, seed: `make_sampler`'s. logit_bias
    ({token id: bias}), repetition_penalty and repetition_context_size: `make_logits_processors`'.
    presence_penalty, frequency_penalty: OpenAI's (`make_penalties`). response_format: an OpenAI
    `response_format`, enforced by constrained decoding (`llama_mlx.structured`).
    """

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    order: str = "mlx"
    seed: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: Optional[dict] = None

    def __post_init__(self):
        """Non-finite numbers are refused here (ArgumentError): NaN penalties or temperatures would
        sample garbage; ranges are checked by `sampler()`."""
        _finite(temperature=self.temp, top_p=self.top_p, min_p=self.min_p,
                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty)
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(bias, float) and math.isnan(bias):
                raise ArgumentError(f"logit_bias of token {token} is NaN")

    @property
    def greedy(self) -> bool:
        return 0 <= self.temp < MIN_TEMP

    def sampler(self) -> Sampler:
        """The sampler closure (`make_sampler`); raises ArgumentError for a value out of range."""
        return make_sampler(self.temp, self.top_p, self.top_k, self.min_p, self.min_tokens_to_keep,
                            order=self.order, seed=self.seed)

    def processors(self, tokenizer: Any = None, max_tokens: Optional[int] = None) -> list[LogitsProcessor]:
        """Fresh logits processors, in the order they apply (the penalties count what they see, so
        each generation needs its own); a response_format needs the tokenizer."""
        bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        out = make_logits_processors(bias or None, self.repetition_penalty, self.repetition_context_size)
        if self.presence_penalty or self.frequency_penalty:
            out.append(make_penalties(self.presence_penalty or 0.0, self.frequency_penalty or 0.0))
        if self.response_format is not None:
            from .structured import json_logits_processor

            processor = json_logits_processor(tokenizer, self.response_format, max_tokens=max_tokens)
            if processor is not None:
                out.append(processor)
        return out

    def to_dict(self) -> dict:
        """Plain values only (JSON): logit_bias keys become strings, as JSON has them."""
        out = dataclasses.asdict(self)
        if out["logit_bias"] is not None:
            out["logit_bias"] = {str(k): v for k, v in out["logit_bias"].items()}
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        """The inverse of `to_dict`; raises ArgumentError for a key it does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ArgumentError(f"unknown sampling settings: {sorted(unknown)}")
        values = dict(values)
        if values.get("logit_bias") is not None:
            values["logit_bias"] = {int(k): float(v) for k, v in values["logit_bias"].items()}
        return cls(**values)
