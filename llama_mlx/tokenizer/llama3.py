"""Meta's Llama 3 tokenizer: tiktoken BPE over Meta's `tokenizer.model`, with the Llama 3.1 special tokens."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Sequence

import tiktoken

from ..errors import TokenizerError
from .base import AllowedSpecial, BaseTokenizer, ChatMessage, DisallowedSpecial, as_id_list, write_json
from .bpe import LLAMA3_PAT_STR, split_for_tiktoken, tiktoken_to_hf_json
from .chat_format import LLAMA3_CHAT_TEMPLATE, ChatFormat
from .detokenizer import StreamingDetokenizer

__all__ = [
    "Llama3Tokenizer",
    "NAMED_SPECIAL_TOKENS",
    "NUM_RESERVED_SPECIAL_TOKENS",
    "STOP_TOKEN_NAMES",
    "Tokenizer",
    "load_tiktoken_bpe",
    "special_token_names",
]

NUM_RESERVED_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: a tool call waits for its result
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
STOP_TOKEN_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def special_token_names(count: int = NUM_RESERVED_SPECIAL_TOKENS) -> list[str]:
    """The Llama 3.1 names of the special tokens, in id order."""
    names = list(NAMED_SPECIAL_TOKENS)
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(count - len(names))]
    return names


def load_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file into {token bytes: rank}; ranks must be 0..n-1 with no repeats."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror or e})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"{path}: line {lineno} is not 'base64-token rank'; not a tiktoken tokenizer.model"
            ) from None
        if token in ranks:
            raise TokenizerError(f"{path}: line {lineno}: token repeated")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: empty tokenizer file")
    if len(set(ranks.values())) != len(ranks) or min(ranks.values()) != 0 or max(ranks.values()) != len(ranks) - 1:
        raise TokenizerError(f"{path}: token ranks are not 0..{len(ranks) - 1} without repeats")
    return ranks


class Llama3Tokenizer(BaseTokenizer):
    """Meta's Llama 3 tokenizer (the API of `llama/tokenizer.py`) on tiktoken."""

    num_reserved_special_tokens = NUM_RESERVED_SPECIAL_TOKENS
    pat_str = LLAMA3_PAT_STR

    def __init__(self, model_path: str | Path, *, eos_token_ids: Sequence[int] | None = None):
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        self.model_path = path
        self.mergeable_ranks = load_tiktoken_bpe(path)
        num_base_tokens = len(self.mergeable_ranks)
        self.special_tokens = {
            name: num_base_tokens + i for i, name in enumerate(special_token_names(self.num_reserved_special_tokens))
        }
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=self.pat_str,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = self.model.n_vocab
        self.vocab_size = self.n_words
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = -1
        self.add_bos = True
        self.stop_tokens = {self.special_tokens[name] for name in STOP_TOKEN_NAMES}
        if eos_token_ids:
            self.add_stop_tokens(eos_token_ids)
        self.chat_format = ChatFormat(self)

    def __repr__(self) -> str:
        return f"Llama3Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"

    def encode(
        self,
        s: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Token ids of `s`, with BOS/EOS on request.

        Special-token text in `s` is plain text unless `allowed_special` ("all" or a set of
        names) lets it be a special token; text of one in `disallowed_special` raises ValueError.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        allowed = allowed_special if allowed_special == "all" else frozenset(allowed_special)
        disallowed = disallowed_special if disallowed_special == "all" else frozenset(disallowed_special)
        ids: list[int] = [self.bos_id] if bos else []
        for piece in split_for_tiktoken(s):
            ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=disallowed))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, t: Sequence[int]) -> str:
        """The text of the ids; special tokens are written out, invalid UTF-8 becomes U+FFFD."""
        return self.model.decode(as_id_list(t))

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for."""
        return self.model.decode_single_token_bytes(token)

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token name or of a single ordinary token's text, or None."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.mergeable_ranks.get(token.encode("utf-8"))

    def apply_chat_template(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True, *,
                            tokenize: bool = True) -> list[int] | str:
        """Meta's dialog prompt: BOS, each message, then (by default) the assistant header
        (`tokenize=False`: its text)."""
        ids = self.chat_format.encode_dialog_prompt(messages, add_generation_prompt=add_generation_prompt)
        return ids if tokenize else self.decode(ids)

    def encode_turn(
        self,
        messages: Sequence[ChatMessage],
        *,
        history: Sequence[ChatMessage] | None = None,
        add_generation_prompt: bool = True,
        after_generation_prompt: bool = False,
        previous_stop: int | None = None,
    ) -> list[int]:
        """The tokens a new turn adds to a running conversation; see `ChatFormat.encode_turn`
        (Meta's format encodes each message on its own: `history` is not needed)."""
        return self.chat_format.encode_turn(messages, add_generation_prompt=add_generation_prompt,
                                            previous_stop=previous_stop,
                                            after_generation_prompt=after_generation_prompt)

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer over this vocabulary."""
        return StreamingDetokenizer(self.token_bytes)

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.model`, and the equivalent Hugging Face `tokenizer.json`,
        `tokenizer_config.json` (with a chat template of this format) and `special_tokens_map.json`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ranked = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        with open(folder / "tokenizer.model", "wb") as f:
            f.writelines(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranked)

        bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
        hf = tiktoken_to_hf_json(self.mergeable_ranks, self.special_tokens, self.pat_str, bos_token=bos)
        with open(folder / "tokenizer.json", "w", encoding="utf-8") as f:
            json.dump(hf, f, ensure_ascii=False)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "chat_template": LLAMA3_CHAT_TEMPLATE,
        }
        write_json(folder / "tokenizer_config.json", config)
        write_json(folder / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})


Tokenizer = Llama3Tokenizer  # the name Meta's reference uses
