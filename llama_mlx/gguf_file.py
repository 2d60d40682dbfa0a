"""The GGUF file format (llama.cpp): its header, that is its key/value metadata and tensor table.

The one GGUF parser: the checkpoint reader takes the tensor table, the tokenizer the metadata.
Tensor data is not read here (`mx.load` does that).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, LlamaMLXError

__all__ = ["GGML_TYPES", "GGUFHeader", "GGUFTensorInfo", "read_gguf_header", "read_gguf_metadata"]

GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}

# GGUF metadata value types: struct format of the scalars, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_NESTING = 4  # arrays of arrays of ...: llama.cpp itself writes at most one level
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table."""

    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists the fastest-moving dimension first)
    type: str  # a GGML_TYPES name, or "type N" for an id it does not know
    offset: int  # of the data, from the start of the file


@dataclass
class GGUFHeader:
    """A parsed GGUF header; `file_size` lets a reader check that every tensor fits in the file."""

    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    file_size: int
    data_start: int = 0  # where the tensor data section begins (tensor offsets are from the file's start)
    alignment: int = 32


class _Reader:
    def __init__(self, data, path: Path, error: type[LlamaMLXError]):
        self.data, self.pos, self.path, self.error = data, 0, path, error

    def take(self, n: int):
        if self.pos + n > len(self.data):
            raise self.error(f"{self.path}: truncated GGUF header")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{self.path}: corrupt GGUF header (a string is not UTF-8)") from None

    def left(self) -> int:
        return len(self.data) - self.pos

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise self.error(f"{self.path}: corrupt GGUF header (metadata {key!r:.80} nests arrays more "
                                 f"than {MAX_ARRAY_NESTING} deep)")
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALARS:  # numeric arrays in one go
                fmt = _SCALARS[itype]
                return np.frombuffer(self.take(struct.calcsize(fmt) * count), dtype=np.dtype(fmt)).tolist()
            if itype not in (_STRING, _ARRAY):
                raise self.error(f"{self.path}: corrupt GGUF header (metadata {key!r:.80} is an array of "
                                 f"unknown type {itype})")
            if count * (8 if itype == _STRING else 12) > self.left():  # every item takes its length field
                raise self.error(f"{self.path}: truncated GGUF header (metadata {key!r:.80} claims {count} items)")
            return [self.value(itype, key, depth + 1) for _ in range(count)]
        raise self.error(f"{self.path}: corrupt GGUF header (metadata {key!r:.80} has unknown value type {vtype})")


def _parse(path: Path, error: type[LlamaMLXError], with_tensors: bool) -> GGUFHeader:
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if f.seek(0, 2) else b""
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    r = _Reader(memoryview(data), path, error)
    if bytes(r.take(4)) != b"GGUF":
        raise error(f"{path}: not a GGUF file (bad magic)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise error(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_kv * 12 > r.left() or n_tensors * 24 > r.left():  # the smallest key/value and tensor entries
        raise error(f"{path}: truncated GGUF header (claims {n_kv} metadata keys and {n_tensors} tensors)")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        if key in metadata:
            raise error(f"{path}: corrupt GGUF header (metadata {key!r:.80} appears twice)")
        metadata[key] = r.value(r.scalar("<I"), key)
    align = metadata.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise error(f"{path}: GGUF metadata 'general.alignment' must be a power of two, found {align!r:.40}")
    tensors: dict[str, GGUFTensorInfo] = {}
    start = 0
    if with_tensors:
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > MAX_DIMS:
                raise error(f"{path}: corrupt GGUF header (tensor {name!r:.80} has {n_dims} dimensions)")
            dims = [r.scalar("<Q") for _ in range(n_dims)]
            type_id, offset = r.scalar("<I"), r.scalar("<Q")
            if offset % align:
                raise error(f"{path}: corrupt GGUF header (tensor {name!r:.80} is not aligned to {align} bytes)")
            if any(d >= 1 << 48 for d in dims):
                raise error(f"{path}: corrupt GGUF header (tensor {name!r:.80} has dimensions {dims})")
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        start = (r.pos + align - 1) // align * align
        if len({i[0] for i in infos}) != len(infos):
            raise error(f"{path}: corrupt GGUF header (a tensor name appears twice)")
        for name, shape, type_id, offset in infos:
            kind = GGML_TYPES.get(type_id, f"type {type_id}")
            tensors[name] = GGUFTensorInfo(name, shape, kind, start + offset)
    return GGUFHeader(version, metadata, tensors, len(data), start, align)


def read_gguf_header(path: str | Path, *, error: type[LlamaMLXError] = CheckpointError) -> GGUFHeader:
    """Parse a GGUF header (versions 2 and 3): magic, version, metadata, tensor table.

    error: the exception raised, naming the file, when the header is unreadable, truncated or corrupt.
    """
    return _parse(Path(path), error, with_tensors=True)


def read_gguf_metadata(path: str | Path, *, error: type[LlamaMLXError] = CheckpointError) -> dict[str, Any]:
    """The metadata of a GGUF file as plain Python values (the tensor table is skipped)."""
    return _parse(Path(path), error, with_tensors=False).metadata
