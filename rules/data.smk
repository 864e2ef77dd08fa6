rule prepare_data:
    """Cap every source's share, up-weight contrastive pairs, split train/validation, and
    tabulate samples and tokens per source (tokens of this model's tokenizer)."""
    input:
        samples=config["data"]["samples"],
        tokenizer_dir=get_tokenizer_base,
    output:
        train="results/{model}/data/train.jsonl",
        validation="results/{model}/data/validation.jsonl",
        summary=report(
            "results/{model}/data/summary.tsv",
            caption="../report/data.rst",
            category="Data",
        ),
    log:
        "logs/{model}/prepare_data.log",
    priority: model_priority
    conda:
        "../envs/train.yaml"
    threads: job_threads("prepare_data")
    resources:
        **job_resources("prepare_data"),
    params:
        base_dir=lambda w: base_dir(w.model),
        max_source_share=config["data"]["max_source_share"],
        contrastive_weight=config["data"]["contrastive_weight"],
        validation_fraction=config["data"]["validation_fraction"],
        seed=config["data"]["seed"],
        validation_pairs=config["data"]["validation_pairs"],
    script:
        "../scripts/prepare_data.py"
