"""Snakemake rule script for fetch_base: a hub model's safetensors, config and tokenizer as
plain files (loraforge.hub.download.fetch_base; HF_TOKEN from the environment for gated repos).

    params: repo_id, revision
    output: base (folder), complete (touch flag, by Snakemake)
    log:    one file
"""

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
