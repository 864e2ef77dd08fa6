"""Resumable output: the append-only journal of finished shards, placing untouched shards
(link, move or copy), and what to delete when an interrupted merge cannot be resumed."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any

from loraforge.merge.common import LINK_FALLBACK_ERRNOS, MergeError, TMP_SUFFIX, recovery_hint
from loraforge.safetensors_io import copy_file

log = logging.getLogger(__name__)

class Journal:
    """Append-only, fsynced record of the shards finished in a partial output, one JSON object a
    line. The first line fingerprints the merge so that a rerun only resumes the same merge."""

    def __init__(self, path: str, fingerprint: dict[str, Any], entries: dict[str, dict[str, Any]]):
        self.path, self.fingerprint, self.entries = path, fingerprint, entries

    @classmethod
    def create(cls, path: str, fingerprint: dict[str, Any]) -> Journal:
        journal = cls(path, fingerprint, {})
        with open(path, "w") as f:
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(os.path.dirname(path))
        return journal

    @classmethod
    def load(cls, path: str) -> Journal:
        with open(path, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a kill can leave a torn last line: drop it
        if len(complete) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(complete))
        try:
            lines = [json.loads(line) for line in complete.splitlines()]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MergeError(f"{path} is corrupt ({e}): {recovery_hint(os.path.dirname(path))}") from None
        if not lines or "fingerprint" not in lines[0] or any("shard" not in entry for entry in lines[1:]):
            raise MergeError(f"{path} is not a merge journal: {recovery_hint(os.path.dirname(path))}")
        return cls(path, lines[0]["fingerprint"], {entry["shard"]: entry for entry in lines[1:]})

    def record(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[entry["shard"]] = entry




def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_base_shard(path: str) -> None:
    """Remove a consumed base shard: the file, and the link to it in a Hugging Face cache snapshot."""
    real = os.path.realpath(path)
    if os.path.islink(path):
        os.unlink(path)
    if os.path.exists(real):
        os.remove(real)


def _place_untouched_shard(src: str, final: str, tmp: str, mode: str) -> tuple[str, int]:
    """Link, move or copy a shard that has no targeted tensor; returns (action, bytes written)."""
    if mode == "link":
        try:
            os.link(src, final)
            return "linked", 0
        except OSError as e:
            if e.errno not in LINK_FALLBACK_ERRNOS:
                raise
            log.info("cannot hard-link %s (%s); copying", src, os.strerror(e.errno))
    elif mode == "consume":
        try:
            os.rename(src, final)
            return "moved", 0
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            log.info("cannot move %s across filesystems; copying", src)
    written = copy_file(src, tmp)
    os.rename(tmp, final)
    return "copied", written


def _open_journal(partial_dir: str, journal_path: str, fingerprint: dict[str, Any]) -> Journal:
    """Resume the journal of an interrupted run of the same merge, or start a new one."""
    if os.path.exists(journal_path):
        journal = Journal.load(journal_path)
        if journal.fingerprint != fingerprint:
            _discard_stale_partial(partial_dir, journal.fingerprint, fingerprint)
            return _open_journal(partial_dir, journal_path, fingerprint)
        for name in os.listdir(partial_dir):
            if name.endswith(TMP_SUFFIX):
                os.remove(os.path.join(partial_dir, name))
        log.info("resuming %s: %d shards already done", partial_dir, len(journal.entries))
        return journal
    if os.path.exists(partial_dir) and os.listdir(partial_dir):
        raise MergeError(f"{partial_dir} exists but holds no merge journal: {recovery_hint(partial_dir)}")
    os.makedirs(partial_dir, exist_ok=True)
    return Journal.create(journal_path, fingerprint)


def _discard_stale_partial(partial_dir: str, recorded: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Remove the partial output of a merge of other inputs (say, an adapter retrained since),
    unless it was a consume-mode merge: then it holds base shards that exist nowhere else."""
    differ = sorted(k for k in fingerprint if recorded.get(k) != fingerprint[k])
    if recorded.get("mode") == "consume":
        raise MergeError(
            f"{partial_dir} holds an interrupted consume-mode merge of other inputs (they differ in {differ}) "
            "and with it base shards that exist nowhere else: rerun that merge to finish it"
        )
    log.info("removing %s, the partial output of a merge of other inputs (%s)", partial_dir, differ)
    shutil.rmtree(partial_dir)
