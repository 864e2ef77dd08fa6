"""The arithmetic: W + scale * B @ A in fp32, rounded once, in row blocks of bounded memory."""

from __future__ import annotations

import math
from typing import Callable

import torch

from loraforge.merge.common import BLOCK_BYTES, MergeError
from loraforge.merge.planning import MatrixUpdate, TensorUpdate
from loraforge.safetensors_io import pread_exactly

class Workspace:
    """Scratch memory of one worker, reused from matrix to matrix. Fresh multi-MB buffers for every
    tensor made glibc return the memory to the OS and fault it back in each time, doubling the
    per-tensor time (measured on 1 MiB expert tensors)."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def tensor(self, role: str, dtype: torch.dtype, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        flat = self._flat.get((role, dtype))
        if flat is None or flat.numel() < n:
            flat = self._flat[(role, dtype)] = torch.empty(n, dtype=dtype)
        return flat[:n].view(shape)

    def read(self, fd: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """The tensor of `dtype` and `shape` stored at `offset` of `fd`, read into this workspace."""
        raw = self.tensor("read", torch.uint8, (math.prod(shape) * dtype.itemsize,))
        pread_exactly(fd, raw.numpy(), offset, what)
        return raw.view(dtype).view(shape)


def merge_block(block: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float,
                workspace: Workspace) -> torch.Tensor:
    """round_to(block.dtype, block + (lora_B @ lora_A) * scale), computed in fp32 (fp64 for fp64
    blocks); the result lives in `workspace` memory, valid until its next use.

    Like PEFT, the delta is `(B @ A) * scale` and is then added to W (the bf16->fp32 widening is
    exact and addition commutes, so adding W to the delta gives the same bits). One rounding, to
    nearest even, at the end."""
    compute_dtype = torch.float64 if block.dtype == torch.float64 else torch.float32
    merged = workspace.tensor("delta", compute_dtype, block.shape)
    torch.matmul(lora_B.to(compute_dtype), lora_A.to(compute_dtype), out=merged)
    merged.mul_(scale).add_(block)
    if block.dtype == compute_dtype:
        return merged
    rounded = workspace.tensor("rounded", block.dtype, block.shape)
    rounded.copy_(merged)  # the one rounding
    return rounded


def _merge_matrix(update: TensorUpdate, m: MatrixUpdate, shape: tuple[int, ...],
                  read_block: Callable[[int, int], torch.Tensor], write_block: Callable[[int, torch.Tensor], None],
                  workspace: Workspace) -> None:
    """W += scale * B @ A for one 2-D matrix of `shape` ([rows, cols]), rounded once to W's dtype.

    Matrices whose fp32 working set exceeds BLOCK_BYTES are done in row blocks to bound memory;
    MKL may round those by one ulp differently than PEFT's single matmul. `read_block(start, n)`
    gives rows [start, start+n) of W, `write_block(start, merged)` takes their merged values.
    Fails, naming the tensor, if the matrix comes out unchanged or non-finite."""
    rows, cols = shape
    rows_per_block = max(1, BLOCK_BYTES // (4 * max(1, cols)))
    changed = False
    for start in range(0, rows, rows_per_block):
        n = min(rows_per_block, rows - start)
        block = read_block(start, n)
        merged = merge_block(block, m.lora_B[start : start + n], m.lora_A, update.scale, workspace)
        # a NaN or inf anywhere (fp16 overflow too) makes the sum one; an fp16 tensor is summed to
        # fp32, or a large but finite one would overflow the sum itself
        total = merged.sum(dtype=torch.float32 if merged.dtype == torch.float16 else None).item()
        if not math.isfinite(total):
            raise MergeError(f"{update.tensor}: merging {update.source} gives non-finite values")
        changed = changed or not torch.equal(merged, block)
        write_block(start, merged)
    if not changed:
        where = "" if m.expert is None else f" (expert {m.expert})"
        raise MergeError(f"{update.tensor}{where} is unchanged after merging {update.source}: the delta rounds away")
