"""Snakemake `script:` for memory_table: per GGUF the file size, KV cache at num_ctx, compute
buffer, overhead and total RAM (loraforge.memory documents the formulas), as TSV.

input.ggufs (list); input.config_json (optional: the model's config.json; without it the
dimensions come from the GGUF metadata); output.tsv; params.num_ctx; log[0] (optional).
"""

from loraforge.memory import format_table, memory_table, write_memory_tsv
from loraforge.rulelog import rule_logging

sm = snakemake  # noqa: F821 (injected by Snakemake's script directive)
with rule_logging(sm):
    config_json = sm.input.get("config_json")
    df = memory_table(list(sm.input.ggufs), config_json or None, int(sm.params.num_ctx))
    write_memory_tsv(df, sm.output.tsv)
    print(format_table(df))
