rule merge_adapter:
    """Stream the adapter into 16-bit shards: untouched shards are hard-linked (link), moved
    (consume) or copied (copy); targeted shards are rewritten with W + scale * B @ A."""
    input:
        base=get_base,
        base_complete=get_base_complete,
        adapter="results/{model}/adapter",
    output:
        merged=temp(directory("results/{model}/merged")),
        report="results/{model}/reports/merge.json",
    log:
        "logs/{model}/merge_adapter.log",
    benchmark:
        "logs/{model}/benchmarks/merge_adapter.tsv"
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("merge_adapter")
    resources:
        **job_resources("merge_adapter"),
    params:
        mode=EXPORT["merge_mode"],
        base_is_users=lambda w: "path" in config["models"][w.model]["base"],
    script:
        "../scripts/merge.py"
