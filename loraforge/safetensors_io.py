"""Raw safetensors IO: read a shard's header, read one tensor, write a shard tensor by tensor.

The format is small enough to handle by hand, which is what lets a merge stay bounded in memory
and copy untouched tensors without decoding them:

    8 bytes   little-endian u64 N, the header length
    N bytes   JSON: {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}
    rest      the data buffer; offsets are relative to its start, tensors are contiguous, no gaps

The reader is lazy (one tensor at a time, like mergekit's loader); the writer gets the full tensor
list up front so it can write the header first and then stream each tensor's bytes in order.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
METADATA_KEY = "__metadata__"
COPY_CHUNK_BYTES = 16 * 1024 * 1024
WRITEBACK_BYTES = 32 * 1024 * 1024  # start writing dirty pages to disk every this many bytes

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

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


_sync_file_range = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting for it.

    The closing fsync then finds little left to do: the disk works while we compute the next
    tensors instead of all at once at the end (Linux sync_file_range; a no-op elsewhere)."""
    if _sync_file_range is not None and count > 0:
        _sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)


class SafetensorsFormatError(ValueError):
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
        if dtype not in DTYPE_SIZES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != nbytes or begin < 0 or data_start + end > file_size:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has offsets {begin, end} that do not fit")
        entries.append(TensorInfo(name, dtype, shape, data_start + begin, nbytes))
    entries.sort(key=lambda t: t.offset)
    return ShardHeader(path, metadata, {t.name: t for t in entries}, data_start, file_size)


def read_tensor(fd: int, info: TensorInfo, buffer: bytearray | None = None) -> torch.Tensor:
    """Read one floating-point tensor from an open file descriptor into a writable tensor.

    With `buffer` (at least info.nbytes long) the tensor is a view of it, so a caller can reuse
    one buffer for tensor after tensor; without, it gets fresh memory."""
    if info.dtype not in TORCH_FLOAT_DTYPES:
        raise SafetensorsFormatError(f"tensor {info.name!r} has dtype {info.dtype}, not a float type")
    dtype = TORCH_FLOAT_DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    if buffer is None:
        buffer = bytearray(info.nbytes)
    view = memoryview(buffer)[: info.nbytes]
    done = 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], info.offset + done)
        if n == 0:
            raise SafetensorsFormatError(f"tensor {info.name!r}: file ends early")
        done += n
    count = info.nbytes // DTYPE_SIZES[info.dtype]
    return torch.frombuffer(buffer, dtype=dtype, count=count).reshape(info.shape)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read every tensor of a (small) safetensors file, e.g. an adapter, into memory.

    Plain reads rather than safetensors' mmap, so the file's pages are not held twice."""
    header = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {name: read_tensor(fd, info) for name, info in header.tensors.items()}
    finally:
        os.close(fd)


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and JSON header for tensors laid out contiguously in the given order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header[METADATA_KEY] = metadata
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # pad with spaces so the data buffer starts 8-byte aligned, as the safetensors library does
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


class ShardWriter:
    """Writes one safetensors file: the header first, then every tensor's bytes in the declared order.

    Each tensor is either raw bytes copied from another file (`copy_tensor`, done in the kernel
    where possible) or a tensor computed here (`write_tensor`). The file IO runs on a background
    thread at most one tensor behind, so the disk works while the caller computes the next
    tensor: a tensor given to `write_tensor` must not change until the next call returns (alternate
    two buffers). `close()` checks that every declared tensor was written and fsyncs the file.
    """

    def __init__(self, path: str, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None):
        self.path = path
        self._declared = [(name, math.prod(shape) * DTYPE_SIZES[dtype]) for name, dtype, shape in tensors]
        self._next = 0
        self.bytes_written = 0
        self._writeback_from = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._in_flight: Future | None = None
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._submit(self._write_all, encode_header(tensors, metadata))

    def _submit(self, function, *args) -> None:
        self._wait()
        self._in_flight = self._io.submit(function, *args)

    def _wait(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()  # re-raises an IO error from the writer thread

    def _expect(self, name: str, nbytes: int) -> None:
        if self._next >= len(self._declared) or self._declared[self._next] != (name, nbytes):
            expected = self._declared[self._next] if self._next < len(self._declared) else "nothing"
            raise SafetensorsFormatError(f"{self.path}: wrote {(name, nbytes)}, expected {expected}")
        self._next += 1

    # --- on the writer thread
    def _wrote(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        if self.bytes_written - self._writeback_from >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._writeback_from, self.bytes_written - self._writeback_from)
            self._writeback_from = self.bytes_written

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._wrote(n)

    def _copy(self, src_fd: int, info: TensorInfo) -> None:
        self._wrote(copy_range(src_fd, self._fd, info.offset, info.nbytes))

    # --- the caller's side
    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        self._expect(name, tensor.numel() * tensor.element_size())
        if tensor.numel():
            self._submit(self._write_all, tensor.reshape(-1).view(torch.uint8).numpy())

    def copy_tensor(self, name: str, src_fd: int, info: TensorInfo) -> None:
        """Copy `info`'s bytes from `src_fd`, which must stay open until the next call returns."""
        self._expect(name, info.nbytes)
        self._submit(self._copy, src_fd, info)

    def close(self) -> None:
        try:
            self._wait()
            if self._next != len(self._declared):
                missing = [name for name, _ in self._declared[self._next :]]
                raise SafetensorsFormatError(f"{self.path}: tensors never written: {missing[:5]}")
            os.fsync(self._fd)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop after an error (the file is left for the caller to remove); safe after close()."""
        try:
            self._wait()
        except Exception:
            pass  # the error that made the caller abort is the one to report
        finally:
            self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            self._io.shutdown()
            os.close(self._fd)
            self._fd = -1


def copy_range(src_fd: int, dst_fd: int, src_offset: int, count: int) -> int:
    """Append `count` bytes of `src_fd` starting at `src_offset` to `dst_fd`'s current position.

    Uses copy_file_range (no trip through user space, a reflink on filesystems that share
    extents) and falls back to a bounded read/write loop where the kernel refuses it.
    """
    done = 0
    use_kernel_copy = hasattr(os, "copy_file_range")
    while done < count:
        if use_kernel_copy:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count - done, src_offset + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_kernel_copy = False
                continue
        else:
            chunk = memoryview(os.pread(src_fd, min(COPY_CHUNK_BYTES, count - done), src_offset + done))
            n = 0
            while n < len(chunk):
                n += os.write(dst_fd, chunk[n:])
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
