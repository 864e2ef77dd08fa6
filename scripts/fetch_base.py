import os

from loraforge.base import fetch_hub_base
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):
    fetch_hub_base(
        snakemake.params.repo_id,
        snakemake.output.base,
        revision=snakemake.params.revision,
        token=os.environ.get("HF_TOKEN"),
    )
