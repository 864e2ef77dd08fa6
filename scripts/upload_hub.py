"""Snakemake rule script for upload_hub: the adapter and the chosen GGUFs, with model cards,
to the Hugging Face Hub, verified by sha256 (loraforge.hub.upload; the token from HF_TOKEN).

    input:  ggufs (one per quant), adapter, memory
    params: model, hub (settings), base_model, lora, modelfile_quant, quality
    output: record (results/{model}/hub-upload.json)
    log:    one file
"""

from pathlib import Path

from loraforge.hub.errors import token_from_env
from loraforge.hub.upload import upload_model
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    sm = snakemake  # noqa: F821
    upload_model(
        model=sm.params.model,
        settings=sm.params.hub,
        ggufs=dict(zip(sm.params.hub["quants"], map(Path, sm.input.ggufs))),
        adapter_dir=Path(sm.input.adapter),
        memory_tsv=Path(sm.input.memory),
        quality_tsv=Path(sm.params.quality),
        base_model=sm.params.base_model,
        lora=sm.params.lora,
        modelfile_quant=sm.params.modelfile_quant,
        record_path=Path(sm.output.record),
        token=token_from_env(required=True),
    )
