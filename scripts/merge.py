"""Snakemake `script:` for the merge rule: stream the adapter into 16-bit shards.

input.base, input.adapter: model and PEFT adapter folders; output.merged: the merged folder
(a directory() output); output.report: the merge report as JSON;
params.mode: link | consume | copy; params.base_is_users: the base is the user's own `path:`
folder (never consumed); params.remove_base_after: after a consume-mode merge, drop
input.base_complete (the base's weights are gone; its small files stay, so data preparation and
training keep an existing ancient() input); log[0]: progress bars and messages.
All logic is in loraforge.merge.
"""

import json
import os

from loraforge.merge import merge
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 (injected by Snakemake's script directive)

with rule_logging(smk):
    report = merge(
        smk.input.base,
        smk.input.adapter,
        smk.output.merged,
        mode=smk.params.mode,
        progress=True,
        base_is_users=smk.params.base_is_users,
    )
    if smk.params.remove_base_after and smk.input.get("base_complete"):
        os.remove(smk.input.base_complete)
    with open(smk.output.report, "w") as f:
        json.dump(report.as_dict(), f, indent=2)
        f.write("\n")
