"""Structured output: OpenAI `response_format` (`json_object`, `json_schema`) by constrained decoding.

The grammar library is llguidance (chosen by measured per-token mask cost; see
benchmarks/structured_cost.py). Its tokenizer is built from ours (the bytes of every id, the
special tokens, the stop tokens), so Meta's tiktoken tokenizer and Hugging Face tokenizers both
work. The logits processor masks every token the grammar does not allow to -inf; once the
document is complete only the stop tokens remain, so generation ends there:

    proc = json_logits_processor(tokenizer, {"type": "json_object"})
    for r in stream_generate(model, tokenizer, prompt, logits_processors=[proc]): ...
"""

from __future__ import annotations

import json
import weakref
from typing import Any, Mapping, Optional

import llguidance
import mlx.core as mx
import numpy as np

from .errors import LlamaMLXError

__all__ = [
    "JSONLogitsProcessor",
    "ResponseFormatError",
    "grammar_for_response_format",
    "grammar_tokenizer",
    "json_logits_processor",
]


class ResponseFormatError(LlamaMLXError):
    """A `response_format` is malformed, or its JSON schema cannot be compiled into a grammar."""


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads from a tokenizer: bytes per id, specials, eos, encode."""

    def __init__(self, tokenizer):
        specials = {int(i) for i in tokenizer.special_tokens.values()}
        names = {int(i): name for name, i in tokenizer.special_tokens.items()}
        self.tokens = [
            names[i].encode("utf-8") if i in specials else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)
        ]
        self.special_token_ids = sorted(specials)
        self.eos_token_id = int(tokenizer.eos_id)
        self.bos_token_id = None if tokenizer.bos_id is None else int(tokenizer.bos_id)
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


_TOKENIZERS: "weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for one of ours (built once per tokenizer, about a second at 128k ids).

    Every stop token of `tokenizer` counts as an end of the document.
    """
    cached = _TOKENIZERS.get(tokenizer)
    if cached is None:
        wrapper = llguidance.TokenizerWrapper(_TokenizerView(tokenizer))
        stops = sorted({int(tokenizer.eos_id), *map(int, tokenizer.stop_tokens)})
        cached = llguidance.LLTokenizer(wrapper, n_vocab=tokenizer.vocab_size, eos_token=stops)
        _TOKENIZERS[tokenizer] = cached
    return cached


def grammar_for_response_format(
    response_format: Optional[Mapping[str, Any]], *, whitespace_flexible: bool = False
) -> Optional[str]:
    """The llguidance grammar of an OpenAI `response_format`, or None for plain text.

    `{"type": "text"}` (or None): no grammar. `{"type": "json_object"}`: any JSON object.
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}`: that
    schema. Keys and items are written `", "` and `": "` apart, with no other whitespace unless
    `whitespace_flexible`. Raises ResponseFormatError on anything else.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ResponseFormatError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ResponseFormatError("response_format json_schema needs a 'json_schema' object")
        schema = spec.get("schema", {})
        if not isinstance(schema, (Mapping, bool)):
            raise ResponseFormatError("response_format json_schema.schema must be a JSON schema object")
    else:
        raise ResponseFormatError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    options = {"whitespace_flexible": whitespace_flexible}
    if not whitespace_flexible:
        options.update(item_separator=", ", key_separator=": ")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(json.dumps(schema)), overrides=options)
    except (ValueError, TypeError) as e:
        raise ResponseFormatError(f"response_format schema: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ResponseFormatError(f"response_format schema cannot be enforced: {messages[0] if messages else 'invalid'}")
    return grammar


_TABLES: "weakref.WeakKeyDictionary[Any, tuple[np.ndarray, np.ndarray]]" = weakref.WeakKeyDictionary()


def _token_bytes_table(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(each id's first non-space byte, 0 for none or a special; whether it holds a quote or bracket),
    once per tokenizer: what budget closing picks by."""
    cached = _TABLES.get(tokenizer)
    if cached is None:
        specials = {int(i) for i in tokenizer.special_tokens.values()}
        firsts = np.zeros(tokenizer.vocab_size, dtype=np.uint8)
        closing = np.zeros(tokenizer.vocab_size, dtype=bool)
        for i in range(tokenizer.vocab_size):
            if i in specials:
                continue
            raw = tokenizer.token_bytes(i)
            stripped = raw.lstrip(b" \t\n\r")
            firsts[i] = stripped[0] if stripped else 0
            closing[i] = b'"' in raw or b"}" in raw or b"]" in raw
        cached = _TABLES[tokenizer] = (firsts, closing)
    return cached


class JSONLogitsProcessor:
    """A logits processor `(history_ids, logits[1, V]) -> logits` enforcing a grammar.

    The first call sees the prompt as history; each later call consumes the tokens sampled since.
    Tokens the grammar forbids get -inf; when the document is complete only stop tokens remain.
    Make a fresh one per generation (it holds the parse state). With `max_tokens` (the answer's
    budget), the last `reserve` steps keep, where the grammar allows any, only tokens that close what
    is open: inside a string those starting with its closing quote, outside one those starting with
    `}` or `]` (else any holding a quote or bracket), so the document most likely ends before the
    budget does (`{"city": "Par` goes on `"}`, not with more of the string).
    """

    def __init__(self, tokenizer, grammar: str, *, max_tokens: Optional[int] = None, reserve: int = 48):
        self.tokenizer = tokenizer
        self.max_tokens, self.reserve = max_tokens, reserve
        self._generated = 0
        self._closing: Optional[np.ndarray] = None
        self._in_string = self._escaped = False  # where the generated text stands, lexically
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise ResponseFormatError(f"response_format: {self.matcher.get_error()}")
        self.stop_tokens = sorted({int(tokenizer.eos_id), *map(int, tokenizer.stop_tokens)})
        self._words = np.zeros(((tokenizer.vocab_size + 31) // 32,), dtype=np.int32)
        self._seen: Optional[int] = None  # history length already consumed

    @property
    def is_complete(self) -> bool:
        """Whether the text so far is a whole document (a stop token may end it now)."""
        return self.matcher.is_accepting()

    def consume(self, tokens) -> None:
        """Advance the grammar by sampled tokens (done by `__call__` from the history)."""
        for token in tokens:
            token = int(token)
            if self.matcher.is_stopped() and token in self.stop_tokens:
                continue
            if not self.matcher.consume_token(token):
                raise ResponseFormatError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
            if token not in self.stop_tokens:
                self._track(self.tokenizer.token_bytes(token))

    def _track(self, data: bytes) -> None:
        """Follow whether the text ends inside a JSON string (and after a backslash there)."""
        for byte in data:
            if self._escaped:
                self._escaped = False
            elif byte == 0x5C and self._in_string:  # backslash
                self._escaped = True
            elif byte == 0x22:  # quote
                self._in_string = not self._in_string

    def allowed(self) -> np.ndarray:
        """A boolean mask over the vocabulary of the tokens allowed next."""
        if self.matcher.is_stopped():
            mask = np.zeros(self.tokenizer.vocab_size, dtype=bool)
            mask[self.stop_tokens] = True
            return mask
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        return bits[: self.tokenizer.vocab_size].astype(bool)

    def _closing_tokens(self) -> np.ndarray:
        if self._closing is None:
            closing = _token_bytes_table(self.tokenizer)[1].copy()
            closing[self.stop_tokens] = True
            self._closing = closing
        return self._closing

    def _closer(self, allowed: np.ndarray) -> np.ndarray:
        """Of the `allowed` tokens, those that best close what is open (see the class docstring)."""
        firsts = _token_bytes_table(self.tokenizer)[0]
        if self._in_string:
            if self._escaped:
                return allowed
            best = allowed & (firsts == ord('"'))
        else:
            best = allowed & ((firsts == ord("}")) | (firsts == ord("]")))
        best[self.stop_tokens] = allowed[self.stop_tokens]
        if best.any():
            return best
        closing = allowed & self._closing_tokens()
        return closing if closing.any() else allowed

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        n = int(history.size)
        if self._seen is None:
            self._seen = n  # the prompt
        elif n > self._seen:
            self.consume(history[self._seen :].tolist())
            self._generated += n - self._seen
            self._seen = n
        allowed = self.allowed()
        if self.max_tokens is not None and self._generated >= self.max_tokens - self.reserve:
            allowed = self._closer(allowed)
        mask = mx.array(allowed)
        V = logits.shape[-1]
        if V > mask.size:  # a model head padded beyond the vocabulary: those ids are never text
            mask = mx.concatenate([mask, mx.zeros((V - mask.size,), dtype=mx.bool_)])
        return mx.where(mask[:V], logits, mx.array(float("-inf"), logits.dtype))


def json_logits_processor(
    tokenizer,
    response_format: Optional[Mapping[str, Any]],
    *,
    max_tokens: Optional[int] = None,
    whitespace_flexible: bool = False,
) -> Optional[JSONLogitsProcessor]:
    """A fresh logits processor for an OpenAI `response_format`, or None when it asks for plain text.

    Pass it in `logits_processors` of `stream_generate`; generation stops at the stop token the
    grammar forces once the JSON is complete; give `max_tokens` (the generation's budget) to steer
    the last steps toward closing the document. Raises ResponseFormatError on a bad format or schema.
    """
    grammar = grammar_for_response_format(response_format, whitespace_flexible=whitespace_flexible)
    if grammar is None:
        return None
    return JSONLogitsProcessor(tokenizer, grammar, max_tokens=max_tokens)
