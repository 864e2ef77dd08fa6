"""Snakemake `script:` for train_adapter: LoRA/QLoRA SFT of one model.

input.train, input.validation: chat JSONL; params.base_dir: the base model folder;
params.lora, params.train: the model's settings; output.adapter: the adapter folder (written
as .partial, renamed at the end, with the settings it was trained with recorded inside);
output.metrics: metrics.json, next to loss.csv and loss.png; log[0]: the training log.
"""

import json

from loraforge import training_record
from loraforge.rulelog import rule_logging
from loraforge.train import train

with rule_logging(snakemake):
    metrics = train(
        snakemake.params.base_dir,
        snakemake.input.train,
        snakemake.input.validation,
        adapter_dir=snakemake.output.adapter,
        out_dir=str(snakemake.output.metrics).rsplit("/", 1)[0],
        lora=dict(snakemake.params.lora),
        train_params=dict(snakemake.params.train),
        # read from the config, not params: the record is for the adapter guard, not staleness
        record=training_record.current_settings(snakemake.config, snakemake.wildcards.model),
    )
    print(json.dumps({k: metrics[k] for k in ("steps", "first_loss", "final_loss", "eval_loss", "seconds_per_step", "verdict")}))
