"""Raw safetensors IO: read a shard's header, map a small file's tensors, write a shard in pieces.

The format is small enough to handle by hand, which is what lets a merge stay bounded in memory
and copy untouched tensors without decoding them:

    8 bytes   little-endian u64 N, the header length
    N bytes   JSON: {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}
    rest      the data buffer; offsets are relative to its start, tensors are contiguous, no gaps

Reading is lazy (the caller reads the bytes it needs, like mergekit's loader); the writer gets the
full tensor list up front, so it knows where every tensor goes and several threads can write
tensors, or pieces of them, in any order.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from loraforge.errors import UserError

from loraforge.constants import SAFETENSORS_DTYPE_BYTES

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
METADATA_KEY = "__metadata__"
COPY_CHUNK_BYTES = 16 * 1024 * 1024
WRITEBACK_BYTES = 32 * 1024 * 1024  # start writing dirty pages to disk every this many bytes


# The floating dtypes a LoRA delta can be added to; everything else is only ever copied as bytes.
TORCH_FLOAT_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _load_sync_file_range():
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


def _load_fallocate():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate  # 64-bit offsets everywhere
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return function


_sync_file_range = _load_sync_file_range()
_fallocate = _load_fallocate()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting for it.

    The closing fsync then finds little left to do: the disk works while we compute the next
    tensors instead of all at once at the end (Linux sync_file_range; a no-op elsewhere)."""
    if _sync_file_range is not None and count > 0:
        _sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)


class SafetensorsFormatError(UserError, ValueError):
    """A file that is not a valid safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int


@dataclass(frozen=True)
class ShardHeader:
    path: str
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo]  # in data order
    data_start: int
    file_size: int

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header(path: str) -> ShardHeader:
    """Parse and validate the header of the safetensors file at `path` (reads no tensor data)."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_length = f.read(HEADER_LENGTH_BYTES)
        if len(raw_length) != HEADER_LENGTH_BYTES:
            raise SafetensorsFormatError(f"{path}: too short for a safetensors file")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_length > file_size:
            raise SafetensorsFormatError(f"{path}: header length {header_length} is invalid")
        try:
            header = json.loads(f.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsFormatError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header is not a JSON object")
    data_start = HEADER_LENGTH_BYTES + header_length
    metadata = header.pop(METADATA_KEY, None)
    entries = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: malformed entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if end - begin != nbytes or begin < 0 or data_start + end > file_size:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} has offsets {begin, end} beyond the file's {file_size} bytes: "
                "the file is truncated or corrupt"
            )
        entries.append(TensorInfo(name, dtype, shape, data_start + begin, nbytes))
    entries.sort(key=lambda t: t.offset)
    return ShardHeader(path, metadata, {t.name: t for t in entries}, data_start, file_size)


def pread_exactly(fd: int, buffer, offset: int, what: str = "tensor") -> None:
    """Fill `buffer` (anything writable with the buffer protocol) from `fd` at `offset`."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise SafetensorsFormatError(f"{what}: file ends early")
        done += n


class MappedTensors:
    """Every tensor of a (small) safetensors file, e.g. an adapter, as a view of the file mapped
    read-only in memory (`tensors`).

    The pages are mapped up front (MAP_POPULATE, where there is one) straight from the page
    cache: no zero-filled fresh memory and no copy, 7 ms instead of 60 ms for reading a 108 MB
    adapter into memory. The tensors must not be written to (the mapping is read-only: a write
    would crash the process), and the file must not be truncated while they are in use."""

    def __init__(self, path: str):
        header = read_header(path)
        with open(path, "rb") as f:
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
            self._mapping = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        self._base: int | None = None  # the mapping's address
        self.tensors: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable": known, see above
            for name, info in header.tensors.items():
                if info.dtype not in TORCH_FLOAT_DTYPES:
                    raise SafetensorsFormatError(f"tensor {name!r} has dtype {info.dtype}, not a float type")
                dtype = TORCH_FLOAT_DTYPES[info.dtype]
                if info.nbytes == 0:
                    self.tensors[name] = torch.empty(info.shape, dtype=dtype)
                    continue
                count = info.nbytes // SAFETENSORS_DTYPE_BYTES[info.dtype]
                tensor = torch.frombuffer(self._mapping, dtype=dtype, count=count, offset=info.offset)
                self.tensors[name] = tensor.reshape(info.shape)
                self._base = tensor.data_ptr() - info.offset

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages of `tensor`, a contiguous view of this mapping that is no longer needed,
        from this process's memory (they stay in the page cache: reading the tensor again would
        map them back). Pages it shares with a neighbour are kept."""
        if self._base is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.data_ptr() - self._base
        end = start + tensor.numel() * tensor.element_size()
        if not (tensor.is_contiguous() and 0 <= start <= end <= len(self._mapping)):
            raise ValueError("not a contiguous view of this mapping")
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and JSON header for tensors laid out contiguously in the given order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header[METADATA_KEY] = metadata
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # pad with spaces so the data buffer starts 8-byte aligned, as the safetensors library does
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


class ShardWriter:
    """Writes one safetensors file whose layout is fixed up front: the header, then every tensor
    at its offset, contiguously in the declared order.

    Positional and thread-safe: several threads may write tensors, or byte ranges of tensors, in
    any order (`write` for bytes computed here, `copy` for raw bytes of another file, done in the
    kernel where possible). The file's space is reserved at once (fallocate, where the filesystem
    has it), so a full disk fails before any work and ext4 skips per-page block reservation. As
    the written part grows contiguously from the start, the kernel is asked to start writing it
    to disk, so the closing fsync finds little left to do. `close()` checks that every declared
    byte was written exactly once and fsyncs the file.
    """

    def __init__(self, path: str, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None):
        self.path = path
        header = encode_header(tensors, metadata)
        self._layout: dict[str, tuple[int, int, int]] = {}  # name -> (order, absolute offset, nbytes)
        offset = len(header)
        for order, (name, dtype, shape) in enumerate(tensors):
            nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
            self._layout[name] = (order, offset, nbytes)
            offset += nbytes
        self.size = offset
        self._ends = [o + n for _, o, n in self._layout.values()]
        self._missing = [n for _, _, n in self._layout.values()]  # bytes not yet written, per tensor
        self._complete = 0  # tensors [0, _complete) are fully written
        self._writeback_from = 0
        self._lock = threading.Lock()
        self.bytes_written = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            reserve_space(self._fd, self.size)
            _pwrite_all(self._fd, header, 0)
        except BaseException:
            self._release()
            raise
        with self._lock:
            self.bytes_written += len(header)
            self._advance()

    def _region(self, name: str, start: int, nbytes: int) -> tuple[int, int]:
        if name not in self._layout:
            raise SafetensorsFormatError(f"{self.path}: tensor {name!r} was not declared")
        order, offset, size = self._layout[name]
        if start < 0 or start + nbytes > size:
            raise SafetensorsFormatError(f"{self.path}: bytes {start}..{start + nbytes} are outside {name!r} ({size})")
        return order, offset + start

    def _wrote(self, order: int, nbytes: int) -> None:
        with self._lock:
            self.bytes_written += nbytes
            self._missing[order] -= nbytes
            if self._missing[order] < 0:
                raise SafetensorsFormatError(f"{self.path}: tensor {list(self._layout)[order]!r} was written twice")
            if order == self._complete:
                self._advance()

    def _advance(self) -> None:
        """Move the fully written prefix of tensors on, and start writing it back as it grows by
        WRITEBACK_BYTES; called with the lock held."""
        while self._complete < len(self._missing) and self._missing[self._complete] == 0:
            self._complete += 1
        end = self._ends[self._complete - 1] if self._complete else 0
        if end - self._writeback_from >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._writeback_from, end - self._writeback_from)
            self._writeback_from = end

    def write(self, name: str, data: torch.Tensor | bytes | memoryview, start: int = 0) -> None:
        """Write `data` (a contiguous tensor or bytes) as the bytes of `name` from byte `start` on."""
        if isinstance(data, torch.Tensor):
            data = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        view = memoryview(data).cast("B")
        order, offset = self._region(name, start, len(view))
        _pwrite_all(self._fd, view, offset)
        self._wrote(order, len(view))

    def copy(self, src_fd: int, src_offset: int, pieces: list[tuple[str, int, int]]) -> None:
        """Copy bytes of `src_fd` from `src_offset` on as `pieces`: (tensor name, first byte in
        it, bytes) that follow each other in this file (say, the end of one tensor and the start
        of the next), in one kernel copy."""
        regions = [(*self._region(name, start, nbytes), nbytes) for name, start, nbytes in pieces]
        for (_, offset, nbytes), (_, next_offset, _) in zip(regions, regions[1:]):
            if offset + nbytes != next_offset:
                raise SafetensorsFormatError(f"{self.path}: copied pieces {pieces} are not contiguous")
        total = sum(nbytes for _, _, nbytes in regions)
        if total:
            copy_range(src_fd, self._fd, src_offset, total, regions[0][1])
        for order, _, nbytes in regions:
            self._wrote(order, nbytes)

    def close(self) -> None:
        try:
            unwritten = [name for name, missing in zip(self._layout, self._missing) if missing]
            if unwritten:
                raise SafetensorsFormatError(f"{self.path}: tensors never written: {unwritten[:5]}")
            os.fsync(self._fd)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop after an error (the file is left for the caller to remove); safe after close()."""
        self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def reserve_space(fd: int, size: int) -> None:
    """Allocate `size` bytes of disk for the file now (Linux fallocate, which never falls back to
    writing zeros as posix_fallocate does); a no-op where the filesystem or OS lacks it. A full
    disk raises here, before the work that would have filled it."""
    if _fallocate is None or size <= 0:
        return
    if _fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return
        raise OSError(err, os.strerror(err))


def copy_range(src_fd: int, dst_fd: int, src_offset: int, count: int, dst_offset: int | None = None) -> int:
    """Copy `count` bytes of `src_fd` starting at `src_offset` to `dst_fd` at `dst_offset` (by
    default at, and advancing, its current position).

    Uses copy_file_range (no trip through user space, a reflink on filesystems that share
    extents) and falls back to a bounded read/write loop where the kernel refuses it.
    """
    done = 0
    use_kernel_copy = hasattr(os, "copy_file_range")
    while done < count:
        dst = None if dst_offset is None else dst_offset + done
        if use_kernel_copy:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count - done, src_offset + done, dst)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_kernel_copy = False
                continue
        else:
            chunk = memoryview(os.pread(src_fd, min(COPY_CHUNK_BYTES, count - done), src_offset + done))
            if dst is None:
                n = 0
                while n < len(chunk):
                    n += os.write(dst_fd, chunk[n:])
            else:
                _pwrite_all(dst_fd, chunk, dst)
                n = len(chunk)
        if n == 0:
            raise SafetensorsFormatError(f"source ended {count - done} bytes early while copying")
        done += n
    return done


def copy_file(src: str, dst: str) -> int:
    """Copy a whole file and fsync the copy; returns the bytes copied."""
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            size, done = os.fstat(src_fd).st_size, 0
            reserve_space(dst_fd, size)
            while done < size:
                n = copy_range(src_fd, dst_fd, done, min(WRITEBACK_BYTES, size - done))
                start_writeback(dst_fd, done, n)
                done += n
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return done
