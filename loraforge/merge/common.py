"""What every part of the merge shares: file names, limits, the error and the report."""

from __future__ import annotations

import errno
from dataclasses import asdict, dataclass
from typing import Any

from loraforge.errors import UserError

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_KEY_PREFIX = "base_model.model."
JOURNAL_NAME = ".loraforge-merge.journal"
MARKER_NAME = ".loraforge-merge.json"  # written last: its presence means the folder is complete
TMP_SUFFIX = ".tmp"
# weights in other formats are not carried over: the output's weights are the merged shards
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
# fp32 working set per block of rows; bounds memory for huge targeted tensors (lm_head, fused experts)
BLOCK_BYTES = 64 * 1024 * 1024
# untouched tensors in merged shards are copied in pieces of at most this many bytes
COPY_TASK_BYTES = 64 * 1024 * 1024
# threads merging one shard at once (each runs torch on one thread); at most the usable cores
MAX_WORKERS = 4
JOURNAL_FORMAT = 1
# errors for which a hard link or rename is impossible but a copy works (EXDEV: another filesystem)
LINK_FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP}


class MergeError(UserError, ValueError):
    """The merge was refused (before writing anything) or failed an integrity check."""


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class MergeReport:
    """What a merge did. Counts cover the whole output, shards finished by an interrupted earlier
    run included (`shards_resumed` says how many); `seconds` is this run's wall time."""

    mode: str
    out_dir: str
    shards: int = 0
    shards_merged: int = 0
    shards_linked: int = 0
    shards_moved: int = 0
    shards_copied: int = 0
    shards_resumed: int = 0
    tensors_merged: int = 0  # base tensors that received a LoRA delta (each per-expert tensor counts)
    matrices_merged: int = 0  # 2-D weight matrices changed: a fused 3-D expert tensor counts E times
    matrices_untrained: int = 0  # targeted matrices with all-zero factors, left unchanged (see _drop_untrained)
    tensors_linked: int = 0
    tensors_moved: int = 0
    tensors_copied: int = 0  # untouched tensors copied as raw bytes (in merged or copied shards)
    bytes_written: int = 0  # bytes of shard data written (links and moves write none)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add_shard(self, entry: dict[str, Any]) -> None:
        setattr(self, f"shards_{entry['action']}", getattr(self, f"shards_{entry['action']}") + 1)
        for key in ("tensors_merged", "matrices_merged", "tensors_linked", "tensors_moved", "tensors_copied"):
            setattr(self, key, getattr(self, key) + entry.get(key, 0))
        self.bytes_written += entry.get("bytes_written", 0)


def recovery_hint(partial_dir: str, base_dir: str | None = None) -> str:
    """What to delete to start an interrupted merge over. A consume-mode merge has moved base
    shards into the partial folder: deleting it loses them, so the base must be rebuilt too."""
    hint = f"delete {partial_dir} and run again"
    base = f"the base's completion flag {base_dir}.complete" if base_dir else "the base's completion flag (results/<model>/base.complete)"
    return (hint + f". If it was a consume-mode merge (export.merge_mode: consume), it holds base shards that "
            f"were moved out of the base: also delete {base}, so that the workflow builds or fetches the base "
            "again (the adapter is kept; training does not rerun)")
