"""Byte-level BPE pieces that Meta's tiktoken tokenizer and the Hugging Face tokenizers share:
Llama 3's split pattern and Meta's cuts of long text, GPT-2's byte alphabet, and the
`tokenizer.json` equivalent of a tiktoken encoding."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Mapping

from tokenizers import Regex, decoders, pre_tokenizers, processors

__all__ = [
    "BYTE_TO_CHAR",
    "CHAR_TO_BYTE",
    "LLAMA3_PAT_STR",
    "MAX_NO_WHITESPACES_CHARS",
    "TIKTOKEN_MAX_ENCODE_CHARS",
    "bos_post_processor",
    "byte_level_pre_tokenizer",
    "component_state",
    "split_for_tiktoken",
    "tiktoken_to_hf_json",
]

LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tiktoken panics on more than ~400k characters at once, and slows down badly on very long runs
# of whitespace or non-whitespace (openai/tiktoken#195); Meta cuts the text first, and so do we.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

_RUNS = re.compile(r"\s+|\S+")  # re's \s is exactly str.isspace(), the test Meta uses


def split_for_tiktoken(
    s: str, max_chars: int = TIKTOKEN_MAX_ENCODE_CHARS, max_run: int = MAX_NO_WHITESPACES_CHARS
) -> Iterator[str]:
    """Meta's cuts: blocks of `max_chars`, then within each block a cut every `max_run`
    characters of a longer run of whitespace or non-whitespace."""
    for start in range(0, len(s), max_chars):
        block = s[start : start + max_chars]
        if len(block) <= max_run:
            yield block
            continue
        cut = 0
        for run in _RUNS.finditer(block):
            begin, end = run.span()
            for at in range(begin + max_run, end, max_run):
                yield block[cut:at]
                cut = at
        yield block[cut:]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def byte_level_pre_tokenizer(kind: str, pattern: str):
    """A byte-level pre-tokenizer: "split" by `pattern` first, "digits" one digit apiece, else GPT-2's."""
    if kind == "split":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def bos_post_processor(bos_token: str, bos_id: int):
    """Byte-level offsets, and BOS before every sequence."""
    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos_token}:0 $A:0",
                pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
                special_tokens=[(bos_token, bos_id)],
            ),
        ]
    )


def tiktoken_to_hf_json(
    ranks: Mapping[bytes, int], special_tokens: Mapping[str, int], pat_str: str, bos_token: str | None = None
) -> dict:
    """The `tokenizer.json` (as a dict) of the Hugging Face tokenizer equivalent to a tiktoken encoding.

    Every token becomes its GPT-2 byte spelling; the merges are every split of a token into two
    tokens, in the token's rank order (the same list Hugging Face's Llama 3 conversion has), and
    `ignore_merges` takes a piece that is itself a token whole, as tiktoken does.
    """
    if len(ranks) >= 1 << 20:
        raise ValueError("vocabulary too large")
    spelling = {byte: char for byte, char in BYTE_TO_CHAR.items()}
    spelled = [""] * len(ranks)
    for token, rank in ranks.items():
        spelled[rank] = token.decode("latin-1").translate(spelling)
    get = ranks.get
    keys = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left = get(token[:i])
            if left is not None:
                right = get(token[i:])
                if right is not None:
                    keys.append((rank << 40) | (left << 20) | right)  # sorts by (rank, left, right)
    keys.sort()
    mask = (1 << 20) - 1
    merges = [[spelled[(key >> 20) & mask], spelled[key & mask]] for key in keys]
    ordered = sorted(special_tokens.items(), key=lambda item: item[1])
    if ordered and ordered[0][1] != len(ranks):
        raise ValueError("special tokens must follow the ordinary tokens")
    if bos_token is not None:
        post_processor = bos_post_processor(bos_token, special_tokens[bos_token])
    else:
        post_processor = processors.ByteLevel(trim_offsets=False)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for name, i in ordered
        ],
        "normalizer": None,
        "pre_tokenizer": component_state(byte_level_pre_tokenizer("split", pat_str)),
        "post_processor": component_state(post_processor),
        "decoder": component_state(decoders.ByteLevel()),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {token: rank for rank, token in enumerate(spelled)},
            "merges": merges,
        },
    }


def component_state(component) -> Any:
    """A `tokenizers` component (pre-tokenizer, decoder, ...) as its tokenizer.json dict."""
    return json.loads(component.__getstate__()) if component is not None else None
