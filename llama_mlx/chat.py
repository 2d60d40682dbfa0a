"""A multi-turn conversation over one prompt cache, shared by the terminal chat and servers.

The session keeps the token ids of its conversation exactly as the chat template encodes it, and
grows them turn by turn: a turn appends its own tokens (`encode_turn`), nothing is re-templated.
The prompt cache always holds a prefix of those ids; an answer whose sampled ids differ from
what its text encodes to is cut back there, so the next turn prefills the difference.
The session never prints: `respond` yields `GenerationResponse`s, bad requests raise `ChatError`s.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from .cache import PromptCache
from .errors import ContextLengthError, LlamaMLXError
from .fileio import atomic_files
from .generate import GenerationResponse, check_keywords, context_length, stream_generate
from .tokenizer.chat_template import TemplateNotIncrementalError

__all__ = [
    "SESSION_FORMAT",
    "ChatError",
    "ChatSession",
    "NothingToRetryError",
    "NothingToUndoError",
    "SessionFileError",
    "Turn",
    "session_files",
    "session_path",
]

MAX_SESSION_BYTES = 32 << 20  # a saved conversation's JSON (a 128k-token context is well under 1 MB of text)
SESSION_FORMAT = "llama-mlx-chat/1"
PYTHON_TAG = "<|python_tag|>"
_MESSAGE_KEYS = ("role", "content", "python_tag", "stop_reason")


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
    """The session file as named; SessionFileError if `must_exist` and neither it nor its pair exists."""
    path = Path(path).expanduser()
    if must_exist and not path.is_file():
        conversation, cache = session_files(path)
        if not (path.suffix == ".safetensors" and conversation.is_file()):
            raise SessionFileError(f"{path}: no such file")
    return path


def session_files(path: Union[str, Path]) -> tuple[Path, Path]:
    """(conversation JSON, KV cache) of a saved chat, named as given: FILE holds the conversation and
    FILE.safetensors (FILE.json: the .json swapped for .safetensors) the cache, unless FILE ends in
    .safetensors: then it holds the cache, and the conversation is the .json beside it."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        return path.with_suffix(".json"), path
    if path.suffix == ".json":
        return path, path.with_suffix(".safetensors")
    return path, path.with_name(path.name + ".safetensors")


class ChatSession:
    """A conversation, its token ids and its prompt cache.

    `generate_kwargs` go to `stream_generate` (sampler, logits_processors, stop, prefill_step_size,
    ...); `max_tokens` and `generate_kwargs` may be changed between answers. `generate` stands
    in for `stream_generate` (called with the same arguments), e.g. `lockstep.Leader.stream_generate`
    under mlx.launch, whose keywords then go in `generate_kwargs`.
    """

    def __init__(self, model, tokenizer, *, system: Optional[str] = None, max_tokens: int = 512,
                 max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 name: str = "model", generate: Optional[Callable[..., Iterator[GenerationResponse]]] = None,
                 **generate_kwargs: Any):
        self.generate = generate or stream_generate
        check_keywords("ChatSession", generate_kwargs, self.generate)
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

    def add_user(self, text: str, image: Any = None) -> None:
        """Append a question (answer it with `respond`); `image` (a path, bytes or Pillow image) goes
        with it for Llama 3.2 Vision: one per message, encoded once for the conversation."""
        if image is None:
            self._push({"role": "user", "content": text})
            return
        from .vision.prompt import sees_images

        if not sees_images(self.model):
            raise ChatError(f"{self.name} reads text only: images need a Llama 3.2 Vision model")
        image = str(image) if isinstance(image, Path) else image
        self._push({"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]})

    @property
    def images(self) -> list:
        """The conversation's images, in order."""
        return [part["image"] for m in self.messages if isinstance(m.get("content"), list)
                for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"]

    def _image_kwargs(self) -> dict:
        """`images=` for the next answer; the cache starts over when the images it holds are no longer
        the conversation's first ones (an exchange with an image was dropped)."""
        images = self.images
        held = next((len(c.spans) for c in self.cache.cache if hasattr(c, "spans")), 0)
        attached = getattr(self, "_attached", [])
        if held != len(attached) or attached != images[:len(attached)]:
            if held:
                self.cache.reset()
            attached = []
        self._attached = images
        return {"images": images} if images else {}

    def add_assistant(self, text: str) -> None:
        """Append an answer written elsewhere (a scripted reply, a conversation restored by a client)."""
        if self.messages and self.messages[-1]["role"] in ("user", "ipython"):
            self.prompt_tokens()
            self._push({"role": "assistant", "content": text}, after_generation_prompt=True)
        else:
            self._push({"role": "assistant", "content": text})

    def drop_unanswered(self) -> None:
        """Remove a trailing question that got no answer (a tool's output stays: it answers a call)."""
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
        dropped = self._drop_at_once(limit, reserve, start)
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

    def _drop_at_once(self, limit: int, reserve: int, start: int) -> int:
        """fit's drops, found without encoding the conversation once per drop (quadratic in a long
        saved session): the newest 1, 2, 4, ... exchanges are encoded until one count does not fit, then
        a binary search between; returns how many exchanges were dropped (fit checks the result)."""
        n = len(self.messages)
        if n - start <= 2 or len(self.prompt_tokens()) + reserve <= limit:
            return 0
        cuts, i = [], start  # cuts[j]: the first message kept after j + 1 drops, as fit drops them
        while n - i > 1:
            i += 1
            if n - i > 1 and self.messages[i]["role"] == "assistant":
                i += 1
            cuts.append(i)
        head = self.messages[:start]

        def fits(j: int) -> bool:
            ids = self.tokenizer.apply_chat_template(head + self.messages[cuts[j]:], add_generation_prompt=True)
            return len(ids) + reserve <= limit

        last = len(cuts) - 1  # a lone question: fit itself decides
        good, step = last, 1
        while good - step >= 0 and fits(good - step):
            good, step = good - step, step * 2
        bad = max(good - step, -1)
        while good - bad > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        self.messages = head + self.messages[cuts[good]:]
        self._rebuild()
        return good + 1

    def respond(self, *, stop_requested: Optional[Callable[[], bool]] = None,
                prompt_progress: Optional[Callable[[int, int], None]] = None) -> Iterator[GenerationResponse]:
        """Answer the last question, yielding each streamed step.

        Stops early when `stop_requested()` turns true (checked between prefill chunks and after each
        token), on KeyboardInterrupt, or when the generator is closed. The answer, or what came before a
        stop, joins the conversation and `self.last` tells how it went; a question that got no token is
        dropped. Fits the conversation to the context first (see `fit`).
        """
        if not self.messages or self.messages[-1]["role"] not in ("user", "ipython"):
            raise NothingToRetryError("no question to answer")
        self.fit()
        prompt = self.prompt_tokens()
        full_encodes = self.full_encodes

        def progress(done: int, total: int) -> None:
            if stop_requested is not None and stop_requested():
                raise _Stopped
            if prompt_progress is not None:
                prompt_progress(done, total)

        stream = self.generate(self.model, self.tokenizer, prompt, self.max_tokens, prompt_cache=self.cache,
                               prompt_progress=progress, **self.generate_kwargs, **self._image_kwargs())
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
            self._push(self._answer_message(text, last), after_generation_prompt=True)
            # The prompt was fed as it is: only the answer's ids are compared.
            self._settle_cache(self._ids, len(prompt) if self.full_encodes == full_encodes else 0)
            self._account(last)
        self.last = Turn(last, text, self.context_used(), last is None or last.finish_reason is None)

    def _answer_message(self, text: str, last: GenerationResponse) -> dict:
        """The answer as a message: a code-interpreter call (`<|python_tag|>` code, ended by <|eom_id|>)
        keeps those marks as the chat format's `python_tag` / `stop_reason`, so it re-encodes as sampled."""
        message = {"role": "assistant", "content": text}
        if text.startswith(PYTHON_TAG):
            message.update(content=text[len(PYTHON_TAG):], python_tag=True)
            eom = self.tokenizer.special_tokens.get("<|eom_id|>")
            if last.finish_reason == "stop" and eom is not None and last.token == eom:
                message["stop_reason"] = "end_of_message"
        return message

    def tool_call(self) -> Optional[str]:
        """The code of the last answer when it is a code-interpreter call awaiting its output, else None."""
        if self.messages and self.messages[-1]["role"] == "assistant" and self.messages[-1].get("python_tag"):
            return self.messages[-1]["content"]
        return None

    def add_tool_result(self, output: str) -> None:
        """Append a tool's output (the `ipython` turn); answer it with `respond`."""
        self._push({"role": "ipython", "content": output})

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
        """Write the conversation as readable JSON and its KV cache beside it (see `session_files`);
        returns `path`. Only a missing path or a regular file is replaced; the two files are saved both
        or neither."""
        conversation, cache_file = session_files(path)
        if not conversation.parent.is_dir():
            raise SessionFileError(f"{conversation.parent}: no such folder")
        if not all(isinstance(image, str) for image in self.images):
            raise SessionFileError("an image given as bytes or a Pillow image cannot be saved: give its file path")
        info = {"format": SESSION_FORMAT, "model": self.name, "fingerprint": self.fingerprint(),
                "saved": _dt.datetime.now().isoformat(timespec="seconds")}
        text = json.dumps({**info, "cache": cache_file.name, "cached_tokens": len(self.cache.tokens),
                           "messages": self.messages}, indent=2, ensure_ascii=False) + "\n"
        with atomic_files([cache_file, conversation]) as (cache_out, conversation_out):  # both or neither
            self.cache.save(cache_out, metadata={**info, "messages": self.messages})
            conversation_out.write(text.encode("utf-8"))
        return Path(path).expanduser()

    def load(self, path: Union[str, Path]) -> dict:
        """Resume what `save` wrote (either of its files). Returns what happened: the files read,
        `cached` (ids restored into the KV cache) and `to_prefill` (the conversation's ids the next
        answer prefills first), and `note` (why a saved cache was not used, or None)."""
        path = session_path(path, must_exist=True)
        conversation, cache_file = session_files(path)
        messages, note, meta = None, None, None
        if conversation.is_file():
            messages = _read_conversation(conversation)
        cache = None
        if cache_file.is_file():
            try:
                cache, meta = PromptCache.load(self.model, cache_file)
            except Exception as e:  # noqa: BLE001 - any unreadable file is "not a saved cache"
                if messages is None:
                    raise SessionFileError(f"{cache_file}: not a saved chat ({_why(e)})") from None
                note = f"{cache_file.name} is not a readable KV cache"
        if messages is None:  # an old save: the cache file alone, transcript in its metadata
            if meta is None or meta.get("format") != SESSION_FORMAT or not isinstance(meta.get("messages"), list):
                raise SessionFileError(f"{path}: not a saved chat (a prompt cache without a conversation?)")
            messages = _clean_messages(meta["messages"], path)
        if cache is not None and meta.get("fingerprint") not in (None, self.fingerprint()):
            cache, note = None, f"{cache_file.name} was saved with a different model ({meta.get('model', '?')})"
        elif cache is not None and cache.options != self.cache.options:
            cache, note = None, f"{cache_file.name} was saved with other KV cache settings"
        if cache is None and note is None:
            note = f"no KV cache beside it ({cache_file.name})"
        images = [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                  if p["type"] == "image"]
        if images:
            from .vision.prompt import sees_images

            if not sees_images(self.model):
                raise SessionFileError(f"{path}: the conversation holds images: it needs a Llama 3.2 Vision model")
        held = next((len(c.spans) for c in cache.cache if hasattr(c, "spans")), 0) if cache is not None else 0
        if held > len(images):
            cache, note = None, f"{cache_file.name} holds more images than the conversation"
        self.messages = messages
        self.cache = cache if cache is not None else PromptCache(self.model, **self.cache.options)
        self._attached = images[:held]  # the images the restored cache holds: not encoded again
        self.last = None
        self._rebuild()
        cached = len(self.cache.tokens)
        return {"conversation": conversation if conversation.is_file() else None,
                "cache": cache_file if cache is not None else None,
                "cached": cached, "to_prefill": len(self._ids) - cached, "note": note}


def _why(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _read_conversation(path: Path) -> list[dict]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SESSION_BYTES + 1)  # never more: a huge file is refused unread
        if len(raw) > MAX_SESSION_BYTES:
            raise SessionFileError(f"{path}: not a saved chat (larger than {MAX_SESSION_BYTES >> 20} MiB)")
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise SessionFileError(f"{path}: not a saved chat (JSON nested too deep)") from None
    except UnicodeDecodeError:
        raise SessionFileError(f"{path}: not a saved chat (not UTF-8 text)") from None
    except ValueError as e:
        raise SessionFileError(f"{path}: not a saved chat (not JSON: {_why(e)})") from None
    except OSError as e:
        raise SessionFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT or not isinstance(data.get("messages"), list):
        raise SessionFileError(f"{path}: not a saved chat (no \"format\": \"{SESSION_FORMAT}\" with messages)")
    return _clean_messages(data["messages"], path)


def _clean_messages(messages: list, path: Path) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(m.get("content"), str) or m["role"] == "user" and _image_parts(m.get("content"))):
            raise SessionFileError(f"{path}: message {i + 1} is not a {{\"role\", \"content\"}} object of strings "
                                   "(or a user's text and one image path)")
        out.append({k: m[k] for k in _MESSAGE_KEYS if k in m})
    return out


def _image_parts(content) -> bool:
    """Whether `content` is what `add_user(text, image=path)` makes: one image path, then text."""
    return (isinstance(content, list) and len(content) == 2 and all(isinstance(p, dict) for p in content) and
            content[0].keys() == {"type", "image"} and
            content[0]["type"] == "image" and isinstance(content[0]["image"], str) and
            content[1].keys() == {"type", "text"} and content[1]["type"] == "text" and
            isinstance(content[1]["text"], str))
