"""Failures a user can cause, and how a rule script reports them: one line naming the file
(and line or field) and the cause, never a bare traceback or a raw errno.

Every error class of lora-forge whose message already says that derives from `UserError`.
`explain()` turns the rest of the usual suspects into such a line: a full disk (ENOSPC,
EDQUOT, or the short writes numpy and the converter report as "N requested and M written"),
a missing or unreadable file. `rule_logging` prints it on the console; the traceback stays in
the rule's log file for whoever wants it."""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

# Below this many free bytes on an output's filesystem a failed write is taken for a full disk.
NEARLY_FULL_BYTES = 1 << 20
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|No space left on device|Disk quota exceeded", re.I)
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class UserError(Exception):
    """A failure the user can fix; the message names the file or field and the cause."""


class DiskFullError(UserError, OSError):
    """A write failed because the filesystem (or a quota) is full."""


def _existing_parent(path: str | os.PathLike) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(_existing_parent(path)).free
    except OSError:
        return None


def nearly_full(paths: Iterable[str | os.PathLike]) -> str | None:
    """The first of `paths` whose filesystem has (almost) no free space left, else None."""
    for path in paths:
        free = free_bytes(path)
        if free is not None and free < NEARLY_FULL_BYTES:
            return str(path)
    return None


def disk_full_message(path: str | os.PathLike, doing: str = "writing") -> str:
    free = free_bytes(path)
    left = f" ({free / 1e6:.1f} MB free)" if free is not None else ""
    return (
        f"{path}: no space left on device while {doing}{left}. Free some space (or raise the quota) "
        "and run the same command again: finished artifacts are kept and this step starts over. "
        "`loraforge plan TARGET` shows what a run needs; `export.merge_mode: consume` needs the least."
    )


def looks_like_disk_full(exc: BaseException | None = None, text: str = "") -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return bool(_SHORT_WRITE.search(text or (str(exc) if exc is not None else "")))


def explain(exc: BaseException, outputs: Iterable[str | os.PathLike] = ()) -> str | None:
    """One clear line for a failure a user can cause, or None for an unexpected one (a bug)."""
    outputs = [str(o) for o in outputs]
    if isinstance(exc, UserError):
        return str(exc)
    if looks_like_disk_full(exc):
        where = getattr(exc, "filename", None) or nearly_full(outputs) or (outputs[0] if outputs else "output")
        return disk_full_message(where)
    if nearly_full(outputs):  # a library that reports a failed write without errno (sentencepiece)
        return disk_full_message(nearly_full(outputs))
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        if exc.filename:
            return f"{exc.filename}: {exc.strerror or exc}"
        if str(exc):  # raised by a library (safetensors, transformers) with the file in the message only
            return str(exc)
    checkpoint = checkpoint_being_read(exc)
    if checkpoint is not None:
        return unreadable_checkpoint_message(checkpoint, exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text: {exc}"
    return None


# transformers' Trainer methods that read a checkpoint when training resumes -> the argument naming it
_CHECKPOINT_READERS = {"_load_from_checkpoint": "resume_from_checkpoint", "_load_optimizer_and_scheduler": "checkpoint",
                       "_load_rng_state": "checkpoint", "_load_scaler": "checkpoint", "load_from_json": "json_path"}


def checkpoint_being_read(exc: BaseException) -> str | None:
    """The checkpoint folder (or file) transformers was reading to resume training when `exc` was
    raised (a truncated optimizer.pt, a torn trainer_state.json, ...), else None."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        argument = _CHECKPOINT_READERS.get(tb.tb_frame.f_code.co_name)
        value = tb.tb_frame.f_locals.get(argument) if argument else None
        if isinstance(value, (str, os.PathLike)):
            found = str(value)
        tb = tb.tb_next
    return found


def unreadable_checkpoint_message(checkpoint: str, exc: BaseException) -> str:
    folder = Path(checkpoint).parent if Path(checkpoint).suffix == ".json" else Path(checkpoint)
    cause = (str(exc).strip().splitlines() or [""])[0][:200]
    return (f"{checkpoint}: cannot resume training from this checkpoint ({type(exc).__name__}: {cause}). "
            f"Move it aside (mv {folder} {folder}.bad) and run the same command again: training resumes "
            "from an earlier checkpoint, or starts over")
