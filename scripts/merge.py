"""Snakemake `script:` for the merge rule: stream the adapter into 16-bit shards.

input.base, input.adapter: model and PEFT adapter folders; output.merged: the merged folder
(a directory() output); output.report (optional): the merge report as JSON;
params.mode: link | consume | copy; params.remove_base_after (optional): after a consume-mode
merge, drop input.base_complete (the base's weights are gone; its small files stay, so data
preparation and training keep an existing ancient() input); log[0]: progress bars and messages.
All logic is in loraforge.merge.
"""

import contextlib
import json
import logging

import os

from loraforge.merge import merge

smk = snakemake  # noqa: F821 (injected by Snakemake's script directive)

with open(smk.log[0], "w") as log_file:
    logging.basicConfig(stream=log_file, level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        with contextlib.redirect_stderr(log_file):  # the per-shard progress bars
            report = merge(
                smk.input.base,
                smk.input.adapter,
                smk.output.merged,
                mode=smk.params.get("mode", "link"),
                progress=True,
            )
        if smk.params.get("remove_base_after") and smk.input.get("base_complete"):
            os.remove(smk.input.base_complete)
    except Exception:
        logging.exception("merge failed")
        raise
    report_path = smk.output.get("report")
    if report_path:
        with open(report_path, "w") as f:
            json.dump(report.as_dict(), f, indent=2)
            f.write("\n")
