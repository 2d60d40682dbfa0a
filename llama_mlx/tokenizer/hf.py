"""Hugging Face tokenizers for Llama-family checkpoints: a `tokenizer.json`, or the vocabulary in a GGUF file."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

from ..errors import TokenizerError
from ..paths import check_folder_files
from ..tokenizer_source import FOLDER_FILES, folder_eos_token_ids, read_json_object
from .base import (
    AllowedSpecial,
    BaseTokenizer,
    ChatMessage,
    DisallowedSpecial,
    as_id_list,
    disallowed_error,
    resolve_special,
    write_json,
)
from .bpe import (
    CHAR_TO_BYTE,
    LLAMA3_PAT_STR,
    bos_post_processor,
    byte_level_pre_tokenizer,
    component_state,
    split_for_tiktoken,
)
from .chat_format import LLAMA3_CHAT_TEMPLATE, ChatFormat
from .chat_template import TemplateNotIncrementalError, render_chat_template, render_turn
from .detokenizer import NaiveStreamingDetokenizer, StreamingDetokenizer

__all__ = ["GPT2_PAT_STR", "HFTokenizer", "QWEN2_PAT_STR", "gguf_tokenizer"]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"

GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's `tokenizer.ggml.pre` names -> how the text is split before BPE.
_GGUF_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"), ("split", LLAMA3_PAT_STR)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"), ("digits", GPT2_PAT_STR)
    ),
    **dict.fromkeys((None, "default", "gpt2", "gpt-2", "phi-2", "olmo", "jina-es", "jina-de"), ("gpt2", GPT2_PAT_STR)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), ("split", QWEN2_PAT_STR)),
}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_id(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _value(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A GGUF metadata value as plain Python (mx.array and numpy values become scalars or lists)."""
    value = metadata.get(key, default)
    if hasattr(value, "tolist"):
        value = value.tolist()
    return value


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merges a SentencePiece BPE vocabulary implies: a token's splits, higher-scored tokens first."""
    merges = []
    for token, score in zip(tokens, scores):
        splits = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((score, left, right) for left, right in splits)
    merges.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))  # stable: file order breaks the remaining ties
    return [(left, right) for _, left, right in merges]


def gguf_tokenizer(metadata: Mapping[str, Any], source: str = "GGUF metadata") -> "HFTokenizer":
    """An HFTokenizer built from a GGUF file's `tokenizer.ggml.*` metadata and its chat template."""
    _check_gguf_types(metadata, source)
    model = _value(metadata, "tokenizer.ggml.model")
    tokens = _value(metadata, "tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise TokenizerError(f"{source}: no tokenizer.ggml.model / tokenizer.ggml.tokens: it carries no vocabulary")
    tokens = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in tokens]
    token_types = _value(metadata, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise TokenizerError(f"{source}: {len(token_types)} token types for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)

    def token_of(key: str) -> str | None:
        token_id = _value(metadata, key)
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise TokenizerError(f"{source}: {key} = {token_id} is outside the vocabulary")
        return tokens[int(token_id)]

    bos, eos = token_of("tokenizer.ggml.bos_token_id"), token_of("tokenizer.ggml.eos_token_id")
    unk, pad = token_of("tokenizer.ggml.unknown_token_id"), token_of("tokenizer.ggml.padding_token_id")
    pre = _value(metadata, "tokenizer.ggml.pre")
    add_bos = _value(metadata, "tokenizer.ggml.add_bos_token")

    if model == "gpt2":
        if pre not in _GGUF_PRE:
            raise TokenizerError(
                f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                f"known: {', '.join(sorted(str(k) for k in _GGUF_PRE if k))}"
            )
        kind, pattern = _GGUF_PRE[pre]
        merge_lines = _value(metadata, "tokenizer.ggml.merges") or []
        merges = []
        for line in merge_lines:
            pair = line.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"{source}: malformed merge {line!r}")
            merges.append((pair[0], pair[1]))
        llama3 = kind == "split" and pattern == LLAMA3_PAT_STR
        # llama.cpp takes a piece that is a whole token as is for Llama 3 vocabularies, as tiktoken does.
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
        tok.pre_tokenizer = byte_level_pre_tokenizer(kind, pattern)
        tok.decoder = decoders.ByteLevel()
        if add_bos is None:
            add_bos = llama3
    elif model == "llama":
        scores = _value(metadata, "tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise TokenizerError(f"{source}: a SentencePiece vocabulary needs one tokenizer.ggml.scores per token")
        add_prefix = _value(metadata, "tokenizer.ggml.add_space_prefix", True)
        tok = tokenizers.Tokenizer(
            models.BPE(
                vocab=vocab, merges=_spm_merges(tokens, scores, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True
            )
        )
        replace = normalizers.Replace(" ", _SPM_SPACE)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), replace]) if add_prefix else replace
        steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_prefix else steps)
        if add_bos is None:
            add_bos = True
    else:
        raise TokenizerError(f"{source}: tokenizer model {model!r} is not supported (gpt2 and llama are)")

    # Control tokens are special; user-defined ones are matched whole in text, as llama.cpp does.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _GGUF_CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _GGUF_USER_DEFINED]
    )
    add_bos = bool(add_bos) and bos is not None
    if add_bos and model == "gpt2":
        tok.post_processor = bos_post_processor(bos, vocab[bos])
    return HFTokenizer(
        tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=_value(metadata, "tokenizer.chat_template"),
        add_bos_token=add_bos,
        vocab_size=len(tokens),
        source=source,
    )


_GGUF_TYPES = {  # key -> (what it must be, test); a wrong type is a TokenizerError naming the key
    "tokenizer.ggml.model": ("a string", lambda v: isinstance(v, str)),
    "tokenizer.ggml.pre": ("a string", lambda v: isinstance(v, str)),
    "tokenizer.chat_template": ("a string", lambda v: isinstance(v, str)),
    "tokenizer.ggml.tokens": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(t, (str, bytes)) for t in v)),
    "tokenizer.ggml.merges": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
    "tokenizer.ggml.token_type": ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(t) for t in v)),
    "tokenizer.ggml.scores": ("a list of numbers", lambda v: isinstance(v, list) and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) for t in v)),
    **{f"tokenizer.ggml.{k}_token_id": ("a token id", _is_int_id) for k in ("bos", "eos", "unknown", "padding")},
    "tokenizer.ggml.add_bos_token": ("true or false", lambda v: isinstance(v, bool)),
    "tokenizer.ggml.add_space_prefix": ("true or false", lambda v: isinstance(v, bool)),
}


def _check_gguf_types(metadata: Mapping[str, Any], source: str) -> None:
    for key, (what, ok) in _GGUF_TYPES.items():
        value = _value(metadata, key)
        if value is not None and not ok(value):
            raise TokenizerError(f"{source}: GGUF metadata {key!r} must be {what}, found {type(value).__name__}")


def _find(obj: Any, predicate) -> bool:
    if isinstance(obj, dict):
        return predicate(obj) or any(_find(v, predicate) for v in obj.values())
    if isinstance(obj, list):
        return any(_find(v, predicate) for v in obj)
    return False


def _decoder_kind(decoder: Any) -> tuple[str, bool]:
    """("byte_level" | "spm" | "naive", strip_first_space) for a serialized decoder."""
    if decoder is None:
        return "naive", False
    if decoder.get("type") == "ByteLevel":
        return "byte_level", False
    if decoder.get("type") == "Sequence":
        steps = decoder.get("decoders") or []
        types = [step.get("type") for step in steps]
        spm_prefix = (
            types[:3] == ["Replace", "ByteFallback", "Fuse"]
            and steps[0].get("pattern") == {"String": _SPM_SPACE}
            and steps[0].get("content") == " "
        )
        if spm_prefix and len(steps) == 3:
            return "spm", False
        strip = steps[3] if len(steps) == 4 else {}
        strip_one_space = (strip.get("type"), strip.get("content"), strip.get("start"), strip.get("stop")) == (
            "Strip", " ", 1, 0
        )
        if spm_prefix and strip_one_space:
            return "spm", True
    return "naive", False


class HFTokenizer(BaseTokenizer):
    """A `tokenizers.Tokenizer` behind the shared interface, with the checkpoint's chat template."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        eos_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
        meta_splitting: bool | None = None,
        tokenizer_config: Mapping[str, Any] | None = None,
        source: str = "tokenizer.json",
    ):
        self._tok = tokenizer
        # Encodes of several threads (the server templates off its event loop) share `_tok`, whose
        # `encode_special_tokens` `_encode_native` flips: one at a time.
        self._lock = threading.RLock()
        # Special-token text is plain text unless `encode` is told otherwise; see _encode_native.
        self._tok.encode_special_tokens = True
        self.source = source
        self.vocab_size = vocab_size or tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        names = sorted(self.special_tokens, key=len, reverse=True)  # longest first at one position
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        if bos_token is None and eos_token is None and "<|end_of_text|>" in self.special_tokens:
            # A bare Llama 3 tokenizer.json, without its tokenizer_config.json.
            bos_token, eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_id = self._required_id(bos_token, "bos_token")
        eos_token_ids = [int(i) for i in eos_token_ids]
        eos_id = self._required_id(eos_token, "eos_token")
        if eos_id is None:
            if not eos_token_ids:
                raise TokenizerError(f"{source}: no eos_token and no eos_token_id; cannot tell where answers end")
            eos_id = eos_token_ids[0]
        self.eos_id: int = eos_id
        self.stop_tokens = {eos_id}
        self.add_stop_tokens(eos_token_ids)
        self.chat_template = chat_template or None
        self._config = dict(tokenizer_config or {})

        pre = component_state(tokenizer.pre_tokenizer)
        llama3_split = _find(pre, lambda d: d.get("type") == "Split" and d.get("pattern") == {"Regex": LLAMA3_PAT_STR})
        # A Llama 3 vocabulary cuts long text the way Meta's tiktoken tokenizer does, so both give the same ids.
        self.meta_splitting = llama3_split if meta_splitting is None else meta_splitting
        self._decoder_kind, self._strip_first_space = _decoder_kind(component_state(tokenizer.decoder))
        self._pieces: dict[int, bytes | int] = {}

        if add_bos_token is None:  # as the post-processor does it
            add_bos_token = self.bos_id is not None and self._tok.encode("a", add_special_tokens=True).ids[:1] == [
                self.bos_id
            ]
        self.add_bos = self.add_bos_token = bool(add_bos_token)

        # A Llama 3 vocabulary also gets Meta's chat format (used when there is no template, and for
        # `encode_turn`) and Meta's stop tokens, whatever its config says.
        llama3_names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        self.chat_format = ChatFormat(self) if all(n in self.special_tokens for n in llama3_names) else None
        if self.chat_format is not None:
            ends = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
            self.stop_tokens |= {self.special_tokens[n] for n in ends if n in self.special_tokens}

    def _required_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {what} {token!r} is not in the vocabulary")
        return token_id

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @classmethod
    def from_folder(cls, folder: str | Path, *, eos_token_ids: Iterable[int] | None = None) -> "HFTokenizer":
        """Load `tokenizer.json` with `tokenizer_config.json`, `special_tokens_map.json`, the chat template
        (`chat_template.jinja`, `chat_template.json` or the config) and eos ids of
        `generation_config.json` / `config.json`."""
        folder = Path(folder)
        check_folder_files(folder, FOLDER_FILES, what="tokenizer file", error=TokenizerError)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: not found")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: cannot load ({e})") from None
        config = read_json_object(folder / "tokenizer_config.json")
        special_map = read_json_object(folder / "special_tokens_map.json")

        def token(name: str) -> str | None:
            value = config.get(name, special_map.get(name))
            return value.get("content") if isinstance(value, dict) else value

        template = _chat_template(folder, config)
        eos_ids = list(eos_token_ids or []) + folder_eos_token_ids(folder)
        return cls(
            tok,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            unk_token=token("unk_token"),
            pad_token=token("pad_token"),
            chat_template=template,
            add_bos_token=config.get("add_bos_token"),
            eos_token_ids=eos_ids,
            tokenizer_config=config,
            source=str(path),
        )

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, eos_token_ids: Iterable[int] | None = None, source: str = "GGUF metadata"
    ) -> "HFTokenizer":
        """Build from GGUF metadata (as `mx.load(path, return_metadata=True)[1]` gives it)."""
        tok = gguf_tokenizer(metadata, source)
        if eos_token_ids:
            tok.add_stop_tokens(eos_token_ids)
        return tok

    # -- encoding

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Token ids of `text`, with BOS/EOS on request; special-token text is plain text
        unless `allowed_special` ("all" or a set of names) lets it be a special token."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        allowed, disallowed = resolve_special(allowed_special, disallowed_special, self.special_tokens)
        if bos and self.bos_id is None:
            raise ValueError(f"{self.source}: this tokenizer has no BOS token")
        ids: list[int] = [self.bos_id] if bos else []
        pieces = split_for_tiktoken(text) if self.meta_splitting else [text]
        for piece in pieces:
            ids.extend(self._encode_piece(piece, allowed, disallowed))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_piece(self, text: str, allowed: set[str], disallowed: set[str]) -> list[int]:
        if not (allowed or disallowed) or self._special_re is None or not text:
            return self._encode_plain(text)
        found = set(self._special_re.findall(text))
        for name in sorted(found & disallowed):
            raise disallowed_error(name)
        use = found & allowed
        if not use:
            return self._encode_plain(text)
        if use == found:
            return self._encode_native(text)
        ids: list[int] = []
        pattern = "(" + "|".join(map(re.escape, sorted(use, key=len, reverse=True))) + ")"
        for i, part in enumerate(re.split(pattern, text)):
            ids.extend([self.special_tokens[part]] if i % 2 else self._encode_plain(part))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        with self._lock:
            try:
                return self._encode_one(text)
            except Exception:
                if not _has_surrogates(text):
                    raise
                # Lone surrogates cannot be UTF-8: replace them, as tiktoken does.
                return self._encode_one(_fix_surrogates(text))

    def _encode_one(self, text: str) -> list[int]:
        if len(text) < _LONG_TEXT:
            return self._tok.encode(text, add_special_tokens=False).ids
        # (`encode_batch` lets other threads run meanwhile: `encode` holds the GIL, ~1 s a MB)
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def _encode_native(self, text: str) -> list[int]:
        """The tokenizer's own matching of special tokens in text (lstrip/rstrip rules and all)."""
        with self._lock:
            self._tok.encode_special_tokens = False
            try:
                return self._encode_plain(text)
            finally:
                self._tok.encode_special_tokens = True

    def decode(self, ids: Sequence[int]) -> str:
        """The text of the ids, special tokens written out."""
        return self._tok.decode(as_id_list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token given by its vocabulary spelling, or None."""
        return self._tok.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """The id of a token given by its vocabulary spelling (the unknown token's id, if any, for others),
        or a list of them, as in transformers."""
        unk = self._tok.token_to_id(self.unk_token) if self.unk_token is not None else None
        one = lambda t: self._tok.token_to_id(t) if self._tok.token_to_id(t) is not None else unk  # noqa: E731
        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]

    # -- chat

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True, *, tokenize: bool = True,
        **template_kwargs: Any
    ) -> list[int] | str:
        """Prompt ids from the checkpoint's own chat template (BOS added when the tokenizer adds one
        and the template did not). Special-token text inside message content stays plain text.
        `tokenize=False`: the prompt's text instead (with that BOS written out); other keywords
        go to the template; special-token text in them (tools, documents, dict keys) stays plain text too."""
        if self.chat_template is None:
            if self.chat_format is not None:
                ids = self.chat_format.encode_dialog_prompt(messages, add_generation_prompt=add_generation_prompt)
                return ids if tokenize else self.decode(ids)
            raise TokenizerError(f"{self.source}: the checkpoint has no chat template")
        messages = [dict(m) for m in messages]
        # Every caller string the template may render is guarded; only our own special-token names are not.
        context = {name: template_kwargs.get(name, getattr(self, name)) for name in _OWN_TOKENS}
        caller = {k: v for k, v in template_kwargs.items() if k not in _OWN_TOKENS}
        (guarded, caller), restore = self._guard((messages, caller))
        context.update(caller)
        text = render_chat_template(self.chat_template, guarded, add_generation_prompt, **context)
        if restore:
            ids = self._encode_guarded(text, restore)
        else:
            ids = self.encode(text, allowed_special="all")
        bos = self.add_bos_token and self.bos_id is not None and ids[:1] != [self.bos_id]
        if not tokenize:
            text = text.translate(restore) if restore else text
            return (self.bos_token + text) if bos else text
        if bos:
            ids.insert(0, self.bos_id)
        return ids

    def _guard(self, value: Any) -> tuple[Any, dict[int, str]]:
        """Stand-ins for special-token text in `value` (strings in it, dict keys included; tuples become
        lists), so the template's output can tell it apart from the template's own special tokens."""
        if self._special_re is None:
            return value, {}
        found = dict.fromkeys(name for text in _strings(value) for name in self._special_re.findall(text))
        if not found:
            return value, {}
        for base in (0xF0000, 0x100000):  # a Private Use plane the conversation does not use
            if not any(base <= ord(c) <= base + 0xFFFF for text in _strings(value) for c in text):
                break
        else:
            raise TokenizerError("cannot guard special-token text: the messages use both Private Use planes")
        stand_in = {name: chr(base + i) for i, name in enumerate(found)}

        def visit(v):
            if isinstance(v, str):
                return self._special_re.sub(lambda m: stand_in[m.group()], v)
            if isinstance(v, Mapping):
                return {visit(k): visit(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [visit(x) for x in v]
            return v

        return visit(value), {ord(c): name for name, c in stand_in.items()}

    def _encode_guarded(self, text: str, restore: dict[int, str]) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(re.split(f"({self._special_re.pattern})", text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode(part.translate(restore)))
        return ids

    def encode_turn(
        self,
        messages: Sequence[ChatMessage],
        *,
        history: Sequence[ChatMessage] | None = None,
        add_generation_prompt: bool = True,
        after_generation_prompt: bool = False,
        previous_stop: int | None = None,
    ) -> list[int]:
        """The tokens a new turn adds to a running conversation: `apply_chat_template` of `history`
        plus `messages`, less that of `history` (no BOS).

        Meta's chat format (a Llama 3 vocabulary without a template of its own, or with Llama 3's)
        needs no `history`: see `ChatFormat.encode_turn`. The checkpoint's Jinja template does: the turn
        is the text it adds, encoded from the last special token before it on (text after a special
        token encodes the same whatever precedes it). TemplateNotIncrementalError when the template
        renders `history` differently once `messages` follow.
        """
        template = self.chat_template not in (None, LLAMA3_CHAT_TEMPLATE)
        if template and history is not None:
            stop = [] if previous_stop is None else [int(previous_stop)]
            return stop + self._template_turn(history, messages, add_generation_prompt, after_generation_prompt)
        if self.chat_format is None:
            need = "the conversation so far (history)" if template else "Llama 3's chat format or a chat template"
            raise TokenizerError(f"{self.source}: encode_turn needs {need}")
        return self.chat_format.encode_turn(messages, add_generation_prompt=add_generation_prompt,
                                            previous_stop=previous_stop,
                                            after_generation_prompt=after_generation_prompt)

    def _template_turn(self, history, messages, add_generation_prompt: bool, after_generation_prompt: bool):
        history, messages = [dict(m) for m in history], [dict(m) for m in messages]
        guarded, restore = self._guard(history + messages)  # one set of stand-ins for both renderings
        context = {name: getattr(self, name) for name in _OWN_TOKENS}
        before, after = render_turn(self.chat_template, guarded[: len(history)], guarded[len(history) :],
                                    add_generation_prompt=add_generation_prompt,
                                    after_generation_prompt=after_generation_prompt, **context)
        start = 0
        if self._special_re is not None:
            for match in self._special_re.finditer(before):
                start = match.start()
        encode = (lambda t: self._encode_guarded(t, restore)) if restore else (
            lambda t: self.encode(t, allowed_special="all"))
        head, ids = encode(before[start:]), encode(after[start:])
        if ids[: len(head)] != head:
            raise TemplateNotIncrementalError("the new turn's text merges into the tokens of the conversation so far")
        return ids[len(head) :]

    # -- streaming and saving

    def _piece(self, token: int) -> bytes | int:
        piece = self._pieces.get(token)
        if piece is None:
            text = self._tok.id_to_token(token)
            if text is None:
                piece = b""  # tokenizers skips unknown ids
            elif self._decoder_kind == "byte_level":
                try:
                    piece = bytes(CHAR_TO_BYTE[c] for c in text)
                except KeyError:  # not written in the byte alphabet: taken as is
                    piece = text.encode("utf-8")
            else:
                byte = _BYTE_TOKEN.fullmatch(text)
                piece = int(byte.group(1), 16) if byte else text.replace(_SPM_SPACE, " ").encode("utf-8")
            self._pieces[token] = piece
        return piece

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for in decoded text."""
        piece = self._piece(int(token))
        return bytes([piece]) if isinstance(piece, int) else piece

    def detokenizer(self):
        """A fresh streaming detokenizer suited to this tokenizer's decoder."""
        if self._decoder_kind == "naive":
            return NaiveStreamingDetokenizer(self.decode)
        return StreamingDetokenizer(
            self._piece, byte_fallback=self._decoder_kind == "spm", strip_first_space=self._strip_first_space
        )

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json`, `tokenizer_config.json` (chat template, BOS/EOS) and `special_tokens_map.json`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        special = {
            name: getattr(self, name)
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if getattr(self, name) is not None
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            **self._config,
            **special,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(folder / "tokenizer_config.json", config)
        write_json(folder / "special_tokens_map.json", special)


_OWN_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _strings(value: Any) -> Iterable[str]:
    """Every string in nested dicts and lists, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


_LONG_TEXT = 1 << 16  # characters from which an encode lets other threads run


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _fix_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = read_json_object(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template is not a string")
    return template
