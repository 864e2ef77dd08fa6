"""What to merge, decided before anything is written: the adapter's settings (refusing what
cannot be merged exactly), the expert layouts, and which base tensor gets which delta."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from loraforge.constants import INDEX_NAME, SINGLE_SHARD_NAME
from loraforge.expert_lora_layout import ExpertLoraLayouts, LayoutError, expert_B_blocks
from loraforge.fileio import read_hf_config
from loraforge.merge.common import ADAPTER_CONFIG_NAME, ADAPTER_KEY_PREFIX, ADAPTER_WEIGHTS_NAME, MergeError, recovery_hint
from loraforge.safetensors_io import TORCH_FLOAT_DTYPES, MappedTensors, ShardHeader, TensorInfo, read_header

log = logging.getLogger(__name__)

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
