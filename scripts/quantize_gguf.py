"""Snakemake `script:` for quantize_gguf: intermediate GGUF -> params.quant (Q4_K_M, Q5_K_M,
...) through llama-cpp-python's llama_model_quantize with allow_requantize=True.

input.gguf, output.gguf, params.quant, threads, log[0] (llama.cpp's log). Logic: loraforge.gguf.
"""

from loraforge.gguf import quantize

# `snakemake` is injected by Snakemake's script directive
quantize(
    snakemake.input.gguf,  # noqa: F821
    snakemake.output.gguf,  # noqa: F821
    snakemake.params.quant,  # noqa: F821
    snakemake.threads,  # noqa: F821
    log=snakemake.log[0],  # noqa: F821
)
