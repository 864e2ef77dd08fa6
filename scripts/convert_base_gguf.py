"""Snakemake rule script for convert_base_gguf: the un-fine-tuned base's HF folder -> its
intermediate GGUF (llama.cpp's converter, as convert_gguf does for the merged model), for the
adapter-only path (FROM base + ADAPTER). The base is never consumed here.

    input:  base (the base's HF folder), base_complete (its weights are all there)
    params: outtype (the export intermediate: Q8_0, F16 or BF16)
    output: gguf
    log:    one file (the converter's output)
"""

from loraforge.gguf import convert_to_gguf
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    convert_to_gguf(
        snakemake.input.base,  # noqa: F821
        snakemake.output.gguf,  # noqa: F821
        str(snakemake.params.outtype).lower(),  # noqa: F821
        threads=snakemake.threads,  # noqa: F821
        log=snakemake.log[0],  # noqa: F821
    )
