rule build_tiny_base:
    """A tiny Qwen3 / Qwen3-MoE base, built and briefly pre-trained locally (deterministic)."""
    input:
        corpus=config["tiny_base"]["corpus"],
    output:
        base=directory("results/{model}/base"),
        complete="results/{model}/base.complete",
        report="results/{model}/reports/base.json",
    log:
        "logs/{model}/build_tiny_base.log",
    wildcard_constraints:
        model=_alternatives(BUILT_MODELS),
    priority: model_priority
    conda:
        "../envs/train.yaml"
    threads: job_threads("build_tiny_base")
    resources:
        **job_resources("build_tiny_base"),
    params:
        arch=lambda w: config["models"][w.model]["base"]["build"],
        vocab_size=config["tiny_base"]["vocab_size"],
        pretrain_steps=config["tiny_base"]["pretrain_steps"],
        seed=config["tiny_base"]["seed"],
    script:
        "../scripts/build_tiny_base.py"


rule fetch_base:
    """A hub model's safetensors, config and tokenizer, via huggingface_hub (HF_TOKEN for gated repos)."""
    output:
        base=directory("results/{model}/base"),
        complete="results/{model}/base.complete",
    log:
        "logs/{model}/fetch_base.log",
    wildcard_constraints:
        model=_alternatives(HUB_MODELS),
    priority: model_priority
    retries: 2
    conda:
        "../envs/train.yaml"
    threads: job_threads("fetch_base")
    resources:
        **job_resources("fetch_base"),
    params:
        repo_id=lambda w: config["models"][w.model]["base"]["hub"],
        revision=lambda w: config["models"][w.model]["base"].get("revision"),
    script:
        "../scripts/fetch_base.py"
