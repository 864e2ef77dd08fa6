"""A hub model's weights, config and tokenizer as a plain local folder (the fetch_base rule).

    1. resolve the revision (a branch, tag or commit) to a commit sha with `model_info`: a
       missing repo, a missing revision or a network failure stops here with one line;
    2. `snapshot_download(revision=<sha>, local_dir=<out>.partial)`: files finished in an
       earlier attempt are kept (huggingface_hub's local-dir metadata records their commit);
       a file cut off mid-way is resumed with a Range request inside the same call, and in
       huggingface_hub 1.33 a failed file's temporary copy is removed, so a rerun fetches that
       file again from its start;
    3. every wanted file of the commit's listing must be there with the listed size, and LFS
       files with the listed sha256; a mismatch is deleted (so a rerun fetches it again) and
       the fetch fails;
    4. only then is `<out>.partial` renamed to `<out>`.

Why not snapshot_download alone: when the hub cannot be reached (or answers 5xx) and the
local_dir already holds files, snapshot_download (1.33) returns that folder with only a
warning, complete or not (`_snapshot_download.py`, "Returning existing local_dir"): a rerun
after an interrupted download during a hub outage would have renamed half a model into
place. Resolving the commit ourselves (errors raised) and checking the files closes that."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from loraforge.fileio import partial_path, sha256_file
from loraforge.hub.errors import HubError, endpoint, hub_errors

log = logging.getLogger(__name__)

# What the pipeline needs from a model repo (no .bin/.pth duplicates, no GGUFs, no images).
BASE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "LICENSE*"]
MANIFEST = ".lora-forge-fetch.json"  # inside the partial folder while fetching; removed at the end


class IncompleteDownloadError(HubError):
    """Files of the fetched folder do not match the hub's listing."""


def start_partial(folder: Path, repo_id: str, revision: str | None, commit: str) -> None:
    """The folder a fetch downloads into, marked with the commit it is for; one left by an attempt
    at another commit (the pin changed between attempts) starts over, one of this commit resumes."""
    manifest = folder / MANIFEST
    if folder.exists() and (not manifest.is_file() or json.loads(manifest.read_text()).get("commit") != commit):
        log.info("removing %s: left by an attempt at another revision", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"repo_id": repo_id, "revision": revision, "commit": commit}) + "\n")


def resolve_commit(api, repo_id: str, revision: str | None) -> str:
    """The commit sha a revision names; errors name the repo (HubError)."""
    with hub_errors(repo_id, revision, doing="looking up the model"):
        info = api.model_info(repo_id, revision=revision)
    if not info.sha:
        raise HubError(f"{repo_id}@{revision or 'main'}: the hub did not say which commit this revision is")
    return info.sha


def wanted_files(api, repo_id: str, commit: str, patterns: list[str]) -> dict[str, dict]:
    """path -> {size, sha256 (LFS files only)} of the commit's files matching `patterns`."""
    from huggingface_hub import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    with hub_errors(repo_id, commit, doing="listing the files"):
        entries = {e.path: e for e in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                   if isinstance(e, RepoFile)}
    keep = set(filter_repo_objects(list(entries), allow_patterns=patterns))
    return {
        p: {"size": e.lfs.size if e.lfs else e.size, "sha256": e.lfs.sha256 if e.lfs else None}
        for p, e in sorted(entries.items())
        if p in keep
    }


def check_files(folder: Path, expected: dict[str, dict], *, label: str) -> None:
    """Every expected file present with its size (and sha256 for LFS files); a wrong file is
    removed, with huggingface_hub's metadata of it, so the next attempt downloads it again."""
    problems = []
    for rel, want in expected.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} missing")
            continue
        size = path.stat().st_size
        bad = None
        if size != want["size"]:
            bad = f"{rel} has {size} bytes, the hub lists {want['size']}"
        elif want["sha256"] and sha256_file(path) != want["sha256"]:
            bad = f"{rel} sha256 differs from the hub's"
        if bad:
            problems.append(bad)
            path.unlink()
            (folder / ".cache" / "huggingface" / "download" / f"{rel}.metadata").unlink(missing_ok=True)
    if problems:
        raise IncompleteDownloadError(
            f"{label}: download incomplete ({'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}); "
            "run the same command again to fetch what is missing"
        )


def fetch_base(
    repo_id: str,
    out_dir: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    patterns: list[str] | None = None,
) -> Path:
    """Download `repo_id` at `revision` into the plain folder `out_dir` (real files, no cache
    symlinks: a consume-mode merge may move them). Returns `out_dir`."""
    from huggingface_hub import HfApi, snapshot_download

    patterns = patterns or BASE_PATTERNS
    out = Path(out_dir)
    partial = partial_path(out)
    api = HfApi(endpoint=endpoint(), token=token)
    commit = resolve_commit(api, repo_id, revision)
    label = f"{repo_id}@{revision or 'main'}"
    log.info("fetching %s (commit %s) into %s", label, commit, partial)

    start_partial(partial, repo_id, revision, commit)

    expected = wanted_files(api, repo_id, commit, patterns)
    if not any(p.endswith(".safetensors") for p in expected):
        raise HubError(f"{label}: the repo has no safetensors weights (lora-forge reads only safetensors)")
    log.info("%d files, %.1f MB", len(expected), sum(f["size"] for f in expected.values()) / 1e6)

    with hub_errors(repo_id, revision, doing="downloading"):
        snapshot_download(repo_id=repo_id, revision=commit, local_dir=partial, token=token, allow_patterns=patterns,
                          endpoint=endpoint())
    check_files(partial, expected, label=label)

    shutil.rmtree(partial / ".cache", ignore_errors=True)
    (partial / MANIFEST).unlink()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    log.info("fetched %s (commit %s): %d files checked against the hub's listing", label, commit, len(expected))
    return out
