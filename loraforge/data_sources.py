"""Which data a model trains on: the `data:` block overlaid with `models.<key>.data`, and its
`samples` (one path, or a list of local files and hub datasets) as normalized entries.

An entry is one of (schemas/config.schema.yaml, data/README.md):

    data/mine.jsonl                                  a local file, any known format
    {path: data/mine.json, source: mine, weight: 2}  the same, with options
    {hub: org/name, split: train, revision: <sha>}   a hub dataset (the fetch_dataset rule)

Options of both: `source` (the source of samples that name none; default: the file's stem or
the dataset's name), `weight` (< 1: keep that fraction; > 1: repeat in train) and `cap` (at most
that many samples). A hub dataset is fetched once into results/datasets/<slug>.jsonl, where
<slug> names repo, split and revision: another revision is another file.

Light on purpose (no pandas, no datasets): the Snakefile and loraforge.config import it."""

from __future__ import annotations

import os
import re
from pathlib import Path

DATASETS_DIR = "results/datasets"
RESERVED_MODEL_KEYS = ("datasets",)  # results/datasets/ holds the fetched hub datasets


def data_settings(config: dict, model: str) -> dict:
    """The model's data settings as written: `data:` overlaid with `models.<model>.data`."""
    return {**(config.get("data") or {}), **(config["models"][model].get("data") or {})}


def samples_field(config: dict, model: str) -> str:
    own = config["models"][model].get("data") or {}
    return f"models.{model}.data.samples" if "samples" in own else "data.samples"


def hub_slug(repo_id: str, split: str, revision: str | None) -> str:
    """The file name (without .jsonl) of a fetched hub dataset split."""
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", f"{repo_id.replace('/', '--')}--{split}@{revision or 'main'}")


def _normalize(entry, field: str) -> dict:
    if isinstance(entry, str):
        entry = {"path": entry}
    out = {"source": entry.get("source"), "weight": entry.get("weight", 1), "cap": entry.get("cap"),
           "field": field}
    if "hub" in entry:
        split = entry.get("split", "train")
        slug = hub_slug(entry["hub"], split, entry.get("revision"))
        out.update(kind="hub", hub=entry["hub"], split=split, revision=entry.get("revision"), slug=slug,
                   file=f"{DATASETS_DIR}/{slug}.jsonl", label=f"{entry['hub']} ({split})",
                   default_source=entry["hub"].split("/")[-1])
    else:
        out.update(kind="file", file=entry["path"], label=entry["path"], default_source=Path(entry["path"]).stem)
    return out


def entries(config: dict, model: str) -> list[dict]:
    """The model's `samples` as normalized entries: kind (file or hub), file (the local file
    the samples are read from), label, default_source, source, weight, cap, field (for
    messages), and for hub entries hub, split, revision, slug."""
    samples = data_settings(config, model)["samples"]
    field = samples_field(config, model)
    if isinstance(samples, str):
        return [_normalize(samples, field)]
    return [_normalize(e, f"{field}[{i}]") for i, e in enumerate(samples)]


def data_files(config: dict, model: str) -> list[str]:
    """Every file prepare_data reads for `model` (local files and fetched hub datasets)."""
    return [e["file"] for e in entries(config, model)]


def sample_bytes(config, model: str | None = None, default: int = 1_000_000) -> int:
    """Bytes of the sample files a model reads (the largest over all models when None), those
    on disk; `default` when none is (the disk plan's estimate of the prepared data)."""
    models = [model] if model else list(config.get("models") or {})
    most = 0
    for m in models:
        try:
            files = data_files(config, m)
        except (KeyError, TypeError, AttributeError):  # a partial config (plans in tests)
            files = []
        most = max(most, sum(os.path.getsize(f) for f in files if os.path.isfile(f)))
    return most or default


def hub_datasets(config: dict) -> dict[str, dict]:
    """slug -> hub entry, over every model (the fetch_dataset rule's jobs)."""
    return {e["slug"]: e for m in config["models"] for e in entries(config, m) if e["kind"] == "hub"}


def local_files(config: dict) -> list[tuple[str, str]]:
    """(field, path) of every local data file any model reads (loraforge.config.check_paths)."""
    seen, out = set(), []
    for model in config["models"]:
        for e in entries(config, model):
            if e["kind"] == "file" and (e["field"], e["file"]) not in seen:
                seen.add((e["field"], e["file"]))
                out.append((e["field"], e["file"]))
    return out


def config_problems(config: dict) -> list[str]:
    """What the schema cannot say about the data settings."""
    return [f"models.{key}: the key `{key}` is taken by {DATASETS_DIR}/ (the fetched hub datasets); name the model "
            "otherwise" for key in RESERVED_MODEL_KEYS if key in config["models"]]
