"""Snakemake rule script for fetch_base: a hub model's safetensors, config and tokenizer as
plain files (loraforge.base.fetch_hub_base; HF_TOKEN from the environment for gated repos).

    params: repo_id, revision
    output: base (folder), complete (touch flag, by Snakemake)
    log:    one file
"""

import os

from loraforge.base import fetch_hub_base
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    fetch_hub_base(
        snakemake.params.repo_id,  # noqa: F821
        snakemake.output.base,  # noqa: F821
        revision=snakemake.params.revision,  # noqa: F821
        token=os.environ.get("HF_TOKEN"),
    )
