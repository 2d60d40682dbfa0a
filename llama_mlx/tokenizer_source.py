"""Where a checkpoint's tokenizer comes from: found beside the weights by the readers,
loaded by `llama_mlx.tokenizer.load_tokenizer`. Plain data, so neither package imports the other."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from .errors import TokenizerError

__all__ = [
    "FOLDER_FILES",
    "TOKENIZER_FILES",
    "TokenizerKind",
    "TokenizerSource",
    "find_tokenizer_source",
    "folder_eos_token_ids",
    "is_tiktoken_file",
    "read_json_object",
]

# Every file a tokenizer folder may hold, read (or copied by convert) from beside the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
FOLDER_FILES = TOKENIZER_FILES + ("generation_config.json", "config.json")  # what a tokenizer folder load reads

TokenizerKind = Literal["tiktoken", "hf-json", "gguf"]

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


@dataclass(frozen=True)
class TokenizerSource:
    """A tokenizer, not yet read.

    kind "tiktoken": `path` is Meta's tokenizer.model; "hf-json": `path` is the folder holding
    tokenizer.json (with tokenizer_config.json and chat template files); "gguf": `path` is the
    .gguf file, and `gguf_metadata` its metadata when the reader has parsed it already.
    `eos_token_ids` are stop ids beyond those the tokenizer files name (generation_config.json).
    """

    kind: TokenizerKind
    path: Path
    eos_token_ids: tuple[int, ...] = ()
    gguf_metadata: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)


def is_tiktoken_file(path: str | Path) -> bool:
    """Whether `path` looks like a tiktoken BPE file (`base64 rank` lines), not a SentencePiece model."""
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0]
    return bool(_TIKTOKEN_LINE.match(first))


def folder_eos_token_ids(folder: str | Path) -> list[int]:
    """The eos ids a model folder's generation_config.json and config.json list."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = Path(folder) / name
        value = read_json_object(file).get("eos_token_id")
        values = [] if value is None else value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise TokenizerError(f"{file}: eos_token_id must be a token id or a list of them, found {value!r}")
        ids += values
    return ids


def find_tokenizer_source(
    folder_or_file: str | Path,
    *,
    eos_token_ids: Iterable[int] = (),
    required: bool = True,
) -> TokenizerSource | None:
    """The tokenizer a file or model folder holds.

    A folder: Meta's tiktoken `tokenizer.model` if it has one, else `tokenizer.json`, else its
    single `.gguf` file; the eos ids of its generation_config.json / config.json join `eos_token_ids`.
    A file: `tokenizer.model`, `tokenizer.json` or a `.gguf`. Raises TokenizerError naming the file
    when there is none, or only a SentencePiece `tokenizer.model`; with required=False returns None instead.
    """
    try:
        return _find(Path(folder_or_file), tuple(int(i) for i in eos_token_ids))
    except TokenizerError:
        if required:
            raise
        return None


def _find(path: Path, eos: tuple[int, ...]) -> TokenizerSource:
    if path.is_file():
        if path.suffix == ".gguf":
            return TokenizerSource("gguf", path, eos)
        if path.name == "tokenizer.json":
            return TokenizerSource("hf-json", path.parent, eos)
        _require_tiktoken(path)
        return TokenizerSource("tiktoken", path, eos)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such file or folder")
    eos = eos + tuple(folder_eos_token_ids(path))
    model = path / "tokenizer.model"
    if model.is_file() and _tiktoken(model):
        return TokenizerSource("tiktoken", model, eos)
    if (path / "tokenizer.json").is_file():
        return TokenizerSource("hf-json", path, eos)
    if model.is_file():
        _require_tiktoken(model)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return TokenizerSource("gguf", ggufs[0], eos)
    raise TokenizerError(f"{path}: no tokenizer.model, tokenizer.json or single .gguf file")


def _tiktoken(path: Path) -> bool:
    try:
        return is_tiktoken_file(path)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None


def _require_tiktoken(path: Path) -> None:
    if not _tiktoken(path):
        raise TokenizerError(
            f"{path}: not a tiktoken BPE file (a SentencePiece model?); "
            "only Llama 3's tokenizer.model is read, give a folder with tokenizer.json for other models"
        )


def read_json_object(path: Path) -> dict:
    """A JSON object file's contents ({} when missing); TokenizerError naming the file when unreadable."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except RecursionError:
        raise TokenizerError(f"{path}: cannot read (JSON nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data
