"""Snakemake rule script for conventions_score: the share of held-out contrastive pairs where
the model prefers the right-way answer, for the base and each fine-tuned quant, through llama.cpp
on the GGUFs (loraforge.conventions), and the validation perplexity of each (llama-perplexity,
the same text, context and chunks as quality.tsv).

    input:  base_gguf, ggufs (params.quants), validation, text, reference (JSON), adapter
    params: ctx, chunks, quants
    output: tsv (loraforge.conventions.CONVENTIONS_COLUMNS)
    log:    one file
"""

from loraforge.conventions import conventions_table
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk):
    table = conventions_table(
        {"base": smk.input.base_gguf, **dict(zip(smk.params.quants, smk.input.ggufs))},
        validation_jsonl=smk.input.validation,
        text=smk.input.text,
        tokenizer_dir=smk.input.adapter,
        out_tsv=smk.output.tsv,
        ctx=int(smk.params.ctx),
        chunks=int(smk.params.chunks),
        threads=smk.threads,
        log=smk.log[0],
    )
    print(table.to_string(index=False))
