"""Snakemake rule script for memory_table: per GGUF the file size, KV cache at num_ctx,
compute buffer, overhead and total RAM (loraforge.memory documents the formulas), as TSV.

    input:  ggufs (list), config_json (optional: the model's config.json; without it the
            dimensions come from the GGUF metadata)
    params: num_ctx
    output: tsv
    log:    one file (the table, formatted)
"""

from loraforge.memory import write_memory_table
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    write_memory_table(
        list(snakemake.input.ggufs),  # noqa: F821
        snakemake.input.get("config_json") or None,  # noqa: F821
        int(snakemake.params.num_ctx),  # noqa: F821
        snakemake.output.tsv,  # noqa: F821
    )
