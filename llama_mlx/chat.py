"""A multi-turn conversation over one prompt cache, shared by the terminal chat and servers.

The session keeps the token ids of its conversation exactly as the chat template encodes it, and
grows them turn by turn: a turn appends its own tokens (`encode_turn`), nothing is re-templated.
The prompt cache always holds a prefix of those ids; an answer whose sampled ids differ from
what its text encodes to is cut back there, so the next turn prefills the difference.
The session never prints: `respond` yields `GenerationResponse`s, bad requests raise `ChatError`s.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from .cache import PromptCache
from .errors import ContextLengthError, LlamaMLXError
from .generate import GenerationResponse, context_length, stream_generate
from .tokenizer.chat_template import TemplateNotIncrementalError

__all__ = [
    "SESSION_FORMAT",
    "ChatError",
    "ChatSession",
    "NothingToRetryError",
    "NothingToUndoError",
    "SessionFileError",
    "Turn",
    "session_path",
]

SESSION_FORMAT = "llama-mlx-chat/1"


class ChatError(LlamaMLXError):
    """A chat operation could not be carried out; the session is as it was."""


class NothingToUndoError(ChatError):
    """/undo with no exchange to drop."""


class NothingToRetryError(ChatError):
    """/retry (or an answer) asked for with no question to answer."""


class SessionFileError(ChatError):
    """A session file is missing, is not a saved chat, or was saved with another model."""


@dataclass
class Turn:
    """How one answer went: its last streamed step (None when stopped before the first token)."""

    response: Optional[GenerationResponse]
    text: str
    context_used: int
    interrupted: bool


class _Stopped(Exception):
    """Raised between prefill chunks when a stop was requested (the cache is consistent there)."""


def _common(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """Length of the shared prefix of `a` and `b`, known to agree up to `start`."""
    n = min(start, len(a), len(b))
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def session_path(path: Union[str, Path], must_exist: bool = False) -> Path:
    """The session file as named (it is read as safetensors whatever its suffix); SessionFileError if missing."""
    path = Path(path).expanduser()
    if must_exist and not path.is_file():
        raise SessionFileError(f"{path}: no such file")
    return path


class ChatSession:
    """A conversation, its token ids and its prompt cache.

    `generate_kwargs` go to `stream_generate` (sampler, logits_processors, stop, prefill_step_size,
    compile); `max_tokens` and `generate_kwargs` may be changed between answers.
    """

    def __init__(self, model, tokenizer, *, system: Optional[str] = None, max_tokens: int = 512,
                 max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 name: str = "model", **generate_kwargs: Any):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_tokens = max_tokens
        self.generate_kwargs = generate_kwargs
        self.cache = PromptCache(model, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
        self.model_context = context_length(model)
        self.messages: list[dict] = []
        self.last: Optional[Turn] = None
        self.totals = {"answers": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                       "prompt_seconds": 0.0, "generation_seconds": 0.0, "peak_memory": 0.0}
        self.full_encodes = 0  # turns the template could not append: the conversation was encoded anew
        self._ids: list[int] = []  # the conversation's ids, without a generation prompt
        self._marks: list[Optional[int]] = []  # len(self._ids) after each message (None: unknown)
        self._prompt: Optional[list[int]] = None  # ids + generation prompt, once computed
        if system is not None:
            self._push({"role": "system", "content": system})

    # --- state -------------------------------------------------------------------------

    @property
    def context_limit(self) -> int:
        size = self.cache.options.get("max_kv_size")
        return min(self.model_context, size) if size else self.model_context

    @property
    def system(self) -> Optional[str]:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    @property
    def tokens(self) -> list[int]:
        """The conversation's ids as the chat template encodes it (no generation prompt)."""
        return list(self._ids)

    def prompt_tokens(self) -> list[int]:
        """The ids the next answer is generated from: the conversation and the generation prompt."""
        if self._prompt is None:
            self._prompt = self._extend([], add_generation_prompt=True)
        return list(self._prompt)

    def exchanges(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "user")

    def context_used(self) -> int:
        return min(len(self.cache.tokens), self.context_limit)

    def _first_turn(self) -> int:
        return 1 if self.system is not None else 0

    # --- token bookkeeping -------------------------------------------------------------

    def _extend(self, new: list[dict], *, add_generation_prompt: bool = False,
                after_generation_prompt: bool = False) -> list[int]:
        """The conversation's ids with `new` messages added: the current ids plus the turn's tokens."""
        base = self._prompt if after_generation_prompt else self._ids
        if not self.messages:
            return self.tokenizer.apply_chat_template(new, add_generation_prompt=add_generation_prompt)
        try:
            return base + self.tokenizer.encode_turn(new, history=self.messages,
                                                     add_generation_prompt=add_generation_prompt,
                                                     after_generation_prompt=after_generation_prompt)
        except TemplateNotIncrementalError:
            self.full_encodes += 1
            ids = self.tokenizer.apply_chat_template(self.messages + new, add_generation_prompt=add_generation_prompt)
            keep = _common(base, ids)
            self._marks = [m if m is not None and m <= keep else None for m in self._marks]
            return ids

    def _push(self, message: dict, *, after_generation_prompt: bool = False) -> None:
        ids = self._extend([message], after_generation_prompt=after_generation_prompt)
        self.messages.append(message)
        self._ids = ids
        self._marks.append(len(ids))
        self._prompt = None

    def _rebuild(self, cut: bool = True) -> None:
        """Encode the whole conversation (its start changed); `cut`: keep only the cache's shared prefix."""
        self._ids = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=False) \
            if self.messages else []
        self._marks = [None] * len(self.messages)
        self._marks[-1:] = [len(self._ids)] if self.messages else []
        self._prompt = None
        if cut:
            self.cache.keep_prefix(self._ids)

    def _truncate(self, count: int, cut: bool = True) -> int:
        """Keep the first `count` messages; returns how many ids the cache is known to share with them
        (`cut`: the cache keeps only those)."""
        del self.messages[count:]
        del self._marks[count:]
        self._prompt = None
        if count and self._marks[-1] is None:
            self._rebuild(cut)
            return len(self.cache.tokens) if cut else 0
        self._ids = self._ids[: self._marks[-1]] if count else []
        if cut:
            self._cut_cache(len(self._ids))
        return len(self._ids)

    def _cut_cache(self, keep: int) -> None:
        drop = len(self.cache.tokens) - keep
        if drop > 0 and self.cache.trim(drop) != drop:
            self.cache.reset()  # a rotating cache that wrapped cannot be cut back

    def _settle_cache(self, target: list[int], known: int) -> None:
        """Cut the cache to its agreement with `target`, comparing only past the `known` shared ids."""
        self._cut_cache(_common(self.cache.tokens, target, known))

    # --- turns -------------------------------------------------------------------------

    def add_user(self, text: str) -> None:
        """Append a question (answer it with `respond`)."""
        self._push({"role": "user", "content": text})

    def add_assistant(self, text: str) -> None:
        """Append an answer written elsewhere (a scripted reply, a conversation restored by a client)."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.prompt_tokens()
            self._push({"role": "assistant", "content": text}, after_generation_prompt=True)
        else:
            self._push({"role": "assistant", "content": text})

    def drop_unanswered(self) -> None:
        """Remove a trailing question that got no answer."""
        if self.messages and self.messages[-1]["role"] == "user":
            self._truncate(len(self.messages) - 1)

    def fit(self) -> int:
        """Drop the oldest exchanges until the prompt and an answer fit in the context; returns how many.

        The system prompt and the newest question always stay; when even they do not fit, the question
        is dropped and ContextLengthError raised.
        """
        limit = self.context_limit
        reserve = min(self.max_tokens, limit // 2)
        start = self._first_turn()
        dropped = 0
        while True:
            prompt = self.prompt_tokens()
            alone = len(self.messages) - start <= 1
            # (a lone question that leaves less room than max_tokens still gets a shorter answer)
            if len(prompt) + reserve <= limit or (alone and len(prompt) < limit):
                return dropped
            if alone:
                self.drop_unanswered()
                raise ContextLengthError(
                    f"this message needs {len(prompt)} tokens with the system prompt; the context holds {limit}")
            del self.messages[start]  # the oldest question ...
            if len(self.messages) - start > 1 and self.messages[start]["role"] == "assistant":
                del self.messages[start]  # ... and its answer
            dropped += 1
            self._rebuild()

    def respond(self, *, stop_requested: Optional[Callable[[], bool]] = None,
                prompt_progress: Optional[Callable[[int, int], None]] = None) -> Iterator[GenerationResponse]:
        """Answer the last question, yielding each streamed step.

        Stops early when `stop_requested()` turns true (checked between prefill chunks and after each
        token), on KeyboardInterrupt, or when the generator is closed. The answer, or what came before a
        stop, joins the conversation and `self.last` tells how it went; a question that got no token is
        dropped. Fits the conversation to the context first (see `fit`).
        """
        if not self.messages or self.messages[-1]["role"] != "user":
            raise NothingToRetryError("no question to answer")
        self.fit()
        prompt = self.prompt_tokens()
        full_encodes = self.full_encodes

        def progress(done: int, total: int) -> None:
            if stop_requested is not None and stop_requested():
                raise _Stopped
            if prompt_progress is not None:
                prompt_progress(done, total)

        stream = stream_generate(self.model, self.tokenizer, prompt, self.max_tokens, prompt_cache=self.cache,
                                 prompt_progress=progress, **self.generate_kwargs)
        pieces: list[str] = []
        last: Optional[GenerationResponse] = None
        try:
            for response in stream:
                last = response
                pieces.append(response.text)
                yield response
                if stop_requested is not None and stop_requested() and response.finish_reason is None:
                    break
        except (_Stopped, KeyboardInterrupt):
            pass
        finally:
            stream.close()  # the stream records what the cache holds
            self._finish(prompt, last, "".join(pieces), full_encodes)

    def _finish(self, prompt: list[int], last: Optional[GenerationResponse], text: str, full_encodes: int) -> None:
        if last is None:
            self.drop_unanswered()
        else:
            self._push({"role": "assistant", "content": text}, after_generation_prompt=True)
            # The prompt was fed as it is: only the answer's ids are compared.
            self._settle_cache(self._ids, len(prompt) if self.full_encodes == full_encodes else 0)
            self._account(last)
        self.last = Turn(last, text, self.context_used(), last is None or last.finish_reason is None)

    def _account(self, r: GenerationResponse) -> None:
        t = self.totals
        t["answers"] += 1
        t["prompt_tokens"] += r.prompt_tokens
        t["cached_tokens"] += r.cached_tokens
        t["generated_tokens"] += r.generation_tokens
        t["prompt_seconds"] += r.time_to_first_token
        if r.generation_tps > 0:
            t["generation_seconds"] += (r.generation_tokens - 1) / r.generation_tps
        t["peak_memory"] = max(t["peak_memory"], r.peak_memory)

    # --- commands ----------------------------------------------------------------------

    def undo(self) -> int:
        """Drop the last exchange and cut the cache to match; returns the tokens freed."""
        start = self._first_turn()
        if len(self.messages) <= start:
            raise NothingToUndoError("nothing to undo")
        count = len(self.messages)
        if self.messages[count - 1]["role"] == "assistant":
            count -= 1
        if count > start and self.messages[count - 1]["role"] == "user":
            count -= 1
        before = len(self.cache.tokens)
        self._truncate(count)
        return before - len(self.cache.tokens)

    def retry(self) -> str:
        """Forget the last answer so `respond` gives it again; returns the question."""
        if not self.messages or self.messages[-1]["role"] == "system" or (
                self.messages[-1]["role"] == "assistant" and (len(self.messages) < 2 or
                                                             self.messages[-2]["role"] != "user")):
            raise NothingToRetryError("no question to answer again")
        if self.messages[-1]["role"] == "assistant":
            known = self._truncate(len(self.messages) - 1, cut=False)
            self._settle_cache(self.prompt_tokens(), known)  # the cached generation prompt stays
        return self.messages[-1]["content"]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the cache."""
        self.cache.reset()
        self._truncate(self._first_turn())
        self.last = None

    def set_system(self, text: Optional[str]) -> None:
        """Set (None: remove) the system prompt; the cache keeps what still holds."""
        if self.system is not None:
            self.messages.pop(0)
        if text is not None:
            self.messages.insert(0, {"role": "system", "content": text})
        self._rebuild()

    def fingerprint(self) -> dict:
        args = self.model.args
        return {"layers": args.num_hidden_layers, "kv_heads": args.num_key_value_heads, "head_dim": args.head_dim,
                "hidden_size": args.hidden_size, "vocab_size": args.vocab_size}

    def save(self, path: Union[str, Path]) -> Path:
        """Write the transcript and the KV cache; returns the file written."""
        path = session_path(path)
        if path.parent and not path.parent.is_dir():
            raise SessionFileError(f"{path.parent}: no such folder")
        self.cache.save(path, metadata={
            "format": SESSION_FORMAT,
            "model": self.name,
            "fingerprint": self.fingerprint(),
            "messages": self.messages,
            "saved": _dt.datetime.now().isoformat(timespec="seconds"),
        })
        return path

    def load(self, path: Union[str, Path]) -> Path:
        """Resume what `save` wrote: the transcript and the cache (nothing is prefilled again)."""
        path = session_path(path, must_exist=True)
        try:
            cache, meta = PromptCache.load(self.model, path)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise SessionFileError(f"{path}: not a saved chat session ({e or type(e).__name__})") from None
        if meta.get("format") != SESSION_FORMAT or not isinstance(meta.get("messages"), list):
            raise SessionFileError(f"{path}: not a saved chat session (a prompt cache without a transcript?)")
        if meta.get("fingerprint") not in (None, self.fingerprint()):
            raise SessionFileError(f"{path}: saved with a different model ({meta.get('model', '?')})")
        self.messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in meta["messages"]
                         if isinstance(m, dict) and "role" in m and "content" in m]
        self.cache, self.last = cache, None
        self._rebuild()
        return path
