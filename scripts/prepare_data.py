"""Snakemake rule script: cap sources, split train/validation and summarise the chat dataset.

An adapter only: reads the rule's input/params/output/log and calls `loraforge.data.prepare`.
Tokens in the summary are counted with the base model's tokenizer (input.tokenizer_dir),
loaded by `loraforge.tokenizer.load_tokenizer`, the loader training uses.

    input:  samples (JSONL), tokenizer_dir (a Hugging Face model folder)
    params: max_source_share, contrastive_weight, validation_fraction, seed, validation_pairs
    output: train, validation (JSONL), summary (TSV)
    log:    one file
"""

import logging

from loraforge.data import prepare
from loraforge.rulelog import rule_logging
from loraforge.tokenizer import token_counter

log = logging.getLogger("prepare_data")

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    smk = snakemake  # noqa: F821
    summary = prepare(
        smk.input.samples,
        smk.output.train,
        smk.output.validation,
        smk.output.summary,
        max_source_share=float(smk.params.max_source_share),
        contrastive_weight=int(smk.params.contrastive_weight),
        validation_fraction=float(smk.params.validation_fraction),
        seed=int(smk.params.seed),
        validation_pairs=int(smk.params.validation_pairs),
        count_tokens=token_counter(smk.input.tokenizer_dir),
    )
    log.info("summary:\n%s", summary.to_string(index=False))
