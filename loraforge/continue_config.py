"""The Continue IDE extension's config (`config.yaml`, Continue's current format; config.json
is deprecated): the article's 30B for chat, edit and apply, its 3B for tab completion, both
served by a local Ollama under the names `ollama create` gave them (ollama.name).

Field names are Continue's (@continuedev/config-yaml, `configYamlSchema`): top level `name`,
`version`, `schema: v1`, `models`; per model `name`, `provider: ollama`, `model`, `apiBase`,
`roles`, `defaultCompletionOptions` (`temperature`, `topP`, `contextLength`) and, for the
autocomplete model, `autocompleteOptions`. tests/test_continue.py validates the written file
with that package's own schema.

Only settings go in, no model file: the config names Ollama models, which exist once
`ollama create` has run on the Modelfiles, so writing it needs neither GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from loraforge.config import ConfigError, model_settings
from loraforge.fileio import write_text_atomic

CHAT_ROLES = ("chat", "edit", "apply")
AUTOCOMPLETE_ROLES = ("autocomplete",)
CONFIG_VERSION = "1.0.0"
SCHEMA_VERSION = "v1"


def completion_options(ollama: dict) -> dict:
    """Continue's defaultCompletionOptions from a model's Modelfile settings (the same values,
    so Continue asks for what the Modelfile sets: temperature, top_p, num_ctx)."""
    return {
        "temperature": float(ollama["temperature"]),
        "topP": float(ollama["top_p"]),
        "contextLength": int(ollama["num_ctx"]),
    }


def model_entry(config: dict, key: str, roles: tuple[str, ...], label: str) -> dict:
    ollama = model_settings(config, key)["ollama"]
    return {
        "name": f"{ollama['name']} ({label})",
        "provider": "ollama",
        "model": ollama["name"],
        "apiBase": config["continue"]["api_base"],
        "roles": list(roles),
        "defaultCompletionOptions": completion_options(ollama),
    }


def continue_spec(config: dict) -> dict:
    """The settings the Continue config is made of (a validated lora-forge config in, plain
    data out): what the rule passes as params, so a change of any of them rewrites the file."""
    cont = config["continue"]
    for field in ("chat_model", "autocomplete_model"):
        if not cont.get(field):
            raise ConfigError(f"continue.{field} is not set in config.yaml: name the model key (under models:) "
                              f"Continue uses for {'chat' if field == 'chat_model' else 'tab completion'}")
    chat = model_entry(config, cont["chat_model"], CHAT_ROLES, "chat")
    autocomplete = model_entry(config, cont["autocomplete_model"], AUTOCOMPLETE_ROLES, "autocomplete")
    autocomplete["autocompleteOptions"] = dict(cont["autocomplete_options"])
    return {"name": cont["name"], "version": CONFIG_VERSION, "schema": SCHEMA_VERSION,
            "models": [chat, autocomplete]}


def modelfiles_of(config: dict) -> dict[str, str]:
    """Ollama name -> the Modelfile that registers it, for the config's header."""
    cont = config["continue"]
    keys = dict.fromkeys(k for k in (cont.get("chat_model"), cont.get("autocomplete_model")) if k)
    return {model_settings(config, k)["ollama"]["name"]: f"results/{k}/Modelfile" for k in keys}


def render_continue_config(spec: dict, modelfiles: dict[str, str] | None = None) -> str:
    """The YAML text, with a header saying where it goes and which models to register first."""
    header = ["# Continue config written by lora-forge (snakemake results/continue/config.yaml).",
              "# Copy it to ~/.continue/config.yaml (or add its models: to yours) once Ollama has the models:"]
    header += [f"#   ollama create {name} -f {path}" for name, path in (modelfiles or {}).items()]
    return "\n".join(header) + "\n" + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def write_continue_config(path: str | os.PathLike, spec: dict, modelfiles: dict[str, str] | None = None) -> Path:
    """Write the Continue config atomically (temp name, then rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_continue_config(spec, modelfiles)
    write_text_atomic(out, text)
    print(f"wrote {out}\n{text}")
    return out
