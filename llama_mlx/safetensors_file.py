"""The safetensors header, checked before `mx.load` sees the file.

`mx.load` trusts the header: offsets out of order, overlapping or past the data, negative
shapes or an unknown dtype reach C++ unchecked. Here every entry is validated first.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError, LlamaMLXError

__all__ = ["DTYPE_SIZES", "MAX_HEADER_BYTES", "check_safetensors"]

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's own limit
BAD = "truncated or corrupt safetensors file"
_LOADABLE = set(DTYPE_SIZES) - {"F8_E4M3", "F8_E5M2", "F64"}  # what mx.load reads


def check_safetensors(path: str | Path, *, error: type[LlamaMLXError] = CheckpointError) -> dict[str, Any]:
    """Parse and validate a safetensors header; returns it (tensor entries and `__metadata__`).

    Raises `error` naming the file (and the tensor) when the header is truncated, malformed or
    describes data that is not exactly the rest of the file laid out without overlaps.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{path}: truncated safetensors file (no header)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise error(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                            f"file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except RecursionError:
        raise error(f"{path}: {BAD} (header: JSON nested too deeply)") from None
    except ValueError as e:
        raise error(f"{path}: {BAD} (header: {e})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: {BAD} (header: not a JSON object)")
    meta = header.get("__metadata__") or {}  # mlx writes null
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise error(f"{path}: {BAD} (header: '__metadata__' must map strings to strings)")
    data = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise error(f"{path}: {BAD}: tensor {name!r:.80}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise error(f"{path}: {BAD}: tensor {name!r:.80}: unknown dtype {dtype!r:.40}")
        if dtype not in _LOADABLE:
            raise error(f"{path}: {BAD}: tensor {name!r:.80}: dtype {dtype} is not supported")
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0
                                              for d in shape):
            raise error(f"{path}: {BAD}: tensor {name!r:.80}: shape {shape!r:.80} is not a list of "
                        "non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)):
            raise error(f"{path}: {BAD}: tensor {name!r:.80}: data_offsets {offsets!r:.80} "
                        "is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data:
            raise error(f"{path}: {BAD}: tensor {name!r:.80}: data_offsets [{begin}, {end}] are outside the "
                        f"{data} data bytes (truncated file?)")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise error(f"{path}: {BAD}: tensor {name!r:.80}: data_offsets span {end - begin} bytes, shape "
                        f"{shape} of {dtype} needs {math.prod(shape) * DTYPE_SIZES[dtype]}")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise error(f"{path}: {BAD}: tensor {n1!r:.80} overlaps tensor {n0!r:.80} in the data")
    return header
