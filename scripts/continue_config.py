"""Snakemake rule script for continue_config: Continue's config.yaml (chat + autocomplete models
served by Ollama), from settings only (loraforge.continue_config.write_continue_config).

    params: spec (the config's content, loraforge.continue_config.continue_spec),
            modelfiles (Ollama name -> the Modelfile to `ollama create` it from, for the header)
    output: config
    log:    one file
"""

from loraforge.continue_config import write_continue_config
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    write_continue_config(
        snakemake.output.config,  # noqa: F821
        snakemake.params.spec,  # noqa: F821
        modelfiles=snakemake.params.modelfiles,  # noqa: F821
    )
