"""Snakemake rule script: read the model's sample files (any known format, hub datasets as
fetched by fetch_dataset), remove duplicates, cap sources, split train/validation, weight, and
summarise the chat dataset.

An adapter only: reads the rule's input/params/output/log and calls `loraforge.data.prepare`.
Tokens in the summary, and the lengths training cuts at max_seq_length, are counted with the
base model's tokenizer (input.tokenizer_dir), loaded by `loraforge.tokenizer.load_tokenizer`,
the loader training uses. Samples training will cut get one warning line on the console.

    input:  samples (files), tokenizer_dir (a Hugging Face model folder)
    params: sources (loraforge.data_sources.entries), max_source_share, contrastive_weight,
            validation_fraction, seed, validation_pairs, max_seq_length
    output: train, validation (JSONL), summary (TSV)
    log:    one file
"""

import logging
import sys

from loraforge.data import prepare, truncation_warning
from loraforge.rulelog import rule_logging
from loraforge.tokenizer import chat_length_counter, load_tokenizer, token_counter

log = logging.getLogger("prepare_data")

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    smk = snakemake  # noqa: F821
    tokenizer = load_tokenizer(smk.input.tokenizer_dir)
    summary = prepare(
        smk.params.sources,
        smk.output.train,
        smk.output.validation,
        smk.output.summary,
        max_source_share=float(smk.params.max_source_share),
        contrastive_weight=int(smk.params.contrastive_weight),
        validation_fraction=float(smk.params.validation_fraction),
        seed=int(smk.params.seed),
        validation_pairs=int(smk.params.validation_pairs),
        count_tokens=token_counter(tokenizer),
        max_seq_length=int(smk.params.max_seq_length),
        count_length=chat_length_counter(tokenizer),
    )
    log.info("summary:\n%s", summary.to_string(index=False))
    warning = truncation_warning(summary)
    if warning:  # the log is read after the fact; this is worth seeing while it runs
        print(f"[lora-forge] warning in rule {smk.rule} ({smk.wildcards.model}): {warning}", file=sys.__stderr__,
              flush=True)
