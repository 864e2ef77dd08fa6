"""Where llama.cpp's pieces are, and the process that runs its HF->GGUF converter.

Two halves of one llama.cpp commit are used (toolchain facts, "llama.cpp from PyPI"):

- the compiled library of `llama-cpp-python` (the quantizer, `llama_model_quantize`, and
  generation) and its command-line tools from the same build (`llama-perplexity`,
  `llama-imatrix`, `llama-server`; `llama_tool(name)` finds them);
- the Python converter from the same sdist, extracted at `tools/llama.cpp/`
  (`convert_hf_to_gguf.py`, `conversion/`, and its own `gguf-py/`), so converter and
  quantizer agree on the format. `LORAFORGE_LLAMACPP_DIR` points elsewhere if needed.

The converter runs in a child process started as `python -m loraforge.llamacpp convert
[--release-shards] -- <converter arguments>`. That entry point puts the converter's own
`gguf-py` first on `sys.path` (never the PyPI `gguf`), installs small hooks, and runs
`convert_hf_to_gguf.py` as `__main__`. This module imports only the standard library at
import time, so the hooks are in place before the converter imports anything.

Hooks (all logged with a `loraforge:` prefix into the converter's output):

- release shards (`--release-shards`, the low-disk "consume" mode): before
  `GGUFWriter.write_tensors_to_file` writes the tensor data, each output tensor's lazy
  graph is walked down to the safetensors ranges it reads (`gguf.utility.LocalTensor`),
  which gives, per shard, the last output tensor that needs it. Right after that tensor is
  written (and flushed), the shard is unlinked, so the shards disappear one by one while the
  GGUF grows and the peak disk stays about one copy of the weights. A shard that is still
  memory-mapped is reported (its blocks are only freed when the mapping goes). A shard
  that is a symlink or has other hard links (a "link"-mode merge sharing the base's
  shards) is unlinked as a name only: the base model is never touched. A released shard
  that is opened again (a dependency the walk missed) raises at once instead of writing
  garbage. Config, tokenizer and index files stay (small; the index then names missing
  shards, so nothing can load the half-consumed folder as a model).
- SentencePiece vocab fixes (always on, no-ops for real Qwen checkpoints, which ship a
  byte-level BPE `tokenizer.json` and no `tokenizer.model`): the Qwen converters read a
  `tokenizer.model` but (1) only mark added tokens as special when
  `tokenizer_config.json` lists them in `added_tokens_decoder`; without it `<|im_start|>`
  and `<|im_end|>` become NORMAL tokens that llama.cpp never matches in text. The hook
  takes them from `tokenizer.json`'s `added_tokens` then (the same rule: special, or
  looking like `<|...|>` -> CONTROL, else USER_DEFINED). (2) They never write
  `tokenizer.ggml.add_space_prefix`, so llama.cpp prepends a space to the text and after
  every special token; the hook writes it from `tokenizer_config.json`'s
  `add_prefix_space`, else from the SentencePiece model's own `add_dummy_prefix`. (3) The
  Qwen2/Qwen3-MoE converter never tries a `tokenizer.model` (the dense one does, first) and
  refuses unknown BPE pre-tokenizers; the hook gives it the dense converter's rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_LOG_PREFIX = "loraforge:"


# --------------------------------------------------------------------------------------
# locating things
# --------------------------------------------------------------------------------------

def llamacpp_dir() -> Path:
    """The extracted llama.cpp converter tree (tools/llama.cpp unless LORAFORGE_LLAMACPP_DIR)."""
    d = Path(os.environ.get("LORAFORGE_LLAMACPP_DIR") or REPO_ROOT / "tools" / "llama.cpp")
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(
            f"llama.cpp converter not found at {d}/convert_hf_to_gguf.py; extract it from the "
            "llama-cpp-python sdist (vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py}) "
            "or set LORAFORGE_LLAMACPP_DIR"
        )
    return d


def llama_tool(name: str) -> Path:
    """A llama.cpp command-line tool of the llama-cpp-python build (setup.sh builds the tools
    with the library; they install into site-packages/bin, beside site-packages/lib)."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    tool = site / "bin" / name
    if not tool.is_file():
        raise FileNotFoundError(
            f"llama.cpp tool {name} not found at {tool}; run ./setup.sh (it builds llama.cpp's "
            "tools with -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=ON)"
        )
    return tool


def llama_tool_env(base: dict | None = None) -> dict:
    """Environment for a llama.cpp tool: its shared libraries (site-packages/lib) on
    LD_LIBRARY_PATH."""
    import sysconfig

    env = dict(os.environ if base is None else base)
    lib = str(Path(sysconfig.get_paths()["purelib"]) / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    return env


def converter_script() -> Path:
    return llamacpp_dir() / "convert_hf_to_gguf.py"


def gguf_py_dir() -> Path:
    """The converter's own gguf-py (same commit as the quantizer), not the PyPI `gguf`."""
    return llamacpp_dir() / "gguf-py"


def converter_env(threads: int | None = None, base: dict | None = None) -> dict:
    """Environment for the converter process: its gguf-py first on PYTHONPATH, then the
    converter folder (for `conversion`) and this repository (for `loraforge.llamacpp`)."""
    env = dict(os.environ if base is None else base)
    paths = [str(gguf_py_dir()), str(llamacpp_dir()), str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("NO_LOCAL_GGUF", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # tqdm's progress bar goes to the log: update it rarely
    env.setdefault("TQDM_MININTERVAL", "5")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def converter_command(model_dir, outfile, outtype: str, *, release_shards: bool = False,
                      extra_args: list[str] | None = None) -> list[str]:
    """The command line of the converter process (see the module docstring)."""
    cmd = [sys.executable, "-m", "loraforge.llamacpp", "convert"]
    if release_shards:
        cmd.append("--release-shards")
    cmd += ["--", str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    return cmd + list(extra_args or [])


# --------------------------------------------------------------------------------------
# hooks, run inside the converter process
# --------------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(f"{_LOG_PREFIX} {msg}", file=sys.stderr, flush=True)


def _mapped_paths() -> set[str]:
    """Paths of files this process has memory-mapped (Linux /proc/self/maps)."""
    out = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.add(parts[5].removesuffix(" (deleted)"))
    except OSError:
        pass
    return out


class _Unknown(Exception):
    """A tensor whose data sources cannot be determined (it then depends on every shard)."""


def _tensor_sources(obj) -> set[str]:
    """The files a (lazy) tensor reads: walk LazyBase args/kwargs/funcs (closures, defaults),
    containers and numpy base chains down to gguf.utility.LocalTensor ranges and memmaps.
    Raises _Unknown for data backed by an anonymous mmap (cannot tell which file)."""
    import functools
    import mmap
    import types

    import numpy as np
    from gguf.lazy import LazyBase, LazyChunkedTensor
    from gguf.utility import LocalTensor

    files: set[str] = set()
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (str, bytes, int, float, bool, type)) or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, LocalTensor):
            files.add(os.path.abspath(o.data_range.filename))
        elif isinstance(o, LazyBase):
            stack.append(o._args)
            stack.append(o._kwargs)
            stack.append(o._func)
            stack.append(o._data)
        elif isinstance(o, LazyChunkedTensor):
            stack.extend(o._chunks)
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, functools.partial):
            stack += [o.func, o.args, o.keywords]
        elif isinstance(o, types.MethodType):
            stack.append(o.__func__)
        elif isinstance(o, types.FunctionType):
            for cell in o.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # empty cell
                    pass
            stack.append(o.__defaults__)
            stack.append(o.__kwdefaults__)
        elif isinstance(o, np.ndarray):
            if isinstance(o, np.memmap) and getattr(o, "filename", None):
                files.add(os.path.abspath(o.filename))
            if o.base is not None:
                stack.append(o.base)
        elif isinstance(o, mmap.mmap):
            raise _Unknown("data backed by an mmap of unknown origin")
        # anything else (torch tensors evaluated from lazy leaves, module objects, the
        # model instance in a closure, ...) carries no file dependency of its own: a lazy
        # leaf keeps its LocalTensor in _args even after evaluation.
    return files


class _ShardReleaser:
    """Plans and performs the release of safetensors shards during the GGUF write."""

    def __init__(self, writer, events_path: str | None = None):
        self.writer = writer
        self.events_path = events_path
        self.released: set[str] = set()
        self.order: list[tuple[str, object]] = [
            (name, ti) for tensors in writer.tensors for name, ti in tensors.items()
        ]
        self.n = len(self.order)
        self.shards: set[str] = set()
        self.last_use: dict[str, int] = {}
        unknown_at: list[int] = []
        for i, (name, ti) in enumerate(self.order):
            try:
                deps = _tensor_sources(ti.tensor)
            except _Unknown as e:
                _say(f"release-shards: cannot trace the sources of {name!r} ({e}); "
                     "no shard is released before it is written")
                unknown_at.append(i)
                continue
            for f in deps:
                if f.endswith(".safetensors"):
                    self.shards.add(f)
                    self.last_use[f] = i
        # shards of the same model that no written tensor reads (only skipped tensors):
        # released after the last tensor
        self.unread: set[str] = set()
        for d in {os.path.dirname(f) for f in self.shards}:
            index = os.path.join(d, "model.safetensors.index.json")
            try:
                with open(index, encoding="utf-8") as fh:
                    names = set(json.load(fh).get("weight_map", {}).values())
            except (OSError, ValueError):
                continue
            self.unread |= {os.path.join(d, n) for n in names} - self.shards
        # a tensor of unknown origin pins every shard until it is written
        if unknown_at:
            for f in self.shards:
                self.last_use[f] = max(self.last_use.get(f, -1), unknown_at[-1])
        self.by_index: dict[int, list[str]] = {}
        for f, i in self.last_use.items():
            self.by_index.setdefault(i, []).append(f)
        self.shard_bytes = {f: os.path.getsize(f) for f in self.shards | self.unread if os.path.exists(f)}
        self.bytes_written = 0
        self._event({"event": "plan", "n_tensors": self.n,
                     "shards": {os.path.basename(f): {"bytes": self.shard_bytes.get(f, 0),
                                                      "last_tensor": self.last_use[f]}
                                for f in sorted(self.shards)}})
        _say(f"release-shards: {len(self.shards)} shard(s) feed {self.n} tensor(s); each is "
             "deleted right after the last tensor that reads it is written")

    def _event(self, ev: dict) -> None:
        if self.events_path:
            with open(self.events_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(ev) + "\n")

    def _flush(self) -> None:
        for fout in self.writer.fout or ():
            fout.flush()

    def after_tensor(self, i: int, nbytes: int) -> None:
        self.bytes_written += nbytes
        due = self.by_index.get(i)
        if due:
            self.release(due, after=i)

    def release(self, files, after: int | None) -> None:
        import gc

        self._flush()  # what was read from the shard is in the file (page cache) first
        gc.collect()  # drop the evaluated lazy graph (and its memmaps) of the written tensor
        name = self.order[after][0] if after is not None and after < self.n else None
        mapped = _mapped_paths()
        for f in sorted(files):
            if f in self.released:
                continue
            self.released.add(f)
            if not os.path.lexists(f):
                _say(f"release-shards: {os.path.basename(f)} is already gone")
                continue
            st = os.lstat(f)
            shared = os.path.islink(f) or st.st_nlink > 1
            real = os.path.realpath(f)
            os.unlink(f)
            still_mapped = not shared and (f in mapped or real in mapped)
            remaining = sum(b for g, b in self.shard_bytes.items() if g not in self.released)
            where = f"after tensor {after + 1}/{self.n} {name!r}" if name else "after the last tensor"
            note = " (a link: the name only, no space freed)" if shared else ""
            if still_mapped:
                note += " (still memory-mapped: its space is freed when the converter exits)"
            from loraforge.sizes.units import human  # pure Python: imports no gguf

            _say(f"released {os.path.basename(f)} ({human(self.shard_bytes.get(f, 0))}) {where}; "
                 f"GGUF data written {human(self.bytes_written)}, shards left {human(remaining)}{note}")
            self._event({"event": "release", "shard": os.path.basename(f), "after_tensor": after,
                         "tensor": name, "bytes": self.shard_bytes.get(f, 0),
                         "gguf_bytes_written": self.bytes_written, "shard_bytes_left": remaining,
                         "shared_link": shared, "still_mapped": still_mapped})

    def finish(self) -> None:
        rest = [f for f in self.shards | self.unread if f not in self.released]
        if rest:
            self.release(rest, after=None)


class _ReleasingTensor:
    """Stands in for a tensor in GGUFWriter.tensors: writes it, drops it, then tells the
    releaser (which unlinks the shards no later tensor needs)."""

    def __init__(self, inner, index: int, releaser: _ShardReleaser):
        self._inner = inner
        self._index = index
        self._releaser = releaser
        self.nbytes = inner.nbytes

    def tofile(self, *args, **kwargs):
        self._inner.tofile(*args, **kwargs)
        self._inner = None  # the evaluated graph can go now
        self._releaser.after_tensor(self._index, self.nbytes)

    def __getattr__(self, name):
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _install_release_hook(events_path: str | None) -> None:
    import gguf
    from gguf.utility import LocalTensor

    writer_cls = gguf.GGUFWriter
    original = writer_cls.write_tensors_to_file
    released_guard: set[str] = set()

    def write_tensors_to_file(self, *, progress: bool = False) -> None:
        if self.temp_file is not None:
            _say("release-shards: the writer uses a temp file (--use-temp-file); no shard is released")
            return original(self, progress=progress)
        releaser = _ShardReleaser(self, events_path)
        for i, (name, ti) in enumerate(releaser.order):
            ti.tensor = _ReleasingTensor(ti.tensor, i, releaser)
        original_release = releaser.release

        def release(files, after):
            original_release(files, after)
            released_guard.update(files)

        releaser.release = release
        original(self, progress=progress)
        releaser.finish()

    writer_cls.write_tensors_to_file = write_tensors_to_file

    # a released shard must never be read again: fail loudly instead of reading garbage
    original_mmap_bytes = LocalTensor.mmap_bytes

    def mmap_bytes(self):
        if os.path.abspath(self.data_range.filename) in released_guard:
            raise RuntimeError(
                f"release-shards: {self.data_range.filename} was already released but is read "
                "again; a dependency was missed. Rebuild the merged model and convert without "
                "release_shards."
            )
        return original_mmap_bytes(self)

    LocalTensor.mmap_bytes = mmap_bytes


def _install_vocab_hooks() -> None:
    import gguf
    from conversion.base import SentencePieceTokenTypes, TextModel

    original_create = TextModel._create_vocab_sentencepiece
    original_set = TextModel._set_vocab_sentencepiece

    def _create_vocab_sentencepiece(self):
        tokens, scores, toktypes = original_create(self)
        cfg_path = self.dir_model / "tokenizer_config.json"
        tok_json = self.dir_model / "tokenizer.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        if cfg.get("added_tokens_decoder") or not tok_json.is_file():
            return tokens, scores, toktypes
        added = json.loads(tok_json.read_text(encoding="utf-8")).get("added_tokens") or []
        fixed = []
        for tok in added:
            tid, content = int(tok["id"]), tok["content"]
            if tid >= len(tokens):
                continue
            if tok.get("special") or self.does_token_look_special(content):
                toktype = SentencePieceTokenTypes.CONTROL
            else:
                content = content.replace("\u2581", " ")
                toktype = SentencePieceTokenTypes.USER_DEFINED
            if toktypes[tid] in (SentencePieceTokenTypes.UNKNOWN, SentencePieceTokenTypes.CONTROL) \
                    and toktype == SentencePieceTokenTypes.CONTROL and tokens[tid] == content.encode():
                continue  # <unk>, <s>, </s>: already right
            tokens[tid], scores[tid], toktypes[tid] = content.encode("utf-8"), -1000.0, toktype
            fixed.append(f"{content}={int(toktype)}")
        if fixed:
            _say("vocab: tokenizer_config.json has no added_tokens_decoder; typed the added tokens "
                 f"of tokenizer.json (1=normal 3=control 4=user-defined): {', '.join(fixed)}")
        return tokens, scores, toktypes

    def _set_vocab_sentencepiece(self, *args, **kwargs):
        result = original_set(self, *args, **kwargs)
        key = gguf.Keys.Tokenizer.ADD_PREFIX
        if any(key in kv for kv in self.gguf_writer.kv_data):
            return result
        cfg_path = self.dir_model / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        value, source = cfg.get("add_prefix_space"), "tokenizer_config.json add_prefix_space"
        if value is None:
            try:
                from sentencepiece import sentencepiece_model_pb2 as pb

                proto = pb.ModelProto()
                proto.ParseFromString((self.dir_model / "tokenizer.model").read_bytes())
                value, source = bool(proto.normalizer_spec.add_dummy_prefix), "tokenizer.model add_dummy_prefix"
            except Exception as e:  # pragma: no cover - protobuf missing etc.
                _say(f"vocab: cannot read add_dummy_prefix from tokenizer.model ({e}); llama.cpp's default applies")
                return result
        self.gguf_writer.add_add_space_prefix(bool(value))
        _say(f"vocab: tokenizer.ggml.add_space_prefix = {bool(value)} (from {source})")
        return result

    TextModel._create_vocab_sentencepiece = _create_vocab_sentencepiece
    TextModel._set_vocab_sentencepiece = _set_vocab_sentencepiece

    # (3) the dense Qwen2/Qwen3 converter tries a SentencePiece tokenizer.model first and
    # falls back to the BPE path; the MoE one goes straight to the BPE path, which refuses
    # any tokenizer whose pre-tokenizer hash it does not know. Give the MoE the dense rule.
    from conversion.qwen import Qwen2MoeModel

    original_moe_set_vocab = Qwen2MoeModel.set_vocab

    def moe_set_vocab(self):
        if (self.dir_model / "tokenizer.model").is_file():
            _say("vocab: Qwen MoE with a SentencePiece tokenizer.model: converted like the dense "
                 "Qwen2/Qwen3 converter does (SentencePiece first)")
            try:
                return self._set_vocab_sentencepiece()
            except FileNotFoundError:
                pass
        return original_moe_set_vocab(self)

    Qwen2MoeModel.set_vocab = moe_set_vocab


def _run_converter(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge.llamacpp convert")
    parser.add_argument("--release-shards", action="store_true",
                        help="delete each safetensors shard once all its tensors are written")
    parser.add_argument("--events", default=os.environ.get("LORAFORGE_RELEASE_EVENTS"),
                        help="append JSON lines of the release plan/events to this file")
    parser.add_argument("--no-vocab-fixes", action="store_true")
    parser.add_argument("converter_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    conv_args = args.converter_args
    if conv_args and conv_args[0] == "--":
        conv_args = conv_args[1:]

    script = converter_script()
    # the converter's own gguf-py and conversion package, before anything imports gguf
    for p in (str(llamacpp_dir()), str(gguf_py_dir())):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    if "gguf" in sys.modules:  # pragma: no cover - would be a bug in this module
        raise RuntimeError("gguf was imported before the converter's gguf-py was put on sys.path")
    import gguf

    if not str(Path(gguf.__file__).resolve()).startswith(str(gguf_py_dir().resolve())):
        raise RuntimeError(f"imported gguf from {gguf.__file__}, not from {gguf_py_dir()}")
    _say(f"converter {script} (gguf-py {Path(gguf.__file__).parent})")
    if not args.no_vocab_fixes:
        _install_vocab_hooks()
    if args.release_shards:
        _install_release_hook(args.events)

    import runpy

    sys.argv = [str(script)] + conv_args
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "convert":
        print("usage: python -m loraforge.llamacpp convert [--release-shards] [--events FILE] "
              "-- MODEL_DIR --outtype TYPE --outfile FILE", file=sys.stderr)
        return 2
    return _run_converter(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
