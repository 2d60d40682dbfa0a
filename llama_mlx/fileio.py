"""Writing files so that nothing is lost or half-written, and nothing that is not ours is replaced.

Every save writes a new temporary file beside the target and renames it over the target. The
temporary file has a random name and is created exclusively (`O_EXCL | O_NOFOLLOW`), so nothing
planted in the folder beforehand can take its place, and it is written through the descriptor that
created it, never by name. A rename replaces whatever the target is, so the target is checked
first: only a missing path or a regular file (not a symbolic link, device node, FIFO or socket)
may be replaced. Files saved together (`atomic_files`) are saved all or none. Whole folders are
swapped in one step by `exchange_paths` where the system can.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence, Union

from .errors import UnsafeOutputError

__all__ = ["atomic_files", "atomic_write_bytes", "atomic_write_text", "check_replaceable", "exchange_paths"]

PathLike = Union[str, Path]
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


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


def _random_name(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(12)}.{what}")


def _create_temp(path: Path) -> tuple[Path, BinaryIO]:
    # O_EXCL fails on anything already there, a planted link included: the file is surely new and ours.
    while True:
        tmp = _random_name(path, "tmp")
        try:
            fd = os.open(tmp, _CREATE, 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "wb")


@contextlib.contextmanager
def atomic_files(paths: Sequence[PathLike]) -> Iterator[list[BinaryIO]]:
    """Save several files as one: yields binary files, one per path, each open on a new temporary
    file beside its path. When the block ends without error they are fsynced and renamed over their
    paths, all or none: a rename that fails puts back what the ones before it replaced.

    Only a missing path or a regular file is replaced (`UnsafeOutputError` otherwise), checked before
    anything is written and again just before the renames. On any error no temporary file is left.
    """
    paths = [check_replaceable(p) for p in paths]
    temps: list[Path] = []
    files: list[BinaryIO] = []
    try:
        for path in paths:
            tmp, f = _create_temp(path)
            temps.append(tmp)
            files.append(f)
        yield files
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for path in paths:
            check_replaceable(path)
        _rename_all(temps, paths)
    finally:
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _rename_all(temps: list[Path], paths: list[Path]) -> None:
    """Rename each temp over its path; on failure, undo the renames done (their old files kept until then)."""
    done: list[tuple[Path, Path | None]] = []  # (path, where its old file waits; None: there was none)
    backups: list[Path] = []
    try:
        for i, (tmp, path) in enumerate(zip(temps, paths)):
            last = i == len(paths) - 1  # nothing after it can fail: no need to keep its old file
            if last or not os.path.lexists(path):
                os.replace(tmp, path)
                done.append((path, None))
            elif exchange_paths(tmp, path):  # one step; the old file now waits under the temp's name
                done.append((path, tmp))
            else:
                backup = _backup(path)
                backups.append(backup)
                os.replace(tmp, path)
                done.append((path, backup))
    except BaseException:
        for path, old in reversed(done):
            with contextlib.suppress(OSError):
                if old is None:
                    os.unlink(path)
                else:
                    os.replace(old, path)
        raise
    finally:
        for backup in backups:
            with contextlib.suppress(OSError):
                backup.unlink()


def _backup(path: Path) -> Path:
    """A second name for `path`'s file (a hard link; a rename where links are not supported)."""
    while True:
        backup = _random_name(path, "old")
        try:
            os.link(path, backup, follow_symlinks=False)
            return backup
        except FileExistsError:
            continue
        except OSError:
            if os.path.lexists(backup):
                continue
            os.rename(path, backup)
            return backup


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_files`)."""
    with atomic_files([path]) as (f,):
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (see `atomic_files`)."""
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
