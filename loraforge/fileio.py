"""Small file helpers used everywhere: atomic outputs, a file's sha256 and reading a model's
config.json.

Atomic outputs: a file or folder is written under `<name>.partial` next to its final name and
renamed into place only when complete (`os.replace`, atomic on one filesystem), so a
half-written artifact never carries the final name; on an error the partial is removed. The
merge's resumable `.partial` folder (loraforge.merge) and the GGUF quantizer's release path
(loraforge.gguf) keep their own, richer protocols but use the same suffix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from loraforge.errors import UserError

PARTIAL_SUFFIX = ".partial"


class ConfigFileError(UserError, ValueError):
    """A model's config.json that is not a JSON object; the message names the file."""


def partial_path(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is complete: `<path>.partial`."""
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield `<path>.partial` (a stale one from a killed run removed) to write a file or a
    folder into; when the block ends without an error it replaces `path` (an existing folder
    is removed first), else it is removed. fsync=True flushes a file to disk before the rename
    (for outputs that must survive a power loss, not only a crash)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    _remove(tmp)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if tmp.is_dir() and final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write a text file atomically (see `atomic_output`); returns its path."""
    with atomic_output(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, fsync: bool = False) -> Path:
    """Write `obj` as indented JSON (non-JSON values via str) atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n", fsync=fsync)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, hex (read in blocks: any size). The one file digest of the
    project: adapters, datasets, base shards, hub uploads."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_hf_config(model: str | os.PathLike, *, required: bool = False) -> dict | None:
    """A Hugging Face model's config.json as a dict: `model` is a model folder or the file.
    A missing file gives None, or FileNotFoundError naming it when `required`; a file that is
    not a JSON object gives ValueError naming it."""
    p = Path(model)
    if p.suffix != ".json":
        p = p / "config.json"
    try:
        text = p.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        if required:
            raise FileNotFoundError(f"{p} not found: is {p.parent} a Hugging Face model folder?") from None
        return None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigFileError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigFileError(f"{p}: a config.json must hold a JSON object, not {type(cfg).__name__}")
    return cfg
