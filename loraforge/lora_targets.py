"""`lora.target_modules` checked against the base model before any work: a typo must fail in
seconds, naming the module, not hours into training (or, worse, after the old adapter was
archived). Module names come from the base's safetensors headers, so nothing is loaded.

PEFT's rule for a string in target_modules: it matches a module whose full name equals it or
ends with "." + it. Qwen3-MoE experts are stored per expert on disk
(`mlp.experts.7.gate_proj.weight`), so gate_proj/up_proj/down_proj match them as PEFT (which
turns them into target_parameters on the fused in-memory experts) does."""

from __future__ import annotations

import os
from pathlib import Path

from loraforge.errors import UserError
from loraforge.safetensors_io import SafetensorsFormatError, read_header


class TargetModulesError(UserError, ValueError):
    pass


def module_names(base_dir: str | os.PathLike) -> set[str] | None:
    """Full names of the modules owning a 2-D (or fused 3-D) weight, or None without shards."""
    shards = sorted(Path(base_dir).glob("*.safetensors"))
    if not shards:
        return None
    names = set()
    for shard in shards:
        try:
            header = read_header(str(shard))
        except (OSError, SafetensorsFormatError):
            return None
        for t in header.tensors.values():
            if len(t.shape) >= 2:
                names.add(t.name.removesuffix(".weight"))
    return names


def _matches(module: str, key: str) -> bool:
    return module == key or module.endswith("." + key)


def _leaf(module: str) -> str:
    # "model.layers.3.mlp.experts.7.gate_proj" -> "gate_proj"; layer/expert numbers are noise
    return module.rsplit(".", 1)[-1]


def unmatched(targets: list[str], modules: set[str]) -> list[str]:
    return [key for key in targets if not any(_matches(m, key) for m in modules)]


def check_target_modules(targets: list[str], base_dir: str | os.PathLike, field: str = "lora.target_modules") -> None:
    """Raise TargetModulesError naming every entry of `targets` that matches no module of the
    base in `base_dir`, with the model's module names. Silent when the base has no shards yet."""
    modules = module_names(base_dir)
    if modules is None:
        return
    missing = unmatched(list(targets), modules)
    if missing:
        leaves = sorted({_leaf(m) for m in modules})
        raise TargetModulesError(
            f"{field}: {', '.join(map(repr, missing))} match no module of the base model {base_dir}; "
            f"its modules are named: {', '.join(leaves)}"
        )
