"""Snakemake rule script for quantize_base_gguf: the base's intermediate GGUF -> params.quant
(llama_model_quantize with allow_requantize, loraforge.gguf.quantize), the FROM of
Modelfile.adapter. The input is never released here (only quantize_gguf does that, in consume mode).

    input:  gguf (the base's intermediate)
    params: quant
    output: gguf
    log:    one file (llama.cpp's log)
"""

from loraforge.gguf import quantize
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    quantize(
        snakemake.input.gguf,  # noqa: F821
        snakemake.output.gguf,  # noqa: F821
        snakemake.params.quant,  # noqa: F821
        snakemake.threads,  # noqa: F821
        log=snakemake.log[0],  # noqa: F821
    )
