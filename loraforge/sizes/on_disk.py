"""Measuring what exists: bytes a file or folder really takes (sparse files counted by their
allocated blocks, hard links once)."""

from __future__ import annotations

import os
import stat as _stat
from typing import Iterable


def file_bytes(st: os.stat_result) -> int:
    """The bytes a file takes: its apparent size (st_size), or its allocated blocks when
    fewer (a sparse file: holes take no space)."""
    blocks = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else min(st.st_size, blocks * 512)


def measure(paths: Iterable[str | os.PathLike], seen: set | None = None) -> tuple[int, dict[str, int]]:
    """Bytes under each path (`file_bytes`: apparent sizes, holes of sparse files not
    counted), counting every inode once across all the paths (hard links, and symlinks to files such as HF cache blobs, are followed and
    counted once; symlinked directories are not entered). Files that vanish while walking
    are skipped. Returns (total, {path: bytes}) where a shared inode counts for the first
    path that reaches it."""
    seen = set() if seen is None else seen
    per: dict[str, int] = {}
    total = 0
    for p in paths:
        key = str(p)
        n = 0
        for st in _walk_stats(key):
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            n += file_bytes(st)
        per[key] = per.get(key, 0) + n
        total += n
    return total, per


def _walk_stats(path: str):
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    if not _stat.S_ISDIR(st.st_mode):
        if _stat.S_ISREG(st.st_mode):
            yield st
        return
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    est = entry.stat(follow_symlinks=True)
                except (FileNotFoundError, NotADirectoryError, PermissionError):
                    continue
                if _stat.S_ISREG(est.st_mode):
                    yield est


def path_bytes(path: str | os.PathLike) -> int | None:
    """Measured bytes of a file or folder, or None when it does not exist."""
    if not os.path.lexists(path):
        return None
    return measure([path])[0]


def actual_or_estimate(path: str | os.PathLike, estimate: int | None) -> int:
    """The real size when the path exists, else the estimate (0 when there is none)."""
    actual = path_bytes(path)
    if actual is not None:
        return actual
    return int(estimate or 0)
