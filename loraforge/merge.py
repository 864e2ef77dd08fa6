"""Rename-merge: stream a PEFT LoRA adapter into a base model's safetensors shards.

The output folder has the base's Hugging Face layout (same shard names, same tensors in each
shard, config and tokenizer files, index) with every targeted weight replaced by

    W_final = round_to_base_dtype(W_base (fp32) + scale * B @ A (fp32)),   scale = alpha/r or alpha/sqrt(r)

Shards are handled one at a time: a shard with no targeted tensor is hard-linked (mode "link",
the default), moved (mode "consume") or copied (mode "copy"); a shard with targeted tensors is
rewritten matrix by matrix (a 2-D tensor, or one expert), untouched bytes being copied by the
kernel. One worker thread per core (this one included) takes the next matrix, reads it, merges
it and writes it at its place in the output, while the previous shard is fsynced and recorded on
another thread. So memory stays near the adapter plus a few matrices per worker, and in consume
mode the disk peak stays near the base plus a shard.

Adapters: dense LoRA on nn.Linear (q/k/v/o/gate/up/down), and Qwen3-MoE expert adapters made by
PEFT's ParamWrapper on the fused 3-D expert parameters (as `get_peft_model` writes them, or as
Unsloth writes them with explicit target_parameters). The base may store experts per expert in
2-D (`mlp.experts.E.gate_proj.weight`, the usual layout) or fused in 3-D
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]).

Everything is validated before the first byte is written. The output is assembled in
`<out>.partial` with a journal and renamed to `<out>` only when complete; an interrupted run is
resumed by running the same merge again (in consume mode that is how the base shards already
moved or merged into the partial output are recovered).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from loraforge.errors import UserError
from loraforge.constants import INDEX_NAME, MERGE_MODES, SINGLE_SHARD_NAME
from loraforge.fileio import PARTIAL_SUFFIX, read_hf_config
from loraforge.expert_lora_layout import ExpertLoraLayouts, LayoutError, expert_B_blocks
from loraforge.safetensors_io import (
    TORCH_FLOAT_DTYPES,
    SafetensorsFormatError,
    ShardHeader,
    ShardWriter,
    TensorInfo,
    copy_file,
    MappedTensors,
    pread_exactly,
    read_header,
)

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# Adapter config


@dataclass(frozen=True)
class LoraSettings:
    """The adapter_config.json fields that decide the merge, with PEFT's pattern semantics."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_parameters: tuple[str, ...]
    expert_layouts: ExpertLoraLayouts = ExpertLoraLayouts()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LoraSettings:
        refuse_unsupported_options(config)
        try:
            expert_layouts = ExpertLoraLayouts.from_config(config)
        except LayoutError as e:
            raise MergeError(str(e)) from None
        return cls(
            r=int(config["r"]),
            lora_alpha=config["lora_alpha"],
            use_rslora=bool(config.get("use_rslora")),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            target_parameters=tuple(config.get("target_parameters") or ()),
            expert_layouts=expert_layouts,
        )

    def targets_parameter(self, key: str) -> bool:
        """Whether target_parameters names `key` (PEFT: equal, or a suffix after a dot)."""
        return any(key == t or key.endswith(f".{t}") for t in self.target_parameters)

    def rank_and_scale(self, key: str) -> tuple[int, float]:
        """r and scale for the module or parameter `key`, as PEFT's `_create_and_replace` picks them."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


def _pattern_key(patterns: dict[str, Any], key: str) -> str | None:
    """The first pattern matching `key` as a whole or as a dotted suffix (peft.utils.other.get_pattern_key)."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


# adapter_config.json option -> why a rename-merge cannot honour it when it is set
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA rescales each weight column by a learned magnitude; W + scale*B@A is not its merge",
    "lora_bias": "the adapter trains a bias on lora_B, which a weight-only merge would drop",
    "modules_to_save": "whole modules saved with the adapter replace base tensors; a weight delta merge cannot",
    "fan_in_fan_out": "the adapter assumes transposed (Conv1D-style) weights, which these checkpoints do not have",
    "trainable_token_indices": "trained embedding rows are stored separately and are not a LoRA delta",
    "layer_replication": "replicated layers exist only at load time, not in the base shards",
    "use_qalora": "QALoRA pools inputs by group, so its delta is not B@A on the full weight",
    "use_bdlora": "block-diagonal LoRA variants have another delta formula",
    "alora_invocation_tokens": "aLoRA only applies after its invocation tokens; merging would apply it always",
    "velora_config": "VeLoRA is a LoRA variant with another forward pass",
    "kasa_config": "KaSA is a LoRA variant with another delta formula",
    "arrow_config": "Arrow routes between several LoRAs at run time",
    "monteclora_config": "MonteCLoRA samples its delta at run time",
}


def refuse_unsupported_options(config: dict[str, Any]) -> None:
    reasons = []
    if config.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type={config.get('peft_type')!r}: only LoRA adapters can be merged")
    if config.get("bias", "none") != "none":
        reasons.append(f"bias={config['bias']!r}: base biases were trained and saved with the adapter")
    for option, why in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            reasons.append(f"{option}={json.dumps(config[option])}: {why}")
    for required in ("r", "lora_alpha"):
        if required not in config:
            reasons.append(f"{required} is missing")
    if reasons:
        raise MergeError("adapter_config.json cannot be merged by renaming:\n  " + "\n  ".join(reasons))


# ---------------------------------------------------------------------------------------------
# Expert layouts


@dataclass(frozen=True)
class FusedExpertParam:
    name: str  # parameter of the experts module, [E, out, in] in memory and when fused on disk
    parts: tuple[str, ...]  # per-expert on-disk projections stacked along `out`, in order


@dataclass(frozen=True)
class ExpertLayout:
    module: str  # last name of the experts module
    # In registration order: PEFT wraps each targeted parameter in a ParamWrapper in this order, the
    # first innermost, so the adapter key of the i-th of n targeted ones has n-1-i ".base_layer"s.
    params: tuple[FusedExpertParam, ...]
    num_experts_keys: tuple[str, ...]  # config.json names for the expert count, first found wins


# Qwen3MoeExperts (transformers 5.17): gate_up_proj [E, 2I, H] whose forward does
# `linear(x, gate_up_proj[e]).chunk(2)` -> (gate, up), so gate is the first half; down_proj [E, H, I].
EXPERT_LAYOUTS = {
    "qwen3_moe": ExpertLayout(
        module="experts",
        params=(
            FusedExpertParam("gate_up_proj", ("gate_proj", "up_proj")),
            FusedExpertParam("down_proj", ("down_proj",)),
        ),
        # real Qwen3-MoE checkpoints say num_experts; transformers 5 saves num_local_experts
        num_experts_keys=("num_experts", "num_local_experts"),
    ),
}


# ---------------------------------------------------------------------------------------------
# Planning: which base tensor gets which delta


@dataclass
class MatrixUpdate:
    """One 2-D weight matrix gets W += scale * B @ A."""

    expert: int | None  # index into a fused 3-D tensor; None for a 2-D tensor
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [rows, r]
    nonzero: bool | None = None  # whether both factors have a non-zero element; None: not checked yet


@dataclass
class TensorUpdate:
    tensor: str  # base tensor name
    source: str  # adapter module it comes from, for messages
    scale: float
    matrices: list[MatrixUpdate]


@dataclass
class BaseModel:
    """The base folder's shards and what is known of them before anything is written."""

    directory: str
    config: dict[str, Any]
    shards: list[str]
    headers: dict[str, ShardHeader]
    tensor_shard: dict[str, str]
    index_metadata: dict[str, Any] | None  # None when the base is a single model.safetensors

    def tensor(self, name: str) -> TensorInfo | None:
        shard = self.tensor_shard.get(name)
        return None if shard is None else self.headers[shard].tensors[name]


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: not valid JSON ({e})") from None


def _shard_list(base_dir: str) -> tuple[list[str], dict[str, Any] | None, dict[str, str] | None]:
    index_path = os.path.join(base_dir, INDEX_NAME)
    if os.path.exists(index_path):
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"{index_path} has no weight_map")
        return sorted(set(weight_map.values())), index.get("metadata") or {}, weight_map
    if os.path.exists(os.path.join(base_dir, SINGLE_SHARD_NAME)):
        return [SINGLE_SHARD_NAME], None, None
    raise MergeError(f"{base_dir}: neither {INDEX_NAME} nor {SINGLE_SHARD_NAME} found")


def open_base(base_dir: str, partial_dir: str) -> BaseModel:
    """Read the base's config and every shard header. A shard already consumed by an interrupted
    consume-mode run is read from the partial output instead (it has the same tensors)."""
    config = read_hf_config(base_dir)
    if config is None:
        raise MergeError(f"{base_dir}: config.json not found; is this a Hugging Face model folder?")
    shards, index_metadata, weight_map = _shard_list(base_dir)
    headers, tensor_shard = {}, {}
    for shard in shards:
        path = os.path.join(base_dir, shard)
        if not os.path.exists(path):
            path = os.path.join(partial_dir, shard)
        if not os.path.exists(path):
            raise MergeError(
                f"base shard {shard} is missing from {base_dir} (and from {partial_dir}): "
                f"{recovery_hint(partial_dir, base_dir)}"
            )
        headers[shard] = header = read_header(path)
        for name in header.tensors:
            if name in tensor_shard:
                raise MergeError(f"tensor {name} is stored in both {tensor_shard[name]} and {shard}")
            tensor_shard[name] = shard
    for name, shard in (weight_map or {}).items():
        if tensor_shard.get(name) != shard:
            raise MergeError(f"{INDEX_NAME} places {name} in {shard}, but that shard does not hold it")
    return BaseModel(base_dir, config, shards, headers, tensor_shard, index_metadata)


def load_adapter(adapter_dir: str) -> tuple[dict[str, Any], MappedTensors]:
    """adapter_config.json, and the adapter's tensors as read-only views of its mapped weights file."""
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise MergeError(
                f"{path} not found (a PEFT adapter folder has {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})"
            )
    return _read_json(config_path), MappedTensors(weights_path)


def _pair_lora_factors(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path in the base model: (lora_A, lora_B)}; refuses keys that are not LoRA A/B matrices."""
    pattern = re.compile(rf"^{re.escape(ADAPTER_KEY_PREFIX)}(.+)\.lora_([AB])\.weight$")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in weights.items():
        match = pattern.match(key)
        if match is None or tensor.ndim != 2:
            unknown.append(key)
            continue
        factors.setdefault(match.group(1), {})[match.group(2)] = tensor
    if unknown:
        raise MergeError(
            f"adapter has {len(unknown)} keys that are not LoRA A/B matrices (embedding LoRA, biases, DoRA "
            f"magnitudes or saved modules cannot be rename-merged): {', '.join(sorted(unknown)[:5])}"
        )
    pairs = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"adapter module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if ab["A"].shape[0] != ab["B"].shape[1]:
            shapes = f"lora_A {list(ab['A'].shape)} and lora_B {list(ab['B'].shape)}"
            raise MergeError(f"adapter module {module}: {shapes} disagree on r")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def _strip_base_layers(module: str) -> tuple[str, int]:
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    return module, depth


def _check_float(info: TensorInfo) -> None:
    if info.dtype not in TORCH_FLOAT_DTYPES:
        raise MergeError(f"base tensor {info.name} is {info.dtype}; a LoRA delta can only be added to F16/BF16/F32/F64")


def _dense_update(module: str, lora_A, lora_B, info: TensorInfo, settings: LoraSettings) -> TensorUpdate:
    _check_float(info)
    if info.shape != (lora_B.shape[0], lora_A.shape[1]):
        raise MergeError(
            f"shape mismatch: adapter module {module} makes a [{lora_B.shape[0]}, {lora_A.shape[1]}] delta but base "
            f"tensor {info.name} is {list(info.shape)}; was the adapter trained on another model?"
        )
    # PEFT matches patterns against the module name, or the parameter name for target_parameters
    key = info.name if settings.targets_parameter(info.name) else module
    r, scale = settings.rank_and_scale(key)
    if lora_A.shape[0] != r:
        raise MergeError(
            f"adapter module {module} has rank {lora_A.shape[0]}, "
            f"but adapter_config (r/rank_pattern) gives {r} for {key}"
        )
    return TensorUpdate(info.name, module, scale, [MatrixUpdate(None, lora_A, lora_B)])


def _expert_updates(
    module: str, depth: int, lora_A, lora_B, base: BaseModel, settings: LoraSettings,
    release: Callable[[torch.Tensor], None] | None = None,
) -> list[TensorUpdate]:
    model_type = base.config.get("model_type")
    layout = EXPERT_LAYOUTS.get(model_type)
    if layout is None or not module.endswith(f".{layout.module}"):
        raise MergeError(
            f"adapter module {module}{'.base_layer' * depth} matches no tensor of the base ({model_type}); "
            "was the adapter trained on another architecture?"
        )
    targeted = [p for p in layout.params if settings.targets_parameter(f"{module}.{p.name}")]
    if depth >= len(targeted):
        raise MergeError(
            f"adapter module {module}{'.base_layer' * depth} wraps a fused expert parameter, but adapter_config's "
            f"target_parameters {list(settings.target_parameters)} names only {[p.name for p in targeted]} there"
        )
    param = targeted[len(targeted) - 1 - depth]
    key = f"{module}.{param.name}"
    num_experts = next((int(base.config[k]) for k in layout.num_experts_keys if k in base.config), 0)
    if num_experts <= 0:
        keys = " or ".join(layout.num_experts_keys)
        raise MergeError(f"config.json of the {model_type} base gives no expert count ({keys})")
    r, scale = settings.rank_and_scale(key)
    if lora_A.shape[0] != num_experts * r:
        raise MergeError(
            f"adapter for {key} has {lora_A.shape[0]} lora_A rows; expected {num_experts} experts x r={r} "
            "(adapter_config r/rank_pattern); was it trained on another model?"
        )
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    # lora_A rows grouped per expert, A.reshape(E, r, in); lora_B as adapter_config records it
    # (expert_lora_layout: PEFT's rank_major, or Unsloth's older grouped_by_expert). Each expert's
    # B columns are gathered once here ([E, out, r], each block contiguous) rather than copied again
    # by every matmul on a strided view (the values, and so the products, are the same).
    try:
        b_layout = settings.expert_layouts.lora_B_layout_of(param.name, num_experts)
    except LayoutError as e:
        raise MergeError(str(e)) from None
    expert_A = [lora_A[e * r : (e + 1) * r] for e in range(num_experts)]
    expert_B = expert_B_blocks(lora_B, num_experts, r, b_layout)
    if release is not None:
        release(lora_B)  # the copy replaces it: memory stays at about one adapter
    # which experts' factors are not all zero, for all experts at once (_drop_untrained)
    nonzero_A = _nonzero_rows(lora_A.reshape(num_experts, -1))
    nonzero_B: dict[tuple[int, int], list[bool]] = {}

    def nonzero(e: int, row: int, rows: int) -> bool:
        if (row, rows) not in nonzero_B:
            nonzero_B[(row, rows)] = _nonzero_rows(expert_B[:, row : row + rows].flatten(1))
        return nonzero_A[e] and nonzero_B[(row, rows)][e]

    fused = base.tensor(key)
    if fused is not None:
        _check_float(fused)
        if fused.shape != (num_experts, out_features, in_features):
            raise MergeError(
                f"shape mismatch: adapter for {key} makes [{num_experts}, {out_features}, {in_features}] deltas "
                f"but the base tensor is {list(fused.shape)}"
            )
        matrices = [MatrixUpdate(e, expert_A[e], expert_B[e], nonzero(e, 0, out_features)) for e in range(num_experts)]
        return [TensorUpdate(key, key, scale, matrices)]

    updates = []
    for e in range(num_experts):
        row = 0
        for part in param.parts:
            name = f"{module}.{e}.{part}.weight"
            info = base.tensor(name)
            if info is None:
                raise MergeError(f"adapter targets {key}, but the base has neither that tensor nor {name}")
            _check_float(info)
            rows = info.shape[0]
            if info.shape != (rows, in_features) or row + rows > out_features:
                raise MergeError(
                    f"shape mismatch: base tensor {name} is {list(info.shape)}, which does not fit the "
                    f"[{out_features}, {in_features}] per-expert delta of {key}"
                )
            matrices = [MatrixUpdate(None, expert_A[e], expert_B[e][row : row + rows], nonzero(e, row, rows))]
            updates.append(TensorUpdate(name, key, scale, matrices))
            row += rows
        if row != out_features:
            raise MergeError(
                f"shape mismatch: {'+'.join(param.parts)} of expert {e} have {row} rows, "
                f"the delta of {key} {out_features}"
            )
    return updates


def plan_updates(
    base: BaseModel, settings: LoraSettings, weights: dict[str, torch.Tensor], adapter_config: dict[str, Any],
    release: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, TensorUpdate]:
    """{base tensor name: update} for every targeted tensor; refuses anything that does not fit.
    `release(tensor)` is told of each adapter tensor that the updates replaced with a copy."""
    base_class = (adapter_config.get("auto_mapping") or {}).get("base_model_class")
    architectures = base.config.get("architectures") or []
    if base_class and architectures and base_class not in architectures:
        raise MergeError(
            f"adapter was made for {base_class} (adapter_config auto_mapping), the base is {architectures}"
        )

    updates: dict[str, TensorUpdate] = {}
    for module, (lora_A, lora_B) in _pair_lora_factors(weights).items():
        stripped, depth = _strip_base_layers(module)
        dense = base.tensor(f"{module}.weight") if depth == 0 else None
        if dense is not None:
            new = [_dense_update(module, lora_A, lora_B, dense, settings)]
        else:
            new = _expert_updates(stripped, depth, lora_A, lora_B, base, settings, release)
        for update in new:
            if update.tensor in updates:
                sources = f"{updates[update.tensor].source}, {update.source}"
                raise MergeError(f"base tensor {update.tensor} is targeted twice ({sources})")
            updates[update.tensor] = update
    if not updates:
        raise MergeError("the adapter has no LoRA weights")
    return updates


def _nonzero_rows(x: torch.Tensor) -> list[bool]:
    """Whether each row of the 2-D `x` has an element that is not zero (NaN counts as not zero).
    Max and min reductions: ten times faster than Tensor.any on floats (measured)."""
    return ((x.amax(1) != 0) | (x.amin(1) != 0)).tolist()


def _drop_untrained(updates: dict[str, TensorUpdate]) -> list[str]:
    """Take out the matrices whose A or B slice is all zero and return their names.

    Such a matrix has a zero delta: it is correct to leave it unchanged. It happens for real in
    MoE training (an expert the router never picked keeps PEFT's zero-initialised B columns),
    so it is reported, not refused; the after-merge check then covers every matrix with a
    non-zero delta. An adapter with no trained matrix at all is refused."""
    untrained = []
    for key in list(updates):
        update = updates[key]
        kept = []
        for m in update.matrices:
            if m.nonzero if m.nonzero is not None else bool(m.lora_A.any() and m.lora_B.any()):
                kept.append(m)
            else:
                untrained.append(update.tensor if m.expert is None else f"{update.tensor} (expert {m.expert})")
        if not kept:
            del updates[key]
        elif len(kept) != len(update.matrices):
            updates[key] = replace(update, matrices=kept)
    if not updates:
        raise MergeError("every LoRA factor pair of the adapter has an all-zero A or B: it was never trained")
    if untrained:
        log.warning(
            "%d matrices have all-zero LoRA factors (never trained, e.g. experts the router never picked) "
            "and stay unchanged: %s%s", len(untrained), ", ".join(untrained[:5]), " ..." if len(untrained) > 5 else ""
        )
    return untrained


# ---------------------------------------------------------------------------------------------
# The arithmetic


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


# ---------------------------------------------------------------------------------------------
# Journal and files


class Journal:
    """Append-only, fsynced record of the shards finished in a partial output, one JSON object a
    line. The first line fingerprints the merge so that a rerun only resumes the same merge."""

    def __init__(self, path: str, fingerprint: dict[str, Any], entries: dict[str, dict[str, Any]]):
        self.path, self.fingerprint, self.entries = path, fingerprint, entries

    @classmethod
    def create(cls, path: str, fingerprint: dict[str, Any]) -> Journal:
        journal = cls(path, fingerprint, {})
        with open(path, "w") as f:
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(os.path.dirname(path))
        return journal

    @classmethod
    def load(cls, path: str) -> Journal:
        with open(path, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a kill can leave a torn last line: drop it
        if len(complete) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(complete))
        try:
            lines = [json.loads(line) for line in complete.splitlines()]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MergeError(f"{path} is corrupt ({e}): {recovery_hint(os.path.dirname(path))}") from None
        if not lines or "fingerprint" not in lines[0] or any("shard" not in entry for entry in lines[1:]):
            raise MergeError(f"{path} is not a merge journal: {recovery_hint(os.path.dirname(path))}")
        return cls(path, lines[0]["fingerprint"], {entry["shard"]: entry for entry in lines[1:]})

    def record(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[entry["shard"]] = entry


def recovery_hint(partial_dir: str, base_dir: str | None = None) -> str:
    """What to delete to start an interrupted merge over. A consume-mode merge has moved base
    shards into the partial folder: deleting it loses them, so the base must be rebuilt too."""
    hint = f"delete {partial_dir} and run again"
    base = f"the base's completion flag {base_dir}.complete" if base_dir else "the base's completion flag (results/<model>/base.complete)"
    return (hint + f". If it was a consume-mode merge (export.merge_mode: consume), it holds base shards that "
            f"were moved out of the base: also delete {base}, so that the workflow builds or fetches the base "
            "again (the adapter is kept; training does not rerun)")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _remove_base_shard(path: str) -> None:
    """Remove a consumed base shard: the file, and the link to it in a Hugging Face cache snapshot."""
    real = os.path.realpath(path)
    if os.path.islink(path):
        os.unlink(path)
    if os.path.exists(real):
        os.remove(real)


def _place_untouched_shard(src: str, final: str, tmp: str, mode: str) -> tuple[str, int]:
    """Link, move or copy a shard that has no targeted tensor; returns (action, bytes written)."""
    if mode == "link":
        try:
            os.link(src, final)
            return "linked", 0
        except OSError as e:
            if e.errno not in LINK_FALLBACK_ERRNOS:
                raise
            log.info("cannot hard-link %s (%s); copying", src, os.strerror(e.errno))
    elif mode == "consume":
        try:
            os.rename(src, final)
            return "moved", 0
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            log.info("cannot move %s across filesystems; copying", src)
    written = copy_file(src, tmp)
    os.rename(tmp, final)
    return "copied", written


@dataclass(frozen=True)
class _Task:
    """One piece of a merged shard: a matrix to merge (a whole 2-D tensor, or one expert of a fused
    3-D one: bytes [start, start+nbytes) of `info`), or bytes to copy as they are: `copies`, runs
    of (tensor, first byte, bytes) that follow each other in the base shard and in the output."""

    nbytes: int
    copies: tuple[tuple[TensorInfo, int, int], ...] = ()
    info: TensorInfo | None = None
    start: int = 0
    update: TensorUpdate | None = None
    matrix: MatrixUpdate | None = None


def _shard_tasks(header: ShardHeader, updates: dict[str, TensorUpdate]) -> tuple[list[_Task], dict[str, int]]:
    """The shard's work in file order, and the report's counts for it. Untouched bytes that follow
    each other are copied together, in runs of at most COPY_TASK_BYTES (a huge tensor in several,
    so that it does not leave the other workers idle)."""
    tasks: list[_Task] = []
    counts = {"tensors_merged": 0, "matrices_merged": 0, "tensors_copied": 0}
    run: list[tuple[TensorInfo, int, int]] = []
    run_bytes = 0

    def end_run() -> None:
        nonlocal run_bytes
        if run:
            tasks.append(_Task(run_bytes, copies=tuple(run)))
            run.clear()
            run_bytes = 0

    def copy(info: TensorInfo, start: int, nbytes: int) -> None:
        nonlocal run_bytes
        while nbytes > 0:
            if run:
                last, last_start, last_n = run[-1]
                if last.offset + last_start + last_n != info.offset + start or run_bytes >= COPY_TASK_BYTES:
                    end_run()
            n = min(nbytes, COPY_TASK_BYTES - run_bytes)
            run.append((info, start, n))
            run_bytes += n
            start, nbytes = start + n, nbytes - n

    for info in header.tensors.values():
        update = updates.get(info.name)
        if update is None:
            counts["tensors_copied"] += 1
            copy(info, 0, info.nbytes)
            continue
        counts["tensors_merged"] += 1
        counts["matrices_merged"] += len(update.matrices)
        by_expert = {m.expert: m for m in update.matrices}
        if None in by_expert:
            end_run()
            tasks.append(_Task(info.nbytes, info=info, update=update, matrix=by_expert[None]))
            continue
        matrix_bytes = info.nbytes // info.shape[0]
        for e in range(info.shape[0]):
            if e in by_expert:
                end_run()
                tasks.append(_Task(matrix_bytes, info=info, start=e * matrix_bytes, update=update, matrix=by_expert[e]))
            else:
                copy(info, e * matrix_bytes, matrix_bytes)
    end_run()
    return tasks, counts


def _merge_task(task: _Task, src_fd: int, writer: ShardWriter, workspace: Workspace) -> None:
    if task.copies:
        first, start, _ = task.copies[0]
        writer.copy(src_fd, first.offset + start, [(info.name, start, n) for info, start, n in task.copies])
        return
    info, m = task.info, task.matrix
    dtype = TORCH_FLOAT_DTYPES[info.dtype]
    shape = info.shape[-2:]
    row_bytes = shape[1] * dtype.itemsize

    def read_block(start: int, n: int) -> torch.Tensor:
        at = info.offset + task.start + start * row_bytes
        return workspace.read(src_fd, at, dtype, (n, shape[1]), f"tensor {info.name!r}")

    def write_block(start: int, merged: torch.Tensor) -> None:
        writer.write(info.name, merged, task.start + start * row_bytes)

    _merge_matrix(task.update, m, shape, read_block, write_block, workspace)


def _run_tasks(tasks: list[_Task], work: Callable[[_Task, Workspace], None], workspaces: list[Workspace]) -> None:
    """Run `work` on every task, in order, on one thread per workspace (this one included).

    Torch ops and file IO release the GIL, so the workers really do run at once: one merges a
    matrix while another reads or writes. On failure no new task is started, and the error of
    the first failing task in file order is raised, as a sequential run would have."""
    lock = threading.Lock()
    threads = torch.get_num_threads()
    pending = iter(enumerate(tasks))
    failures: list[tuple[int, BaseException]] = []
    stop = threading.Event()

    def loop(workspace: Workspace) -> None:
        # OpenMP's thread count is per thread: a new thread would start MKL with one OpenMP thread
        # per core, spinning against the other workers (20x slower matmuls, measured). torch only
        # applies its own setting to a thread lazily, and not before a matmul: apply it now.
        torch.set_num_threads(threads)
        while not stop.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                work(item[1], workspace)
            except BaseException as e:  # KeyboardInterrupt too: stop the others, then re-raise
                failures.append((item[0], e))
                stop.set()
                return

    helpers = [threading.Thread(target=loop, args=(w,), name="loraforge-merge", daemon=True) for w in workspaces[1:]]
    for thread in helpers:
        thread.start()
    try:
        loop(workspaces[0])
    finally:
        stop.set()  # after a normal return every task is taken: this only stops them after an error
        interrupted = None
        for thread in helpers:  # always wait: the shard's file must not be closed under a worker
            while thread.is_alive():
                try:
                    thread.join()
                except BaseException as e:
                    interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]


def _merge_shard(src: str, header: ShardHeader, updates: dict[str, TensorUpdate], tmp: str, bar: tqdm,
                 workspaces: list[Workspace]) -> tuple[dict[str, int], ShardWriter]:
    """Write the merged shard to `tmp`: targeted tensors get their delta, the rest are byte copies.
    Returns the counts and the writer, still to be closed (which fsyncs the file)."""
    tasks, counts = _shard_tasks(header, updates)
    writer = ShardWriter(tmp, [(t.name, t.dtype, t.shape) for t in header.tensors.values()], header.metadata)
    src_fd = os.open(src, os.O_RDONLY)
    bar_lock = threading.Lock()

    def work(task: _Task, workspace: Workspace) -> None:
        _merge_task(task, src_fd, writer, workspace)
        with bar_lock:
            bar.update(task.nbytes)

    try:
        _run_tasks(tasks, work, workspaces)
    except BaseException:
        writer.abort()
        raise
    finally:
        os.close(src_fd)
    counts["bytes_written"] = writer.bytes_written
    return counts, writer


class _Finisher:
    """Makes merged shards durable and records them (fsync, rename, directory fsync, journal entry,
    in consume mode the base shard's removal) on a thread of its own, so that the next shard is
    merged meanwhile instead of waiting for the disk. One shard at a time, in order: `submit`
    and `wait` first wait for the previous one, raising its error."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraforge-finish")
        self._pending: Future | None = None

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def submit(self, finish: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._thread.submit(finish)

    def shutdown(self, error: BaseException | None) -> None:
        """Wait for the last shard; after `error`, only report a failure of its own, not raise it."""
        try:
            self.wait()
        except Exception as e:
            if error is None:
                raise
            log.error("also, finishing the previous shard failed: %s", e)
        finally:
            self._thread.shutdown()


def _carried_files(base_dir: str) -> Iterator[str]:
    """Config, generation config, tokenizer, chat template, README...: every top-level file but weights."""
    for entry in sorted(os.scandir(base_dir), key=lambda e: e.name):
        # indexes are rewritten (ours) or would point at weights that are not carried over
        if entry.name.startswith(".") or not entry.is_file() or entry.name.endswith(".index.json"):
            continue
        if entry.name.endswith(WEIGHT_SUFFIXES):
            continue
        yield entry.name


def _write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# The merge


def merge(base_dir: str, adapter_dir: str, out_dir: str, mode: str = "link", progress: bool = True,
          base_is_users: bool = False) -> MergeReport:
    """Merge the PEFT adapter in `adapter_dir` into the model in `base_dir`, writing `out_dir`.

    mode: "link" hard-links shards without targeted tensors (the base stays intact and they take
    no space), "consume" moves them and removes each base shard once its merged replacement is
    durable (peak disk: base plus one shard), "copy" copies them. Links and moves fall back to a
    copy across filesystems. Do not edit linked output shards in place: they are the base's files.

    base_is_users: the base is a folder the user gave (`base: {path: ...}`), not one the workflow
    built or fetched: consume mode is refused for it, since it would use up the user's only copy.

    Raises MergeError, before writing anything, for adapters it cannot merge exactly. If the run is
    interrupted, `<out_dir>.partial` holds the finished shards; running the same merge again resumes.
    """
    started = time.monotonic()
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, not {mode!r}")
    if mode == "consume" and base_is_users:
        raise MergeError(
            f"{base_dir}: refusing to consume your own base folder (consume mode moves its shards into the "
            "merged model, which is deleted after the export); use merge mode link or copy for it"
        )
    with _single_threaded_torch(), _no_cyclic_gc():
        return _merge(base_dir, adapter_dir, out_dir, mode, progress, started)


def _merge(base_dir: str, adapter_dir: str, out_dir: str, mode: str, progress: bool, started: float) -> MergeReport:
    base_dir, adapter_dir, out_dir = (os.path.abspath(p) for p in (base_dir, adapter_dir, out_dir))
    partial_dir = out_dir + PARTIAL_SUFFIX
    journal_path = os.path.join(partial_dir, JOURNAL_NAME)
    if out_dir in (base_dir, adapter_dir):
        raise MergeError(f"output folder {out_dir} must differ from the base and adapter folders")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise MergeError(f"output {out_dir} already exists; remove it first")

    # --- validate everything before writing anything
    # The adapter's digest (for the journal) is computed on the side, while this thread plans:
    # hashing ~100 MB costs as much as the planning, and the second core is idle meanwhile.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraforge-sha256") as hasher:
        adapter_sha256 = hasher.submit(_file_sha256, os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME))
        adapter_config, adapter = load_adapter(adapter_dir)
        settings = LoraSettings.from_config(adapter_config)
        base = open_base(base_dir, partial_dir)
        updates = plan_updates(base, settings, adapter.tensors, adapter_config, release=adapter.release)
        untrained = _drop_untrained(updates)
        fingerprint = {
            "format": JOURNAL_FORMAT,
            "base_dir": os.path.realpath(base_dir),
            "adapter_sha256": adapter_sha256.result(),
            "adapter_config_sha256": _file_sha256(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)),
            "mode": mode,
            # tensor bytes, not file sizes: a merged shard's header may be formatted differently
            "shards": {shard: base.headers[shard].data_bytes for shard in base.shards},
        }

    marker_path = os.path.join(partial_dir, MARKER_NAME)
    if os.path.exists(marker_path) and not os.path.exists(journal_path):
        with open(marker_path) as f:
            marker = json.load(f)
        if marker.get("fingerprint") == fingerprint:
            _publish(partial_dir, out_dir)  # an earlier run did everything but this final rename
            return MergeReport(**marker["report"])
        _discard_stale_partial(partial_dir, marker.get("fingerprint") or {}, fingerprint)

    journal = _open_journal(partial_dir, journal_path, fingerprint)

    report = MergeReport(mode=mode, out_dir=out_dir, shards=len(base.shards), matrices_untrained=len(untrained))
    workspaces = [Workspace() for _ in range(_worker_count())]
    finisher, error = _Finisher(), None
    try:
        for shard in base.shards:
            entry = _process_shard(shard, base, updates, partial_dir, journal, mode, progress, workspaces, finisher)
            report.add_shard(entry)
            if entry.get("resumed"):
                report.shards_resumed += 1
    except BaseException as e:
        error = e
        raise
    finally:
        finisher.shutdown(error)

    _finish(base, partial_dir, journal_path, report, fingerprint, started)
    _publish(partial_dir, out_dir)
    log.info("merged %s into %s: %s", adapter_dir, out_dir, report.as_dict())
    return report


def _worker_count() -> int:
    """Threads that merge a shard at once: one per usable core, at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector. The merge's many small allocations (a few Python
    objects per torch op) trigger full collections, each walking every object that torch & co
    created: one took 62 ms of a 0.8 s merge, holding the GIL, so stopping every worker. The merge
    makes no reference cycles worth collecting early; reference counting still frees every tensor."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Run torch on one thread per op: the cores are used by merging several matrices at once
    instead (_run_tasks). The per-matrix work is small and memory-bound; OpenMP's barriers cost
    more than they save, and on a busy 2-core machine 2 threads made the elementwise ops 5-300x
    slower (spinning threads fighting for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _open_journal(partial_dir: str, journal_path: str, fingerprint: dict[str, Any]) -> Journal:
    """Resume the journal of an interrupted run of the same merge, or start a new one."""
    if os.path.exists(journal_path):
        journal = Journal.load(journal_path)
        if journal.fingerprint != fingerprint:
            _discard_stale_partial(partial_dir, journal.fingerprint, fingerprint)
            return _open_journal(partial_dir, journal_path, fingerprint)
        for name in os.listdir(partial_dir):
            if name.endswith(TMP_SUFFIX):
                os.remove(os.path.join(partial_dir, name))
        log.info("resuming %s: %d shards already done", partial_dir, len(journal.entries))
        return journal
    if os.path.exists(partial_dir) and os.listdir(partial_dir):
        raise MergeError(f"{partial_dir} exists but holds no merge journal: {recovery_hint(partial_dir)}")
    os.makedirs(partial_dir, exist_ok=True)
    return Journal.create(journal_path, fingerprint)


def _discard_stale_partial(partial_dir: str, recorded: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Remove the partial output of a merge of other inputs (say, an adapter retrained since),
    unless it was a consume-mode merge: then it holds base shards that exist nowhere else."""
    differ = sorted(k for k in fingerprint if recorded.get(k) != fingerprint[k])
    if recorded.get("mode") == "consume":
        raise MergeError(
            f"{partial_dir} holds an interrupted consume-mode merge of other inputs (they differ in {differ}) "
            "and with it base shards that exist nowhere else: rerun that merge to finish it"
        )
    log.info("removing %s, the partial output of a merge of other inputs (%s)", partial_dir, differ)
    shutil.rmtree(partial_dir)


def _process_shard(shard: str, base: BaseModel, updates: dict[str, TensorUpdate], partial_dir: str,
                   journal: Journal, mode: str, progress: bool, workspaces: list[Workspace],
                   finisher: _Finisher) -> dict[str, Any]:
    base_path = os.path.join(base.directory, shard)
    final = os.path.join(partial_dir, shard)
    header = base.headers[shard]
    src = os.path.realpath(base_path)
    tmp = final + TMP_SUFFIX
    shard_updates = {name: updates[name] for name in header.tensors if name in updates}
    started = time.monotonic()

    def finish(entry: dict[str, Any]) -> None:
        _fsync_dir(partial_dir)
        journal.record(entry)
        if mode == "consume":
            _remove_base_shard(base_path)  # only now: the output shard is durable and recorded
        log.info("%s %s in %.1fs", entry["action"], shard, time.monotonic() - started)

    if shard_updates and shard not in journal.entries and os.path.exists(base_path):
        # a shard to merge: written to `tmp` while the previous one is still being finished (only
        # tmp files are written; the resume removes them), then finished on the finisher's thread
        with tqdm(total=header.data_bytes, unit="B", unit_scale=True, desc=shard, disable=not progress,
                  mininterval=1.0, file=sys.stderr) as bar:
            counts, writer = _merge_shard(src, header, shard_updates, tmp, bar, workspaces)
        entry = {"shard": shard, "action": "merged", **counts}

        def durable() -> None:
            writer.close()  # fsync
            if os.path.exists(final):
                os.remove(final)  # unrecorded leftover of an interrupted attempt; the base is intact
            os.rename(tmp, final)
            finish(entry)

        try:
            finisher.submit(durable)
        except BaseException:
            writer.abort()
            raise
        return entry

    finisher.wait()  # the rest renames, moves or records: only once the shards before are recorded
    in_base = os.path.exists(base_path)  # follows cache symlinks: a dangling one means moved away
    if shard in journal.entries:
        if mode == "consume" and in_base:
            _remove_base_shard(base_path)  # interrupted between the journal entry and the removal
        return {**journal.entries[shard], "resumed": True}
    if os.path.exists(final):
        if in_base:
            os.remove(final)  # unrecorded leftover of an interrupted attempt; the base is intact, redo it
        elif mode == "consume":
            # moved by os.rename just before an interrupt; the move itself is atomic
            entry = {"shard": shard, "action": "moved", "tensors_moved": len(header.tensors)}
            journal.record(entry)
            _remove_base_shard(base_path)
            return {**entry, "resumed": True}
    if not in_base:
        raise MergeError(
            f"base shard {base_path} is missing (used up by an earlier consume-mode merge, or deleted): "
            f"{recovery_hint(partial_dir, base.directory)}"
        )

    with tqdm(total=header.data_bytes, unit="B", unit_scale=True, desc=shard, disable=not progress,
              mininterval=1.0, file=sys.stderr) as bar:
        action, written = _place_untouched_shard(src, final, tmp, mode)
        bar.update(header.data_bytes)
    entry = {"shard": shard, "action": action, f"tensors_{action}": len(header.tensors), "bytes_written": written}
    finish(entry)
    return entry


def _finish(base: BaseModel, partial_dir: str, journal_path: str, report: MergeReport, fingerprint: dict[str, Any],
            started: float) -> None:
    """Carry over config and tokenizer files, write the index and the completion marker."""
    for name in _carried_files(base.directory):
        copy_file(os.path.realpath(os.path.join(base.directory, name)), os.path.join(partial_dir, name))
    if base.index_metadata is not None:
        # rewritten from the output shards' own headers, so it describes exactly what is there
        weight_map, total = {}, 0
        for shard in base.shards:
            header = read_header(os.path.join(partial_dir, shard))
            weight_map.update(dict.fromkeys(header.tensors, shard))
            total += header.data_bytes
        metadata = {**base.index_metadata, "total_size": total}
        _write_json(os.path.join(partial_dir, INDEX_NAME), {"metadata": metadata, "weight_map": weight_map})
    report.seconds = round(time.monotonic() - started, 3)
    _write_json(os.path.join(partial_dir, MARKER_NAME), {"report": report.as_dict(), "fingerprint": fingerprint})
    os.remove(journal_path)
    _fsync_dir(partial_dir)


def _publish(partial_dir: str, out_dir: str) -> None:
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked at the start); e.g. created by a workflow manager
    os.rename(partial_dir, out_dir)
    _fsync_dir(os.path.dirname(out_dir))


# ---------------------------------------------------------------------------------------------
# CLI (loraforge merge)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="DIR", help="base model folder (Hugging Face layout)")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
    parser.add_argument("--mode", choices=MERGE_MODES, default="link",
                        help="untouched shards: hard-link (default), consume (move; base shards are removed), or copy")
    parser.add_argument("--report", metavar="FILE.json", help="also write the merge report here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = merge(args.base, args.adapter, args.out, mode=args.mode, progress=not args.no_progress)
    except (MergeError, SafetensorsFormatError) as e:
        print(f"loraforge merge: error: {e}", file=sys.stderr)
        return 1
    summary = json.dumps(report.as_dict(), indent=2)
    print(summary)
    if args.report:
        with open(args.report, "w") as f:
            f.write(summary + "\n")
    return 0
