"""Snakemake rule script for fetch_dataset: a hub dataset's split as JSON lines, pinned and
checked (loraforge.hub.datasets.fetch_dataset; HF_TOKEN from the environment for gated repos).

    params: repo_id, split, revision
    output: rows (JSON lines), record (JSON: repo, revision, commit, rows, files)
    log:    one file
"""

from loraforge.hub.datasets import fetch_dataset
from loraforge.hub.errors import token_from_env
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    fetch_dataset(
        snakemake.params.repo_id,  # noqa: F821
        snakemake.params.split,  # noqa: F821
        snakemake.output.rows,  # noqa: F821
        snakemake.output.record,  # noqa: F821
        revision=snakemake.params.revision,  # noqa: F821
        token=token_from_env(),
    )
