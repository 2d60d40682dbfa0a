"""Writing files so that nothing is lost or half-written, and nothing that is not ours is replaced.

Every save writes a temporary file beside the target and renames it over the target. A rename
replaces whatever the target is, so the target is checked first: only a missing path or a regular
file (not a symbolic link, device node, FIFO or socket) may be replaced. Whole folders are
swapped in one step by `exchange_paths` where the system can.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
import sys
from pathlib import Path
from typing import Iterator, Union

from .errors import UnsafeOutputError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_replaceable", "exchange_paths"]

PathLike = Union[str, Path]


def check_replaceable(path: PathLike) -> Path:
    """Raise `UnsafeOutputError` unless `path` is missing or a regular file (links are not followed)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise UnsafeOutputError(f"{path}: cannot check the target: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeOutputError(f"{path}: is a symbolic link; refusing to replace it")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeOutputError(f"{path}: is not a regular file ({_kind(st.st_mode)}); refusing to replace it")
    return path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    `suffix` is appended to the temporary name (for writers that insist on an extension).
    The target is checked before anything is written and again just before the rename.
    """
    path = check_replaceable(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check_replaceable(path)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (see `atomic_path`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def exchange_paths(a: PathLike, b: PathLike) -> bool:
    """Atomically swap two existing paths (folders included): renameat2(RENAME_EXCHANGE) on Linux,
    renamex_np(RENAME_SWAP) on macOS.

    Returns False where no atomic swap is available (another system, or a filesystem without one),
    leaving both paths as they were; raises OSError when the swap itself fails.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if sys.platform.startswith("linux"):
            rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
        elif sys.platform == "darwin":
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        else:
            return False
    except (OSError, AttributeError):
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
