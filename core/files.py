"""Atomic files and folders: a reader finds the old complete version or the new one, never a part of either.

Every write here goes to a hidden staging name beside its target (same folder, so the same file system), is
flushed to disk (``fsync`` of the data, then of the folder that names it) and only then takes the target's name.
A process killed at any point leaves the target as it was plus, at worst, a hidden leftover (``.NAME.*``) that no
reader opens and that the next write of the same target removes. One writer per target at a time.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PathLike = str | os.PathLike
Content = bytes | str | Callable[[Path], object]  # a callable writes the file at the staging path it is given


def fsync_path(path: PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk (some file systems refuse it for folders: ignored)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def replace_file(staged: PathLike, target: PathLike) -> None:
    """Give a finished file its final name: flush it, ``os.replace`` it over ``target``, flush the folder."""
    fsync_path(staged)
    os.replace(staged, target)
    fsync_path(Path(target).parent)


def atomic_write(path: PathLike, content: Content) -> Path:
    """Write ``content`` (bytes, text, or a callable that writes the file at the path it is given, e.g.
    ``lambda p: save_file(tensors, p)``) to ``path`` so that readers see the old file or the new one."""
    path = Path(path)
    staged = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")  # writers may go by the suffix
    try:
        if isinstance(content, bytes):
            staged.write_bytes(content)
        elif isinstance(content, str):
            staged.write_text(content, encoding="utf-8")
        else:
            content(staged)
        replace_file(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path


def write_json(path: PathLike, payload: object) -> Path:
    """``atomic_write`` of ``payload`` as indented JSON with sorted keys."""
    return atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@contextmanager
def atomic_folder(target: PathLike) -> Iterator[Path]:
    """Build a folder in the staging folder this yields; when the block ends without an error it is flushed and
    swapped in at ``target``, and the old ``target`` (if any) removed after that. An error leaves ``target`` as it was.

    Where the system can exchange two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs,
    tmpfs, ...), ``target`` names a complete folder at every instant. Elsewhere the old folder is renamed aside for
    the moment between two renames; after a crash in that moment, the next write of ``target`` puts it back first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    staging = _sibling(target, "staging")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap, the old folder lies under the staging name


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def _leftovers(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"))


def recover_folder(target: PathLike) -> None:
    """Undo what a killed ``atomic_folder`` left: a folder moved aside is put back if ``target`` is missing, staging
    folders (never complete, never read) are removed. ``atomic_folder`` calls it first; a reader may call it too."""
    target = Path(target)
    for aside in _leftovers(target, "old"):
        if not target.exists():
            os.replace(aside, target)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for staging in _leftovers(target, "staging"):
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def _swap_in(staging: Path, target: Path) -> None:
    if not (target.exists() or target.is_symlink()):
        os.replace(staging, target)
    elif not _exchange(staging, target):
        aside = _sibling(target, "old")
        os.replace(target, aside)
        os.replace(staging, target)
        shutil.rmtree(aside)
    fsync_path(target.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (glibc 2.28+), or None on systems without it."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where this system or file system cannot (the caller falls back)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
