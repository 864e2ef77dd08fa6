"""GGUF export: HF folder -> intermediate GGUF -> quantized GGUF, and a smoke check.

- `convert_to_gguf(model_dir, out, "q8_0")` runs llama.cpp's own converter
  (`tools/llama.cpp/convert_hf_to_gguf.py` with its own gguf-py, the commit of the quantizer)
  writing Q8_0 (or F16/BF16) directly, no F16 GGUF first. `release_shards=True` deletes each
  safetensors shard as soon as its tensors are in the GGUF (the article's low-disk path,
  done inside the converter: see `loraforge.llamacpp`).
- `quantize(in, out, "Q5_K_M", threads)` calls `llama_model_quantize` of llama-cpp-python
  with `allow_requantize = True` (the flag the article was missing), so the Q8_0
  intermediate can be requantized; from an F16/BF16 intermediate it is a plain quantization.
- `quantize(..., release_input=...)` (the low-disk "consume" mode) frees the input while it is
  read: llama.cpp logs `[ i/ n] name` as it starts each tensor, so the tensor before it has
  been read, quantized and written; its byte range in the input (from gguf-py's tensor infos,
  matched by name: llama.cpp's order is not the file's) is deallocated with
  `fallocate(PUNCH_HOLE | KEEP_SIZE)`, which frees the blocks even though llama.cpp still has
  the file memory-mapped (deleting it would free nothing until the mapping goes). The input
  is renamed `<name>.releasing` first and deleted at the end; a failure deletes it once a
  hole was punched (it is no longer a complete GGUF) and says so, or renames it back when it
  is still intact. Only the last consumer of a temp intermediate may do this: see
  `release_decision` (the consumers file written by the workflow's onstart hook, the other
  consumers finished in this run, no other process holding the file).
- `check_gguf(path)` reads the metadata with the gguf reader and loads the file in llama.cpp
  to generate a few tokens from a ChatML prompt.

Every output is written to `<name>.partial` and renamed when complete, so a half-written GGUF
never looks finished. `inspect-gguf` is the CLI of `check_gguf`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterable, Iterator

from loraforge import llamacpp
from loraforge.constants import CONVERTER_FTYPES, ENDOFTEXT, FTYPE_ALIASES, IM_END, IM_START, NEEDS_IMATRIX
from loraforge.errors import DiskFullError, UserError, disk_full_message, looks_like_disk_full, nearly_full
from loraforge.fileio import partial_path, write_json_atomic

# the outtypes convert_hf_to_gguf.py writes directly
CONVERTER_OUTTYPES = tuple(t.lower() for t in CONVERTER_FTYPES)
DEFAULT_CHECK_PROMPT = (
    f"{IM_START}system\nYou are an expert Ruby on Rails architect.{IM_END}\n"
    f"{IM_START}user\nWrite a Rails model for a blog post with a title.{IM_END}\n"
    f"{IM_START}assistant\n"
)


class GGUFCheckError(UserError, RuntimeError):
    """A GGUF failed its smoke check (metadata or llama.cpp load/generation)."""


# --------------------------------------------------------------------------------------
# logs and atomic outputs
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _log_target(log) -> Iterator[IO[str] | None]:
    """`log` is None, a path (appended to), or an open text file."""
    if log is None:
        yield None
    elif hasattr(log, "write"):
        yield log
    else:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            yield f


def _write(f: IO[str] | None, text: str) -> None:
    if f is not None:
        f.write(text if text.endswith("\n") else text + "\n")
        f.flush()


GGUF_MAGIC = b"GGUF"
# llama.cpp (and so Ollama) reads GGUF versions 2 and 3: "GGUFv1 is no longer supported"
GGUF_MIN_VERSION = 2


def header_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a GGUF that llama.cpp can open (magic, version), or None when its header is fine."""
    from gguf import GGUF_VERSION

    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        size = os.path.getsize(path)
        found = "it is empty" if size == 0 else f"it starts with {head[:4]!r}"
        return f"not a GGUF file: a GGUF starts with the magic {GGUF_MAGIC!r}, {found}"
    if len(head) < 8:
        return f"not a GGUF file: {os.path.getsize(path)} bytes, too short for a GGUF header"
    version, swapped = int.from_bytes(head[4:8], "little"), int.from_bytes(head[4:8], "big")
    if GGUF_MIN_VERSION <= version <= GGUF_VERSION:
        return None
    if GGUF_MIN_VERSION <= swapped <= GGUF_VERSION:
        return f"a big-endian GGUF (version {swapped}): llama.cpp and Ollama read little-endian ones"
    return (f"GGUF version {version}, not one llama.cpp reads ({GGUF_MIN_VERSION} to {GGUF_VERSION}): "
            "the file is damaged or too old; convert the model again")


def _check_magic(path: Path) -> None:
    problem = header_problem(path)
    if problem is not None:
        raise RuntimeError(f"{path}: {problem}")


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------

def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    cfg = model_dir / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))


def convert_to_gguf(model_dir, out_path, outtype: str = "q8_0", *, release_shards: bool = False,
                    threads: int | None = None, log=None) -> Path:
    """Convert a Hugging Face model folder to a GGUF with llama.cpp's converter.

    outtype: q8_0 (default, the smallest intermediate), f16, bf16 (lossless for bf16
    weights) or f32. release_shards: delete each safetensors shard of model_dir as soon as
    all tensors read from it are written (peak disk ~ one copy of the weights; model_dir is
    consumed). The converter's output (progress included) goes to `log` (path or file).
    Returns out_path; raises RuntimeError (with the log's last lines) on failure."""
    model_dir, out = Path(model_dir), Path(out_path)
    outtype = outtype.lower()
    if outtype not in CONVERTER_OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not written by convert_hf_to_gguf.py; "
                         f"choose one of {', '.join(CONVERTER_OUTTYPES)} (quantize further with quantize())")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    shards_before = sorted(p.name for p in model_dir.glob("*.safetensors"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    tmp.unlink(missing_ok=True)
    cmd = llamacpp.converter_command(model_dir, tmp, outtype, release_shards=release_shards)
    env = llamacpp.converter_env(threads)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.time()
    with _log_target(log) as f:
        _write(f, f"$ {' '.join(cmd)}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, errors="replace", bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if f is not None:
                f.write(line)
        rc = proc.wait()
        seconds = time.time() - started
        if rc != 0:
            disk_full = looks_like_disk_full(text="\n".join(tail)) or nearly_full([tmp])
            tmp.unlink(missing_ok=True)
            gone = [s for s in shards_before if not (model_dir / s).exists()]
            lost = (f" {len(gone)} of {len(shards_before)} shards of {model_dir} were already released: "
                    "rebuild the merged model before retrying." if gone else "")
            _write(f, f"conversion FAILED (exit {rc}) after {seconds:.1f}s.{lost}")
            if disk_full:
                raise DiskFullError(disk_full_message(out, f"converting {model_dir} to GGUF") + lost)
            raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {rc}) on {model_dir}.{lost}\n"
                               + "\n".join(tail))
        _check_magic(tmp)
        meta = gguf_metadata(tmp, tensors=False)
        if _has_chat_template(model_dir) and not meta.get("chat_template"):
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{model_dir} has a chat template but the GGUF has no tokenizer.chat_template")
        if not meta.get("n_tokens"):
            tmp.unlink(missing_ok=True)
            raise RuntimeError("the GGUF has no tokenizer (tokenizer.ggml.tokens missing)")
        os.replace(tmp, out)
        size = out.stat().st_size
        _write(f, f"converted {model_dir} -> {out} ({outtype}, {size} bytes) in {seconds:.1f}s")
    return out


# --------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------

def quant_types() -> dict[str, int]:
    """Every llama.cpp file type name -> LLAMA_FTYPE_* value, read from llama_cpp itself
    (Q4_0 ... Q8_0, Q2_K, Q2_K_S, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, IQ*, TQ1_0, TQ2_0,
    MXFP4_MOE, F16, BF16, F32, ...), plus llama-quantize's aliases Q3_K/Q4_K/Q5_K."""
    import llama_cpp

    out: dict[str, int] = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            out[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(llama_cpp, attr))
        elif attr == "LLAMA_FTYPE_ALL_F32":
            out["F32"] = int(getattr(llama_cpp, attr))
    for alias, target in FTYPE_ALIASES.items():
        if target in out:
            out[alias] = out[target]
    return out


def ftype_for(qtype: str) -> int:
    """LLAMA_FTYPE_* value of a type name (case-insensitive); ValueError naming unknown ones."""
    types = quant_types()
    key = str(qtype).strip().upper()
    if key not in types:
        raise ValueError(f"unknown quantization type {qtype!r}; llama.cpp knows: {', '.join(sorted(types))}")
    return types[key]


def ftype_name(ftype: int) -> str:
    """The canonical name of a general.file_type value (e.g. 15 -> 'Q4_K_M')."""
    for name, value in quant_types().items():
        if value == int(ftype) and name not in FTYPE_ALIASES:
            return name
    return f"UNKNOWN_{int(ftype)}"


@contextlib.contextmanager
def llama_log_to(sink) -> Iterator[None]:
    """Route llama.cpp's log (all levels) to `sink` (a callable taking str) while active;
    llama-cpp-python's own callback is restored afterwards."""
    import llama_cpp
    import llama_cpp._logger as lc_logger

    @llama_cpp.llama_log_callback
    def _callback(level, text, user_data):  # noqa: ARG001
        try:
            sink(text.decode("utf-8", errors="replace"))
        except Exception:  # never raise into C
            pass

    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(lc_logger.llama_log_callback, ctypes.c_void_p(0))
        del _callback


# --------------------------------------------------------------------------------------
# releasing the input while quantizing (consume mode)
# --------------------------------------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
RELEASING_SUFFIX = ".releasing"
# llama_model_quantize_impl logs "[%4d/%4d] %36s - [dims], type = ..." as it starts a tensor
_TENSOR_LINE = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]\s+(\S+)\s+-\s")
_libc = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset + length) of an open (writable) file, keeping its size:
    the blocks are freed at once, even while the file is memory-mapped; reads of the range
    then give zeros. OSError (errno EOPNOTSUPP where the filesystem cannot)."""
    global _libc
    if length <= 0:
        return
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        fn = getattr(lib, "fallocate64", None) or lib.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _libc = fn
    if _libc(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, int(offset), int(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")


def releasing_path(src: str | os.PathLike) -> Path:
    """Where an input being released lives during the quantization (never looks complete)."""
    src = Path(src)
    return src.with_name(src.name + RELEASING_SUFFIX)


def processes_holding(path: str | os.PathLike, exclude: Iterable[int] | None = None) -> list[int]:
    """Pids of the processes (other than `exclude`, default this one) that have the file open
    or memory-mapped (/proc/*/fd and /proc/*/maps, same inode). Processes whose /proc
    entries cannot be read (another user's, without privileges) are not seen."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    real = os.path.realpath(path)
    skip = {os.getpid()} if exclude is None else set(exclude)
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        found = False
        for fd in fds:
            try:
                fst = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == key:
                found = True
                break
        if not found:
            try:
                with open(f"/proc/{pid}/maps") as fh:
                    for line in fh:
                        parts = line.split(None, 5)
                        if len(parts) < 6 or parts[4] == "0":
                            continue
                        if int(parts[4]) != st.st_ino:
                            continue
                        major, minor = (int(x, 16) for x in parts[3].split(":"))
                        if os.makedev(major, minor) == st.st_dev or parts[5].rstrip("\n").removesuffix(" (deleted)") == real:
                            found = True
                            break
            except (OSError, ValueError):
                pass
        if found:
            holders.append(pid)
    return holders


def _ancestors() -> set[int]:
    """This process and its ancestors (the Snakemake process that runs a job's script)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def release_decision(src: str | os.PathLike, out: str | os.PathLike,
                     consumers: str | os.PathLike | bool) -> tuple[bool, str]:
    """Whether quantizing `src` into `out` may release (consume) `src`, and why (not).

    consumers: the consumers file of `src` that the workflow's onstart hook wrote (JSON:
    `intermediate`, `consumers` (the outputs of every job of this run reading it), `pid` (the
    Snakemake process), `started` (time of the run's start)), or True when the caller vouches
    that nothing else will read `src`. With a file, every other listed consumer must have
    finished in this run (its output exists, written after the run started and after `src`),
    and the file must come from this run (its pid is this process or an ancestor). In both
    cases no other process may have `src` open or mapped."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        return False, f"{src} does not exist"
    if consumers is not True:
        manifest = Path(consumers)
        try:
            info = json.loads(manifest.read_text())
        except FileNotFoundError:
            return False, f"no consumers file {manifest} (written by the workflow's onstart hook in consume mode)"
        except (OSError, ValueError) as e:
            return False, f"unreadable consumers file {manifest}: {e}"
        if not _same_file(info.get("intermediate", ""), src):
            return False, f"{manifest} lists the consumers of {info.get('intermediate')}, not of {src}"
        if int(info.get("pid", -1)) not in _ancestors():
            return False, f"{manifest} was written by another run (pid {info.get('pid')}), not the one running this job"
        listed = [str(c) for c in info.get("consumers", [])]
        if not any(_same_file(c, out) for c in listed):
            return False, f"{out} is not a consumer listed in {manifest}"
        started = float(info.get("started", 0))
        src_mtime = src.stat().st_mtime
        for c in listed:
            if _same_file(c, out):
                continue
            try:
                mtime = os.stat(c).st_mtime
            except OSError:
                return False, f"another consumer, {c}, has not finished yet"
            if mtime < started or mtime < src_mtime:
                return False, f"another consumer, {c}, has not been rebuilt in this run yet"
    holders = processes_holding(src)
    if holders:
        return False, f"{src} is open in another process (pid {', '.join(map(str, holders))})"
    return True, ("the last consumer of this run" if consumers is not True else "asked for") + ", nothing else holds it"


class _InputReleaser:
    """Frees the tensor data of a GGUF that llama.cpp is quantizing, tensor by tensor.

    Each tensor owns its byte range in the file up to the next tensor (its padding
    included). When a tensor is done, the maximal run of done neighbours (in file order)
    around it is deallocated, block-aligned inwards, so no byte of a tensor still to be read
    is ever touched; a block shared by two tensors goes when both are done."""

    def __init__(self, src: Path):
        from gguf import GGUFReader

        self.src = Path(src)
        reader = GGUFReader(str(self.src))
        spans = sorted((int(t.data_offset), int(t.n_bytes), str(t.name)) for t in reader.tensors)
        del reader
        size = self.src.stat().st_size
        self.names = [name for _, _, name in spans]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.start = [off for off, _, _ in spans]
        self.end = self.start[1:] + [size]
        self.data_bytes = (size - self.start[0]) if spans else 0
        self.done = [False] * len(spans)
        self.block = max(512, os.statvfs(self.src).f_bsize or 4096)
        self.path = self.src  # renamed to .releasing by begin()
        self.fd: int | None = None
        self.current: str | None = None
        self.punched = 0
        self.tensors_released = 0
        self.error: str | None = None
        self.closed = False
        self._lock = threading.Lock()

    @property
    def damaged(self) -> bool:
        return self.punched > 0

    def begin(self) -> Path:
        """Rename the input out of the way (a run killed mid-way never leaves a half-released
        file under the name of a complete one) and open it for punching."""
        target = releasing_path(self.src)
        target.unlink(missing_ok=True)
        os.rename(self.src, target)
        self.path = target
        try:
            self.fd = os.open(target, os.O_RDWR)
        except OSError:
            os.rename(target, self.src)
            self.path = self.src
            raise
        return target

    def _floor(self, n: int) -> int:
        return n // self.block * self.block

    def _ceil(self, n: int) -> int:
        return -(-n // self.block) * self.block

    def on_log(self, text: str) -> None:
        for m in _TENSOR_LINE.finditer(text):
            with self._lock:
                if self.current is not None:
                    self.tensor_done(self.current)
                self.current = m.group(3)

    def tensor_done(self, name: str) -> None:
        i = self.index.get(name)
        if i is None or self.done[i] or self.fd is None or self.error:
            return
        self.done[i] = True
        lo = i
        while lo > 0 and self.done[lo - 1]:
            lo -= 1
        hi = i
        while hi + 1 < len(self.done) and self.done[hi + 1]:
            hi += 1
        # punched so far: the aligned interior of each done run; now the merged run's
        a, b = self._ceil(self.start[lo]), self._floor(self.end[hi])
        p0 = self._floor(self.start[i]) if lo < i else self._ceil(self.start[i])
        p1 = self._ceil(self.end[i]) if hi > i else self._floor(self.end[i])
        p0, p1 = max(p0, a), min(p1, b)
        if p1 > p0:
            try:
                punch_hole(self.fd, p0, p1 - p0)
            except OSError as e:
                self.error = (f"punching holes in {self.path} failed ({e}); the rest of it is freed "
                              "when the quantization is done")
                return
            self.punched += p1 - p0
        self.tensors_released += 1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def finish(self) -> str:
        """Success: delete the input (what was not punched yet is freed now)."""
        self.close()
        self.path.unlink(missing_ok=True)
        self.closed = True
        return (f"released {self.src} while quantizing: {self.tensors_released} of {len(self.names)} tensors "
                f"({self.punched} bytes) freed as they were done, the rest and the file at the end"
                + (f"; {self.error}" if self.error else ""))

    def abort(self) -> str:
        """Failure: a damaged input is deleted (it is no longer a complete GGUF), an intact one
        gets its name back. Returns what happened, for the error message."""
        self.close()
        self.closed = True
        if self.damaged:
            self.path.unlink(missing_ok=True)
            return (f" The input {self.src} was being released ({self.punched} bytes of "
                    f"{self.tensors_released} tensors already freed), so it was deleted: it is no longer a "
                    "complete GGUF. Rebuild it (Snakemake reruns the merge and the conversion).")
        if self.path != self.src:
            os.rename(self.path, self.src)
            self.path = self.src
        return f" The input {self.src} is intact (nothing of it was released yet)."


def quantize(in_gguf, out_gguf, qtype: str, threads: int | None = None, *, log=None,
             release_input: str | os.PathLike | bool = False, imatrix: str | os.PathLike | None = None) -> Path:
    """Quantize a GGUF with llama.cpp (llama_model_quantize, allow_requantize=True).

    qtype: any llama.cpp type name (see quant_types()). Works from a Q8_0 intermediate
    (requantize) or from F16/BF16. threads: 0/None = llama.cpp's default (all cores).

    release_input (consume mode): a consumers file of the input (see `release_decision`) or
    True; when the decision allows it, the input is freed tensor by tensor while it is
    quantized and deleted at the end (see the module docstring); otherwise, and with False,
    it is left as it is. The output is the same either way.

    imatrix (export.imatrix): an importance matrix from llama-imatrix (`compute_imatrix`); the
    quantization then runs llama.cpp's llama-quantize tool (the C API takes the matrix only as a
    C++ map) and never releases its input."""
    import llama_cpp

    src, out = Path(in_gguf), Path(out_gguf)
    ftype = ftype_for(qtype)
    if not src.is_file():
        raise FileNotFoundError(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    tmp.unlink(missing_ok=True)
    if imatrix is not None:
        return quantize_with_tool(src, out, qtype, threads, imatrix=imatrix, log=log)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(threads or 0)
    params.allow_requantize = True
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.time()
    with _log_target(log) as f:
        _write(f, f"quantize {src} -> {out}: {qtype.upper()} (ftype {ftype}), nthread={params.nthread}, "
                  "allow_requantize=True")
        releaser: _InputReleaser | None = None
        if release_input:
            ok, why = release_decision(src, out, release_input)
            if ok:
                try:
                    releaser = _InputReleaser(src)
                    releaser.begin()
                except Exception as e:  # unreadable tensor infos, rename refused, ...
                    releaser, why = None, f"{why}, but it cannot be released: {e}"
            _write(f, f"release input: {'yes, tensor by tensor' if releaser else 'no'} ({why})")
        source = releaser.path if releaser is not None else src

        def sink(text: str) -> None:
            for line in text.splitlines():
                tail.append(line)
            if f is not None:
                f.write(text)
            if releaser is not None:
                releaser.on_log(text)

        try:
            with llama_log_to(sink):
                rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
            if f is not None:
                f.flush()
            seconds = time.time() - started
            problem = None
            if rc != 0 or not tmp.is_file():
                hint = (f" {qtype.upper()} needs an importance matrix (llama-imatrix)."
                        if qtype.upper() in NEEDS_IMATRIX else "")
                problem = f"llama_model_quantize({src} -> {qtype}) failed (rc {rc}).{hint}"
            problem = _output_problem(tmp, problem)
            if problem is not None:
                lost = releaser.abort() if releaser is not None else ""
                _discard_failed(tmp, out, problem, tail, f, f"quantizing {src} to {qtype}", seconds, lost)
            os.replace(tmp, out)
            if releaser is not None:
                _write(f, releaser.finish())
            _write(f, f"quantized -> {out} ({out.stat().st_size} bytes) in {seconds:.1f}s")
        finally:
            if releaser is not None and not releaser.closed:  # interrupted
                releaser.abort()
    return out


def _output_problem(tmp: Path, problem: str | None) -> str | None:
    """What is wrong with a finished tool's output file, if anything (not a GGUF: truncated)."""
    if problem is None:
        try:
            _check_magic(tmp)
        except RuntimeError as e:
            problem = str(e)
    return problem


def _discard_failed(tmp: Path, out: Path, problem: str, tail, f, what: str, seconds: float, lost: str = "") -> None:
    """Remove a failed output (never left under the final name) and raise, naming a full disk."""
    disk_full = looks_like_disk_full(text="\n".join(tail)) or nearly_full([tmp])
    tmp.unlink(missing_ok=True)
    _write(f, f"{what}: FAILED after {seconds:.1f}s: {problem}{lost}")
    if disk_full:
        raise DiskFullError(disk_full_message(out, what) + lost)
    raise RuntimeError(problem + lost + "\n" + "\n".join(tail))


def _run_tool(cmd: list[str], log, what: str, out: Path, tmp: Path) -> None:
    """Run a llama.cpp tool writing `tmp`; on success rename it to `out` (never a half-written
    file under the final name); on failure remove it and raise naming the disk when it is full."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.time()
    with _log_target(log) as f:
        _write(f, " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=llamacpp.llama_tool_env())
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if f is not None:
                f.write(line)
        rc = proc.wait()
        problem = None if rc == 0 and tmp.is_file() else f"{cmd[0]} failed (rc {rc}) {what}"
        problem = _output_problem(tmp, problem)
        if problem is not None:
            _discard_failed(tmp, out, problem, tail, f, what, time.time() - started)
        os.replace(tmp, out)
        _write(f, f"{what} -> {out} ({out.stat().st_size} bytes) in {time.time() - started:.1f}s")


def quantize_with_tool(in_gguf, out_gguf, qtype: str, threads: int | None = None, *,
                       imatrix: str | os.PathLike | None = None, log=None) -> Path:
    """Quantize with llama.cpp's llama-quantize tool in its own process (allow-requantize): the
    one way to pass an importance matrix, and safe inside a process that already ran llama.cpp
    through ctypes."""
    # no llama_cpp import here (ftype_for): in the evaluation's process, loading llama_cpp beside
    # pandas ended in heap corruption at exit; the tool itself names an unknown type
    src, out = Path(in_gguf), Path(out_gguf)
    if not src.is_file():
        raise FileNotFoundError(src)
    if imatrix is not None and not Path(imatrix).is_file():
        raise FileNotFoundError(f"importance matrix {imatrix} not found (rule imatrix writes it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    tmp.unlink(missing_ok=True)
    cmd = [str(llamacpp.llama_tool("llama-quantize")), "--allow-requantize"]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src), str(tmp), qtype.upper()]
    if threads:
        cmd.append(str(int(threads)))
    with_matrix = f" with importance matrix {imatrix}" if imatrix is not None else ""
    _run_tool(cmd, log, f"quantizing {src} to {qtype.upper()}{with_matrix}", out, tmp)
    return out


def compute_imatrix(gguf, text_file, out, *, ctx: int, chunks: int, threads: int | None = None, log=None) -> Path:
    """llama-imatrix over a text file (the training split): the mean squared activation feeding
    each weight column, which llama-quantize --imatrix uses to keep the columns that matter most
    more precisely. At most `chunks` chunks of `ctx` tokens; written as GGUF (by its name)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.gguf")  # llama-imatrix picks its format by the name
    tmp.unlink(missing_ok=True)
    cmd = [str(llamacpp.llama_tool("llama-imatrix")), "-m", str(gguf), "-f", str(text_file), "-o", str(tmp),
           "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "--no-ppl"]
    if threads:
        cmd += ["-t", str(int(threads))]
    _run_tool(cmd, log, f"importance matrix of {gguf} over {text_file}", out, tmp)
    return out


# --------------------------------------------------------------------------------------
# metadata and smoke check
# --------------------------------------------------------------------------------------

def _field(reader, key):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # pragma: no cover - odd field types
        return None


def gguf_metadata(path, *, tensors: bool = True) -> dict:
    """A summary of a GGUF's metadata (read with gguf-py's GGUFReader)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    ftype = _field(reader, "general.file_type")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")

    def tid(tok):
        try:
            return tokens.index(tok)
        except ValueError:
            return None

    meta = {
        "path": str(path),
        "file_bytes": os.path.getsize(path),
        "architecture": arch,
        "name": _field(reader, "general.name"),
        "file_type": ftype,
        "file_type_name": ftype_name(ftype) if ftype is not None else None,
        "tensor_count": len(reader.tensors),
        "context_length": _field(reader, f"{arch}.context_length") if arch else None,
        "block_count": _field(reader, f"{arch}.block_count") if arch else None,
        "embedding_length": _field(reader, f"{arch}.embedding_length") if arch else None,
        "head_count": _field(reader, f"{arch}.attention.head_count") if arch else None,
        "head_count_kv": _field(reader, f"{arch}.attention.head_count_kv") if arch else None,
        "key_length": _field(reader, f"{arch}.attention.key_length") if arch else None,
        "value_length": _field(reader, f"{arch}.attention.value_length") if arch else None,
        "expert_count": _field(reader, f"{arch}.expert_count") if arch else None,
        "tokenizer_model": _field(reader, "tokenizer.ggml.model"),
        "n_tokens": len(tokens),
        "eos_token_id": eos,
        "eos_token": tokens[eos] if eos is not None and 0 <= eos < len(tokens) else None,
        "im_start_id": tid(IM_START),
        "im_end_id": tid(IM_END),
        "endoftext_id": tid(ENDOFTEXT),
        "add_space_prefix": _field(reader, "tokenizer.ggml.add_space_prefix"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    if tensors:
        counts: dict[str, int] = collections.Counter(t.tensor_type.name for t in reader.tensors)
        meta["tensor_types"] = dict(sorted(counts.items()))
        meta["tensor_bytes"] = int(sum(int(t.n_bytes) for t in reader.tensors))
    return meta


def check_gguf(path, expect_arch: str | None = None, expect_ftype: str | int | None = None, *,
               load: bool = True, prompt: str = DEFAULT_CHECK_PROMPT, n_predict: int = 8,
               n_ctx: int = 256, threads: int | None = None, report_path: str | os.PathLike | None = None) -> dict:
    """Smoke-check a GGUF: metadata (architecture, general.file_type, chat template present,
    EOS = <|im_end|>, tensors present) and, with load=True, load it in llama.cpp and greedily
    generate a few tokens from a ChatML prompt. Returns a report dict, also written as JSON to
    report_path (atomically) and printed when given; raises GGUFCheckError listing every problem found
    (and writes no report)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFCheckError(f"{path} does not exist")
    meta = gguf_metadata(path)
    problems: list[str] = []
    if expect_arch and meta["architecture"] != expect_arch:
        problems.append(f"architecture is {meta['architecture']!r}, expected {expect_arch!r}")
    if meta["file_type"] is None:
        problems.append("general.file_type is missing")
    elif expect_ftype is not None:
        want = int(expect_ftype) if isinstance(expect_ftype, int) or str(expect_ftype).isdigit() \
            else ftype_for(str(expect_ftype))
        if int(meta["file_type"]) != want:
            problems.append(f"general.file_type is {meta['file_type']} ({meta['file_type_name']}), "
                            f"expected {want} ({ftype_name(want)})")
    if not meta["chat_template"]:
        problems.append("tokenizer.chat_template is missing")
    if meta["eos_token_id"] is None:
        problems.append("tokenizer.ggml.eos_token_id is missing")
    elif meta["im_end_id"] is None:
        problems.append(f"the vocabulary has no {IM_END} token")
    elif meta["eos_token_id"] != meta["im_end_id"]:
        problems.append(f"EOS is {meta['eos_token_id']} ({meta['eos_token']!r}), not {IM_END} ({meta['im_end_id']}): "
                        "chat replies would never end")
    if meta["tensor_count"] <= 0:
        problems.append("the GGUF has no tensors")
    report = {k: v for k, v in meta.items() if k != "chat_template"}
    report["chat_template_present"] = bool(meta["chat_template"])
    if load and not problems:
        try:
            report["llama_cpp"] = _generate(path, prompt, n_predict, n_ctx, threads, meta)
        except GGUFCheckError as e:
            problems.append(str(e))
    report["ok"] = not problems
    report["problems"] = problems
    if problems:
        raise GGUFCheckError(f"{path}: " + "; ".join(problems))
    if report_path is not None:  # the check_gguf rule: the report also goes to the rule's log
        print(json.dumps(report, indent=2, default=str))
        write_json_atomic(report_path, report)
    return report


def _generate(path: Path, prompt: str, n_predict: int, n_ctx: int, threads: int | None, meta: dict) -> dict:
    from llama_cpp import Llama

    logs: collections.deque[str] = collections.deque(maxlen=30)
    started = time.time()
    llm = None
    try:
        with llama_log_to(logs.append):
            try:
                llm = Llama(str(path), n_ctx=n_ctx, n_threads=threads or 1,
                            logits_all=False, verbose=False, seed=0)
            except Exception as e:
                raise GGUFCheckError(f"llama.cpp cannot load it ({e}): {''.join(logs).strip()[-1500:]}") from e
            load_s = time.time() - started
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            for name in ("im_start_id", "im_end_id"):
                if meta[name] is not None and meta[name] not in tokens:
                    raise GGUFCheckError(
                        f"llama.cpp does not tokenize {IM_START if name == 'im_start_id' else IM_END} in the "
                        "ChatML prompt as one special token (token type not CONTROL?)")
            t0 = time.time()
            generated: list[int] = []
            for tok in llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                generated.append(int(tok))
                if tok == meta["eos_token_id"] or len(generated) >= n_predict:
                    break
            gen_s = time.time() - t0
            if not generated:
                raise GGUFCheckError("llama.cpp generated no token")
            if any(not (0 <= t < meta["n_tokens"]) for t in generated):
                raise GGUFCheckError(f"generated token ids out of range: {generated}")
            text = llm.detokenize(generated).decode("utf-8", errors="replace")
            return {
                "n_ctx": n_ctx,
                "prompt_tokens": len(tokens),
                "generated_ids": generated,
                "generated_text": text,
                "stopped_on_eos": generated[-1] == meta["eos_token_id"],
                "load_seconds": round(load_s, 3),
                "generate_seconds": round(gen_s, 3),
                "tokens_per_second": round(len(generated) / gen_s, 2) if gen_s > 0 else None,
            }
    finally:
        if llm is not None:
            llm.close()


# --------------------------------------------------------------------------------------
# CLI: loraforge inspect-gguf FILE
# --------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("file", help="the GGUF file")
    parser.add_argument("--expect-arch", help="expected general.architecture (e.g. qwen3, qwen3moe)")
    parser.add_argument("--expect-ftype", help="expected file type name or number (e.g. Q5_K_M, 17)")
    parser.add_argument("--no-load", action="store_true", help="metadata only, do not load it in llama.cpp")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--threads", type=int, default=None)


def _fmt_bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"


def run(args) -> int:
    path = Path(args.file)
    try:
        meta = gguf_metadata(path)
    except Exception as e:
        print(f"error: cannot read {path} as GGUF: {e}", file=sys.stderr)
        return 1
    try:
        report = check_gguf(path, args.expect_arch, args.expect_ftype, load=not args.no_load, threads=args.threads)
        error = None
    except GGUFCheckError as e:
        report, error = None, str(e)
    if args.json:
        out = report or {k: v for k, v in meta.items() if k != "chat_template"}
        out = dict(out, ok=error is None, error=error)
        print(json.dumps(out, indent=2, default=str))
        return 0 if error is None else 1
    print(f"{path}")
    print(f"  size            {_fmt_bytes(meta['file_bytes'])}")
    print(f"  architecture    {meta['architecture']}  ({meta['block_count']} blocks, "
          f"embedding {meta['embedding_length']}, heads {meta['head_count']}/{meta['head_count_kv']} kv"
          + (f", {meta['expert_count']} experts" if meta.get("expert_count") else "") + ")")
    print(f"  file type       {meta['file_type']} ({meta['file_type_name']})")
    print(f"  tensors         {meta['tensor_count']}  {meta.get('tensor_types')}")
    print(f"  context length  {meta['context_length']}")
    print(f"  tokenizer       {meta['tokenizer_model']}, {meta['n_tokens']} tokens, eos {meta['eos_token_id']} "
          f"({meta['eos_token']!r}), add_space_prefix {meta['add_space_prefix']}")
    print(f"  chat template   {'present' if meta['chat_template'] else 'MISSING'}")
    if report and report.get("llama_cpp"):
        g = report["llama_cpp"]
        print(f"  llama.cpp       loaded in {g['load_seconds']}s; {len(g['generated_ids'])} tokens "
              f"at {g['tokens_per_second']} tok/s: {g['generated_text']!r}")
    if error:
        print(f"  CHECK FAILED: {error}")
        return 1
    print("  check           ok" + (" (metadata only)" if args.no_load else ""))
    return 0
