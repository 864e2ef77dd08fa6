rule convert_gguf:
    """llama.cpp's own converter (same commit as the quantizer), straight to Q8_0 (no F16 GGUF)."""
    input:
        merged="results/{model}/merged",
    output:
        gguf=(
            "results/{model}/{intermediate}.gguf"
            if INTERMEDIATE in EXPORT["quants"]
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
        outtype=INTERMEDIATE,
        # consume mode (set, or chosen by auto): each merged shard is deleted once its tensors
        # are in the GGUF
        merge_mode=EXPORT["merge_mode"],
        base_is_users=lambda w: "path" in config["models"][w.model]["base"],
    script:
        "../scripts/convert_gguf.py"


rule quantize_gguf:
    """Requantize the intermediate (allow_requantize: the article's fifth attempt lacked it)."""
    input:
        gguf=get_intermediate_gguf,
        # not temp and a direct input: a retrained adapter makes the GGUFs stale even after
        # the temp intermediates are gone (snakemake#2011)
        adapter="results/{model}/adapter",
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
