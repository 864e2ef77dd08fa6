"""Snakemake rule script for evaluate: every quant against the reference logits
(llama-perplexity --kl-divergence, same context, batch and chunks) -> quality.tsv
(loraforge.quality.evaluate).

    input:  logits, summary (reference_logits' outputs), ggufs (one per params.quants),
            intermediate and imatrix (both empty unless export.imatrix is enabled)
    params: ctx, chunks, quants, reference_name
    output: tsv (loraforge.quality.QUALITY_COLUMNS)
    log:    one file
"""

from loraforge.quality import evaluate
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk):
    table = evaluate(
        smk.input.logits,
        smk.input.summary,
        dict(zip(smk.params.quants, smk.input.ggufs)),
        smk.output.tsv,
        ctx=int(smk.params.ctx),
        chunks=int(smk.params.chunks),
        threads=smk.threads,
        log=smk.log[0],
        reference_name=smk.params.reference_name,
        # export.imatrix: also each quant without the matrix, from the same intermediate
        intermediate=smk.input.intermediate or None,
    )
    print(table.to_string(index=False))
