import json

from loraforge.config import model_settings
from loraforge.rulelog import rule_logging
from loraforge.train import train

# save_steps / eval_steps are not in params (changing them must not retrain): from the config
train_params = {**model_settings(snakemake.config, snakemake.wildcards.model)["train"], **snakemake.params.train}

with rule_logging(snakemake):
    metrics = train(
        snakemake.params.base_dir,
        snakemake.input.train,
        snakemake.input.validation,
        adapter_dir=snakemake.output.adapter,
        out_dir=str(snakemake.output.metrics).rsplit("/", 1)[0],
        lora=dict(snakemake.params.lora),
        train_params=train_params,
    )
    print(json.dumps({k: metrics[k] for k in ("steps", "first_loss", "final_loss", "eval_loss", "seconds_per_step", "verdict")}))
