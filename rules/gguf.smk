rule convert_gguf:
    """llama.cpp's own converter (same commit as the quantizer), straight to the intermediate:
    F16, or Q8_0 when the disk plan has no room for F16 (export.intermediate auto)."""
    input:
        merged="results/{model}/merged",
    output:
        gguf=(
            "results/{model}/{intermediate}.gguf"
            if KEEP_INTERMEDIATE
            else temp("results/{model}/{intermediate}.gguf")
        ),
    log:
        "logs/{model}/convert_gguf_{intermediate}.log",
    benchmark:
        "logs/{model}/benchmarks/convert_gguf_{intermediate}.tsv"
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("convert_gguf")
    resources:
        **job_resources("convert_gguf"),
    params:
        outtype=lambda w: w.intermediate,
        # consume mode (set, or chosen by auto): each merged shard is deleted once its tensors
        # are in the GGUF
        merge_mode=EXPORT["merge_mode"],
        base_is_users=lambda w: "path" in config["models"][w.model]["base"],
    script:
        "../scripts/convert_gguf.py"


rule quantize_gguf:
    """Quantize the intermediate: from F16, or requantize from Q8_0 (allow_requantize: the
    article's fifth attempt lacked it)."""
    input:
        gguf=get_intermediate_gguf,
        # not temp and a direct input: a retrained adapter makes the GGUFs stale even after
        # the temp intermediates are gone (snakemake#2011)
        adapter="results/{model}/adapter",
        imatrix=get_imatrix,
    output:
        gguf="results/{model}/{quant}.gguf",
    log:
        "logs/{model}/quantize_gguf_{quant}.log",
    benchmark:
        "logs/{model}/benchmarks/quantize_gguf_{quant}.tsv"
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("quantize_gguf")
    resources:
        **job_resources("quantize_gguf"),
    params:
        quant=lambda w: w.quant,
    script:
        "../scripts/quantize_gguf.py"


rule imatrix:
    """llama-imatrix over the training split on the intermediate (export.imatrix): which weight
    columns see the largest activations, for llama-quantize --imatrix. Small; kept."""
    input:
        gguf=get_intermediate_gguf,
        train="results/{model}/data/train.jsonl",
    output:
        imatrix="results/{model}/imatrix.gguf",
    log:
        "logs/{model}/imatrix.log",
    benchmark:
        "logs/{model}/benchmarks/imatrix.tsv"
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("imatrix")
    resources:
        **job_resources("imatrix"),
    params:
        ctx=IMATRIX["ctx"],
        chunks=IMATRIX["chunks"],
    script:
        "../scripts/compute_imatrix.py"


rule check_gguf:
    """Metadata (architecture, file type, chat template, EOS) and a real llama.cpp generation."""
    input:
        gguf="results/{model}/{quant}.gguf",
    output:
        report="results/{model}/checks/{quant}.json",
    log:
        "logs/{model}/check_gguf_{quant}.log",
    wildcard_constraints:
        quant=_alternatives(EXPORT["quants"]),
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("check_gguf")
    resources:
        **job_resources("check_gguf"),
    params:
        quant=lambda w: w.quant,
    script:
        "../scripts/check_gguf.py"


rule memory_table:
    """GGUF size + KV cache at num_ctx: the RAM each quant needs (the article's rule of thumb, exact)."""
    input:
        ggufs=get_export_ggufs,
    output:
        tsv=report(
            "results/{model}/memory.tsv",
            caption="../report/memory.rst",
            category="Export",
        ),
    log:
        "logs/{model}/memory_table.log",
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("memory_table")
    resources:
        **job_resources("memory_table"),
    params:
        num_ctx=lambda w: settings(w.model)["ollama"]["num_ctx"],
    script:
        "../scripts/memory_table.py"
