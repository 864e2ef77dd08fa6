rule fetch_dataset:
    """A hub dataset's split (data.samples entry with hub:), pinned to the commit its revision
    names and checked against the hub's listing, as JSON lines: fetched once, shared by models.
    """
    output:
        rows="results/datasets/{dataset}.jsonl",
        record="results/datasets/{dataset}.json",
    log:
        "logs/datasets/{dataset}.log",
    wildcard_constraints:
        dataset=_alternatives(HUB_DATASETS),
    retries: 2
    conda:
        "../envs/train.yaml"
    # no model: Snakemake's default resources (job_resources sizes a model's jobs)
    threads: 1
    params:
        repo_id=lambda w: HUB_DATASETS[w.dataset]["hub"],
        split=lambda w: HUB_DATASETS[w.dataset]["split"],
        revision=lambda w: HUB_DATASETS[w.dataset]["revision"],
    script:
        "../scripts/fetch_dataset.py"


rule prepare_data:
    """Read the model's data (data.samples, or models.MODEL.data: local files in any known
    format and hub datasets), drop duplicates, cap every source's share, split train/validation,
    weight, and tabulate samples and tokens per source (tokens of this model's tokenizer).
    """
    input:
        samples=get_data_files,
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
        sources=lambda w: lfdata.entries(config, w.model),
        max_source_share=lambda w: data_of(w.model)["max_source_share"],
        contrastive_weight=lambda w: data_of(w.model)["contrastive_weight"],
        validation_fraction=lambda w: data_of(w.model)["validation_fraction"],
        seed=lambda w: data_of(w.model)["seed"],
        validation_pairs=lambda w: data_of(w.model)["validation_pairs"],
        max_seq_length=lambda w: settings(w.model)["train"]["max_seq_length"],
    script:
        "../scripts/prepare_data.py"
