"""Snakemake rule script for convert_gguf: HF folder -> intermediate GGUF (Q8_0, F16 or BF16)
with llama.cpp's own converter, written directly, no F16 GGUF first (loraforge.gguf).

    input:  merged (the merged HF folder)
    params: outtype (Q8_0 | F16 | BF16), merge_mode and base_is_users (in consume mode, set or
            chosen by auto for this run, each merged shard is deleted once its tensors are in
            the GGUF: loraforge.merge_mode)
    output: gguf
    log:    one file (the converter's output, progress included)
"""

from loraforge.gguf import convert_to_gguf
from loraforge.merge_mode import effective_mode
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    convert_to_gguf(
        snakemake.input.merged,  # noqa: F821
        snakemake.output.gguf,  # noqa: F821
        str(snakemake.params.outtype).lower(),  # noqa: F821
        release_shards=effective_mode(snakemake.params.merge_mode, snakemake.params.base_is_users)  # noqa: F821
        == "consume",
        threads=snakemake.threads,  # noqa: F821
        log=snakemake.log[0],  # noqa: F821
    )
