"""Snakemake rule script for train_adapter: LoRA/QLoRA SFT with TRL + PEFT or Unsloth
(loraforge.train.train), in this process or as train.gpus data-parallel processes started with
torchrun (loraforge.train_launch); the adapter folder is written atomically, with the settings it was
trained with recorded inside (loraforge.training_record, for the adapter guard).

    input:  base and base_complete (its weights are there; both ancient() while training is up to
            date by the adapter's record), train, validation (JSONL)
    params: base_dir, lora, train (the model's settings that decide the adapter; save_steps,
            eval_steps, keep_checkpoints, gradient_checkpointing and gpus are read from the
            config: changing them never retrains)
    output: adapter (folder), metrics (JSON), loss_csv, loss_png (all three in one folder)
    log:    one file
"""

import json
import os

from loraforge import training_record
from loraforge.config import model_settings
from loraforge.plan.intermediate import resolve_keep_checkpoints
from loraforge.rulelog import rule_logging
from loraforge.train_launch import run_training
from loraforge.workflow_hooks import settle_adapter_on_hold

with rule_logging(snakemake):
    out_dir = os.path.dirname(snakemake.output.metrics)  # the folder of metrics, loss.csv, loss.png
    # read from the config, not params: the record is for the adapter guard, not staleness
    record = training_record.current_settings(snakemake.config, snakemake.wildcards.model)
    # None unless the base came back with the weights the adapter (put on hold) was trained on
    if settle_adapter_on_hold(out_dir, record) is None:
        metrics = run_training(
            snakemake.params.base_dir,
            snakemake.input.train,
            snakemake.input.validation,
            adapter_dir=snakemake.output.adapter,
            out_dir=out_dir,
            lora=dict(snakemake.params.lora),
            train_params={**model_settings(snakemake.config, snakemake.wildcards.model)["train"],
                          **snakemake.params.train,
                          # auto: the joint disk decision (loraforge plan announces it)
                          "keep_checkpoints": resolve_keep_checkpoints(snakemake.config, snakemake.wildcards.model)},
            record=record,
            threads=snakemake.threads,  # shared out among the train.gpus processes
        )
        print(json.dumps({k: metrics[k] for k in ("steps", "first_loss", "final_loss", "eval_loss",
                                                   "seconds_per_step", "verdict")}))
