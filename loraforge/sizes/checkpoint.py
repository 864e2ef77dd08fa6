"""Estimated sizes of the Hugging Face side: the tensors `save_pretrained` writes (names and
shapes), their shards, the adapter's targets and size, tokenizer files."""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from loraforge.constants import dtype_bytes
from loraforge.sizes.arch import Arch, arch_from_config


DEFAULT_SHARD_BYTES = 4_000_000_000  # hub checkpoints (Qwen, Llama) shard at ~4-5 GB


def tensor_shapes(hf_config: Mapping | Arch) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors `save_pretrained` writes, in model order."""
    return dict(_tensor_shapes(arch_from_config(hf_config)))


@functools.lru_cache(maxsize=32)
def _tensor_shapes(a: Arch) -> tuple[tuple[str, tuple[int, ...]], ...]:
    H, D = a.hidden_size, a.head_dim
    q_out, kv_out = a.num_attention_heads * D, a.num_key_value_heads * D
    qkv_bias = a.model_type == "qwen2" or a.attention_bias
    o_bias = a.attention_bias and a.model_type != "qwen2"
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab_size, H)}
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[f"{p}self_attn.{proj}.weight"] = (out, H)
            if qkv_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (H, q_out)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (H,)
        if a.model_type in ("qwen3", "qwen3_moe"):
            shapes[p + "self_attn.q_norm.weight"] = (D,)
            shapes[p + "self_attn.k_norm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        if a.sparse_layer(i):
            shapes[p + "mlp.gate.weight"] = (a.num_experts, H)
            I = a.moe_intermediate_size
            for e in range(a.num_experts):
                shapes[f"{p}mlp.experts.{e}.gate_proj.weight"] = (I, H)
                shapes[f"{p}mlp.experts.{e}.up_proj.weight"] = (I, H)
                shapes[f"{p}mlp.experts.{e}.down_proj.weight"] = (H, I)
        else:
            I = a.intermediate_size
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                shapes[f"{p}mlp.{proj}.weight"] = shape
                if a.mlp_bias:
                    shapes[f"{p}mlp.{proj}.bias"] = (shape[0],)
    shapes["model.norm.weight"] = (H,)
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, H)
    return tuple(shapes.items())


def parameter_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _safetensors_header_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    # {"name":{"dtype":"BF16","shape":[a,b],"data_offsets":[x,y]}, ...} + __metadata__, padded to 8
    n = 8 + 40
    for name, shape in shapes.items():
        n += len(name) + 56 + sum(len(str(d)) + 1 for d in shape) + 2 * 11
    return n + (-n) % 8


def safetensors_bytes(shapes: Mapping[str, tuple[int, ...]], dtype: str = "bfloat16") -> int:
    """Bytes of one .safetensors file holding `shapes` in `dtype` (data + a header estimate)."""
    item = dtype_bytes(dtype)
    return sum(math.prod(s) for s in shapes.values()) * item + _safetensors_header_bytes(shapes)


@dataclass
class Shard:
    """One safetensors file of a model folder."""

    name: str
    bytes: int
    tensors: list[str] = field(default_factory=list)
    targeted: bool = True  # holds a tensor the adapter changes (so a merge rewrites it)


def shard_layout(
    shapes: Mapping[str, tuple[int, ...]],
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    targets: Iterable[str] | None = None,
) -> list[Shard]:
    """Split tensors into shards the way `save_pretrained` does (fill in order, start a new
    shard when the next tensor would pass `max_shard_bytes`), with HF's file names."""
    item = dtype_bytes(dtype)
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nb = math.prod(shape) * item
        if groups[-1] and size + nb > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = shape
        size += nb
    n = len(groups)
    shards = []
    for i, g in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(Shard(fname, safetensors_bytes(g, dtype), list(g), any(is_targeted(t, targets) for t in g)))
    return shards


def index_json_bytes(shapes: Mapping[str, tuple[int, ...]], n_shards: int) -> int:
    """model.safetensors.index.json (only written when there are several shards)."""
    if n_shards <= 1:
        return 0
    return 64 + sum(len(name) + 42 for name in shapes)


DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts")


def is_targeted(tensor_name: str, targets: Iterable[str] | None = None) -> bool:
    """Whether a LoRA on `targets` (module names; 'experts' = all expert weights) changes
    this tensor. Biases and norms are never changed by a LoRA merge."""
    targets = set(DEFAULT_TARGET_MODULES if targets is None else targets)
    parts = tensor_name.split(".")
    if parts[-1] != "weight":
        return False
    if "experts" in parts and (
        "experts" in targets or (len(parts) >= 2 and parts[-2] in targets)
    ):
        return True
    return any(p in targets for p in parts[:-1])


def adapter_targets(adapter_config: Mapping) -> set[str]:
    """Module names targeted by a PEFT adapter_config.json (target_modules + target_parameters)."""
    targets: set[str] = set()
    tm = adapter_config.get("target_modules") or []
    if isinstance(tm, str):  # a regex: fall back to the default names it mentions
        targets |= {m for m in DEFAULT_TARGET_MODULES if m in tm}
    else:
        targets |= {str(m).split(".")[-1] for m in tm}
    for p in adapter_config.get("target_parameters") or []:
        if "experts" in str(p):
            targets.add("experts")
        targets.add(str(p).split(".")[-1])
    if targets & {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}:
        # PEFT turns gate/up/down on an MoE into target_parameters on the fused experts
        targets.add("experts")
    return targets


def read_base_shards(base_dir: str | os.PathLike, targets: Iterable[str] | None = None) -> list[Shard] | None:
    """The shards of an existing model folder with their real sizes, and whether each is
    targeted (from model.safetensors.index.json; without an index, a single file is read
    from its header; None when the folder has no safetensors)."""
    base = Path(base_dir)
    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        by_file: dict[str, list[str]] = {}
        for t, f in weight_map.items():
            by_file.setdefault(f, []).append(t)
        shards = []
        for fname in sorted(by_file):
            try:
                nbytes = (base / fname).stat().st_size
            except FileNotFoundError:
                continue
            ts = by_file[fname]
            shards.append(Shard(fname, nbytes, ts, any(is_targeted(t, targets) for t in ts)))
        return shards
    files = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    if not files:
        return None
    shards = []
    for f in files:
        names = _safetensors_names(f)
        targeted = True if names is None else any(is_targeted(t, targets) for t in names)
        shards.append(Shard(f.name, f.stat().st_size, names or [], targeted))
    return shards


def _safetensors_names(path: Path) -> list[str] | None:
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100_000_000:
                return None
            header = json.loads(fh.read(n))
        return [k for k in header if k != "__metadata__"]
    except (OSError, ValueError):
        return None


def tokenizer_files_bytes(vocab_size: int) -> int:
    """tokenizer.json + vocab/merges + configs of a HF folder (~75 bytes a token for BPE)."""
    return 16_384 + vocab_size * 75


def model_folder_bytes(hf_config: Mapping | Arch, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[list[Shard], int]:
    """(shards, bytes of the other files) of a HF model folder built from this config."""
    a = arch_from_config(hf_config)
    shapes = tensor_shapes(a)
    shards = shard_layout(shapes, a.dtype, max_shard_bytes)
    other = tokenizer_files_bytes(a.vocab_size) + 4096 + index_json_bytes(shapes, len(shards))
    return shards, other


def training_checkpoint_bytes(adapter_fp32_bytes: int) -> int:
    """One Trainer checkpoint of a LoRA run: the adapter (fp32), Adam's two fp32 moments (twice
    the adapter) in optimizer.pt, and small state files (scheduler, RNG, trainer state)."""
    return 3 * adapter_fp32_bytes + 64 * 1024


def lora_adapter_bytes(hf_config: Mapping | Arch, r: int = 16, targets: Iterable[str] | None = None,
                       dtype: str = "float32") -> int:
    """adapter_model.safetensors of a LoRA of rank r: A [r, in] and B [out, r] per targeted
    matrix; on an MoE the experts take one fused A/B per projection with rank r per expert
    (gate/up fused with rank 2r, as PEFT's ParamWrapper stores them)."""
    a = arch_from_config(hf_config)
    targets = set(DEFAULT_TARGET_MODULES if targets is None else targets)
    item = dtype_bytes(dtype)
    n = 0
    count = 0
    for name, shape in tensor_shapes(a).items():
        if ".experts." in name or not is_targeted(name, targets) or len(shape) != 2:
            continue
        out_f, in_f = shape
        n += r * (in_f + out_f)
        count += 2
    if a.is_moe and ("experts" in targets or targets & {"gate_proj", "up_proj", "down_proj"}):
        E, H, I = a.num_experts, a.hidden_size, a.moe_intermediate_size
        per_layer = E * 2 * r * H + 2 * I * E * 2 * r  # gate_up: A [E*2r, H], B [2I, E*2r]
        per_layer += E * r * I + H * E * r  # down: A [E*r, I], B [H, E*r]
        n += per_layer * sum(1 for i in range(a.num_hidden_layers) if a.sparse_layer(i))
        count += 4 * a.num_hidden_layers
    return n * item + 200 * count + 4096
