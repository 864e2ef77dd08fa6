"""What an adapter was trained with, recorded next to it, so the adapter guard can tell a
real change of settings from a run that merely wants to retrain.

Snakemake compares a job's params with its *last attempt*: after a failed retrain, a restored
adapter looks "changed" and would be retrained without asking; a base moved to a `path:`
folder looks like a new input. The record (`<adapter>/lora-forge-training.json`) is compared
instead: LoRA and training settings, the data settings upstream of training, and the base
model's identity (its config, tensor names, shapes and dtypes, and tokenizer files: what
stays the same when the same base is moved or fetched again)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loraforge.config import model_settings
from loraforge.safetensors_io import SafetensorsFormatError, read_header
from loraforge.train_monitor import NOT_RECORDED

RECORD_NAME = "lora-forge-training.json"
DATA_SETTINGS = ("samples", "max_source_share", "contrastive_weight", "validation_fraction", "seed")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
# config.json keys that say nothing about the weights (who saved the file, where from)
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype"}


def base_dir(config: dict, model: str) -> str:
    base = config["models"][model]["base"]
    return base["path"] if "path" in base else f"results/{model}/base"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_identity(folder: str | os.PathLike) -> str | None:
    """A digest of what makes a base model that model, or None when its weights are not there
    (not fetched yet, or used up by a consume-mode merge). Reads headers only."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return None
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in config.items() if k not in _CONFIG_NOISE}, sort_keys=True).encode())
    tensors = {}
    for shard in shards:
        try:
            header = read_header(str(shard))
        except (OSError, SafetensorsFormatError):
            return None
        tensors.update({t.name: [t.dtype, list(t.shape)] for t in header.tensors.values()})
    h.update(json.dumps(tensors, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + _sha256(folder / name).encode())
    return h.hexdigest()


def current_settings(config: dict, model: str, with_base: bool = True) -> dict[str, Any]:
    """The settings a training of `model` under `config` would use (JSON-comparable)."""
    settings = model_settings(config, model)
    declared = dict(config["models"][model]["base"])
    declared.pop("path", None)  # where the base lies is no setting; what it is, is (identity)
    out = {
        "lora": settings["lora"],
        "train": {k: v for k, v in settings["train"].items() if k not in NOT_RECORDED},
        "data": {k: settings["data"][k] for k in DATA_SETTINGS},  # models.X.data overrides data:
        "base": declared,
        "base_identity": base_identity(base_dir(config, model)) if with_base else None,
    }
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from disk


def write(adapter_dir: str | os.PathLike, settings: dict) -> Path:
    path = Path(adapter_dir) / RECORD_NAME
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return path


def read(adapter_dir: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(adapter_dir) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changes(recorded: dict, current: dict) -> list[str]:
    """Readable differences between the settings an adapter was trained with and today's.

    The base counts by identity when both sides know it; a base whose weights are not on disk
    (not fetched yet, or consumed) counts by its declaration (build spec, hub repo/revision)."""
    old, new = dict(recorded), dict(current)
    old_id, new_id = old.pop("base_identity", None), new.pop("base_identity", None)
    out = []
    if old_id and new_id:
        old.pop("base", None), new.pop("base", None)
        if old_id != new_id:
            out.append("base model: different weights layout, config or tokenizer")
    flat_old, flat_new = _flatten(old), _flatten(new)
    for key in sorted(set(flat_old) | set(flat_new)):
        if flat_old.get(key) != flat_new.get(key):
            out.append(f"{key}: {flat_old.get(key)!r} -> {flat_new.get(key)!r}")
    return out
