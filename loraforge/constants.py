"""Facts shared by several modules, each stated once (as gguf-py keeps its tables in one
constants module). GGML block sizes and the HF -> GGUF tensor names are not copied here: they
come from the pinned `gguf` package (gguf-py, the library llama.cpp's converter uses), see
`ggml_block` and `gguf_tensor_name_map`."""

from __future__ import annotations

import functools

# --------------------------------------------------------------------------------------
# Hugging Face model folders
# --------------------------------------------------------------------------------------

INDEX_NAME = "model.safetensors.index.json"
SINGLE_SHARD_NAME = "model.safetensors"

# how a merge places the base's untouched shards (see loraforge.merge)
MERGE_MODES = ("link", "consume", "copy")

# safetensors header dtype -> bytes per element
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# torch / config.json spellings of a dtype -> its safetensors dtype
TORCH_DTYPE_TO_SAFETENSORS = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64",
    "int8": "I8", "uint8": "U8", "float8_e4m3fn": "F8_E4M3",
}  # fmt: skip


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype in either spelling ('bfloat16', 'torch.float16', 'BF16')."""
    d = str(dtype).replace("torch.", "")
    code = TORCH_DTYPE_TO_SAFETENSORS.get(d.lower(), d.upper())
    if code not in SAFETENSORS_DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: "
                         f"{', '.join([*TORCH_DTYPE_TO_SAFETENSORS, *SAFETENSORS_DTYPE_BYTES])}")
    return SAFETENSORS_DTYPE_BYTES[code]


# --------------------------------------------------------------------------------------
# ChatML (Qwen's chat format)
# --------------------------------------------------------------------------------------

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Qwen's fill-in-the-middle tokens (Qwen2.5-Coder, Qwen3-Coder): a completion prompt is
# <|fim_prefix|>{code before}<|fim_suffix|>{code after}<|fim_middle|>; <|repo_name|> and
# <|file_sep|> carry repository context, <|fim_pad|> pads.
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
FIM_PAD, REPO_NAME, FILE_SEP = "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD, REPO_NAME, FILE_SEP)

# The HF chat template (Jinja) of the tiny bases: "<|im_start|>role\ncontent<|im_end|>\n" per
# turn and "<|im_start|>assistant\n" to prompt the reply.
CHATML_JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same text with TRL's {% generation %} markers around each assistant turn's content and its
# <|im_end|> (train.assistant_only_loss): used only while training, never saved with a model.
CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same text as an Ollama TEMPLATE (Go text/template), as Ollama's qwen templates: with
# .Messages (chat API; Ollama passes all system messages joined as .System and keeps them in
# .Messages, so system messages are skipped in the loop), else the legacy
# .System/.Prompt/.Response form (generate API and old clients). Rendered by Go against the
# Jinja one in tests/test_modelfile.py.
CHATML_GO_TEMPLATE = (
    "{{- if .Messages }}\n"
    "{{- if .System }}<|im_start|>system\n"
    "{{ .System }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    "{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}\n"
    "{{- if not (and $last (eq .Role \"assistant\")) }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- end }}\n"
    "{{- if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n"
    "{{ end }}\n"
    "{{- end }}\n"
    "{{- else }}\n"
    "{{- if .System }}<|im_start|>system\n"
    "{{ .System }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- if .Prompt }}<|im_start|>user\n"
    "{{ .Prompt }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
    "{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>\n"
    "{{ end }}"
)

# The Ollama TEMPLATE of a model used for tab completion: Continue's Ollama provider uses the
# model's native fill-in-the-middle (/api/generate with `suffix`) only when the TEMPLATE it reads
# from /api/show mentions .Suffix; that branch writes Qwen's FIM prompt, every other request is
# the ChatML chat above (as Ollama's own qwen2.5-coder template does). Rendered by Go in
# tests/test_continue.py.
FIM_GO_TEMPLATE = (
    "{{- if .Suffix }}" + FIM_PREFIX + "{{ .Prompt }}" + FIM_SUFFIX + "{{ .Suffix }}" + FIM_MIDDLE + "\n"
    "{{- else }}" + CHATML_GO_TEMPLATE + "\n{{- end }}"
)

# --------------------------------------------------------------------------------------
# llama.cpp file types
# --------------------------------------------------------------------------------------

# llama.cpp file types (what `llama-quantize` and `convert_hf_to_gguf --outtype` take) ->
# their default tensor type (llama_model_quantize_impl's switch)
FTYPE_DEFAULT: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K",
    "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    # i-quants and ternary types: sized with their default type; the per-tensor mixture of
    # these (which also needs an importance matrix) is not modelled -> approximate
    "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS",
    "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S",
    "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "MXFP4_MOE": "MXFP4",
}  # fmt: skip
# llama-quantize's short aliases
FTYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
# the types `convert_hf_to_gguf.py --outtype` writes directly (the intermediate)
CONVERTER_FTYPES = ("Q8_0", "F16", "BF16", "F32")

# File types that libllama (llama_model_quantize, what lora-forge calls) refuses without an
# importance matrix, at the pinned llama.cpp (llama-cpp-python 0.3.36, src/llama-quant.cpp
# tensor_requires_imatrix): every file type that gives some tensor other than token_embd /
# output the type IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S or IQ3_XXS, or Q2_K in a Q2_K_S file.
# IQ2_M (default IQ2_S) and IQ3_XS (attn_q/attn_k IQ3_XXS) are in; llama-quantize's older
# message "do not use IQ1_S, IQ1_M, IQ2_S, IQ2_XXS, IQ2_XS or Q2_K_S without an importance
# matrix" lists fewer. Checked against libllama by tests/test_gguf.py.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
                           "IQ3_XXS", "IQ3_XS", "Q2_K_S"})

# HF model_type -> gguf-py's architecture name (gguf.MODEL_ARCH_NAMES values)
GGUF_ARCH_NAMES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}


@functools.lru_cache(maxsize=None)
def ggml_block(ggml_type: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML tensor type, from gguf-py."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]


@functools.lru_cache(maxsize=16)
def gguf_tensor_name_map(model_type: str, n_layers: int):
    """gguf-py's HF -> GGUF tensor name map (`gguf.TensorNameMap`) of an architecture."""
    import gguf

    arch_name = GGUF_ARCH_NAMES.get(model_type)
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ValueError(f"no GGUF architecture for model_type {model_type!r}; known: {', '.join(GGUF_ARCH_NAMES)}")
    return gguf.get_tensor_name_map(arch, n_layers)
