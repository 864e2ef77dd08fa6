"""Publish a model to the hub (the upload_hub rule): the adapter folder and the chosen GGUFs,
each repo with a generated model card, in one commit per repo (`create_commit`: atomic, unlike
`upload_folder`, which may split a large upload into several commits), then verified: the
hub's LFS sha256 and size of every uploaded weight file (`get_paths_info(expand=True)`) must
equal the local file's. Only then, and only if `delete_local_after_upload`, the local GGUFs
are deleted (the article's quota flow), and the upload record is written.

The record (results/{model}/hub-upload.json) keeps, per file, the size, the sha256, the
hub's sha256 and its download URL: what was deleted locally can be fetched back and checked.
It never holds the token: huggingface_hub gets it in memory from HF_TOKEN."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from loraforge.fileio import write_json_atomic
from loraforge.fileio import sha256_file
from loraforge.hub.errors import HubError, endpoint, hub_errors
from loraforge.hub.settings import repo_id as make_repo_id

log = logging.getLogger(__name__)

# Snakemake's marker file in a directory output; PEFT's auto-generated card (ours replaces it).
ADAPTER_SKIP = {".snakemake_timestamp", "README.md"}
WEIGHT_SUFFIXES = (".gguf", ".safetensors")


class UploadVerificationError(HubError):
    """The hub's copy of an uploaded file differs from the local one."""


def _commit(api, repo_id: str, files: dict[str, Path], card, message: str) -> str:
    """One commit of `files` (path in repo -> local file) plus README.md; returns its sha.
    Files the hub already holds with the same content are skipped by huggingface_hub."""
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    log.info("uploading %d files (%.1f MB) to %s", len(files), sum(f.stat().st_size for f in files.values()) / 1e6, repo_id)
    with hub_errors(repo_id, doing="uploading"):
        info = api.create_commit(repo_id, operations=ops, commit_message=message)
    return info.oid


def verify_remote(api, repo_id: str, commit: str, files: dict[str, Path]) -> list[dict]:
    """The hub's listing of the weight files at `commit` against freshly hashed local files."""
    weights = {p: f for p, f in files.items() if p.endswith(WEIGHT_SUFFIXES)}
    with hub_errors(repo_id, commit, doing="verifying the upload"):
        remote = {e.path: e for e in api.get_paths_info(repo_id, list(weights), revision=commit, expand=True)}
    rows = []
    for path, local in weights.items():
        entry = remote.get(path)
        lfs = getattr(entry, "lfs", None)
        local_sha = sha256_file(local)
        rows.append({
            "path": path,
            "size": local.stat().st_size,
            "sha256": local_sha,
            "remote_sha256": lfs.sha256 if lfs else None,
            "remote_size": lfs.size if lfs else getattr(entry, "size", None),
            "verified": bool(lfs and lfs.sha256 == local_sha and lfs.size == local.stat().st_size),
            "url": f"{endpoint()}/{repo_id}/resolve/{commit}/{path}",
        })
    return rows


def upload_model(
    *,
    model: str,
    settings: dict,
    ggufs: dict[str, Path],
    adapter_dir: Path,
    memory_tsv: Path,
    quality_tsv: Path | None,
    base_model: str | None,
    lora: dict,
    modelfile_quant: str | None,
    record_path: Path,
    token: str,
) -> dict:
    """Upload one model's adapter and GGUFs (quant -> file); returns the record written."""
    from huggingface_hub import HfApi
    from huggingface_hub import __version__ as hf_version

    from loraforge.model_card import adapter_card, gguf_card

    started = time.time()
    api = HfApi(endpoint=endpoint(), token=token)
    user = settings.get("user")
    if not user:
        with hub_errors("whoami", doing="checking HF_TOKEN"):
            user = api.whoami()["name"]
    ids = {k: make_repo_id(settings[k], user=user, name=settings["name"], model=model)
           for k in ("gguf_repo", "adapter_repo") if settings.get(k)}
    record: dict = {"model": model, "endpoint": endpoint(), "huggingface_hub": hf_version, "repos": {}}

    for rid in ids.values():
        with hub_errors(rid, doing="creating the repo"):
            api.create_repo(rid, private=settings["private"], exist_ok=True, repo_type="model")

    if "adapter_repo" in ids:
        rid = ids["adapter_repo"]
        files = {p.name: p for p in sorted(Path(adapter_dir).iterdir()) if p.is_file() and p.name not in ADAPTER_SKIP}
        card = adapter_card(repo_id=rid, name=settings["name"], base_model=base_model, gguf_repo=ids.get("gguf_repo"),
                            license=settings["license"], lora=lora)
        commit = _commit(api, rid, files, card, f"lora-forge: {model} LoRA adapter")
        rows = verify_remote(api, rid, commit, files)
        record["repos"]["adapter"] = {"repo_id": rid, "commit": commit, "url": f"{endpoint()}/{rid}",
                                      "files": sorted(files), "weights": rows}

    if "gguf_repo" in ids:
        rid = ids["gguf_repo"]
        files = {f"{q}.gguf": Path(f) for q, f in ggufs.items()}
        card = gguf_card(repo_id=rid, name=settings["name"], quants=list(ggufs), memory_tsv=memory_tsv,
                         quality_tsv=quality_tsv, base_model=base_model, adapter_repo=ids.get("adapter_repo"),
                         license=settings["license"], modelfile_quant=modelfile_quant)
        commit = _commit(api, rid, files, card, f"lora-forge: {model} GGUF {', '.join(ggufs)}")
        rows = verify_remote(api, rid, commit, files)
        record["repos"]["gguf"] = {"repo_id": rid, "commit": commit, "url": f"{endpoint()}/{rid}", "files": rows}

    checked = record["repos"].get("adapter", {}).get("weights", []) + record["repos"].get("gguf", {}).get("files", [])
    bad = [f"{r['path']} (hub {r['remote_sha256']}, local {r['sha256']})" for r in checked if not r["verified"]]
    if bad:
        raise UploadVerificationError(
            f"{', '.join(ids.values())}: the hub's copy differs from the local file: {'; '.join(bad)}; "
            "nothing was deleted; run the same command again"
        )

    deleted = []
    if settings["delete_local_after_upload"] and "gguf_repo" in ids:
        for row in record["repos"]["gguf"]["files"]:
            # verified above: the hub's LFS sha256 equals this file's sha256, hashed just now
            path = files[row["path"]]
            path.unlink()
            row["local_deleted"] = True
            deleted.append(str(path))
            log.info("deleted %s: the hub holds it (sha256 %s)", path, row["sha256"])
    record.update({"deleted_local": deleted, "seconds": round(time.time() - started, 2),
                   "uploaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_json_atomic(record_path, record)
    return record
