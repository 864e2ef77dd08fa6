"""Snakemake rule script for build_tiny_base: a tiny Qwen3 / Qwen3-MoE base, built and briefly
pre-trained locally (loraforge.base.build_tiny_base).

    input:  corpus (text files)
    params: arch, vocab_size, pretrain_steps, seed
    output: base (folder), complete (the flag that its weights are there: each shard's size,
            mtime and sha256, loraforge.base_weights), report (JSON metrics)
    log:    one file
"""

from loraforge.base import build_tiny_base
from loraforge.base_weights import write_manifest
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    build_tiny_base(
        snakemake.output.base,  # noqa: F821
        snakemake.params.arch,  # noqa: F821
        list(snakemake.input.corpus),  # noqa: F821
        vocab_size=snakemake.params.vocab_size,  # noqa: F821
        pretrain_steps=snakemake.params.pretrain_steps,  # noqa: F821
        seed=snakemake.params.seed,  # noqa: F821
        report=snakemake.output.report,  # noqa: F821
    )
    write_manifest(snakemake.output.base, snakemake.output.complete)  # noqa: F821
