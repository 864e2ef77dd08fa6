"""Sample files in the formats people have, detected per file and converted to lora-forge's
chat samples ({id, source, messages, pair?, kind?}):

- OpenAI / ChatML: ``{"messages": [{"role": ..., "content": ...}, ...]}``; `source` optional
  (default: the file name), `content` may also be a list of ``{"type": "text", "text": ...}`` parts;
- ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...]}``
  (optional top-level `system`);
- Alpaca: ``{"instruction": ..., "input": ..., "output": ...}`` (`input`, `system` and
  `history` ([[question, answer], ...]) optional).

A file is JSON lines, or one JSON array (the usual form of Alpaca and ShareGPT dumps). Its
format is taken from its first sample; every other sample must have the same one. Every error
names the file and the 1-based line (of the sample's first character, for an array) and, where
it is about a field, the field: `x.jsonl:17: field 'conversations[2].from': 'bot' is not one of ...`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from loraforge.errors import UserError

ROLES = ("system", "user", "assistant")
CHATML, SHAREGPT, ALPACA = "OpenAI/ChatML", "ShareGPT", "Alpaca"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}
KEPT_FIELDS = ("id", "source", "messages", "pair", "kind")  # what a converted sample carries
FORMAT_HINT = ("expected `messages` (OpenAI/ChatML), `conversations` with from/value (ShareGPT) or "
               "`instruction`/`output` (Alpaca); see data/README.md")


class DataError(UserError, ValueError):
    """A dataset problem. `path`, `line` (1-based) and `field` are set when known."""

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field


def field_error(path, line: int, field: str, problem: str) -> DataError:
    return DataError(f"{path}:{line}: field '{field}': {problem}", path=path, line=line, field=field)


def detect_format(obj) -> str | None:
    """The format one sample is in, or None."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return CHATML
    if "conversations" in obj:
        return SHAREGPT
    if "instruction" in obj and "output" in obj:
        return ALPACA
    return None


# ----------------------------------------------------------------------------- reading


def _decode(raw: bytes, path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8", path=path, line=line,
        ) from None


def _invalid_json(path, line: int, exc: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{line}: invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=line)


def _json_lines(path: str, data: bytes) -> Iterator[tuple[int, object]]:
    for line_no, raw in enumerate(data.splitlines(), start=1):
        text = _decode(raw, path, line_no)
        if not text.strip():
            continue
        try:
            yield line_no, json.loads(text)
        except json.JSONDecodeError as exc:
            raise _invalid_json(path, line_no, exc) from None


def _json_array(path: str, data: bytes) -> Iterator[tuple[int, object]]:
    """The items of a top-level JSON array, each with the line its text starts on."""
    bad = next((i for i, raw in enumerate(data.splitlines(), start=1) if not _is_utf8(raw)), None)
    if bad is not None:
        _decode(data.splitlines()[bad - 1], path, bad)
    text = data.decode("utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line_no = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _invalid_json(path, exc.lineno, exc) from None
        yield line_no, obj


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_records(path) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON) of every sample of a JSON-lines file or a JSON array file."""
    path_str = str(path)
    try:
        data = Path(path_str).read_bytes()
    except OSError as exc:
        raise DataError(f"{path_str}: cannot read the dataset: {exc.strerror or exc}", path=path_str) from None
    if data.lstrip()[:1] == b"[":
        yield from _json_array(path_str, data)
    else:
        yield from _json_lines(path_str, data)


# ----------------------------------------------------------------------------- converting


def _optional_string(obj: dict, key: str, path, line: int) -> None:
    value = obj.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise field_error(path, line, key, f"{value!r} is not a non-empty string")


def _text(value, where: str, path, line: int, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise field_error(path, line, where, f"must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise field_error(path, line, where, "is empty")
    return value


def _chatml(obj: dict, path, line: int) -> dict:
    """Known fields only, in the file's order; list-of-parts content joined to text."""
    out = {k: v for k, v in obj.items() if k in KEPT_FIELDS}
    messages = out.get("messages")
    if isinstance(messages, list):
        out["messages"] = [_plain_message(m, f"messages[{i}]", path, line) for i, m in enumerate(messages)]
    return out


def _plain_message(message, where: str, path, line: int):
    if not isinstance(message, dict):
        return message  # validate_chat names it
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise field_error(path, line, f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", "
                                  "\"text\": ...}) can be trained on")
            parts.append(part["text"])
        content = "".join(parts)
    kept = {k: message[k] for k in ("role", "content") if k in message}
    if "content" in kept:
        kept["content"] = content
    return kept


def _sharegpt(obj: dict, path, line: int) -> dict:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise field_error(path, line, "conversations", "must be a non-empty list of {from, value} objects")
    messages = []
    if obj.get("system") is not None:
        messages.append({"role": "system", "content": _text(obj["system"], "system", path, line)})
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise field_error(path, line, where, f"must be an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise field_error(path, line, f"{where}.{key}", "missing")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise field_error(path, line, f"{where}.from",
                              f"{turn['from']!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        content = _text(turn["value"], f"{where}.value", path, line, nonempty=role == "assistant")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise field_error(path, line, "conversations", "no gpt turn (nothing to learn from)")
    return {**_ids(obj, path, line), "messages": messages}


def _alpaca(obj: dict, path, line: int) -> dict:
    instruction = _text(obj["instruction"], "instruction", path, line, nonempty=True)
    extra = obj.get("input")
    if extra is not None and _text(extra, "input", path, line).strip():
        instruction = f"{instruction}\n\n{extra}"
    messages = []
    if obj.get("system") is not None and _text(obj["system"], "system", path, line).strip():
        messages.append({"role": "system", "content": obj["system"]})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise field_error(path, line, "history", "must be a list of [question, answer] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise field_error(path, line, f"history[{i}]", "must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": instruction})
    messages.append({"role": "assistant", "content": _text(obj["output"], "output", path, line, nonempty=True)})
    return {**_ids(obj, path, line), "messages": messages}


def _ids(obj: dict, path, line: int) -> dict:
    """id and source of a ShareGPT or Alpaca sample, when it has them."""
    out = {}
    for key in ("id", "source"):
        if obj.get(key) is not None:
            _optional_string(obj, key, path, line)
            out[key] = obj[key]
    return out


CONVERTERS = {CHATML: _chatml, SHAREGPT: _sharegpt, ALPACA: _alpaca}


def convert(obj, fmt: str, path, line: int) -> dict:
    """One sample of a file whose format is `fmt`, as a chat sample (not yet validated)."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line}: a sample must be a JSON object, got {type(obj).__name__}",
                        path=path, line=line)
    found = detect_format(obj)
    if found is None and fmt == CHATML:
        raise field_error(path, line, "messages", "missing")
    if found != fmt:
        what = f"is {found}" if found else f"has none of the known formats' fields (keys: {', '.join(sorted(obj)) or 'none'})"
        raise DataError(f"{path}:{line}: this sample {what}, but the file is {fmt} (from its first sample); "
                        "use one format per file", path=path, line=line)
    return CONVERTERS[fmt](obj, path, line)


def validate_chat(obj: dict, path, line: int) -> None:
    """A converted sample: messages of system/user/assistant with text, one assistant answer
    at least, optional non-empty string id, pair and kind, a non-empty string source."""
    for key in ("id", "source", "pair", "kind"):
        _optional_string(obj, key, path, line)
    if obj.get("source") is None:
        raise field_error(path, line, "source", "missing")
    messages = obj.get("messages")
    if messages is None:
        raise field_error(path, line, "messages", "missing")
    if not isinstance(messages, list) or not messages:
        raise field_error(path, line, "messages", "must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]", path, line)
    if not any(m["role"] == "assistant" for m in messages):
        raise field_error(path, line, "messages", "no assistant turn (nothing to learn from)")


def _check_message(message, where: str, path, line: int) -> None:
    if not isinstance(message, dict):
        raise field_error(path, line, where, f"must be an object, got {type(message).__name__}")
    for key in ("role", "content"):
        if key not in message:
            raise field_error(path, line, f"{where}.{key}", "missing")
    if message["role"] not in ROLES:
        raise field_error(path, line, f"{where}.role", f"{message['role']!r} is not one of {', '.join(ROLES)}")
    content = message["content"]
    if not isinstance(content, str):
        raise field_error(path, line, f"{where}.content", f"must be a string, got {type(content).__name__}")
    if message["role"] == "assistant" and not content.strip():
        raise field_error(path, line, f"{where}.content", "assistant content is empty")


def read_chat_samples(path, default_source: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line, chat sample) of every sample of a file in any known format, converted and
    validated; a sample without `source` gets `default_source` (the file's stem if None)."""
    default_source = default_source or Path(str(path)).stem
    fmt = first_line = None
    for line, obj in read_records(path):
        if fmt is None:
            fmt, first_line = detect_format(obj), line
            if fmt is None:
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{line}: a sample must be a JSON object, got {type(obj).__name__}",
                                    path=str(path), line=line)
                raise DataError(f"{path}:{line}: not a known sample format (keys: {', '.join(sorted(obj)) or 'none'}); "
                                f"{FORMAT_HINT}", path=str(path), line=line)
        sample = convert(obj, fmt, path, line)
        if sample.get("source") is None:
            sample["source"] = default_source
        validate_chat(sample, path, line)
        yield line, sample
