"""The `hub:` config block as one model sees it: the top-level block overlaid with
`models.<key>.hub`, checked against what the model builds, repo ids from their templates.

Templates may use {user} (hub.user, else the token's account from whoami), {name} (the
model's ollama name, e.g. rails-coder-tiny) and {model} (the config key)."""

from __future__ import annotations

import string

from loraforge.config import ConfigError, model_settings

PLACEHOLDERS = {"user", "name", "model"}


def hub_settings(config: dict, model: str) -> dict:
    """Effective hub settings of `model`; `quants` defaults to every quant of export.quants.
    Raises ConfigError naming the field."""
    own = config["models"][model].get("hub", {})
    merged = {**config["hub"], **own}
    built = config["export"]["quants"]
    field_of = (lambda k: f"models.{model}.hub.{k}" if k in own else f"hub.{k}")
    quants = merged.get("quants") or list(built)
    for i, q in enumerate(quants):
        if q not in built:
            raise ConfigError(
                f"{field_of('quants')}[{i}]: {q} is not built: upload only quants of export.quants ({', '.join(built)})"
            )
    for key in ("gguf_repo", "adapter_repo"):
        template = merged.get(key)
        if template is None:
            continue
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if names - PLACEHOLDERS:
            raise ConfigError(
                f"{field_of(key)}: unknown placeholder {{{sorted(names - PLACEHOLDERS)[0]}}} in {template!r}; "
                f"use {{user}}, {{name}} or {{model}}"
            )
    return {**merged, "quants": quants, "name": model_settings(config, model)["ollama"]["name"], "model": model}


def repo_id(template: str, *, user: str, name: str, model: str) -> str:
    rid = template.format(user=user, name=name, model=model)
    if rid.count("/") != 1 or not all(rid.split("/")):
        raise ConfigError(f"hub repo id {rid!r} (from {template!r}) must be NAMESPACE/NAME")
    return rid
