"""Snakemake `script:` for the merge rule: stream the adapter into 16-bit shards.

input.base, input.adapter: model and PEFT adapter folders; output.merged: the merged folder
(a directory() output); output.report: the merge report as JSON;
params.mode: auto | link | consume | copy (auto: this run's decision, loraforge.merge_mode);
params.base_is_users: the base is the user's own `path:` folder (never consumed). After a
consume-mode merge input.base_complete is dropped (the base's weights are gone; its small files
stay, so data preparation and training keep an existing ancient() input); log[0]: progress.
All logic is in loraforge.merge.
"""

import json
import os

from loraforge.merge import merge
from loraforge.merge_mode import effective_mode
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 (injected by Snakemake's script directive)

with rule_logging(smk):
    mode = effective_mode(smk.params.mode, smk.params.base_is_users)
    report = merge(
        smk.input.base,
        smk.input.adapter,
        smk.output.merged,
        mode=mode,
        progress=True,
        base_is_users=smk.params.base_is_users,
    )
    if mode == "consume" and smk.input.get("base_complete"):
        os.remove(smk.input.base_complete)
    with open(smk.output.report, "w") as f:
        json.dump(report.as_dict(), f, indent=2)
        f.write("\n")
