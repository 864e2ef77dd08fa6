# The run-level items of `snakemake --report results/report.html` (docs/quality.md "The report").


rule run_summary:
    """The cost table (training GPU-hours x cost.gpu_hour_usd, export time from the export
    rules' benchmark files) and the latest finished run's disk timeline. Not part of `all`: run
    it after a build, then `snakemake --report results/report.html`."""
    input:
        metrics=expand("results/{model}/train/metrics.json", model=config["targets"]),
        done=lambda w: [f for m in config["targets"] for f in quality_outputs(m)],
    output:
        cost=report(
            "results/cost.tsv",
            caption="../report/cost.rst",
            category="Cost",
        ),
        disk=report(
            "results/disk-timeline.png",
            caption="../report/disk.rst",
            category="Disk",
        ),
    log:
        "logs/run_summary.log",
    conda:
        "../envs/export.yaml"
    threads: 1
    params:
        models=config["targets"],
        gpu_hour_usd=config["cost"]["gpu_hour_usd"],
        gpus=[train_gpus(m) for m in config["targets"]],
        benchmark_dirs=[f"logs/{m}/benchmarks" for m in config["targets"]],
    script:
        "../scripts/run_summary.py"
