"""Snakemake rule script for run_summary: the cost table of the target models and the latest
disk timeline, for the report (loraforge.run_summary).

    input:  metrics (train/metrics.json of each model in params.models), quality (quality.tsv:
            only so that the export and evaluation have finished)
    params: models, gpu_hour_usd, gpus (per model), benchmark_dirs (per model)
    output: cost (TSV), disk (PNG)
    log:    one file
"""

from loraforge.rulelog import rule_logging
from loraforge.run_summary import cost_row, latest_disk_timeline, write_cost_table

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk):
    rows = [
        cost_row(model, metrics, bench, float(smk.params.gpu_hour_usd), gpus)
        for model, metrics, bench, gpus in zip(smk.params.models, smk.input.metrics, smk.params.benchmark_dirs,
                                               smk.params.gpus)
    ]
    print(write_cost_table(rows, smk.output.cost).to_string(index=False))
    latest_disk_timeline("logs/disk", smk.output.disk)
