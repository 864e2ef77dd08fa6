"""What a base model's weights are: the sha256 of each safetensors shard, computed once when the
base is built or fetched and kept beside it in `<base>.complete` (the flag that says the base's
weights are all there; a consume-mode merge removes it with the weights). Later readers re-check
it cheaply: a shard whose size and mtime are the recorded ones keeps its recorded digest, any
other is hashed again. A shard the flag lists but the folder no longer holds (moved out by a
consume-mode merge that is still under way) keeps its recorded digest: the flag says what the
base is until the merge removes it.

A user's own `path:` base has no flag: its digests are cached in a file under results/ (never in
the user's folder), with the same size-and-mtime check."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraforge.errors import UserError
from loraforge.fileio import sha256_file, write_json_atomic

FORMAT = 1
COMPLETE_SUFFIX = ".complete"
WEIGHT_GLOB = "*.safetensors"


class BaseWeightsMissing(UserError, FileNotFoundError):
    """A base folder without its weights; the message says how to get them back."""


def require_weights(base_dir: str | os.PathLike) -> None:
    """Refuse a base folder without safetensors shards (not built or fetched yet, or used up by a
    consume-mode merge), naming the target that brings it back."""
    base = Path(base_dir)
    if not base.is_dir():
        raise BaseWeightsMissing(f"base model folder {base} is missing: build or fetch it first "
                                 f"(snakemake --cores 1 {complete_flag(base)}), or fix the base's path")
    if not any(base.glob(WEIGHT_GLOB)):
        raise BaseWeightsMissing(f"{base} has no *.safetensors weights (a consume-mode merge uses them up): "
                                 f"build or fetch them again with snakemake --cores 1 {complete_flag(base)}")


def complete_flag(base_dir: str | os.PathLike) -> Path:
    """results/<model>/base -> results/<model>/base.complete"""
    base = Path(base_dir)
    return base.with_name(base.name + COMPLETE_SUFFIX)


def read_manifest(path: str | os.PathLike | None) -> dict[str, dict]:
    """shard name -> {size, mtime_ns, sha256} as recorded; {} when there is no usable record (no
    file, an empty flag of an older lora-forge, a torn file)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    shards = data.get("shards") if isinstance(data, dict) else None
    return shards if isinstance(shards, dict) else {}


def _entry(path: Path, sha256: str | None = None) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or sha256_file(path)}


def _fresh(recorded: dict | None, path: Path) -> bool:
    if not recorded:
        return False
    st = path.stat()
    return recorded.get("size") == st.st_size and recorded.get("mtime_ns") == st.st_mtime_ns and "sha256" in recorded


def shard_entries(base_dir: str | os.PathLike, manifest: str | os.PathLike | None = None) -> dict[str, dict]:
    """shard name -> {size, mtime_ns, sha256} of the base's weights: the recorded entry where the
    shard's size and mtime are unchanged, a new digest otherwise; a recorded shard missing from
    the folder keeps its record."""
    base = Path(base_dir)
    recorded = read_manifest(manifest)
    out = {name: dict(entry) for name, entry in recorded.items() if not (base / name).exists()}
    for shard in sorted(base.glob(WEIGHT_GLOB)):
        entry = recorded.get(shard.name)
        out[shard.name] = dict(entry) if _fresh(entry, shard) else _entry(shard)
    return dict(sorted(out.items()))


def weight_digests(base_dir: str | os.PathLike, manifest: str | os.PathLike | None = None,
                   cache: str | os.PathLike | None = None) -> dict[str, str] | None:
    """shard name -> sha256, or None when the base has no weights (not built or fetched yet, or
    used up by a consume-mode merge). `manifest`: the base's flag (default `<base>.complete`);
    `cache`: for a user's own folder, a file this function keeps up to date instead."""
    source = cache if cache is not None else manifest if manifest is not None else complete_flag(base_dir)
    entries = shard_entries(base_dir, source)
    if not entries:
        return None
    if cache is not None and entries != read_manifest(cache):
        write_manifest_entries(cache, entries)
    return {name: e["sha256"] for name, e in entries.items()}


def write_manifest_entries(path: str | os.PathLike, entries: dict[str, dict]) -> Path:
    return write_json_atomic(path, {"format": FORMAT, "shards": entries})


def write_manifest(base_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Hash every shard of a freshly built or fetched base and write the flag (`<base>.complete`
    by default) that says its weights are all there and what they are."""
    base = Path(base_dir)
    shards = sorted(base.glob(WEIGHT_GLOB))
    if not shards:
        raise FileNotFoundError(f"{base}: no *.safetensors shards: the base's weights are missing")
    return write_manifest_entries(path or complete_flag(base), {p.name: _entry(p) for p in shards})
