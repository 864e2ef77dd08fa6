# The evaluation: what the user gets, measured (docs/quality.md). Every file here is
# either small or temp(): the 16-bit reference GGUF and its logits exist only while used.


rule reference_gguf:
    """The 16-bit reference for KL divergence: the merged model converted to F16 (temp). Not
    needed when the intermediate is already 16-bit (that GGUF is the reference)."""
    input:
        merged="results/{model}/merged",
    output:
        gguf=temp("results/{model}/eval/reference-F16.gguf"),
    log:
        "logs/{model}/reference_gguf.log",
    # before convert_gguf: in consume mode that conversion releases the merged shards
    priority: early_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("reference_gguf")
    resources:
        **job_resources("reference_gguf"),
    params:
        outtype="F16",
    script:
        "../scripts/reference_gguf.py"


rule base_gguf:
    """The base model as a GGUF (Q8_0, temp), for the conventions score before fine-tuning."""
    input:
        base=get_base,
        complete=get_base_complete,
    output:
        gguf=temp("results/{model}/eval/base-Q8_0.gguf"),
    log:
        "logs/{model}/base_gguf.log",
    # before the merge: a consume-mode merge uses the base up
    priority: early_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("base_gguf")
    resources:
        **job_resources("base_gguf"),
    params:
        outtype="Q8_0",
    script:
        "../scripts/reference_gguf.py"


rule reference_logits:
    """llama-perplexity --kl-divergence-base on the 16-bit reference over the validation text:
    its perplexity and its log-probabilities (temp, bounded by quality.chunks)."""
    input:
        reference=get_reference_gguf,
        validation="results/{model}/data/validation.jsonl",
    output:
        logits=temp("results/{model}/eval/reference.logits"),
        text="results/{model}/eval/validation.txt",
        summary="results/{model}/eval/reference.json",
    log:
        "logs/{model}/reference_logits.log",
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("reference_logits")
    resources:
        **job_resources("reference_logits"),
    params:
        ctx=config["quality"]["ctx"],
        chunks=config["quality"]["chunks"],
        reference_name=lambda w: reference_name(w.model),
    script:
        "../scripts/reference_logits.py"


rule evaluate:
    """quality.tsv: size, bits per weight, perplexity and its change, KL divergence (mean,
    median, p99) and same-top-token % of every built quant against the 16-bit reference.
    """
    input:
        logits="results/{model}/eval/reference.logits",
        summary="results/{model}/eval/reference.json",
        ggufs=get_evaluated_ggufs,
        intermediate=get_evaluation_intermediate,
        imatrix=get_imatrix,
    output:
        tsv=report(
            "results/{model}/quality.tsv",
            caption="../report/quality.rst",
            category="Quality",
        ),
    log:
        "logs/{model}/evaluate.log",
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("evaluate")
    resources:
        **job_resources("evaluate"),
    params:
        ctx=config["quality"]["ctx"],
        chunks=config["quality"]["chunks"],
        quants=lambda w: evaluated_quants(),
        reference_name=lambda w: reference_name(w.model),
    script:
        "../scripts/evaluate_quality.py"


rule conventions_score:
    """conventions.tsv: share of held-out contrastive pairs where the model prefers the
    right-way answer (base vs each quant, by llama.cpp on the GGUFs), and validation perplexity.
    """
    input:
        base_gguf="results/{model}/eval/base-Q8_0.gguf",
        ggufs=get_export_ggufs,
        validation="results/{model}/data/validation.jsonl",
        text="results/{model}/eval/validation.txt",
        reference="results/{model}/eval/reference.json",
        # the chat template and tokenizer (the base's, unchanged; the base may be consumed)
        adapter="results/{model}/adapter",
    output:
        tsv=report(
            "results/{model}/conventions.tsv",
            caption="../report/conventions.rst",
            category="Quality",
        ),
    log:
        "logs/{model}/conventions_score.log",
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("conventions_score")
    resources:
        **job_resources("conventions_score"),
    params:
        ctx=config["quality"]["ctx"],
        chunks=config["quality"]["chunks"],
        quants=EXPORT["quants"],
    script:
        "../scripts/conventions_score.py"
