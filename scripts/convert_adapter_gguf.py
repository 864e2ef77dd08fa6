"""Snakemake rule script for convert_adapter_gguf: the PEFT adapter -> a LoRA GGUF with
llama.cpp's convert_lora_to_gguf.py (loraforge.adapter_gguf.convert_adapter_to_gguf); expert
LoRA on a MoE, rsLoRA and per-module rank/alpha patterns are refused, naming the field.

    input:  adapter (the PEFT folder), base (the base's HF folder: only config.json is read)
    params: outtype (f16: the adapter's precision is no concern at this size)
    output: gguf
    log:    one file (the converter's output)
"""

from loraforge.adapter_gguf import convert_adapter_to_gguf
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    convert_adapter_to_gguf(
        snakemake.input.adapter,  # noqa: F821
        snakemake.input.base,  # noqa: F821
        snakemake.output.gguf,  # noqa: F821
        snakemake.params.outtype,  # noqa: F821
        log=snakemake.log[0],  # noqa: F821
    )
