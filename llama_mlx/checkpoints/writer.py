"""Write an MLX model folder that mlx-lm loads unchanged: config.json, safetensors shards, tokenizer.

Tensors are streamed one module at a time into safetensors files whose headers are planned up
front, so memory holds one module's tensors, not a whole shard.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from ..errors import CheckpointError
from .plan import Item

__all__ = [
    "INDEX",
    "MAX_SHARD_BYTES",
    "Progress",
    "SAFETENSORS_DTYPES",
    "SourceReadError",
    "fsync_dir",
    "generation_config_for",
    "shard_items",
    "write_json",
    "write_tokenizer",
    "write_weights",
]

MAX_SHARD_BYTES = 5 * 10**9  # "at most 5 GB" whichever way GB is read
SAFETENSORS_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
    mx.uint16: "U16", mx.int16: "I16", mx.uint8: "U8", mx.int8: "I8", mx.int64: "I64", mx.uint64: "U64",
    mx.bool_: "BOOL",
}
INDEX = "model.safetensors.index.json"


@dataclass
class Progress:
    """Reported after each module's tensors are written."""

    tensor: str
    done: int
    total: int
    bytes_done: int
    bytes_total: int


class SourceReadError(Exception):
    """Reading a source tensor failed while writing (`tensor`: the item's name); the converter names the file."""

    def __init__(self, tensor: str, message: str):
        super().__init__(message)
        self.tensor = tensor


def shard_items(items: list[Item], max_bytes: int) -> list[list[Item]]:
    """Group items into shards of at most max_bytes (an item larger than that gets its own shard)."""
    shards: list[list[Item]] = []
    size = 0
    for item in items:
        if not shards or (size + item.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _header(items: list[Item]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for item in items:
        for name, shape, dtype in item.outputs:
            n = dtype.size
            for d in shape:
                n *= d
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def _write_shard(path: Path, items: list[Item], on_item: Callable[[Item], None]) -> None:
    try:
        _stream_shard(path, items, on_item)
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # name the file (full disk, size limit)


def _stream_shard(path: Path, items: list[Item], on_item: Callable[[Item], None]) -> None:
    with open(path, "wb") as f:
        f.write(_header(items))
        for item in items:
            try:
                arrays = item.produce()
            except RuntimeError as e:  # MLX reading the source lazily (a file cut short meanwhile)
                raise SourceReadError(item.name, str(e)) from None
            for name, shape, dtype in item.outputs:
                a = arrays.pop(name)
                if tuple(a.shape) != tuple(shape) or a.dtype != dtype:
                    raise CheckpointError(f"{path}: internal error: {name} is {a.dtype}{list(a.shape)}, "
                                          f"planned {dtype}{list(shape)}")
                a = mx.contiguous(a)
                try:
                    mx.eval(a)
                except RuntimeError as e:
                    raise SourceReadError(item.name, str(e)) from None
                f.write(memoryview(a).cast("B"))
                del a
            on_item(item)
        f.flush()
        os.fsync(f.fileno())


def write_weights(folder: Path, items: list[Item], progress: Callable[[Progress], None] | None = None,
                  max_shard_bytes: int | None = None) -> list[Path]:
    """Write the items as model.safetensors (or numbered shards) plus the index; returns the files."""
    shards = shard_items(items, max_shard_bytes or MAX_SHARD_BYTES)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total_bytes = sum(i.nbytes for i in items)
    state = {"done": 0, "bytes": 0}

    def on_item(item: Item) -> None:
        state["done"] += 1
        state["bytes"] += item.nbytes
        if progress is not None:
            progress(Progress(item.name, state["done"], len(items), state["bytes"], total_bytes))

    weight_map = {}
    for name, shard in zip(names, shards):
        _write_shard(folder / name, shard, on_item)
        weight_map.update({t: name for item in shard for t, _, _ in item.outputs})
    index = {
        "metadata": {"total_size": total_bytes, "total_parameters": sum(i.parameters for i in items)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(folder / INDEX, index)
    return [folder / name for name in names]


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_tokenizer(folder: Path, files: list[Path], tokenizer: Any | None) -> None:
    """Copy the source's tokenizer files verbatim, or have the tokenizer save itself."""
    if files:
        for f in files:
            shutil.copyfile(f, folder / f.name)
    elif tokenizer is not None:
        tokenizer.save(folder)


def generation_config_for(tokenizer: Any) -> dict:
    """A minimal generation_config.json from a tokenizer's BOS and stop tokens."""
    stops = sorted(int(t) for t in getattr(tokenizer, "stop_tokens", ()) or ())
    config: dict[str, Any] = {}
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if stops:
        config["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    return config


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem syncs directories
    finally:
        os.close(fd)
