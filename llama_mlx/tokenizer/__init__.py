"""Tokenizers and chat formats: Meta's Llama 3 tiktoken tokenizer, and Hugging Face tokenizers
(`tokenizer.json` or a GGUF vocabulary), behind one interface; see `BaseTokenizer`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import TokenizerError
from ..gguf_file import read_gguf_metadata
from ..paths import check_folder_files
from ..tokenizer_source import FOLDER_FILES, TokenizerSource, find_tokenizer_source
from .base import BaseTokenizer
from .chat_format import LLAMA3_CHAT_TEMPLATE, ChatFormat, Dialog, Message
from .detokenizer import NaiveStreamingDetokenizer, StreamingDetokenizer
from .hf import HFTokenizer
from .llama3 import Llama3Tokenizer

__all__ = [
    "BaseTokenizer",
    "ChatFormat",
    "Dialog",
    "HFTokenizer",
    "LLAMA3_CHAT_TEMPLATE",
    "Llama3Tokenizer",
    "Message",
    "NaiveStreamingDetokenizer",
    "StreamingDetokenizer",
    "TokenizerError",
    "TokenizerSource",
    "load_tokenizer",
]


def load_tokenizer(
    source: TokenizerSource | str | Path | None = None,
    *,
    gguf_metadata: Mapping[str, Any] | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> BaseTokenizer:
    """The tokenizer a `TokenizerSource` (a checkpoint's `tokenizer_source`) or a file or folder names.

    - a folder: Meta's tiktoken `tokenizer.model` if it has one, else `tokenizer.json` with its
      `tokenizer_config.json` (chat template, BOS/EOS) and the eos ids of `generation_config.json`,
      else its single `.gguf` file (see `find_tokenizer_source`).
    - a file: `tokenizer.model`, `tokenizer.json` or a `.gguf`.
    - `gguf_metadata` (a GGUF file's metadata, e.g. `mx.load(gguf, return_metadata=True)[1]`):
      its vocabulary and chat template; `source` then only names it in errors.

    `eos_token_ids` become extra stop tokens. Raises TokenizerError naming the file when the
    input is missing, malformed, or a SentencePiece `tokenizer.model` without `tokenizer.json`.
    """
    if gguf_metadata is not None:
        name = str(source.path if isinstance(source, TokenizerSource) else source or "GGUF metadata")
        return HFTokenizer.from_gguf_metadata(gguf_metadata, eos_token_ids=eos_token_ids, source=name)
    if source is None:
        raise TokenizerError("no tokenizer given: pass a folder, a file or GGUF metadata")
    if not isinstance(source, TokenizerSource):
        if Path(source).is_dir():  # every file it names must be inside the folder
            check_folder_files(source, FOLDER_FILES, what="tokenizer file", error=TokenizerError)
        source = find_tokenizer_source(source, eos_token_ids=eos_token_ids or ())
    elif eos_token_ids:
        source = replace(source, eos_token_ids=source.eos_token_ids + tuple(int(i) for i in eos_token_ids))
    eos = list(source.eos_token_ids)
    if source.kind == "tiktoken":
        return Llama3Tokenizer(source.path, eos_token_ids=eos)
    if source.kind == "hf-json":
        return HFTokenizer.from_folder(source.path, eos_token_ids=eos)
    if source.kind == "gguf":
        metadata = source.gguf_metadata
        if metadata is None:
            metadata = read_gguf_metadata(source.path, error=TokenizerError)
        return HFTokenizer.from_gguf_metadata(metadata, eos_token_ids=eos, source=str(source.path))
    raise TokenizerError(f"{source.path}: unknown tokenizer kind {source.kind!r}")
