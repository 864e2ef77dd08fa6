"""Snakemake rule script for merge_adapter: stream the adapter into 16-bit shards
(loraforge.merge.merge), then write the merge report.

    input:  base, adapter (model and PEFT adapter folders), base_complete (optional: the base's
            complete flag)
    params: mode (link | consume | copy), remove_base_after (optional: after a consume-mode
            merge, drop input.base_complete: the base's weights are gone; its small files stay,
            so data preparation and training keep an existing ancient() input)
    output: merged (a directory() output), report (optional: the merge report as JSON)
    log:    one file (progress bars and messages)
"""

import os

from loraforge.fileio import write_json_atomic
from loraforge.merge import merge
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk):
    report = merge(smk.input.base, smk.input.adapter, smk.output.merged,
                   mode=smk.params.get("mode", "link"), progress=True)
    if smk.params.get("remove_base_after") and smk.input.get("base_complete"):
        os.remove(smk.input.base_complete)
    if smk.output.get("report"):
        write_json_atomic(smk.output.report, report.as_dict())
