"""Errors that suggest the fix: the nearest valid name for a misspelled config key or target
(difflib, plus the names other trainers use for the same setting), where a key belongs when it
was given at the wrong level (`--config max_steps=3`), and the line of a field in config.yaml."""

from __future__ import annotations

import difflib
import re
import textwrap
from pathlib import Path

import yaml

# Names Axolotl, PEFT, transformers and Unsloth notebooks use for our settings.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lr": "learning_rate", "batch_size": "per_device_batch_size", "micro_batch_size": "per_device_batch_size",
    "per_device_train_batch_size": "per_device_batch_size", "num_epochs": "epochs",
    "num_train_epochs": "epochs", "sequence_len": "max_seq_length", "max_length": "max_seq_length",
    "seq_len": "max_seq_length", "lr_scheduler_type": "lr_scheduler", "warmup": "warmup_ratio",
    "gradient_accumulation": "gradient_accumulation_steps", "target_modules_list": "target_modules",
    "quantization": "quants", "quant": "quants",
}
MODEL_PLACEHOLDER = "<model>"


def nearest(name: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate `name` most likely meant (an alias first, then difflib's closest)."""
    candidates = [str(c) for c in candidates]
    alias = ALIASES.get(name)
    if alias in candidates:
        return alias
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=cutoff)
    return close[0] if close else None


def _resolve(schema: dict, root: dict) -> dict:
    while isinstance(schema, dict) and "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema if isinstance(schema, dict) else {}


def key_paths(schema: dict) -> dict[str, list[str]]:
    """Every property name of the schema -> the dotted paths where it is valid
    (`models.<model>.train.max_steps`)."""
    found: dict[str, list[str]] = {}

    def walk(node: dict, prefix: str, depth: int) -> None:
        node = _resolve(node, schema)
        if depth > 6:
            return
        for name, sub in (node.get("properties") or {}).items():
            path = f"{prefix}.{name}" if prefix else name
            found.setdefault(name, []).append(path)
            walk(sub, path, depth + 1)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and prefix == "models":
            walk(extra, f"{prefix}.{MODEL_PLACEHOLDER}", depth + 1)

    walk(schema, "", 0)
    return found


def _flow(path: str, value) -> str:
    """`defaults.train.max_steps`, 3 -> `defaults={train: {max_steps: 3}}` (a --config item)."""
    head, *rest = path.split(".")
    inner = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    for part in reversed(rest):
        inner = f"{{{part}: {inner}}}"
    return f"{head}={inner}"


def unknown_key_hint(key: str, allowed, at: list, schema: dict, value=None, from_command_line: bool = False) -> str:
    """What to say about an unexpected `key` under the field path `at`."""
    close = nearest(key, allowed)
    if close:
        return f"did you mean '{close}'?"
    elsewhere = [p for p in key_paths(schema).get(key, []) if p.count(".") > len(at)]
    if not elsewhere:
        return "valid here: " + ", ".join(sorted(map(str, allowed)))
    defaults = [p for p in elsewhere if p.startswith("defaults.")]
    shown = (defaults + [p for p in elsewhere if p.startswith("models.")])[:2] or elsewhere[:2]
    hint = "it belongs under " + " or ".join(shown)
    if from_command_line and value is not None:
        target = shown[0].replace(MODEL_PLACEHOLDER, "MODEL")
        hint += f": --config '{_flow(target, value)}'"
    return hint


def yaml_line(path: list, source: str | Path | None) -> int | None:
    """1-based line of the deepest existing part of the field `path` in a YAML file."""
    if not source or not Path(source).is_file():
        return None
    try:
        node = yaml.compose(Path(source).read_text())
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def expand_patterns(patterns, model: str, values: dict[str, list[str]]) -> list[str]:
    """The concrete files of `model` the rules' output patterns make, each other wildcard
    expanded over its allowed `values` (quant: the final quants, ...); patterns with a wildcard
    of unknown values are left out."""
    import itertools

    files = set()
    for pattern in patterns:
        names = re.findall(r"{\s*(\w+)\s*(?:,[^}]*)?}", pattern)
        if "model" not in names:
            continue
        names = [n for n in names if n != "model"]
        if any(n not in values for n in names):
            continue
        plain = re.sub(r"{\s*(\w+)\s*(?:,[^}]*)?}", r"{\1}", pattern)
        for combo in itertools.product(*(values[n] for n in names)):
            files.add(plain.format(model=model, **dict(zip(names, combo))))
    return sorted(files)


def missing_target_message(target: str, models: list[str], buildable, known_quants, export_quants) -> str:
    """What to say when no rule makes `target`: the nearest buildable name and what can be built
    for its model. `buildable(model)` lists a model's files."""
    parts = Path(target).parts
    if len(parts) < 3 or parts[0] != "results":
        everything = [f for m in models for f in buildable(m)]
        close = difflib.get_close_matches(target, everything, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{target}: no rule makes this file{hint} (model files are results/<model>/...; models: {', '.join(models)})"
    model = parts[1]
    lines = []
    if model not in models:
        guess = nearest(model, models)
        lines.append(f"{target}: unknown model '{model}' (models in config.yaml: {', '.join(models)})"
                     + (f"; did you mean {Path('results', guess, *parts[2:]).as_posix()}?" if guess else ""))
        model = guess
    else:
        name = Path(target).name
        stem = name.split(".")[-2] if name.count(".") >= 1 else name
        if stem in known_quants and stem not in export_quants:
            lines.append(f"{target}: {stem} is not in export.quants ({', '.join(export_quants)}): add it there to build it")
        else:
            close = difflib.get_close_matches(target, buildable(model), n=1, cutoff=0.6)
            lines.append(f"{target}: no rule makes this file" + (f"; did you mean {close[0]}?" if close else ""))
    if model:
        shown = [f[len(f"results/{model}/"):] for f in buildable(model) if _worth_listing(f)]
        lines.append(f"  what can be built for {model} (in results/{model}/):")
        lines += textwrap.wrap(" ".join(shown), 100, initial_indent="    ", subsequent_indent="    ",
                               break_on_hyphens=False)
    return "\n".join(lines)


# Files a rule makes that nobody asks for by name: temp and internal files of the evaluation,
# the intermediate GGUFs, flags.
_INTERNAL = re.compile(r"/(eval|reports)/|/merged$|\.complete$|/(base\.)?(F16|BF16|Q8_0)\.gguf$|/imatrix\.gguf$")


def _worth_listing(path: str) -> bool:
    return not _INTERNAL.search(path)
