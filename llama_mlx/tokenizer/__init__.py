"""Tokenizers and chat formats: Meta's Llama 3 tiktoken tokenizer, and Hugging Face tokenizers
(`tokenizer.json` or a GGUF vocabulary), behind one interface; see `BaseTokenizer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import TokenizerError
from .base import BaseTokenizer
from .chat_format import LLAMA3_CHAT_TEMPLATE, ChatFormat, Dialog, Message
from .detokenizer import NaiveStreamingDetokenizer, StreamingDetokenizer
from .gguf import read_gguf_metadata
from .hf import HFTokenizer, folder_eos_token_ids
from .llama3 import Llama3Tokenizer, is_tiktoken_file

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
    "load_tokenizer",
    "read_gguf_metadata",
]


def _tiktoken_or_refuse(path: Path, eos_token_ids: Sequence[int] | None) -> Llama3Tokenizer:
    try:
        tiktoken_file = is_tiktoken_file(path)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    if not tiktoken_file:
        raise TokenizerError(
            f"{path}: not a tiktoken BPE file (a SentencePiece model?); "
            "only Llama 3's tokenizer.model is read, give a folder with tokenizer.json for other models"
        )
    return Llama3Tokenizer(path, eos_token_ids=eos_token_ids)


def _from_gguf_file(path: Path, eos_token_ids: Sequence[int] | None) -> HFTokenizer:
    return HFTokenizer.from_gguf_metadata(read_gguf_metadata(path), eos_token_ids=eos_token_ids, source=str(path))


def load_tokenizer(
    folder_or_file: str | Path | None = None,
    *,
    gguf_metadata: Mapping[str, Any] | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> BaseTokenizer:
    """The tokenizer of a checkpoint.

    - `gguf_metadata` (from `mx.load(gguf, return_metadata=True)[1]`): its vocabulary and chat template.
    - a folder: Meta's tiktoken `tokenizer.model` if it has one, else `tokenizer.json` with its
      `tokenizer_config.json` (chat template, BOS/EOS) and the eos ids of `generation_config.json`,
      else its single `.gguf` file.
    - a file: `tokenizer.model`, `tokenizer.json` or a `.gguf`.

    `eos_token_ids` become extra stop tokens. Raises TokenizerError naming the file when the
    input is missing, malformed, or a SentencePiece `tokenizer.model` without `tokenizer.json`.
    """
    if gguf_metadata is not None:
        source = str(folder_or_file) if folder_or_file is not None else "GGUF metadata"
        return HFTokenizer.from_gguf_metadata(gguf_metadata, eos_token_ids=eos_token_ids, source=source)
    if folder_or_file is None:
        raise TokenizerError("no tokenizer given: pass a folder, a file or GGUF metadata")
    path = Path(folder_or_file)
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf_file(path, eos_token_ids)
        if path.name == "tokenizer.json":
            return HFTokenizer.from_folder(path.parent, eos_token_ids=eos_token_ids)
        return _tiktoken_or_refuse(path, eos_token_ids)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such file or folder")
    model = path / "tokenizer.model"
    if model.is_file() and is_tiktoken_file(model):
        eos = list(eos_token_ids or []) + folder_eos_token_ids(path)
        return Llama3Tokenizer(model, eos_token_ids=eos)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_folder(path, eos_token_ids=eos_token_ids)
    if model.is_file():
        return _tiktoken_or_refuse(model, eos_token_ids)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_gguf_file(ggufs[0], eos_token_ids)
    raise TokenizerError(f"{path}: no tokenizer.model, tokenizer.json or single .gguf file")
