"""Containment: the files a checkpoint names must be inside its folder.

A name (an index's shard, a tokenizer file) resolves inside the model folder's tree; symbolic
links are followed only to targets in that tree or, for a Hugging Face cache snapshot
(`.../models--org--name/snapshots/<rev>/`), to that cache repository's `blobs/`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Union

from .errors import CheckpointError, OutsideModelError

__all__ = ["allowed_roots", "check_folder_files", "is_inside", "resolve_inside"]

PathLike = Union[str, Path]


def allowed_roots(folder: PathLike) -> tuple[Path, ...]:
    """The resolved folder, plus its cache repository's blobs/ when it is a Hugging Face snapshot."""
    root = Path(folder).resolve()
    roots = [root]
    snapshots = root.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        roots.append(snapshots.parent / "blobs")
    return tuple(roots)


def is_inside(path: PathLike, roots: tuple[Path, ...]) -> bool:
    target = Path(path).resolve()
    return any(target == r or r in target.parents for r in roots)


def resolve_inside(folder: PathLike, name: PathLike, *, what: str = "file",
                   error: type[CheckpointError] = CheckpointError) -> Path:
    """`folder / name`, checked: inside the folder's tree (links included) and a regular file.

    Raises OutsideModelError when it resolves outside, `error` when it is missing or not a regular file.
    """
    folder = Path(folder)
    if not isinstance(name, (str, Path)) or not str(name) or "\x00" in str(name):
        raise OutsideModelError(f"{folder}: {what} name {name!r} is not a file name")
    path = folder / name
    if Path(name).is_absolute():
        raise OutsideModelError(f"{path}: {what} is an absolute path, outside the model folder {folder}")
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise OutsideModelError(f"{path}: cannot resolve {what}: {e}") from None
    if not is_inside(target, allowed_roots(folder)):
        raise OutsideModelError(f"{path}: {what} resolves outside the model folder {folder} (to {target})")
    try:
        st = os.stat(target)
    except OSError:
        raise error(f"{path}: {what} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {what} is not a regular file")
    return path


def check_folder_files(folder: PathLike, names, *, what: str = "file",
                       error: type[Exception] = CheckpointError) -> list[Path]:
    """Those of `names` present in `folder` (links included), each checked by `resolve_inside`."""
    folder = Path(folder)
    return [resolve_inside(folder, n, what=what, error=error) for n in names
            if (folder / n).is_symlink() or (folder / n).exists()]
