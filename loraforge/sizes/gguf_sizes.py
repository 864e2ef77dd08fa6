"""Estimated sizes of the GGUF side: the tensors llama.cpp's converter writes, the type the
quantizer gives each of them (llama_tensor_get_type), and the file size."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from loraforge.constants import CONVERTER_FTYPES, FTYPE_ALIASES, FTYPE_DEFAULT, ggml_block, gguf_tensor_name_map
from loraforge.sizes.arch import Arch, arch_from_config
from loraforge.sizes.checkpoint import parameter_count, tensor_shapes


# dtypes, file types and GGML block sizes: loraforge.constants (the block sizes from gguf-py)
_K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
               "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
               "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
               "TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}

GGUF_ALIGNMENT = 32


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
