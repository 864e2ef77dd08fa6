"""RAM needed to run each GGUF in llama.cpp / Ollama: the article's "GGUF file size plus
2-4 GB for KV cache and overhead" made exact.

    total = file + kv_cache + compute_buffer + overhead

- file: the GGUF's size. llama.cpp maps it (mmap) and touches every weight on each token,
  so all of it is resident (an MoE reads only the routed experts per token, but over a
  conversation every expert gets paged in: count it all).
- kv_cache: K and V for every layer and position, from the model config:
      2 * n_layers * n_kv_heads * head_dim * num_ctx * bytes_per_element
  head_dim = config.head_dim, or hidden_size / num_attention_heads when absent;
  bytes_per_element 2 for the default f16 cache (1 for q8_0, 0.5 for q4_0, 4 for f32:
  Ollama's OLLAMA_KV_CACHE_TYPE). For Qwen3-Coder-30B-A3B (48 layers, 4 KV heads, head_dim
  128) at 32768 tokens: 2*48*4*128*32768*2 = 3 GiB exactly.
- compute_buffer: llama.cpp's graph scratch for one micro-batch of n_ubatch tokens (512,
  its default), f32 activations, the larger of
      output step:  4 * n_ubatch * (hidden + vocab)              (hidden state + logits)
      one layer:    4 * n_ubatch * (2*hidden + q_dim + 2*kv_dim + ffn_act + n_experts)
                    + attention: flash attention  2 * n_ubatch * num_ctx       (f16 KQ mask)
                                 without it       4 * n_ubatch * num_ctx * (n_heads + 1)
                                                  (f32 KQ scores of every head + mask)
  with q_dim = n_heads*head_dim, kv_dim = n_kv_heads*head_dim, ffn_act = 3*intermediate
  (gate, up, product; MoE: 3*moe_intermediate*experts_per_token). The maximum, not the
  sum: ggml's allocator reuses a layer's scratch for the next and for the output step.
  Ollama turns flash attention on for qwen3/qwen3moe (llama-cpp-python's Llama() leaves
  it off unless flash_attn=True). Checked against llama.cpp's own "compute buffer size"
  for the tiny models at 512-16384 tokens: within 0.5 MiB with flash attention, 2 MiB high
  without (tests/test_memory.py). It is the same kind of estimate as Ollama's per-
  architecture GraphSize (fs/ggml/ggml.go), which has no qwen3 case of its own.
- overhead: a fixed 256 MiB for the runtime itself (the llama.cpp/Ollama process, CPU
  backend buffers, the vocabulary and sampler state).

`recommended_ram_gib` adds 25% headroom for the OS and the editor and rounds up to a
common RAM size (4, 8, 12, 16, 24, 32, 48, 64, ... GiB) -- the article's "Recommended"
column; `min_ram_gib` is the total rounded up to a whole GiB.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from loraforge.fileio import atomic_output, read_hf_config

log = logging.getLogger("loraforge.memory")

GIB = 1024**3
MIB = 1024**2
RUNTIME_OVERHEAD_BYTES = 256 * MIB
DEFAULT_UBATCH = 512
KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0, "q4_0": 0.5}
COMMON_RAM_GIB = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
COLUMNS = ["model_file", "quant", "num_ctx", "file_bytes", "kv_cache_bytes", "compute_bytes",
           "overhead_bytes", "total_bytes", "file_gib", "kv_cache_gib", "total_gib",
           "min_ram_gib", "recommended_ram_gib", "source"]


@dataclass(frozen=True)
class ModelDims:
    """What the memory formulas need from a Hugging Face config."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    n_experts: int = 0
    n_experts_used: int = 0
    moe_intermediate: int = 0


def load_config(hf_config) -> dict:
    """A config dict from a dict, a config.json path, a model folder or a transformers config."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return read_hf_config(hf_config, required=True)


def model_dims(hf_config) -> ModelDims:
    cfg = load_config(hf_config)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg, **cfg["text_config"]}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise ValueError(f"model config lacks {e.args[0]}") from None
    return ModelDims(
        n_layers=layers,
        hidden=hidden,
        n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab=vocab,
        intermediate=int(cfg.get("intermediate_size") or 0),
        n_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
        n_experts_used=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate=int(cfg.get("moe_intermediate_size") or 0),
    )


def dims_from_gguf(path: str | os.PathLike) -> ModelDims:
    """The same dimensions read from a GGUF's metadata (when no HF config is at hand)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def get(key, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = get("general.architecture")
    if not arch:
        raise ValueError(f"{path}: no general.architecture")
    hidden, heads = int(get(f"{arch}.embedding_length")), int(get(f"{arch}.attention.head_count"))
    return ModelDims(
        n_layers=int(get(f"{arch}.block_count")),
        hidden=hidden,
        n_heads=heads,
        n_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(get(f"{arch}.attention.key_length", hidden // heads)),
        vocab=len(get("tokenizer.ggml.tokens", [])),
        intermediate=int(get(f"{arch}.feed_forward_length", 0) or 0),
        n_experts=int(get(f"{arch}.expert_count", 0) or 0),
        n_experts_used=int(get(f"{arch}.expert_used_count", 0) or 0),
        moe_intermediate=int(get(f"{arch}.expert_feed_forward_length", 0) or 0),
    )


def kv_cache_bytes(hf_config, num_ctx: int, cache_type: str = "f16") -> int:
    """2 * n_layers * n_kv_heads * head_dim * num_ctx * bytes_per_element."""
    d = hf_config if isinstance(hf_config, ModelDims) else model_dims(hf_config)
    try:
        per = KV_BYTES_PER_ELEMENT[cache_type.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {cache_type!r}; one of {', '.join(KV_BYTES_PER_ELEMENT)}") from None
    return int(2 * d.n_layers * d.n_kv_heads * d.head_dim * int(num_ctx) * per)


def compute_buffer_bytes(hf_config, num_ctx: int, n_ubatch: int = DEFAULT_UBATCH,
                         flash_attention: bool = True) -> int:
    """llama.cpp's compute (graph) buffer for one micro-batch; see the module docstring."""
    d = hf_config if isinstance(hf_config, ModelDims) else model_dims(hf_config)
    b = min(int(n_ubatch), int(num_ctx))
    output_step = 4 * b * (d.hidden + d.vocab)
    if d.n_experts and d.moe_intermediate:
        ffn_act = 3 * d.moe_intermediate * max(1, d.n_experts_used)
    else:
        ffn_act = 3 * d.intermediate
    q_dim, kv_dim = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    layer = 4 * b * (2 * d.hidden + q_dim + 2 * kv_dim + ffn_act + d.n_experts)
    if flash_attention:
        layer += 2 * b * int(num_ctx)
    else:
        layer += 4 * b * int(num_ctx) * (d.n_heads + 1)
    return int(max(output_step, layer))


def _recommended(total_bytes: int) -> int:
    need = total_bytes * 1.25 / GIB
    return next((g for g in COMMON_RAM_GIB if g >= need), int(math.ceil(need)))


def _quant_of(path: Path) -> str:
    from loraforge.gguf import gguf_metadata

    try:
        return gguf_metadata(path, tensors=False)["file_type_name"] or "?"
    except Exception:
        return "?"


def memory_row(name: str, quant: str, file_bytes: int, dims: ModelDims, num_ctx: int, *,
               cache_type: str = "f16", n_ubatch: int = DEFAULT_UBATCH, flash_attention: bool = True,
               source: str = "measured") -> dict:
    kv = kv_cache_bytes(dims, num_ctx, cache_type)
    compute = compute_buffer_bytes(dims, num_ctx, n_ubatch, flash_attention)
    total = int(file_bytes) + kv + compute + RUNTIME_OVERHEAD_BYTES
    return {
        "model_file": name,
        "quant": quant,
        "num_ctx": int(num_ctx),
        "file_bytes": int(file_bytes),
        "kv_cache_bytes": kv,
        "compute_bytes": compute,
        "overhead_bytes": RUNTIME_OVERHEAD_BYTES,
        "total_bytes": total,
        "file_gib": round(file_bytes / GIB, 3),
        "kv_cache_gib": round(kv / GIB, 3),
        "total_gib": round(total / GIB, 3),
        "min_ram_gib": int(math.ceil(total / GIB)),
        "recommended_ram_gib": _recommended(total),
        "source": source,
    }


def memory_table(gguf_paths: Iterable[str | os.PathLike], hf_config, num_ctx: int, *,
                 estimate_quants: Iterable[str] = (), cache_type: str = "f16",
                 n_ubatch: int = DEFAULT_UBATCH, flash_attention: bool = True):
    """A pandas DataFrame, one row per GGUF: file size, KV cache at num_ctx, compute buffer,
    overhead and the total RAM needed (see the module docstring for the formulas).

    gguf_paths: existing GGUF files (size measured, quant read from general.file_type).
    hf_config: a config dict, config.json path, model folder or transformers config; None
    reads the dimensions from the first GGUF's metadata instead.
    estimate_quants: quant names to add rows for from loraforge.sizes' size estimate
    (before anything is built, e.g. for the 30B)."""
    import pandas as pd

    gguf_paths = [Path(p) for p in gguf_paths]
    if hf_config is None:
        if not gguf_paths:
            raise ValueError("memory_table needs a model config or at least one GGUF")
        cfg, dims = None, dims_from_gguf(gguf_paths[0])
    else:
        cfg = load_config(hf_config)
        dims = model_dims(cfg)
    rows = []
    for p in gguf_paths:
        rows.append(memory_row(p.name, _quant_of(p), p.stat().st_size, dims, num_ctx, cache_type=cache_type,
                               n_ubatch=n_ubatch, flash_attention=flash_attention))
    if estimate_quants:
        from loraforge import sizes

        if cfg is None:
            raise ValueError("estimated rows need the model config (hf_config)")

        for q in estimate_quants:
            rows.append(memory_row(f"({q} estimate)", q.upper(), sizes.gguf_bytes(cfg, q.upper()), dims, num_ctx,
                                   cache_type=cache_type, n_ubatch=n_ubatch, flash_attention=flash_attention,
                                   source="estimated"))
    return pd.DataFrame(rows, columns=COLUMNS)


def write_memory_tsv(df, path: str | os.PathLike) -> Path:
    """Write the table as TSV (temporary name, then renamed)."""
    with atomic_output(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
    return Path(path)


def write_memory_table(gguf_paths: Iterable[str | os.PathLike], hf_config, num_ctx: int,
                       path: str | os.PathLike):
    """`memory_table` written as TSV to path (the memory_table rule); logs the formatted
    table. Returns the DataFrame."""
    df = memory_table(gguf_paths, hf_config, num_ctx)
    write_memory_tsv(df, path)
    log.info("RAM per quant at num_ctx=%d:\n%s", num_ctx, format_table(df))
    return df


def format_table(df) -> str:
    """The article-style table: Model, GGUF size, KV cache, total, min/recommended RAM."""
    lines = [f"{'file':<28} {'quant':<8} {'ctx':>6} {'GGUF':>10} {'KV':>9} {'compute':>9} {'total':>10} "
             f"{'min RAM':>8} {'rec. RAM':>8}"]
    for r in df.to_dict("records"):
        lines.append(
            f"{r['model_file']:<28} {r['quant']:<8} {r['num_ctx']:>6} {r['file_bytes'] / GIB:>8.2f}G "
            f"{r['kv_cache_bytes'] / GIB:>7.2f}G {r['compute_bytes'] / GIB:>7.2f}G {r['total_bytes'] / GIB:>8.2f}G "
            f"{r['min_ram_gib']:>6}G {r['recommended_ram_gib']:>7}G")
    return "\n".join(lines)
