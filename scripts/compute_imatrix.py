"""Snakemake rule script for imatrix: llama-imatrix over the training split on the intermediate
GGUF (loraforge.gguf.compute_imatrix), for llama-quantize --imatrix (export.imatrix).

    input:  gguf (the intermediate), train (results/{model}/data/train.jsonl)
    params: ctx, chunks
    output: imatrix
    log:    one file
"""

import tempfile
from pathlib import Path

from loraforge.gguf import compute_imatrix
from loraforge.quality import validation_text
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk), tempfile.TemporaryDirectory() as tmp:
    text = Path(tmp) / "train.txt"
    validation_text(smk.input.train, text)  # its messages as plain text, as the evaluation reads validation
    compute_imatrix(smk.input.gguf, text, smk.output.imatrix, ctx=int(smk.params.ctx), chunks=int(smk.params.chunks),
                    threads=smk.threads, log=smk.log[0])
