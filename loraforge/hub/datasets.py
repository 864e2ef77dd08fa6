"""A hub dataset's split as local JSON lines (the fetch_dataset rule), fetched like a base
(`loraforge.hub.download`): the revision resolved to a commit, the repo's data files
downloaded into `<rows>.partial/` (kept for a rerun at the same commit), each checked against
the hub's listing (size, LFS sha256), then read by the `datasets` library from that folder and
written atomically as `<rows>` (one row per line, as the hub has it; the format is detected
later, like any sample file's), with a record of repo, revision, commit and files beside it.
The partial folder goes once both are written: nothing half-fetched ever has the final name."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

from loraforge.fileio import atomic_output, partial_path, write_json_atomic
from loraforge.hub.download import MANIFEST, check_files, sha256_file, start_partial
from loraforge.hub.errors import HubError, endpoint, hub_errors

log = logging.getLogger(__name__)

# The files `datasets` can build a split from, and the card whose YAML may name the splits' files.
DATA_PATTERNS = ["*.parquet", "*.jsonl", "*.json", "*.jsonl.gz", "*.json.gz", "*.csv", "*.arrow", "README.md"]


@contextlib.contextmanager
def dataset_errors(repo_id: str, revision: str | None, *, doing: str) -> Iterator[None]:
    """`hub_errors`, saying dataset where it says model."""
    try:
        with hub_errors(repo_id, revision, doing=doing):
            yield
    except HubError as exc:
        raise HubError(str(exc).replace("no such model repo", "no such dataset repo")) from None


def _listing(api, repo_id: str, revision: str | None) -> tuple[str, dict[str, dict]]:
    """(commit, path -> {size, sha256}) of the dataset's data files at `revision`."""
    from huggingface_hub import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    with dataset_errors(repo_id, revision, doing="looking up the dataset"):
        commit = api.dataset_info(repo_id, revision=revision).sha
    if not commit:
        raise HubError(f"{repo_id}@{revision or 'main'}: the hub did not say which commit this revision is")
    with dataset_errors(repo_id, commit, doing="listing the dataset's files"):
        entries = {e.path: e for e in api.list_repo_tree(repo_id, revision=commit, recursive=True, repo_type="dataset")
                   if isinstance(e, RepoFile)}
    keep = set(filter_repo_objects(list(entries), allow_patterns=DATA_PATTERNS))
    files = {p: {"size": e.lfs.size if e.lfs else e.size, "sha256": e.lfs.sha256 if e.lfs else None}
             for p, e in sorted(entries.items()) if p in keep}
    if not any(p != "README.md" for p in files):
        raise HubError(f"{repo_id}@{revision or 'main'}: the dataset has no data files ({', '.join(DATA_PATTERNS[:-1])})")
    return commit, files


def _download(repo_id: str, revision: str | None, commit: str, folder: Path, token: str | None) -> None:
    """snapshot_download into `folder`, which an attempt at another commit leaves emptied first."""
    from huggingface_hub import snapshot_download

    start_partial(folder, repo_id, revision, commit)
    with dataset_errors(repo_id, revision, doing="downloading the dataset"):
        snapshot_download(repo_id=repo_id, repo_type="dataset", revision=commit, local_dir=folder, token=token,
                          allow_patterns=DATA_PATTERNS, endpoint=endpoint())


def _rows(folder: Path, label: str, split: str):
    """The split's rows, read by `datasets` from the local files (streamed: no cache written)."""
    from datasets import load_dataset

    try:
        return load_dataset(str(folder), split=split, streaming=True)
    except ValueError as exc:  # a split the dataset does not have names the ones it has
        shutil.rmtree(folder)  # the files are fine, but no rerun of this entry can use them
        raise HubError(f"{label}: {exc}; set split: in the data.samples entry") from None


def fetch_dataset(repo_id: str, split: str, rows_path, record_path, revision: str | None = None,
                  token: str | None = None) -> int:
    """Fetch `repo_id`'s `split` at `revision` into `rows_path` (JSON lines) and `record_path`;
    returns the number of rows. Errors name the repo (HubError)."""
    from huggingface_hub import HfApi

    label = f"{repo_id}@{revision or 'main'}"
    api = HfApi(endpoint=endpoint(), token=token)
    commit, files = _listing(api, repo_id, revision)
    folder = partial_path(Path(rows_path).with_suffix(".files"))  # not <rows>.partial: atomic_output's
    log.info("fetching dataset %s (commit %s, %d files) into %s", label, commit, len(files), folder)
    _download(repo_id, revision, commit, folder, token)
    check_files(folder, files, label=label)
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    (folder / MANIFEST).unlink()
    count = 0
    with atomic_output(rows_path, fsync=True) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for row in _rows(folder, label, split):
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            count += 1
    if not count:
        Path(rows_path).unlink()
        raise HubError(f"{label}: split {split!r} has no rows")
    write_json_atomic(record_path, {"repo_id": repo_id, "revision": revision, "commit": commit, "split": split,
                                    "rows": count, "sha256": sha256_file(rows_path), "files": files}, fsync=True)
    shutil.rmtree(folder)
    log.info("fetched %s split %s: %d rows from %d files checked against the hub's listing", label, split, count,
             len(files))
    return count
