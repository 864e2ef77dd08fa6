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

The package, one concern a module: `units` (parse_size, human), `arch` (the architecture
from a config), `checkpoint` (the Hugging Face side: tensors, shards, adapter, tokenizer),
`gguf_sizes` (the GGUF side: tensor types, file size), `on_disk` (measuring what exists).
"""

from __future__ import annotations

from loraforge.sizes.arch import SUPPORTED_ARCHS, Arch, arch_from_config
from loraforge.sizes.checkpoint import (
    DEFAULT_SHARD_BYTES,
    DEFAULT_TARGET_MODULES,
    Shard,
    adapter_targets,
    index_json_bytes,
    is_targeted,
    lora_adapter_bytes,
    model_folder_bytes,
    parameter_count,
    read_base_shards,
    safetensors_bytes,
    shard_layout,
    tensor_shapes,
    tokenizer_files_bytes,
    training_checkpoint_bytes,
)
from loraforge.sizes.gguf_sizes import (
    GGUF_ALIGNMENT,
    GGUFTensor,
    bits_per_weight,
    ftype_name,
    ggml_nbytes,
    gguf_bytes,
    gguf_metadata_bytes,
    gguf_name,
    gguf_tensor_types,
    gguf_tensors,
    tokenizer_metadata_bytes,
)
from loraforge.sizes.on_disk import actual_or_estimate, file_bytes, measure, path_bytes
from loraforge.sizes.units import human, parse_size

__all__ = [
    "DEFAULT_SHARD_BYTES", "DEFAULT_TARGET_MODULES", "GGUF_ALIGNMENT", "SUPPORTED_ARCHS", "Arch", "GGUFTensor",
    "Shard", "actual_or_estimate", "adapter_targets", "arch_from_config", "bits_per_weight", "file_bytes",
    "ftype_name", "ggml_nbytes", "gguf_bytes", "gguf_metadata_bytes", "gguf_name", "gguf_tensor_types",
    "gguf_tensors", "human", "index_json_bytes", "is_targeted", "lora_adapter_bytes", "measure",
    "model_folder_bytes", "parameter_count", "parse_size", "path_bytes", "read_base_shards",
    "safetensors_bytes", "shard_layout", "tensor_shapes", "tokenizer_files_bytes", "tokenizer_metadata_bytes", "training_checkpoint_bytes",
]
