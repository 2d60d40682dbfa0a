"""The interface every tokenizer backend exposes, so the rest of the code need not know which one it has."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import AbstractSet, Any, Collection, Iterable, Literal, Mapping, Sequence, Union

__all__ = [
    "AllowedSpecial",
    "BaseTokenizer",
    "ChatMessage",
    "DisallowedSpecial",
    "as_id_list",
    "disallowed_error",
    "resolve_special",
    "write_json",
]

AllowedSpecial = Union[Literal["all"], AbstractSet[str]]
DisallowedSpecial = Union[Literal["all"], Collection[str]]
ChatMessage = Mapping[str, Any]


def as_id_list(ids: Any) -> list[int]:
    """Token ids from a list, tuple, numpy or mx array, as a list of Python ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def resolve_special(
    allowed_special: AllowedSpecial, disallowed_special: DisallowedSpecial, names: Iterable[str]
) -> tuple[set[str], set[str]]:
    """tiktoken's rules: `"all"` means every special token; disallowed ones never include allowed ones."""
    names = set(names)
    allowed = names if allowed_special == "all" else set(allowed_special)
    disallowed = names - allowed if disallowed_special == "all" else set(disallowed_special)
    return allowed, disallowed


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON file the way Hugging Face folders have them (indented, UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def disallowed_error(token: str) -> ValueError:
    return ValueError(
        f"Encountered text corresponding to disallowed special token {token!r}. "
        "Pass it in allowed_special to encode it as a special token, or remove it from "
        "disallowed_special to encode it as plain text."
    )


class BaseTokenizer(ABC):
    """One tokenizer interface, whichever backend: Meta's tiktoken file or a Hugging Face tokenizer."""

    bos_id: int | None
    eos_id: int
    stop_tokens: set[int]
    special_tokens: dict[str, int]
    vocab_size: int
    add_bos: bool  # whether a plain-text prompt should start with BOS

    @abstractmethod
    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Token ids of `text`; special-token text is plain text unless listed in `allowed_special`."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens written out; invalid UTF-8 becomes U+FFFD."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one token given by its text (a special token's name), or None."""

    @abstractmethod
    def apply_chat_template(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True, *,
                            tokenize: bool = True) -> list[int] | str:
        """Prompt ids for a conversation of {"role", "content"} dicts, BOS included
        (`tokenize=False`: the prompt's text, special tokens written out)."""

    @abstractmethod
    def detokenizer(self):
        """A fresh streaming detokenizer: `add_token(id) -> str`, `finalize() -> str`."""

    @abstractmethod
    def save(self, folder: str | Path) -> None:
        """Write the tokenizer files into a model folder."""

    # -- the names Hugging Face and mlx-lm tokenizers use

    @property
    def eos_token_id(self) -> int:
        return self.eos_id

    @property
    def bos_token_id(self) -> int | None:
        return self.bos_id

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id generation stops at (the set itself, as in mlx-lm: adding to it adds a stop)."""
        return self.stop_tokens

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """The id of a token given by its text, or a list of ids for a list (None: not a token)."""
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    def add_stop_tokens(self, tokens: Iterable[int | str]) -> None:
        """Also stop generation at these tokens (ids, or token texts such as "<|eot_id|>")."""
        for token in tokens:
            if isinstance(token, str):
                token_id = self.token_to_id(token)
                if token_id is None:
                    raise ValueError(f"unknown token {token!r}")
            else:
                token_id = int(token)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
            self.stop_tokens.add(token_id)
