"""Snakemake rule script for merge_adapter: stream the adapter into 16-bit shards
(loraforge.merge.merge), then write the merge report.

    input:  base, adapter (model and PEFT adapter folders), base_complete (optional: the base's
            complete flag)
    params: mode (auto | link | consume | copy; auto: this run's decision, loraforge.merge_mode),
            base_is_users (the base is the user's own `path:` folder: never consumed)
    output: merged (a directory() output), report (the merge report as JSON)
    log:    one file (progress bars and messages)

An adapter trained on other base weights than the base's (shard digests: the adapter's training
record against the base's flag, loraforge.training_record.check_adapter_base) is refused before
anything is merged; the report records the base's shard digests.

After a consume-mode merge input.base_complete is dropped: the base's weights are gone; its
small files stay, so data preparation and training keep an existing ancient() input.
"""

import os

from loraforge.fileio import write_json_atomic
from loraforge.merge import merge
from loraforge.merge_mode import effective_mode
from loraforge.rulelog import rule_logging
from loraforge.training_record import check_adapter_base

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk):
    mode = effective_mode(smk.params.mode, smk.params.base_is_users)
    base_weights = check_adapter_base(smk.config, smk.wildcards.get("model"), smk.input.adapter, smk.input.base)
    report = merge(smk.input.base, smk.input.adapter, smk.output.merged, mode=mode, progress=True,
                   base_is_users=smk.params.base_is_users)
    if mode == "consume" and smk.input.get("base_complete"):
        os.remove(smk.input.base_complete)
    write_json_atomic(smk.output.report, {**report.as_dict(), "base_weights": base_weights})
