rule build_tiny_base:
    """A tiny Qwen3 / Qwen3-MoE base, built and briefly pre-trained locally (deterministic)."""
    input:
        corpus=config["tiny_base"]["corpus"],
    output:
        base=directory("results/{model}/base"),
        report="results/{model}/reports/base.json",
    wildcard_constraints:
        model=_alternatives(BUILT_MODELS),
    params:
        arch=lambda w: config["models"][w.model]["base"]["build"],
        vocab_size=config["tiny_base"]["vocab_size"],
        pretrain_steps=config["tiny_base"]["pretrain_steps"],
        seed=config["tiny_base"]["seed"],
    log:
        "logs/{model}/build_tiny_base.log",
    priority: model_priority
    threads: 2
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/build_tiny_base.py"


rule fetch_base:
    """A hub model's safetensors, config and tokenizer, via huggingface_hub (HF_TOKEN for gated repos)."""
    output:
        base=directory("results/{model}/base"),
    wildcard_constraints:
        model=_alternatives(HUB_MODELS),
    params:
        repo_id=lambda w: config["models"][w.model]["base"]["hub"],
        revision=lambda w: config["models"][w.model]["base"].get("revision"),
    log:
        "logs/{model}/fetch_base.log",
    priority: model_priority
    retries: 2
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/fetch_base.py"
