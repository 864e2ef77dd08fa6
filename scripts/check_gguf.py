"""Snakemake rule script for check_gguf: metadata checks plus a real llama.cpp generation from
a ChatML prompt (loraforge.gguf.check_gguf); the report is written only when the check passes,
any problem fails the job.

    input:  gguf
    params: quant (the expected general.file_type)
    output: report (JSON)
    log:    one file
"""

from loraforge.gguf import check_gguf
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    check_gguf(
        snakemake.input.gguf,  # noqa: F821
        expect_ftype=snakemake.params.quant,  # noqa: F821
        threads=snakemake.threads,  # noqa: F821
        report_path=snakemake.output.report,  # noqa: F821
    )
