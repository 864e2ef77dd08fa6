"""Ollama Modelfiles: render one for a ChatML (Qwen) fine-tune, and validate any Modelfile with
the rules of Ollama's own parser (github.com/ollama/ollama, parser/parser.go and
api/types.go FormatParams), since no Ollama server runs here.

Parser rules mirrored (same state machine, same messages):
- instructions FROM (required: "no FROM line"), PARAMETER, TEMPLATE, SYSTEM, ADAPTER, LICENSE,
  MESSAGE, REQUIRES, DRAFT, RENDERER, PARSER; case-insensitive; anything else: 'command must
  be one of "from", "license", ...'. A comment is a line whose first non-blank is '#'.
- values run to the end of the line; double quotes ("...") and triple quotes quote them,
  the latter across lines; a quote left open at the end is "unexpected EOF". Characters that are not printable
  (other than blanks and, inside quotes, newlines) are dropped, as Ollama does.
- PARAMETER names are [A-Za-z0-9_]+ and must be known ("unknown parameter 'x'"), with typed
  values: int num_ctx num_predict top_k seed repeat_last_n num_keep num_batch num_gpu
  main_gpu num_thread; float temperature top_p min_p typical_p repeat_penalty
  presence_penalty frequency_penalty; bool use_mmap; string list stop (repeatable).
  Ollama's deprecated names (penalize_newline, low_vram, f16_kv, logits_all, vocab_only,
  use_mlock, mirostat, mirostat_tau, mirostat_eta) only warn.
- MESSAGE roles: system, user, assistant. REQUIRES: a semantic version.
- with base_dir: FROM, ADAPTER and DRAFT files must exist (a FROM that names no path, like
  `qwen3:8b`, is a model name for Ollama to pull and is accepted).
Extra checks beyond Ollama's parser (errors): a TEMPLATE whose {{ }} actions or
if/range/with ... end blocks do not balance (Ollama's template.Parse would refuse it).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from loraforge.errors import UserError

from loraforge.constants import (CHATML_GO_TEMPLATE, ENDOFTEXT, FIM_GO_TEMPLATE, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX,
                                 IM_END, IM_START)
from loraforge.fileio import write_text_atomic

DEFAULT_STOP = (IM_START, IM_END, ENDOFTEXT)

# --------------------------------------------------------------------------------------
# Ollama's parser, ported
# --------------------------------------------------------------------------------------

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
            "parameter", "message", "requires")
ERR_INVALID_COMMAND = ('command must be one of "from", "license", "template", "system", "adapter", '
                       '"draft", "renderer", "parser", "parameter", "message", or "requires"')
ERR_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'
ERR_MISSING_FROM = "no FROM line"

INT_PARAMETERS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed",
                  "num_predict", "top_k", "repeat_last_n")
FLOAT_PARAMETERS = ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                    "frequency_penalty")
BOOL_PARAMETERS = ("use_mmap",)
LIST_PARAMETERS = ("stop",)
PARAMETER_TYPES = {**{k: "int" for k in INT_PARAMETERS}, **{k: "float" for k in FLOAT_PARAMETERS},
                   **{k: "bool" for k in BOOL_PARAMETERS}, **{k: "list" for k in LIST_PARAMETERS}}
DEPRECATED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
                         "mirostat", "mirostat_tau", "mirostat_eta")

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


class ModelfileError(UserError, ValueError):
    """A Modelfile Ollama would refuse; .line is the 1-based line (0 when unknown)."""

    def __init__(self, msg: str, line: int = 0):
        super().__init__(f"line {line}: {msg}" if line else msg)
        self.msg = msg
        self.line = line


class Command(tuple):
    """One instruction as (instruction, args): instruction upper-case (FROM, PARAMETER, ...),
    args the unquoted value; PARAMETER args are "name value", MESSAGE args "role: content".
    Attributes: .line (1-based, where it starts), .name (Ollama's internal command name:
    "model" for FROM, the parameter name for PARAMETER), .key (parameter name / role),
    .value (the value alone)."""

    def __new__(cls, instruction: str, args: str, *, line: int = 0, name: str = "", key: str | None = None,
                value: str | None = None):
        self = super().__new__(cls, (instruction, args))
        self.line = line
        self.name = name
        self.key = key
        self.value = args if value is None else value
        return self

    @property
    def instruction(self) -> str:
        return self[0]

    @property
    def args(self) -> str:
        return self[1]


def _is_alpha(r: str) -> bool:
    return ("a" <= r <= "z") or ("A" <= r <= "Z")


def _is_number(r: str) -> bool:
    return "0" <= r <= "9"


def _is_space(r: str) -> bool:
    return r in (" ", "\t")


def _is_newline(r: str) -> bool:
    return r in ("\r", "\n")


def _unquote(s: str) -> tuple[str, bool]:
    if len(s) >= 3 and s[:3] == '"""':
        if len(s) >= 6 and s[-3:] == '"""':
            return s[3:-3], True
        return "", False
    if len(s) >= 1 and s[0] == '"':
        if len(s) >= 2 and s[-1] == '"':
            return s[1:-1], True
        return "", False
    return s, True


class _UnexpectedEOF(Exception):
    pass


def _parse_rune(r: str, cs: int) -> tuple[int, str]:
    """parseRuneForState: (next state, rune to keep ('' for none)); raises on errors."""
    if cs == _NIL:
        if r == "#":
            return _COMMENT, ""
        if _is_space(r) or _is_newline(r):
            return _NIL, ""
        return _NAME, r
    if cs == _NAME:
        if _is_alpha(r):
            return _NAME, r
        if _is_space(r):
            return _VALUE, ""
        raise ModelfileError(ERR_INVALID_COMMAND)
    if cs == _VALUE:
        if _is_newline(r) or _is_space(r):
            return _NIL, r
        return _VALUE, r
    if cs in (_PARAMETER, _MESSAGE):
        if _is_alpha(r) or (cs == _PARAMETER and (_is_number(r) or r == "_")):
            return cs, r
        if _is_space(r):
            return _VALUE, ""
        raise _UnexpectedEOF()
    if cs == _COMMENT:
        return (_NIL, "") if _is_newline(r) else (_COMMENT, "")
    raise ModelfileError("")  # pragma: no cover


def _strip_bom(text: str | bytes) -> str:
    if isinstance(text, bytes):
        for bom, enc in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
            if text.startswith(bom):
                return text[len(bom):].decode(enc, errors="replace")
        return text.decode("utf-8", errors="replace")
    return text[1:] if text.startswith("\ufeff") else text


def _trim(s: str) -> str:
    return s.strip(" \t\n\r\v\f\u0085\u00a0")


def parse_modelfile(text: str | bytes) -> list[Command]:
    """Parse a Modelfile exactly as Ollama's parser.ParseFile does; raises ModelfileError
    (with the line number) on the first syntax error, like Ollama."""
    text = _strip_bom(text)
    commands: list[Command] = []
    curr, line, buf = _NIL, 1, []
    role = ""
    name = keyword = ""
    start_line = 1
    for ch in text:
        if _is_newline(ch):
            line += 1
        try:
            nxt, r = _parse_rune(ch, curr)
        except _UnexpectedEOF:
            raise ModelfileError(f"unexpected EOF: {''.join(buf)}", line) from None
        except ModelfileError as e:
            raise ModelfileError(e.msg, line) from None
        if nxt != curr:
            if curr == _NAME:
                word = "".join(buf)
                if word.lower() not in COMMANDS:
                    raise ModelfileError(ERR_INVALID_COMMAND, line)
                s = word.lower()
                keyword = s.upper()
                if s == "from":
                    name = "model"
                elif s == "parameter":
                    nxt = _PARAMETER
                elif s == "message":
                    nxt = _MESSAGE
                    name = s
                else:
                    name = s
            elif curr == _PARAMETER:
                name = "".join(buf)
            elif curr == _MESSAGE:
                word = "".join(buf)
                if word not in ("system", "user", "assistant"):
                    raise ModelfileError(ERR_INVALID_ROLE, line)
                role = word
            elif curr == _VALUE:
                s, ok = _unquote(_trim("".join(buf)))
                if not ok or _is_space(r):
                    buf.append(r)
                    continue
                commands.append(_make_command(keyword, name, role, s, start_line))
                role = ""
            if curr == _NIL and nxt == _NAME:
                start_line = line
            buf = []
            curr = nxt
        if r and r.isprintable():
            buf.append(r)
    if curr == _VALUE:
        s, ok = _unquote(_trim("".join(buf)))
        if not ok:
            raise ModelfileError(f"unexpected EOF: unterminated quoted value of the {keyword} on line "
                                 f"{start_line}", line)
        commands.append(_make_command(keyword, name, role, s, start_line))
    elif curr not in (_NIL, _COMMENT):
        raise ModelfileError(f"unexpected EOF: incomplete {keyword or 'instruction'} on line {start_line}", line)
    if not any(c.name == "model" for c in commands):
        raise ModelfileError(ERR_MISSING_FROM)
    return commands


def _make_command(keyword: str, name: str, role: str, value: str, line: int) -> Command:
    if keyword == "PARAMETER":
        return Command("PARAMETER", f"{name} {value}", line=line, name=name, key=name, value=value)
    if keyword == "MESSAGE":
        return Command("MESSAGE", f"{role}: {value}", line=line, name="message", key=role, value=value)
    return Command(keyword, value, line=line, name=name, value=value)


# --------------------------------------------------------------------------------------
# what `ollama create` checks after parsing (CreateRequest / FormatParams)
# --------------------------------------------------------------------------------------

_GO_INT = re.compile(r"[+-]?[0-9]+\Z")
_GO_FLOAT = re.compile(
    r"[+-]?(?:(?:[0-9](?:_?[0-9])*)?\.?[0-9](?:_?[0-9])*(?:[eE][+-]?[0-9]+)?"
    r"|[0-9]+\.(?:[eE][+-]?[0-9]+)?"
    r"|0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+"
    r"|inf(?:inity)?|nan)\Z", re.IGNORECASE)
_GO_BOOL = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
            "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
_SEMVER = re.compile(
    r"v(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*)"
    r"(?:-(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?)?)?\Z")
_FLOAT32_MAX = 3.4028234663852886e38


def parse_parameter(name: str, value: str):
    """FormatParams for one parameter: the typed value, or ValueError with Ollama's message."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise ValueError(f"unknown parameter '{name}'")
    if kind == "int":
        if not _GO_INT.match(value) or not (-2**63 <= int(value) < 2**63):
            raise ValueError(f"invalid int value [{value}]")
        return int(value)
    if kind == "float":
        ok = bool(_GO_FLOAT.match(value))
        if ok:
            v = value.replace("_", "")
            try:
                f = float.fromhex(v) if "x" in v.lower() and "n" not in v.lower() else float(v)
            except ValueError:
                ok = False
            else:
                if math.isfinite(f) and abs(f) > _FLOAT32_MAX:
                    ok = False  # strconv.ParseFloat(s, 32): out of range
        if not ok:
            raise ValueError(f"invalid float value [{value}]")
        return f
    if kind == "bool":
        if value not in _GO_BOOL:
            raise ValueError(f"invalid bool value [{value}]")
        return _GO_BOOL[value]
    return value  # stop: any string


def _looks_like_path(value: str) -> bool:
    v = value.strip()
    return (v.startswith(("./", "../", "/", "~", "\\", ".\\")) or v in (".", "..")
            or v.lower().endswith((".gguf", ".bin", ".safetensors")))


def _expand_path(value: str, base_dir: Path) -> Path:
    if value.startswith("~"):
        return Path(os.path.expanduser(value))
    p = Path(value)
    return p if p.is_absolute() else (base_dir / p)


def _file_errors(path: Path) -> list[str]:
    """A FROM/ADAPTER/DRAFT path: it must exist, and a file (not a safetensors folder) must be a
    GGUF llama.cpp reads (magic and version), or `ollama create` fails on it."""
    from loraforge.gguf import header_problem

    if not path.exists():
        return [f"no such file ({path})"]
    problem = header_problem(path) if path.is_file() else None
    return [f"{problem} ({path})"] if problem else []


_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)


def template_errors(template: str) -> list[str]:
    """Structural check of a Go text/template: balanced {{ }} and if/range/with/define/block
    ... end blocks (what would make Ollama's template.Parse fail)."""
    errors = []
    stripped = _ACTION.sub("", template)
    if "{{" in stripped or "}}" in stripped:
        errors.append("TEMPLATE has an unbalanced '{{' or '}}'")
    stack: list[str] = []
    for m in _ACTION.finditer(template):
        body = m.group(2).strip()
        if body.startswith("/*"):
            continue
        word = re.match(r"[a-z]+", body)
        word = word.group(0) if word else ""
        if word in ("if", "range", "with", "define", "block"):
            stack.append(word)
        elif word == "else":
            if not stack or stack[-1] not in ("if", "range", "with"):
                errors.append("TEMPLATE has {{ else }} outside if/range/with")
        elif word == "end":
            if not stack:
                errors.append("TEMPLATE has an unexpected {{ end }}")
            else:
                stack.pop()
    if stack:
        errors.append(f"TEMPLATE has unclosed {', '.join(stack)} block(s) (missing {{{{ end }}}})")
    return errors


def check_modelfile(text: str | bytes, base_dir: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a Modelfile; errors are what `ollama create` would refuse."""
    try:
        commands = parse_modelfile(text)
    except ModelfileError as e:
        return [str(e)], []
    errors: list[str] = []
    warnings: list[str] = []
    base = Path(base_dir) if base_dir is not None else None
    stops: list[str] = []
    template = None
    for c in commands:
        where = f"line {c.line}: " if c.line else ""
        if c.name in ("model", "adapter", "draft"):
            if base is not None:
                value = c.value
                if c.name != "model" or _looks_like_path(value):
                    errors += [f"{where}{c.instruction} {value}: {e}" for e in _file_errors(_expand_path(value, base))]
        elif c.name == "template":
            template = c.value
            errors += [f"{where}{e}" for e in template_errors(c.value)]
        elif c.name in ("system", "license", "renderer", "parser", "message"):
            pass
        elif c.name == "requires":
            v = c.value if c.value.startswith("v") else "v" + c.value
            if not _SEMVER.match(v):
                errors.append(f"{where}requires must be a valid semver (e.g. 0.14.0)")
        elif c.name in DEPRECATED_PARAMETERS:
            warnings.append(f"{where}warning: parameter {c.name} is deprecated")
        else:
            try:
                parse_parameter(c.name, c.value)
            except ValueError as e:
                errors.append(f"{where}{e}")
            if c.name == "stop":
                stops.append(c.value)
    if template and "<|im_start|>" in template and "<|im_end|>" not in stops:
        warnings.append("warning: a ChatML TEMPLATE without PARAMETER stop \"<|im_end|>\": "
                        "Qwen fine-tunes would not stop at the end of their turn")
    return errors, warnings


def validate_modelfile(text: str | bytes, base_dir: str | os.PathLike | None = None) -> list[str]:
    """The errors Ollama would raise for this Modelfile (empty: valid). With base_dir (the
    Modelfile's folder), FROM/ADAPTER/DRAFT files must exist."""
    return check_modelfile(text, base_dir)[0]


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------

def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ValueError(f'{what} contains \'"""\', which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def _number(x) -> str:
    if isinstance(x, bool):
        raise TypeError("a number is expected")
    if isinstance(x, int):
        return str(x)
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def _param_value(v: str) -> str:
    """A PARAMETER value, double-quoted (triple-quoted when it has quotes or newlines)."""
    if '"' in v or "\n" in v or "\r" in v:
        return _triple_quoted(v, "a PARAMETER value")
    return f'"{v}"'


def render_modelfile(gguf_path_relative: str, system: str | None, temperature: float, top_p: float,
                     num_ctx: int, stop=DEFAULT_STOP, template: str | None = CHATML_GO_TEMPLATE, *,
                     extra_parameters: dict | None = None, header: str | None = None,
                     adapter_path_relative: str | None = None) -> str:
    """A Modelfile: FROM (the GGUF, relative to the Modelfile: ./Q5_K_M.gguf), ADAPTER (a LoRA
    GGUF applied on top of FROM, when given), TEMPLATE (ChatML), SYSTEM (triple-quoted),
    PARAMETER temperature/top_p/num_ctx and one PARAMETER stop per stop string (without
    <|im_end|>/<|im_start|> a Qwen fine-tune never stops)."""

    def relative(path: str, what: str) -> str:
        p = str(path).replace(os.sep, "/")
        if not (p.startswith(("./", "../", "/", "~"))):
            p = "./" + p
        if p != p.strip() or "\n" in p:
            raise ValueError(f"unusable {what} path {p!r}")
        return p

    src = relative(gguf_path_relative, "FROM")
    if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx <= 0:
        raise ValueError(f"num_ctx must be a positive int, got {num_ctx!r}")
    lines = []
    if header:
        lines += [f"# {h}" if h else "#" for h in header.splitlines()] + [""]
    lines += [f"FROM {src}"]
    if adapter_path_relative is not None:
        lines.append(f"ADAPTER {relative(adapter_path_relative, 'ADAPTER')}")
    lines.append("")
    if template:
        lines += [f"TEMPLATE {_triple_quoted(template, 'TEMPLATE')}", ""]
    if system:
        lines += [f"SYSTEM {_triple_quoted(system, 'SYSTEM')}", ""]
    lines.append(f"PARAMETER temperature {_number(temperature)}")
    lines.append(f"PARAMETER top_p {_number(top_p)}")
    lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    for key, value in (extra_parameters or {}).items():
        vals = value if isinstance(value, (list, tuple)) else [value]
        for v in vals:
            text = _number(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (
                str(v).lower() if isinstance(v, bool) else _param_value(str(v)))
            lines.append(f"PARAMETER {key} {text}")
    seen = set()
    for s in stop or ():
        if s in seen:
            continue
        seen.add(s)
        lines.append(f"PARAMETER stop {_param_value(s)}")
    text = "\n".join(lines) + "\n"
    errors = validate_modelfile(text)
    if errors:
        raise ValueError("rendered Modelfile is invalid: " + "; ".join(errors))
    return text


# --------------------------------------------------------------------------------------
# stop tokens and the chat template of a model folder
# --------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _token_text(tok) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return None


def chat_template_of(model_dir: str | os.PathLike) -> str | None:
    """The HF chat template of a model folder (chat_template.jinja, chat_template.json or
    tokenizer_config.json's chat_template; a list of named templates gives 'default')."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for p in (d / "chat_template.json", d / "tokenizer_config.json"):
        t = _read_json(p).get("chat_template")
        if isinstance(t, list):
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if t:
            return t
    return None


def stop_tokens(model_dir: str | os.PathLike) -> list[str]:
    """Stop strings for a model folder: the control tokens of the form <|...|> that its chat
    template uses (<|im_start|>, <|im_end|> for ChatML), its EOS token, and <|endoftext|>
    when the vocabulary has it (Qwen's end of document). Falls back to DEFAULT_STOP."""
    d = Path(model_dir)
    cfg = _read_json(d / "tokenizer_config.json")
    template = chat_template_of(d) or ""
    special: list[str] = []
    for tok in (cfg.get("added_tokens_decoder") or {}).values():
        if (t := _token_text(tok)):
            special.append(t)
    for tok in _read_json(d / "tokenizer.json").get("added_tokens") or []:
        if (t := _token_text(tok)):
            special.append(t)
    for key in ("eos_token", "pad_token"):
        if (t := _token_text(cfg.get(key))):
            special.append(t)
    control = [t for t in dict.fromkeys(special) if t.startswith("<|") and t.endswith("|>")]
    out = [t for t in control if t in template]
    eos = _token_text(cfg.get("eos_token"))
    if eos:
        out.append(eos)
    if "<|endoftext|>" in special:
        out.append("<|endoftext|>")
    out = list(dict.fromkeys(out))
    if not out:
        return list(DEFAULT_STOP)
    order = {t: i for i, t in enumerate(DEFAULT_STOP)}
    return sorted(out, key=lambda t: (order.get(t, len(order)), out.index(t)))


def tokenizer_tokens(model_dir: str | os.PathLike) -> tuple[set[str], list[Path]]:
    """Every token text of a model folder's tokenizer (tokenizer.json's vocabulary and added
    tokens, tokenizer_config.json's added_tokens_decoder) and the files read."""
    d = Path(model_dir)
    tokens: set[str] = set()
    read = []
    tok = _read_json(d / "tokenizer.json")
    if tok:
        read.append(d / "tokenizer.json")
        vocab = (tok.get("model") or {}).get("vocab") or {}
        tokens.update(vocab if isinstance(vocab, dict) else (v[0] for v in vocab if isinstance(v, list)))
        tokens.update(t for t in map(_token_text, tok.get("added_tokens") or []) if t)
    cfg = _read_json(d / "tokenizer_config.json")
    if cfg:
        read.append(d / "tokenizer_config.json")
        tokens.update(t for t in map(_token_text, (cfg.get("added_tokens_decoder") or {}).values()) if t)
    return tokens, read


def check_fim_tokens(model_dir: str | os.PathLike) -> None:
    """The fill-in-the-middle TEMPLATE writes <|fim_prefix|>, <|fim_suffix|> and <|fim_middle|>:
    each must be a token of the model's tokenizer, or the model would see them as plain text
    and complete nonsense. Raises ModelfileError naming the token and the tokenizer file."""
    tokens, read = tokenizer_tokens(model_dir)
    files = " and ".join(map(str, read)) or f"{model_dir} (no tokenizer.json or tokenizer_config.json)"
    missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if t not in tokens]
    if missing:
        raise ModelfileError(
            f"fill-in-the-middle TEMPLATE: {', '.join(missing)} is not a token of the tokenizer in {files}; "
            "this model was not trained for FIM (Qwen2.5-Coder and Qwen3-Coder are). Set "
            "models.<key>.ollama.fim: false, or use another continue.autocomplete_model")


def is_chatml(model_dir: str | os.PathLike) -> bool:
    t = chat_template_of(model_dir) or ""
    return "<|im_start|>" in t and "<|im_end|>" in t


def modelfile_for_model(gguf_path: str | os.PathLike, modelfile_path: str | os.PathLike,
                        base_dir: str | os.PathLike, *, system: str | None, temperature: float,
                        top_p: float, num_ctx: int, template: str | None = None, header: str | None = None,
                        fim: bool = False, adapter_path: str | os.PathLike | None = None) -> str:
    """Render the Modelfile at modelfile_path for gguf_path (FROM relative to the Modelfile),
    stop tokens and the template kind from the HF folder base_dir: a ChatML chat template
    (or none at all: Qwen's ChatML is assumed, with a warning on stderr) gets CHATML_GO_TEMPLATE;
    any other chat template needs an explicit Ollama `template`. fim: the ChatML template with
    Qwen's fill-in-the-middle branch (FIM_GO_TEMPLATE), after checking the tokenizer has the FIM
    tokens. adapter_path: a LoRA GGUF for an ADAPTER line (FROM is then the base's GGUF)."""
    if fim:
        if template is not None:
            raise ValueError("fim=True writes its own TEMPLATE; do not pass one")
        check_fim_tokens(base_dir)
    if template is None:
        if chat_template_of(base_dir) is None:
            print(f"warning: {base_dir} has no chat template; assuming ChatML (Qwen)", file=sys.stderr)
        elif not is_chatml(base_dir):
            raise ValueError(f"{base_dir}: the chat template is not ChatML (<|im_start|>/<|im_end|>); "
                             "pass an Ollama template explicitly")
        template = FIM_GO_TEMPLATE if fim else CHATML_GO_TEMPLATE
    stops = stop_tokens(base_dir)
    if template in (CHATML_GO_TEMPLATE, FIM_GO_TEMPLATE):  # the markers the template writes always stop a reply
        stops = list(dict.fromkeys([*DEFAULT_STOP, *stops]))
    here = Path(modelfile_path).resolve().parent
    rel = os.path.relpath(Path(gguf_path).resolve(), here)
    adapter_rel = None if adapter_path is None else os.path.relpath(Path(adapter_path).resolve(), here)
    return render_modelfile(rel, system, temperature, top_p, num_ctx, stop=stops,
                            template=template, header=header, adapter_path_relative=adapter_rel)


def write_modelfile(path: str | os.PathLike, text: str) -> Path:
    """Validate (FROM must exist relative to the Modelfile's folder) and write atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = validate_modelfile(text, base_dir=out.parent)
    if errors:
        raise ValueError(f"refusing to write an invalid Modelfile {out}: " + "; ".join(errors))
    return write_text_atomic(out, text)


def write_model_modelfile(path: str | os.PathLike, gguf_path: str | os.PathLike, base_dir: str | os.PathLike, *,
                          name: str | None, system: str | None, temperature: float, top_p: float,
                          num_ctx: int, fim: bool = False, adapter_path: str | os.PathLike | None = None) -> Path:
    """The write_modelfile rule: render the model's Modelfile (`modelfile_for_model`, with a
    header saying how to register it as `name`, default the folder's name), validate and write
    it (`write_modelfile`). fim: with the fill-in-the-middle TEMPLATE (tab completion);
    adapter_path: FROM the base's GGUF plus ADAPTER (the adapter-only variant)."""
    out = Path(path)
    name = name or out.parent.name
    text = modelfile_for_model(
        gguf_path, out, base_dir, system=system, temperature=temperature, top_p=top_p, num_ctx=num_ctx,
        header=f"{name}, generated by lora-forge. Register it with:\n  ollama create {name} -f {out}",
        fim=fim, adapter_path=adapter_path,
    )
    write_modelfile(out, text)
    print(f"wrote {out} (validated with Ollama's parser rules)\n{text}")
    return out


# --------------------------------------------------------------------------------------
# CLI: loraforge check-modelfile FILE
# --------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("file", help="the Modelfile to check")
    parser.add_argument("--base-dir", default=None,
                        help="resolve FROM/ADAPTER/DRAFT paths here (default: the Modelfile's folder)")
    parser.add_argument("--no-files", action="store_true", help="do not check that FROM/ADAPTER files exist")


def run(args) -> int:
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    base = None if args.no_files else (Path(args.base_dir) if args.base_dir else path.resolve().parent)
    errors, warnings = check_modelfile(data, base)
    for w in warnings:
        print(f"{path}: {w}", file=sys.stderr)
    for e in errors:
        print(f"{path}: {e}")
    if errors:
        print(f"{path}: {len(errors)} error(s)")
        return 1
    n = len(parse_modelfile(data))
    print(f"{path}: ok ({n} instructions)")
    return 0
