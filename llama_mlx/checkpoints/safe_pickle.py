"""Read PyTorch `.pth` zip archives without torch and without running pickle code.

The pickle may only name torch's tensor-rebuild functions, its storage classes and OrderedDict;
each is mapped to a function of ours that builds a numpy view on the archive's `data/` records,
memory-mapped from the file. Anything else refuses the whole file with UnsafeCheckpointError.
"""

from __future__ import annotations

import collections
import mmap
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


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass
class PthTensor:
    """A tensor of a .pth file: a strided numpy view of a memory-mapped storage record."""

    __slots__ = ("array", "mx_dtype", "file")
    array: np.ndarray  # uint16 for bfloat16
    mx_dtype: mx.Dtype
    file: Path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def numpy(self) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 as its raw uint16 bits); a view, no copy."""
        return self.array

    def to_mlx(self) -> mx.array:
        """Copy the tensor into an mx.array of its dtype."""
        a = mx.array(np.ascontiguousarray(self.array))
        if self.mx_dtype == mx.bfloat16:
            return a.view(mx.bfloat16)
        return a if a.dtype == self.mx_dtype else a.astype(self.mx_dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("a tensor is rebuilt from something that is not a storage record")
    if len(size) != len(stride) or any(not isinstance(x, int) or x < 0 for x in (*size, *stride, storage_offset)):
        raise CheckpointError("a tensor has an invalid size or stride")
    base = storage.array
    item = base.itemsize
    if size and all(s > 0 for s in size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= base.shape[0]:
            raise CheckpointError("a tensor reaches past the end of its storage record (truncated file?)")
    view = np.lib.stride_tricks.as_strided(
        base[storage_offset:], shape=tuple(size), strides=tuple(s * item for s in stride), writeable=False
    )
    return PthTensor(view, storage.mx_dtype, storage.file)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


@dataclass
class _Storage:
    array: np.ndarray  # 1-D, the whole record
    mx_dtype: mx.Dtype
    file: Path


# (module, name) -> what the pickle gets instead. Nothing here can run code.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, records, file: Path):
        import io

        super().__init__(io.BytesIO(data))
        self._records = records
        self._file = file
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._file}: refused: the pickle references {module}.{name}; "
                "only tensors and plain containers are allowed"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._file}: refused: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if key not in self._storages:
            np_dtype, mx_dtype = STORAGE_DTYPES[stype.name]
            raw = self._records(str(key))
            itemsize = np.dtype(np_dtype).itemsize
            if not isinstance(numel, int) or len(raw) < numel * itemsize:
                raise CheckpointError(f"{self._file}: storage record {key} is shorter than its {numel} elements")
            array = np.frombuffer(raw, dtype=np_dtype, count=numel)
            self._storages[key] = _Storage(array, mx_dtype, self._file)
        return self._storages[key]


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

    Returns a flat dict name -> PthTensor (nested dicts joined with '.'). Raises
    UnsafeCheckpointError if the pickle names anything but tensors and plain containers,
    CheckpointError if the file is truncated, corrupt or not a state dict.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError) as e:
        hint = " (legacy non-zip torch format is not supported)" if _looks_like_legacy(path) else ""
        raise CheckpointError(f"{path}: truncated or corrupt .pth archive: {e}{hint}") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: not a torch checkpoint (no data.pkl in the archive)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: corrupt .pth archive: {e}") from None
        infos = {i.filename: i for i in zf.infolist()}

    fh = open(path, "rb")
    try:
        size = fh.seek(0, 2)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    finally:
        fh.close()  # the mapping stays valid without the descriptor

    def record(key: str) -> memoryview | bytes:
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"{path}: storage record data/{key} is missing (truncated file?)")
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; read it if someone did
            with zipfile.ZipFile(path) as z:
                return z.read(info)
        with open(path, "rb") as f:
            start = _member_offset(f, info)
        if start + info.file_size > size:
            raise CheckpointError(f"{path}: storage record data/{key} extends past the end of the file")
        return memoryview(mm)[start : start + info.file_size]

    try:
        obj = _Unpickler(data, record, path).load()
    except CheckpointError as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except Exception as e:  # malformed pickle streams raise many types; none may escape as a traceback
        raise CheckpointError(f"{path}: corrupt pickle in .pth archive: {type(e).__name__}: {e}") from None

    out: dict[str, PthTensor] = {}
    _flatten(obj, "", out, path)
    return out


def _flatten(obj, prefix: str, out: dict, path: Path) -> None:
    if isinstance(obj, PthTensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{path}: state dict has a non-string key {k!r}")
            _flatten(v, f"{prefix}{k}.", out, path)
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
