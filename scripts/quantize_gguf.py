"""Snakemake `script:` for quantize_gguf: intermediate GGUF -> params.quant (Q4_K_M, Q5_K_M,
...) through llama-cpp-python's llama_model_quantize with allow_requantize=True.

input.gguf, output.gguf, params.quant, threads, log[0] (llama.cpp's log). Logic: loraforge.gguf.

Low-disk mode (config export.merge_mode: consume): the last consumer of the temp intermediate
frees it while it reads it, when the consumers file written by the onstart hook allows it
(loraforge.gguf.release_decision). Read from the config, not a param: it does not change the
output, so it must not make existing GGUFs stale (Snakemake's params trigger).
"""

from loraforge.gguf import quantize
from loraforge.workflow_hooks import release_manifest_path

# `snakemake` is injected by Snakemake's script directive
release = False
if (snakemake.config.get("export") or {}).get("merge_mode") == "consume":  # noqa: F821
    release = release_manifest_path(snakemake.wildcards.model, snakemake.input.gguf)  # noqa: F821

quantize(
    snakemake.input.gguf,  # noqa: F821
    snakemake.output.gguf,  # noqa: F821
    snakemake.params.quant,  # noqa: F821
    snakemake.threads,  # noqa: F821
    log=snakemake.log[0],  # noqa: F821
    release_input=release,
)
