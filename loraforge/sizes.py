"""Artifact sizes, estimated from a model's config before anything exists, or measured.

What the planner needs to know before a run: how big the base shards, the merged shards,
the intermediate GGUF and each quant will be. Everything is derived from the Hugging Face
config (the local `config.json`, or the `arch:` block of config.yaml for hub models not
downloaded yet):

- `tensor_shapes(cfg)`: the tensors `save_pretrained` writes (names and shapes) for the
  llama / qwen2 / qwen3 / qwen3_moe architectures (MoE experts per-expert 2-D, as on disk).
- `safetensors_bytes`, `shard_layout`: bytes on disk of those tensors, one file or sharded.
- `gguf_tensors`, `gguf_tensor_types`, `gguf_bytes`: the GGUF that llama.cpp's converter and
  quantizer write, tensor by tensor. The type of each tensor follows a faithful
  simplification of `llama_tensor_get_type` (llama.cpp src/llama-quant.cpp): 1-D tensors,
  norms and the MoE router stay F32, the output head (or tied token embedding) gets Q6_K,
  `attn_v` and `ffn_down` get Q6_K on the `use_more_bits` layers in Q4_K_M/Q5_K_M, rows
  whose width is not a multiple of the block size fall back (Q4_K->Q5_0, Q5_K->Q5_1,
  Q6_K->Q8_0, Q2_K/Q3_K->Q4_0, then F16). The tokenizer stored in the metadata is
  estimated from the vocabulary size.

Estimates are logical bytes (what a file's st_size will be). `measure` (and
`loraforge.diskmon`, which uses it) counts a file as min(st_size, allocated blocks): its
apparent size, except for a sparse file, whose punched holes take no space (the Q8_0
intermediate that a consume-mode quantization releases tensor by tensor). So a measured file
replaces its estimate like for like (`actual_or_estimate`): for multi-GB shards the slack of
the last block is far below 0.1%.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat as _stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from loraforge.constants import (CONVERTER_FTYPES, FTYPE_ALIASES, FTYPE_DEFAULT, dtype_bytes, ggml_block,
                                 gguf_tensor_name_map)

# --------------------------------------------------------------------------------------
# dtypes and GGML types
# --------------------------------------------------------------------------------------

# dtypes, file types and GGML block sizes: loraforge.constants (the block sizes from gguf-py)
_K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
               "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
               "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
               "TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}

GGUF_ALIGNMENT = 32
DEFAULT_SHARD_BYTES = 4_000_000_000  # hub checkpoints (Qwen, Llama) shard at ~4-5 GB


def ftype_name(ftype: str) -> str:
    """Canonical llama.cpp file-type name ('q4_k_m' -> 'Q4_K_M', 'Q4_K' -> 'Q4_K_M');
    ValueError if unknown."""
    name = str(ftype).strip().upper().replace("-", "_")
    if name.startswith("MOSTLY_"):
        name = name[len("MOSTLY_"):]
    name = FTYPE_ALIASES.get(name, name)
    if name not in FTYPE_DEFAULT:
        raise ValueError(f"unknown llama.cpp type {ftype!r}; known: {', '.join(FTYPE_DEFAULT)}")
    return name


def ggml_nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor of `shape` (numpy order: the last dimension is the row) in a type."""
    block, nbytes = ggml_block(ggml_type)
    n = math.prod(shape)
    return n // block * nbytes if block > 1 else n * nbytes


# --------------------------------------------------------------------------------------
# the architecture, from a HF config or from config.yaml's `arch:`
# --------------------------------------------------------------------------------------

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class Arch:
    """The fields of a HF config that decide the tensors (see `arch_from_config`)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 0
    moe_intermediate_size: int = 0
    dtype: str = "bfloat16"
    attention_bias: bool = False  # q/k/v/o biases (llama, qwen3); qwen2 always has q/k/v bias
    mlp_bias: bool = False  # llama only
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    rope_freqs: bool = False  # llama3-style rope scaling: the converter adds rope_freqs.weight

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def sparse_layer(self, i: int) -> bool:
        """Whether layer i has MoE experts (Qwen3MoeDecoderLayer's rule)."""
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % max(1, self.decoder_sparse_step) == 0
        )

    @property
    def n_gqa(self) -> int:
        return self.num_attention_heads // max(1, self.num_key_value_heads)


def arch_from_config(cfg: Mapping | Arch) -> Arch:
    """Normalize a HF `config.json` dict (or config.yaml's `arch:` block, same field names)."""
    if isinstance(cfg, Arch):
        return cfg
    cfg = dict(cfg)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k != "text_config"}}
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(
            f"unsupported model_type {cfg.get('model_type')!r}: sizes are modelled for "
            f"{', '.join(SUPPORTED_ARCHS)}"
        )
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if cfg.get(k) is None]
    if model_type != "qwen3_moe" and cfg.get("intermediate_size") is None:
        missing.append("intermediate_size")
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)} (model_type {model_type})")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if model_type == "qwen3_moe" else 0
    moe_inter = int(cfg.get("moe_intermediate_size") or 0)
    if experts and not moe_inter:
        raise ValueError("qwen3_moe config lacks moe_intermediate_size")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, Mapping) else None
    return Arch(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=experts,
        moe_intermediate_size=moe_inter,
        dtype=str(dtype).replace("torch.", ""),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
        mlp_only_layers=tuple(int(i) for i in (cfg.get("mlp_only_layers") or ())),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        rope_freqs=model_type == "llama" and rope_type == "llama3",
    )


# --------------------------------------------------------------------------------------
# safetensors (HF names, numpy-order shapes)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# which tensors an adapter touches
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# GGUF: names, per-tensor types, file size
# --------------------------------------------------------------------------------------

_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def gguf_name(hf_name: str, hf_config: Mapping | Arch) -> str | None:
    """The GGUF tensor name llama.cpp's converter gives a HF tensor, from gguf-py's
    TensorNameMap (per-expert tensors map to the stacked 3-D `blk.N.ffn_*_exps.weight`);
    None for names it does not know."""
    a = arch_from_config(hf_config)
    stem, _, suffix = hf_name.rpartition(".")
    name = gguf_tensor_name_map(a.model_type, a.num_hidden_layers).get_name(_EXPERT_INDEX.sub(".experts.", stem))
    return f"{name}.{suffix}" if name else None


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed): shape[-1] is the row width
    hf_names: tuple[str, ...] = ()

    @property
    def row(self) -> int:
        return self.shape[-1]


def gguf_tensors(hf_config: Mapping | Arch) -> list[GGUFTensor]:
    """The tensors of the converted GGUF, in file order (experts stacked into 3-D)."""
    return list(_gguf_tensors(arch_from_config(hf_config)))


@functools.lru_cache(maxsize=32)
def _gguf_tensors(a: Arch) -> tuple[GGUFTensor, ...]:
    out: dict[str, list] = {}
    for hf, shape in tensor_shapes(a).items():
        g = gguf_name(hf, a)
        if g is None:
            raise ValueError(f"no GGUF name for tensor {hf}")
        if g in out:  # an expert of a stacked tensor
            out[g][1] += 1
            out[g][2].append(hf)
        else:
            out[g] = [shape, 1, [hf]]
    tensors = []
    for g, (shape, n, hfs) in out.items():
        tensors.append(GGUFTensor(g, (n, *shape) if n > 1 or "_exps." in g else shape, tuple(hfs)))
    if a.rope_freqs:
        tensors.insert(0, GGUFTensor("rope_freqs.weight", (a.head_dim // 2,)))
    # the converter writes token_embd first, then blocks in order, output_norm/output last;
    # llama.cpp's per-layer counters only depend on the order of blocks, which this keeps
    return tuple(tensors)


def _converter_type(t: GGUFTensor, outtype: str) -> str:
    """convert_hf_to_gguf.py's choice: 1-D tensors, norms, biases, the MoE router and
    rope_freqs are F32; other weights take the outtype (Q8_0 falls back to F16 when the row
    is not a multiple of 32)."""
    if (
        len(t.shape) <= 1
        or t.name.endswith("_norm.weight")
        or not t.name.endswith(".weight")
        or ".ffn_gate_inp." in t.name
    ):
        return "F32"
    if outtype == "Q8_0" and t.row % ggml_block("Q8_0")[0] != 0:
        return "F16"
    return outtype


def _allows_quantization(t: GGUFTensor) -> bool:
    """tensor_allows_quantization() for the tensors of these architectures."""
    return (
        len(t.shape) >= 2
        and t.name.endswith("weight")
        and "_norm.weight" not in t.name
        and "ffn_gate_inp.weight" not in t.name
    )


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight",
                "attn_q.weight", "attn_output.weight"):
        if key in name:
            return key.split(".")[0]
    for key in ("ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key
    return "other"


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if not m:
        raise ValueError(f"cannot determine the layer of tensor {name}")
    return int(m.group(1))


def gguf_tensor_types(hf_config: Mapping | Arch, ftype: str) -> dict[str, str]:
    """GGML type of every tensor in a GGUF of file type `ftype`.

    F32/F16/BF16/Q8_0 are what the converter writes; other types are what llama-quantize
    makes from such a file (the type of a tensor it does not quantize stays the
    converter's: F32 for norms, biases and the router)."""
    return dict(_gguf_tensor_types(arch_from_config(hf_config), ftype_name(ftype)))


@functools.lru_cache(maxsize=64)
def _gguf_tensor_types(a: Arch, ftype: str) -> tuple[tuple[str, str], ...]:
    tensors = _gguf_tensors(a)
    default = FTYPE_DEFAULT[ftype]
    if ftype in CONVERTER_FTYPES:
        base_type = ftype
    else:
        base_type = "F16"
    types: dict[str, str] = {}
    n_layer = a.num_hidden_layers
    n_expert = a.num_experts
    has_output = any(t.name == "output.weight" for t in tensors)
    n_attention_wv = sum(1 for t in tensors if "attn_v.weight" in t.name)
    i_attention_wv = 0
    i_ffn_down = 0
    is_70b = a.model_type == "llama" and n_layer == 80 and a.num_key_value_heads != a.num_attention_heads
    quantized = default not in ("F32", "F16", "BF16")
    for t in tensors:
        conv = _converter_type(t, base_type)
        if ftype in CONVERTER_FTYPES and ftype != "Q8_0" or not _allows_quantization(t):
            types[t.name] = conv
            continue
        new = default
        cat = _category(t.name)
        if quantized:
            # --- llama_tensor_get_type_impl (non-imatrix, non-FALCON paths) ---
            if cat == "output" or (not has_output and cat == "token_embd"):
                if t.row % ggml_block(new)[0] != 0:
                    new = "Q8_0"
                elif ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
                    new = "Q5_K"
                elif ftype == "MXFP4_MOE":
                    new = "Q8_0"
                elif new != "Q8_0":
                    new = "Q6_K"
            elif cat == "token_embd":
                if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                    new = "Q2_K"
                elif ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                    new = "IQ3_S"
                elif ftype in ("TQ1_0", "TQ2_0"):
                    new = "Q4_K"
            elif cat == "attn_v":
                if ftype == "Q2_K":
                    new = "Q4_K" if a.n_gqa >= 4 else "Q3_K"
                elif ftype == "Q2_K_S" and a.n_gqa >= 4:
                    new = "Q4_K"
                elif ftype == "Q3_K_M":
                    new = "Q5_K" if i_attention_wv < 2 else "Q4_K"
                elif ftype == "Q3_K_L":
                    new = "Q5_K"
                elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attention_wv, n_attention_wv):
                    new = "Q6_K"
                elif ftype == "Q4_K_S" and i_attention_wv < 4:
                    new = "Q5_K"
                if is_70b and new in ("Q3_K", "Q4_K"):
                    new = "Q5_K"
                if n_expert == 8:
                    new = "Q8_0"
                i_attention_wv += 1
            elif cat == "attn_k":
                if n_expert == 8:
                    new = "Q8_0"
            elif cat == "ffn_down":
                i_layer = _layer_of(t.name) if n_expert > 1 else i_ffn_down
                if ftype == "Q2_K":
                    new = "Q3_K"
                elif ftype == "Q2_K_S":
                    if i_layer < n_layer // 8:
                        new = "Q4_K"
                elif ftype == "Q3_K_M":
                    new = "Q5_K" if i_layer < n_layer // 16 else "Q4_K"
                elif ftype == "Q3_K_L":
                    new = "Q5_K"
                elif ftype == "Q4_K_M":
                    if _use_more_bits(i_layer, n_layer):
                        new = "Q6_K"
                elif ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
                    new = "Q6_K"
                elif ftype == "Q4_K_S" and i_layer < n_layer // 8:
                    new = "Q5_K"
                i_ffn_down += 1
            elif cat == "attn_output":
                if n_expert == 8:
                    if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                        new = "Q5_K"
                else:
                    new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, new)
            # --- tensor_type_fallback: the row width must be a multiple of the block ---
            if t.row % ggml_block(new)[0] != 0:
                new = _K_FALLBACK.get(new, "F16")
                if t.row % ggml_block(new)[0] != 0:
                    new = "F16"
        types[t.name] = new
    return tuple(types.items())


def tokenizer_metadata_bytes(vocab_size: int) -> int:
    """GGUF metadata taken by the tokenizer: tokens (u64 length + ~7 bytes each), token types
    (i32), BPE merges (~vocab of them, u64 length + ~11 bytes) or SPM scores."""
    return vocab_size * (8 + 7 + 4 + 8 + 11)


def gguf_metadata_bytes(hf_config: Mapping | Arch, names: Iterable[str] = ()) -> int:
    """Header + key/values (tokenizer included, ~6 MB for a 152k vocab) + tensor infos,
    padded to the alignment."""
    a = arch_from_config(hf_config)
    names = list(names)
    if not names:
        names = [t.name for t in gguf_tensors(a)]
    n = 24  # magic, version, n_tensors, n_kv
    n += 2048  # architecture/hparam keys, general.*, special token ids
    n += 4096  # chat template (Qwen's are ~4 KB)
    n += tokenizer_metadata_bytes(a.vocab_size)
    n += sum(8 + len(name) + 4 + 8 * 3 + 4 + 8 for name in names)
    return n + (-n) % GGUF_ALIGNMENT


def gguf_bytes(hf_config: Mapping | Arch, ftype: str) -> int:
    """Estimated size of the GGUF file of type `ftype` (metadata + aligned tensor data)."""
    a = arch_from_config(hf_config)
    types = gguf_tensor_types(a, ftype)
    tensors = gguf_tensors(a)
    data = 0
    for t in tensors:
        nb = ggml_nbytes(types[t.name], t.shape)
        data += nb + (-nb) % GGUF_ALIGNMENT
    return gguf_metadata_bytes(a, names=[t.name for t in tensors]) + data


def bits_per_weight(hf_config: Mapping | Arch, ftype: str) -> float:
    a = arch_from_config(hf_config)
    return 8 * gguf_bytes(a, ftype) / parameter_count(tensor_shapes(a))


# --------------------------------------------------------------------------------------
# other artifacts
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# measuring what exists
# --------------------------------------------------------------------------------------


def file_bytes(st: os.stat_result) -> int:
    """The bytes a file takes: its apparent size (st_size), or its allocated blocks when
    fewer (a sparse file: holes take no space)."""
    blocks = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else min(st.st_size, blocks * 512)


def measure(paths: Iterable[str | os.PathLike], seen: set | None = None) -> tuple[int, dict[str, int]]:
    """Bytes under each path (`file_bytes`: apparent sizes, holes of sparse files not
    counted), counting every inode once across all the paths (hard links, and symlinks to files such as HF cache blobs, are followed and
    counted once; symlinked directories are not entered). Files that vanish while walking
    are skipped. Returns (total, {path: bytes}) where a shared inode counts for the first
    path that reaches it."""
    seen = set() if seen is None else seen
    per: dict[str, int] = {}
    total = 0
    for p in paths:
        key = str(p)
        n = 0
        for st in _walk_stats(key):
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            n += file_bytes(st)
        per[key] = per.get(key, 0) + n
        total += n
    return total, per


def _walk_stats(path: str):
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    if not _stat.S_ISDIR(st.st_mode):
        if _stat.S_ISREG(st.st_mode):
            yield st
        return
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    est = entry.stat(follow_symlinks=True)
                except (FileNotFoundError, NotADirectoryError, PermissionError):
                    continue
                if _stat.S_ISREG(est.st_mode):
                    yield est


def path_bytes(path: str | os.PathLike) -> int | None:
    """Measured bytes of a file or folder, or None when it does not exist."""
    if not os.path.lexists(path):
        return None
    return measure([path])[0]


def actual_or_estimate(path: str | os.PathLike, estimate: int | None) -> int:
    """The real size when the path exists, else the estimate (0 when there is none)."""
    actual = path_bytes(path)
    if actual is not None:
        return actual
    return int(estimate or 0)


# --------------------------------------------------------------------------------------
# human units
# --------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1,
          "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}


def parse_size(text: str | int | float) -> int:
    """'95G' / '95GiB' -> 95 * 2**30 (binary, like df -h); '95GB' -> 95e9; plain numbers are bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 95G, 95GiB, 95GB, 1.5T)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human(n: int | float, signed: bool = False) -> str:
    """Binary units with one decimal: 61061000000 -> '56.9 GiB'."""
    sign = ("+" if n > 0 else "-" if n < 0 else " ") if signed else ("-" if n < 0 else "")
    v = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{sign}{v:.0f} {unit}" if unit == "B" else f"{sign}{v:.1f} {unit}"
        v /= 1024
    return f"{sign}{v:.1f} TiB"
