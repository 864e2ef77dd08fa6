"""Configuration: JSON-schema validation that fills defaults, checks the schema cannot
express, and the per-model view the rules read (defaults merged with a model's overrides).

Every error names the field, e.g. `models.tiny.lora.r: 0 is less than the minimum of 1`."""

from __future__ import annotations

import copy
from pathlib import Path

import functools

import yaml

from loraforge import data_sources
from loraforge.constants import NEEDS_IMATRIX
from loraforge.errors import UserError
from loraforge.fileio import read_hf_config
from loraforge.suggest import unknown_key_hint, yaml_line

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"

# Quants below ~3 bits (NEEDS_IMATRIX) need an importance matrix: without export.imatrix,
# llama-quantize would fail hours into an export.
MOE_MODEL_TYPES = {"qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe"}


class ConfigError(UserError, ValueError):
    """Bad configuration; the message names the field."""


def _with_defaults(validator_class, validators):
    """A validator that fills `default` values while validating (as snakemake's validate())."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if isinstance(subschema, dict) and "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


@functools.cache
def default_filling_validator():
    # imported here: train() reads this module (training_record) where jsonschema may be missing
    # (the GPU machine's image), and only validation needs it
    from jsonschema import Draft202012Validator, validators

    return _with_defaults(Draft202012Validator, validators)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _field(path) -> str:
    parts = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else ("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


def _where(path: list, source) -> str:
    line = yaml_line(path, source)
    return f" ({Path(source).name} line {line})" if line else ""


def _unexpected_keys(error, schema: dict, source) -> str:
    """`'rank' was unexpected (config.yaml line 14): did you mean 'r'?`, one per unknown key."""
    path = list(error.path)
    allowed = list((error.schema.get("properties") or {}))
    unknown = [k for k in error.instance if k not in allowed]
    parts = []
    for key in unknown:
        line = yaml_line(path + [key], source)
        from_command_line = bool(source) and line is None
        hint = unknown_key_hint(key, allowed, path, schema, error.instance[key], from_command_line)
        where = f" ({Path(source).name} line {line})" if line else (" (from --config)" if from_command_line else "")
        parts.append(f"{_field(path)}: '{key}' was unexpected{where}: {hint}")
    return "\n  ".join(parts)


def _describe(error, schema: dict | None = None, source=None) -> str:
    """One readable line for a jsonschema error, naming the field (and its line in `source`)."""
    if error.validator == "oneOf" and list(error.path)[-1:] == ["base"]:
        return (f"{_field(error.path)}: give exactly one of build, hub or path (got {', '.join(sorted(error.instance))})"
                + _where(list(error.path), source))
    if error.validator == "oneOf" and all(list(s) == ["required"] for s in error.validator_value):
        keys = " or ".join(s["required"][0] for s in error.validator_value)  # e.g. a data.samples entry
        return (f"{_field(error.absolute_path)}: give exactly one of {keys} (got {', '.join(sorted(error.instance))})"
                + _where(list(error.absolute_path), source))
    # oneOf/anyOf errors are vague; the deepest sub-error says what is wrong
    if error.context:
        return _describe(max(error.context, key=lambda e: len(e.path)), schema, source)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict) and schema is not None:
        return _unexpected_keys(error, schema, source)
    return _describe_value(error) + _where(list(error.path), source)


def _describe_value(error) -> str:
    if error.validator == "additionalProperties":
        return f"{_field(error.absolute_path)}: {error.message}"
    if error.validator == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return f"{_field(error.absolute_path)}: {error.instance!r} is not one of {allowed}"
    return f"{_field(error.absolute_path)}: {error.message}"


def parse_size(value: str | int | float) -> int:
    """'95GB' -> 95e9 bytes, '500MiB' -> 500*2**20; plain numbers are bytes (loraforge.sizes.parse_size)."""
    from loraforge.sizes import parse_size as _parse

    try:
        return _parse(value)
    except ValueError as e:
        raise ConfigError(f"disk size: {e}") from None


def validate(config: dict, schema: dict | None = None, source: str | Path | None = None) -> dict:
    """Validate in place (filling defaults) and return the config. Raises ConfigError. `source`,
    the YAML file the config was read from, gives each error its line (and tells keys that came
    from --config, which it lacks)."""
    schema = schema or load_schema()
    _unbool_checkpointing(config)
    validator = default_filling_validator()(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path)))
    prefix = f"{source}: " if source else ""
    if errors:
        raise ConfigError(prefix + "invalid configuration:\n  " + "\n  ".join(_describe(e, schema, source) for e in errors))
    try:
        _check_semantics(config)
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None
    return config


def _unbool_checkpointing(config: dict) -> None:
    """YAML 1.1 reads an unquoted `gradient_checkpointing: off` (or on) as a boolean: take it as
    the word that was written."""
    models = config.get("models") if isinstance(config.get("models"), dict) else {}
    for section in [config.get("defaults"), *models.values()]:
        train = section.get("train") if isinstance(section, dict) else None
        if isinstance(train, dict) and isinstance(train.get("gradient_checkpointing"), bool):
            train["gradient_checkpointing"] = "on" if train["gradient_checkpointing"] else "off"


def _check_semantics(config: dict) -> None:
    problems = []
    models = config["models"]
    for i, key in enumerate(config.get("targets", [])):
        if key not in models:
            problems.append(f"targets[{i}]: unknown model key {key!r}; known: {', '.join(models)}")
    for i, key in enumerate(config.get("retrain", [])):
        if key != "all" and key not in models:
            problems.append(f"retrain[{i}]: unknown model key {key!r}; known: {', '.join(models)} (or all)")
    quants = config["export"]["quants"]
    for i, q in enumerate(quants):
        if q in NEEDS_IMATRIX and not config["export"]["imatrix"]["enabled"]:
            problems.append(
                f"export.quants[{i}]: {q} needs an importance matrix: set export.imatrix.enabled: true "
                "(llama-imatrix over the training split), or choose a K-quant such as Q4_K_M"
            )
    export = config["export"]
    if export["modelfile_quant"] not in quants:
        problems.append(
            f"export.modelfile_quant: {export['modelfile_quant']} is not built: it must be one of "
            f"export.quants ({', '.join(quants)})"
        )
    if export["merge_mode"] == "consume":
        for key, model in models.items():
            if "path" in model["base"]:
                problems.append(
                    f"models.{key}.base.path: export.merge_mode consume would move the shards out of your own "
                    f"folder {model['base']['path']} and delete them; lora-forge only consumes bases it built "
                    "or fetched itself. Use merge_mode link (or copy) for this model's base"
                )
    problems += _continue_problems(config)
    problems += data_sources.config_problems(config)
    for key in models:
        settings = model_settings(config, key)
        if settings["lora"]["dropout"] > 0 and is_moe(config, key):
            problems.append(
                f"models.{key}.lora.dropout: {settings['lora']['dropout']} must be 0 for a MoE model: PEFT's "
                "lora.ParamWrapper (expert LoRA) refuses dropout != 0, so training would crash hours in"
            )
    problems += _gpus_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _gpus_problems(config: dict) -> list[str]:
    """train.gpus must divide gradient_accumulation_steps (same effective batch on any number of
    GPUs), and a gpu resource declared for train_adapter must be the gpus the training launches."""
    from loraforge.distributed import DistributedConfigError, accumulation_per_process
    from loraforge.resources import declared_resource

    problems = []
    for key in config["models"]:
        train = model_settings(config, key)["train"]
        gpus = int(train.get("gpus", 1))
        try:
            accumulation_per_process(int(train["gradient_accumulation_steps"]), gpus, field=f"models.{key}.train")
        except DistributedConfigError as e:
            problems.append(str(e))
        declared, where = declared_resource(config, "train_adapter", "gpu", key)
        if gpus > 1 and declared is not None and int(declared) != gpus:
            problems.append(
                f"{where}: {declared} GPUs, but models.{key}.train.gpus is {gpus}: the training job runs one process "
                f"per GPU and requests train.gpus GPUs itself; set it to {gpus} or remove it"
            )
    return problems


def _continue_problems(config: dict) -> list[str]:
    """The continue block names models by key; results/continue/ must not be a model's folder."""
    models = config["models"]
    problems = []
    for field in ("chat_model", "autocomplete_model"):
        key = (config.get("continue") or {}).get(field)
        if key is not None and key not in models:
            problems.append(f"continue.{field}: unknown model key {key!r}; known: {', '.join(models)}")
    if "continue" in models:
        problems.append("models.continue: the key `continue` is taken by results/continue/ (the Continue "
                        "config); name the model otherwise")
    return problems


def uses_fim(config: dict, key: str) -> bool:
    """Whether a model's Modelfiles get the fill-in-the-middle TEMPLATE: ollama.fim true/false,
    or auto (the default): the model Continue uses for tab completion (continue.autocomplete_model)."""
    fim = model_settings(config, key)["ollama"].get("fim", "auto")
    if fim == "auto":
        return (config.get("continue") or {}).get("autocomplete_model") == key
    return bool(fim)


def check_paths(config: dict, root: str | Path = ".") -> None:
    """Every file or folder a setting names must exist (relative paths from `root`, the working
    directory). Snakemake itself says "Nothing to be done" when a changed setting points at a
    missing input whose outputs exist, so this is checked before the DAG is built."""
    root = Path(root)
    wanted = [(field, path, "file") for field, path in data_sources.local_files(config)]
    if any("build" in m["base"] for m in config["models"].values()):
        wanted += [(f"tiny_base.corpus[{i}]", c, "any") for i, c in enumerate(config["tiny_base"]["corpus"])]
    wanted += [(f"models.{key}.base.path", m["base"]["path"], "dir") for key, m in config["models"].items()
               if "path" in m["base"]]
    problems = []
    for field, value, kind in wanted:
        p = root / value
        if not p.exists():
            problems.append(f"{field}: {value} does not exist")
        elif kind == "file" and not p.is_file():
            problems.append(f"{field}: {value} is not a file")
        elif kind == "dir" and not p.is_dir():
            problems.append(f"{field}: {value} is not a folder (a Hugging Face model folder is expected)")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def load(path: str | Path = "config.yaml", overrides: dict | None = None) -> dict:
    """Read, merge overrides (like snakemake --config), validate."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if overrides:
        config = deep_merge(config, overrides)
    return validate(config, source=path)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def model_settings(config: dict, key: str) -> dict:
    """A model's effective settings: defaults.lora/train overlaid with the model's own."""
    if key not in config["models"]:
        raise ConfigError(f"unknown model key {key!r}; known: {', '.join(config['models'])}")
    model = config["models"][key]
    return {
        "key": key,
        "base": model["base"],
        "lora": {**config["defaults"]["lora"], **model.get("lora", {})},
        "train": {**config["defaults"]["train"], **model.get("train", {})},
        "ollama": {
            **{k: v for k, v in config["ollama"].items()},
            **model.get("ollama", {}),
            "name": model.get("ollama", {}).get("name", f"lora-forge-{key}"),
        },
        "arch": model.get("arch", {}),
        "data": data_sources.data_settings(config, key),
    }


def model_type(config: dict, key: str) -> str | None:
    """The HF model_type of a model: from the built arch, the local config.json, or `arch:`."""
    model = config["models"][key]
    base = model["base"]
    if "build" in base:
        return base["build"]
    if "path" in base:
        cfg = read_hf_config(base["path"])
        if cfg is not None:
            return cfg.get("model_type")
    return model.get("arch", {}).get("model_type")


def is_moe(config: dict, key: str) -> bool:
    return model_type(config, key) in MOE_MODEL_TYPES
