"""Reading the key/value metadata of a GGUF file (not its tensors), for its tokenizer."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import TokenizerError

# GGUF value type -> struct format of one item (8 is a string, 9 an array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise TokenizerError(f"{self.path}: truncated GGUF header")
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("I"), self.scalar("Q")
            if item_kind in _SCALARS:
                fmt = _SCALARS[item_kind]
                return list(struct.unpack(f"<{count}{fmt}", self.take(count * struct.calcsize(fmt))))
            return [self.value(item_kind) for _ in range(count)]
        raise TokenizerError(f"{self.path}: unknown GGUF value type {kind}")


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a GGUF file (versions 2 and 3) as plain Python values; tensors are not read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            reader = _Reader(f, path)
            if reader.take(4) != b"GGUF":
                raise TokenizerError(f"{path}: not a GGUF file")
            version = reader.scalar("I")
            if version not in (2, 3):
                raise TokenizerError(f"{path}: GGUF version {version} is not supported")
            reader.scalar("Q")  # tensor count
            count = reader.scalar("Q")
            metadata = {}
            for _ in range(count):
                key = reader.string()
                metadata[key] = reader.value(reader.scalar("I"))
            return metadata
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    except (struct.error, MemoryError, OverflowError):
        raise TokenizerError(f"{path}: malformed GGUF header") from None
