"""Snakemake rule script for fetch_base: a hub model's safetensors, config and tokenizer as
plain files (loraforge.hub.download.fetch_base; HF_TOKEN from the environment for gated repos).

    params: repo_id, revision
    output: base (folder), complete (the flag that its weights are there: each shard's size,
            mtime and sha256, loraforge.base_weights)
    log:    one file
"""

from loraforge.base_weights import write_manifest
from loraforge.hub.download import fetch_base
from loraforge.hub.errors import token_from_env
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    fetch_base(
        snakemake.params.repo_id,  # noqa: F821
        snakemake.output.base,  # noqa: F821
        revision=snakemake.params.revision,  # noqa: F821
        token=token_from_env(),
    )
    write_manifest(snakemake.output.base, snakemake.output.complete)  # noqa: F821
