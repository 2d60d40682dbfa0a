"""Read PyTorch `.pth` zip archives without torch and without running pickle code.

The pickle may only name torch's tensor-rebuild functions, its storage classes and OrderedDict;
each is mapped to a function of ours that builds a numpy view on the archive's `data/` records,
memory-mapped from the file. Anything else refuses the whole file with UnsafeCheckpointError.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError, UnsafeCheckpointError

__all__ = ["PthTensor", "STORAGE_DTYPES", "load_pth"]

# torch storage class -> (numpy dtype, mlx dtype). bfloat16 has no numpy dtype: read as uint16, view in MLX.
STORAGE_DTYPES = {
    "FloatStorage": (np.float32, mx.float32),
    "HalfStorage": (np.float16, mx.float16),
    "BFloat16Storage": (np.uint16, mx.bfloat16),
    "DoubleStorage": (np.float64, mx.float32),  # MLX has no float64 on every device
    "LongStorage": (np.int64, mx.int64),
    "IntStorage": (np.int32, mx.int32),
    "ShortStorage": (np.int16, mx.int16),
    "CharStorage": (np.int8, mx.int8),
    "ByteStorage": (np.uint8, mx.uint8),
    "BoolStorage": (np.bool_, mx.bool_),
}


MAX_NESTING = 16  # dicts within dicts in a state dict
MAX_DIM = 1 << 48
VIEW_FACTOR = 4  # tensors may view their storages (tied, transposed), in all at most this many times over


@dataclass(frozen=True)
class _StorageType:
    name: str


class _Storage:
    """One `data/<key>` record of the archive: where it lies in the file, read only when a tensor is read."""

    __slots__ = ("file", "key", "start", "numel", "np_dtype", "mx_dtype")

    def __init__(self, file: Path, key: str, start: int, numel: int, np_dtype, mx_dtype):
        self.file, self.key, self.start, self.numel = file, key, start, numel
        self.np_dtype, self.mx_dtype = np_dtype, mx_dtype

    def read(self) -> np.ndarray:
        """The record's elements, read with pread (a file cut short names itself instead of SIGBUS)."""
        nbytes = self.numel * np.dtype(self.np_dtype).itemsize
        buf = bytearray(nbytes)
        view = memoryview(buf)
        try:
            with open(self.file, "rb") as f:
                f.seek(self.start)
                done = 0
                while done < nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise CheckpointError(f"{self.file}: truncated while reading storage record "
                                              f"data/{self.key} ({done} of {nbytes} bytes)")
                    done += n
        except OSError as e:
            raise CheckpointError(f"{self.file}: cannot read storage record data/{self.key}: "
                                  f"{e.strerror or e}") from None
        return np.frombuffer(buf, dtype=self.np_dtype)


class PthTensor:
    """A tensor of a .pth file: a strided view of a storage record, read when asked for."""

    __slots__ = ("storage", "offset", "shape", "strides", "mx_dtype", "file")

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides
        self.mx_dtype, self.file = storage.mx_dtype, storage.file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 as its raw uint16 bits), read from the file."""
        base = self.storage.read()
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.shape, strides=tuple(s * item for s in self.strides), writeable=False)
        return np.ascontiguousarray(view)

    def to_mlx(self) -> mx.array:
        """Read the tensor into an mx.array of its dtype."""
        a = mx.array(self.numpy())
        if self.mx_dtype == mx.bfloat16:
            return a.view(mx.bfloat16)
        return a if a.dtype == self.mx_dtype else a.astype(self.mx_dtype)


def _is_dims(value) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_DIM for x in value)


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden): globals from `_ALLOWED` only, BUILD only
    on the plain dicts the file itself made, tensors that fit their storages."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, records, file: Path):
        super().__init__(io.BytesIO(data))
        self._records = records
        self._file = file
        self._storages: dict[str, _Storage] = {}
        self._viewed = 0  # elements of all tensors made so far

    def find_class(self, module, name):
        try:
            found = _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self._file}: refused: the pickle references {module}.{name}; "
                "only tensors and plain containers are allowed"
            ) from None
        return self.rebuild_tensor if found is _REBUILD else found

    def load_build(self):
        # BUILD sets an object's state; on an allowed global it would change how later files load.
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) not in (dict, collections.OrderedDict):
            raise UnsafeCheckpointError(f"{self._file}: refused: the pickle sets the state of a "
                                        f"{type(inst).__name__}; only plain dicts may carry state")
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafeCheckpointError(f"{self._file}: refused: unexpected object state in the pickle")
        if type(inst) is collections.OrderedDict:
            inst.__dict__.update(state)  # state_dict()'s `_metadata`

    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._file}: refused: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self._file}: storage record {key!r:.40} has an invalid size {numel!r:.40}")
        if key not in self._storages:
            np_dtype, mx_dtype = STORAGE_DTYPES[stype.name]
            start, size = self._records(key)
            if size < numel * np.dtype(np_dtype).itemsize:
                raise CheckpointError(f"{self._file}: storage record {key} is shorter than its {numel} elements")
            self._storages[key] = _Storage(self._file, key, start, numel, np_dtype, mx_dtype)
        return self._storages[key]

    def rebuild_tensor(self, storage, storage_offset, size, stride, *_ignored):
        if not isinstance(storage, _Storage):
            raise UnsafeCheckpointError("a tensor is rebuilt from something that is not a storage record")
        if (not _is_dims(size) or not _is_dims(stride) or len(size) != len(stride)
                or not _is_dims((storage_offset,))):
            raise CheckpointError("a tensor has an invalid size or stride")
        numel = math.prod(size)
        if numel:
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.numel:
                raise CheckpointError("a tensor reaches past the end of its storage record (truncated file?)")
            if numel > storage.numel:  # stride-0 views repeat the same bytes
                raise CheckpointError(f"a tensor of {numel} elements is larger than its storage record "
                                      f"data/{storage.key} of {storage.numel} (a stride-0 view?)")
        self._viewed += numel
        stored = sum(s.numel for s in self._storages.values())
        if self._viewed > VIEW_FACTOR * stored + 1024:
            raise CheckpointError(f"the tensors view their storage records more than {VIEW_FACTOR} times over")
        return PthTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


# (module, name) -> what the pickle gets instead. Nothing here can run code or be changed by a file.
_REBUILD = object()  # stands for the loading unpickler's own rebuild_tensor
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD,
    ("torch._utils", "_rebuild_tensor"): _REBUILD,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


def _member_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header (whose extra field can differ)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError("corrupt zip local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load_pth(path: str | Path) -> dict[str, PthTensor]:
    """Read a torch.save zip archive holding a (nested) dict of tensors, safely.

    Returns a flat dict name -> PthTensor (nested dicts joined with '.'); tensor data is read
    by `PthTensor.to_mlx`. Raises UnsafeCheckpointError if the pickle names anything but tensors
    and plain containers, CheckpointError if the file is truncated, corrupt, compressed (torch
    never compresses: refused before inflating), not a state dict, or a tensor overruns its storage.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        hint = " (legacy non-zip torch format is not supported)" if _looks_like_legacy(path) else ""
        raise CheckpointError(f"{path}: truncated or corrupt .pth archive: {e}{hint}") from None
    try:
        with zf, open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: not a torch checkpoint (no data.pkl in the archive)")
            prefix = pkl[0][: -len("data.pkl")]
            infos = {i.filename: i for i in zf.infolist()}

            def stored(name: str) -> tuple[int, int]:
                info = infos[name]
                if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses: refuse before inflating
                    raise CheckpointError(f"{path}: member {name} is compressed; torch never compresses, "
                                          "refusing to inflate it")
                start = _member_offset(fh, info)
                if start + info.file_size > size:
                    raise CheckpointError(f"{path}: member {name} extends past the end of the file")
                return start, info.file_size

            def read(name: str) -> bytes:
                start, n = stored(name)
                fh.seek(start)
                data = fh.read(n)
                if len(data) != n:
                    raise CheckpointError(f"{path}: member {name} is truncated")
                return data

            byteorder = prefix + "byteorder"
            if byteorder in names and read(byteorder).strip() not in (b"little", b""):
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
            data = read(pkl[0])

            def record(key: str) -> tuple[int, int]:
                name = f"{prefix}data/{key}"
                if name not in infos:
                    raise CheckpointError(f"{path}: storage record data/{key} is missing (truncated file?)")
                return stored(name)

            unpickler = _Unpickler(data, record, path)
            obj = _load(unpickler, path)
    except CheckpointError as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None

    out: dict[str, PthTensor] = {}
    _flatten(obj, "", out, path, 0)
    return out


def _load(unpickler: _Unpickler, path: Path):
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickle streams raise many types; none may escape as a traceback
        raise CheckpointError(f"{path}: corrupt pickle in .pth archive: {type(e).__name__}: {e}"[:300]) from None


def _flatten(obj, prefix: str, out: dict, path: Path, depth: int) -> None:
    if isinstance(obj, PthTensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        if depth >= MAX_NESTING:
            raise CheckpointError(f"{path}: state dict nested more than {MAX_NESTING} deep")
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{path}: state dict has a non-string key {k!r:.80}")
            _flatten(v, f"{prefix}{k}.", out, path, depth + 1)
    elif isinstance(obj, (int, float, str, bool, type(None), list, tuple)):
        pass  # training metadata (epochs, args) is harmless and unused
    else:
        raise CheckpointError(f"{path}: unexpected {type(obj).__name__} in the state dict")


def _looks_like_legacy(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x80\x02"
    except OSError:
        return False
