"""Snakemake rule script for quantize_gguf: intermediate GGUF -> params.quant (Q4_K_M, Q5_K_M,
...) through llama-cpp-python's llama_model_quantize with allow_requantize=True
(loraforge.gguf.quantize).

    input:  gguf (the intermediate), adapter (only for staleness: snakemake#2011), imatrix (empty
            unless export.imatrix is enabled)
    params: quant
    output: gguf
    log:    one file (llama.cpp's log)

Low-disk mode (export.merge_mode consume, or auto choosing it for this run): the last consumer
of the temp intermediate frees it while it reads it, when the consumers file written by the
onstart hook allows it (loraforge.gguf.release_decision). Read from the config, not a param: it
does not change the output, so it must not make existing GGUFs stale (Snakemake's params trigger).
"""

from loraforge.gguf import quantize
from loraforge.merge_mode import base_is_users, effective_mode
from loraforge.rulelog import rule_logging
from loraforge.workflow_hooks import release_manifest_path

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk):
    setting = (smk.config.get("export") or {}).get("merge_mode", "auto")
    consume = effective_mode(setting, base_is_users(smk.config, smk.wildcards.model)) == "consume"
    imatrix = smk.input.imatrix or None  # export.imatrix: llama-quantize --imatrix (never releases its input)
    quantize(
        smk.input.gguf,
        smk.output.gguf,
        smk.params.quant,
        smk.threads,
        log=smk.log[0],
        release_input=release_manifest_path(smk.wildcards.model, smk.input.gguf) if consume and not imatrix else False,
        imatrix=imatrix,
    )
