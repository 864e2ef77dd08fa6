"""Snakemake `script:` for convert_gguf: HF folder -> intermediate GGUF (Q8_0, F16 or BF16)
with llama.cpp's own converter, written directly (no F16 GGUF first).

input.merged: the merged HF folder; output.gguf; params.outtype: Q8_0 | F16 | BF16;
params.merge_mode, params.base_is_users: in consume mode (set, or chosen by auto for this
run: loraforge.merge_mode) each merged shard is deleted once its tensors are in the GGUF;
threads; log[0]: the converter's output, progress included. All logic is in loraforge.gguf.
"""

import sys

from loraforge.gguf import convert_to_gguf
from loraforge.merge_mode import effective_mode
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 (injected by Snakemake's script directive)
with rule_logging(smk):
    convert_to_gguf(
        smk.input.merged,
        smk.output.gguf,
        str(smk.params.outtype).lower(),
        release_shards=effective_mode(smk.params.merge_mode, smk.params.base_is_users) == "consume",
        threads=smk.threads,
        log=sys.stdout,  # the rule's log, under rule_logging
    )
