"""Snakemake rule script for reference_logits: the 16-bit reference's perplexity on the
validation text and its saved log-probabilities (llama-perplexity --kl-divergence-base;
loraforge.quality.reference_logits).

    input:  reference (16-bit GGUF), validation (JSONL)
    params: ctx, chunks (llama-perplexity's context/batch and its bound), reference_name
    output: logits (temp), text (the validation text), summary (JSON: PPL, chunks, sizes)
    log:    one file (llama-perplexity's output)
"""

from loraforge.quality import reference_logits
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk):
    summary = reference_logits(
        smk.input.reference,
        smk.input.validation,
        logits_out=smk.output.logits,
        text_out=smk.output.text,
        summary_out=smk.output.summary,
        ctx=int(smk.params.ctx),
        chunks=int(smk.params.chunks),
        threads=smk.threads,
        log=smk.log[0],
    )
    print(f"{smk.params.reference_name} reference: PPL {summary['ppl']:.4f} over {summary['chunks']} chunks "
          f"of {summary['ctx']} tokens; logits file {summary['logits_bytes']} bytes")
