import json
import os

from loraforge.rulelog import rule_logging
from loraforge.train import train

with rule_logging(snakemake):
    metrics = train(
        snakemake.params.base_dir,
        snakemake.input.train,
        snakemake.input.validation,
        adapter_dir=snakemake.output.adapter,
        out_dir=os.path.dirname(snakemake.output.metrics),  # the folder of metrics, loss.csv, loss.png
        lora=dict(snakemake.params.lora),
        train_params=dict(snakemake.params.train),
    )
    print(json.dumps({k: metrics[k] for k in ("steps", "first_loss", "final_loss", "eval_loss", "seconds_per_step", "verdict")}))
