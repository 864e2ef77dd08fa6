"""What an adapter was trained with, recorded next to it, so the adapter guard can tell a
real change of settings from a run that merely wants to retrain.

Snakemake compares a job's params with its *last attempt*: after a failed retrain, a restored
adapter looks "changed" and would be retrained without asking; a base moved to a `path:`
folder looks like a new input. The record (`<adapter>/lora-forge-training.json`) is compared
instead: LoRA and training settings, the data settings upstream of training, the base's
declaration (what the build or fetch rule is asked for) and the base model's identity: its
layout (config, tensor names, shapes and dtypes, tokenizer files) and its weights (the sha256
of each shard, loraforge.base_weights): what stays the same when the same base is moved or
fetched again, and changes when other weights take its place.

The same record decides, before Snakemake plans, whether training is up to date
(`training_is_current`): the Snakefile then takes the base as an ancient() input, so a base
rebuilt or fetched again for an export (after a consume-mode merge) never retrains."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loraforge.base_weights import complete_flag, weight_digests
from loraforge.config import model_settings
from loraforge.errors import UserError
from loraforge.fileio import sha256_file
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


# the build rule's settings (config tiny_base) that decide a built base's weights
TINY_BASE_SETTINGS = ("vocab_size", "pretrain_steps", "seed")
DIGEST_CACHE = "base-digests.json"  # results/<model>/: the shard digests of a user's own `path:` base


def base_weights_source(config: dict, model: str) -> dict[str, Path]:
    """Where a model's base records its shard digests: the built or fetched base's flag
    (`manifest`), or for a user's own folder a cache under results/ (`cache`)."""
    if "path" in config["models"][model]["base"]:
        return {"cache": Path("results") / model / DIGEST_CACHE}
    return {"manifest": complete_flag(base_dir(config, model))}


def base_identity(folder: str | os.PathLike, manifest: str | os.PathLike | None = None,
                  cache: str | os.PathLike | None = None) -> dict | None:
    """What makes a base model that model: {"layout": digest of its config, tensor names, shapes
    and dtypes and tokenizer files, "weights": {shard: sha256}}, or None when its weights are not
    there (not fetched yet, or used up by a consume-mode merge). Shard digests come from the
    base's flag when size and mtime still match (loraforge.base_weights)."""
    layout = base_layout(folder)
    if layout is None:
        return None
    weights = weight_digests(folder, manifest=manifest, cache=cache)
    return {"layout": layout, "weights": weights} if weights else None


def base_layout(folder: str | os.PathLike) -> str | None:
    """A digest of a base's config, tensor names, shapes and dtypes, and tokenizer files (headers
    only), or None when its shards are not there."""
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
            h.update(name.encode() + sha256_file(folder / name).encode())
    return h.hexdigest()


def identity_for_training(base_dir: str | os.PathLike, record: dict | None) -> dict | str | None:
    """The base identity a training run is fingerprinted with: the record's (computed by the rule
    script with the model's digest source), else the folder's own."""
    recorded = (record or {}).get("base_identity")
    return recorded if weights_of(recorded) else base_identity(base_dir)


def current_settings(config: dict, model: str, with_base: bool = True) -> dict[str, Any]:
    """The settings a training of `model` under `config` would use (JSON-comparable)."""
    settings = model_settings(config, model)
    out = {
        "lora": settings["lora"],
        "train": {k: v for k, v in settings["train"].items() if k not in NOT_RECORDED},
        "data": {k: settings["data"][k] for k in DATA_SETTINGS},  # models.X.data overrides data:
        "base": base_declaration(config, model),
        "base_identity": (base_identity(base_dir(config, model), **base_weights_source(config, model))
                          if with_base else None),
    }
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from disk


def base_declaration(config: dict, model: str) -> dict[str, Any]:
    """What the base rule is asked for: a built base's architecture and build settings, a hub
    repo and revision. Where the base lies is no setting (a `path:` declares nothing); what it
    is, is (identity)."""
    declared = dict(config["models"][model]["base"])
    declared.pop("path", None)
    if "build" in declared:
        declared["tiny_base"] = {k: config["tiny_base"][k] for k in TINY_BASE_SETTINGS}
    return declared


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
    if isinstance(old.get("base"), dict) and isinstance(new.get("base"), dict) and "tiny_base" not in old["base"]:
        # a record of an older lora-forge has no build settings: nothing to compare them with
        new["base"] = {k: v for k, v in new["base"].items() if k != "tiny_base"}
    out = []
    if old_id and new_id:
        old.pop("base", None), new.pop("base", None)
        out += identity_changes(old_id, new_id)
    flat_old, flat_new = _flatten(old), _flatten(new)
    for key in sorted(set(flat_old) | set(flat_new)):
        if flat_old.get(key) != flat_new.get(key):
            out.append(f"{key}: {flat_old.get(key)!r} -> {flat_new.get(key)!r}")
    return out


def identity_changes(old: dict | str, new: dict | str) -> list[str]:
    """Readable differences between two base identities. A record of an older lora-forge holds the
    layout digest alone (a string): then the layout is all that can be compared."""
    old = {"layout": old} if isinstance(old, str) else old
    new = {"layout": new} if isinstance(new, str) else new
    out = []
    if old.get("layout") != new.get("layout"):
        out.append("base model: different config, tensor layout or tokenizer")
    old_w, new_w = old.get("weights"), new.get("weights")
    if old_w and new_w and old_w != new_w:
        differ = sorted(k for k in set(old_w) | set(new_w) if old_w.get(k) != new_w.get(k))
        out.append(f"base model weights: {len(differ)} of {len(new_w)} shards differ ({', '.join(differ[:3])}"
                   f"{', ...' if len(differ) > 3 else ''})")
    return out


def weights_of(identity: dict | str | None) -> dict[str, str] | None:
    """The shard digests of a base identity (None for a record of an older lora-forge)."""
    return identity.get("weights") if isinstance(identity, dict) else None


class AdapterBaseMismatch(UserError, ValueError):
    """An adapter trained on other base weights than the base it is about to be merged into."""


def check_adapter_base(config: dict, model: str | None, adapter_dir: str | os.PathLike,
                       base: str | os.PathLike) -> dict[str, str] | None:
    """Refuse to merge an adapter into other weights than it was trained on (shard digests: the
    adapter's record against the base's flag, re-checked by size and mtime). Returns the base's
    shard digests (for the merge report). An adapter of an older lora-forge records no weights:
    nothing to compare."""
    # a Snakefile of one's own running the merge script has no models: the digests are computed
    source = base_weights_source(config, model) if model in (config.get("models") or {}) else {}
    current = weight_digests(base, **source)
    recorded = weights_of((read(adapter_dir) or {}).get("base_identity"))
    if recorded and current and recorded != current:
        for shard in sorted(k for k in current if recorded.get(k) != current[k] and (Path(base) / k).exists()):
            read_header(str(Path(base) / shard))  # a damaged shard is named as such, not as other weights
        diff = identity_changes({"weights": recorded}, {"weights": current})
        raise AdapterBaseMismatch(
            f"{adapter_dir} was trained on other weights than {base} ({'; '.join(diff)}): merging it would "
            f"make a model nobody trained. Retrain it on this base (the old adapter is archived): snakemake "
            f"--cores 1 --forcerun train_adapter --config retrain=[{model}] -- results/{model}/adapter"
        )
    return current


# -- before Snakemake plans: is this model's training up to date? -------------------------------

TRAIN_REPORTS = ("metrics.json", "loss.csv", "loss.png")
DATA_FILES = ("train.jsonl", "validation.jsonl", "summary.tsv")


def _recorded_changes(config: dict, model: str, sections: tuple[str, ...] | None = None) -> list[str] | None:
    """The adapter record's differences from today's settings, by declaration (no hashing), or
    None when there is no adapter record."""
    recorded = read(Path("results") / model / "adapter")
    if recorded is None:
        return None
    current = current_settings(config, model, with_base=False)
    recorded = {k: v for k, v in recorded.items() if k != "base_identity"}
    if sections is not None:
        recorded = {k: v for k, v in recorded.items() if k in sections}
        current = {k: v for k, v in current.items() if k in sections}
    return changes(recorded, current)


def training_is_current(config: dict, model: str) -> bool:
    """The adapter and its reports are there, trained with today's settings on the base today's
    config declares, and no retrain is asked for (`--config retrain=[...]`): training has no
    reason to run, so a base rebuilt or fetched again must not make it (an ancient() input)."""
    opted = set(config.get("retrain") or [])
    if model in opted or "all" in opted:
        return False
    model_dir = Path("results") / model
    if not (model_dir / "adapter" / "adapter_model.safetensors").is_file():
        return False
    if not all((model_dir / "train" / name).is_file() for name in TRAIN_REPORTS):
        return False
    return _recorded_changes(config, model) == []


def data_is_current(config: dict, model: str) -> bool:
    """The prepared data is there and the adapter record says it was made with today's data
    settings from the base today's config declares (its tokenizer counts the tokens)."""
    if not all((Path("results") / model / "data" / name).is_file() for name in DATA_FILES):
        return False
    return _recorded_changes(config, model, sections=("data", "base")) == []
