rule continue_config:
    """Continue's config.yaml: the chat model (chat, edit, apply) and the tab-completion model
    (autocomplete), served by Ollama under their ollama.name. Not part of `all`; ask for it:
    snakemake --cores 1 results/continue/config.yaml"""

    # No file inputs, on purpose: the config names Ollama models and their settings, nothing
    # in a GGUF. Taking the GGUFs as inputs would build (or, for the article's 30b/3b, train on
    # a GPU) both models just to write a YAML file. Every setting it is made of is a param, so
    # a change of any of them rewrites it (Snakemake's params trigger).
    output:
        config="results/continue/config.yaml",
    log:
        "logs/continue/continue_config.log",
    conda:
        "../envs/ollama.yaml"
    # a small file and no model: Snakemake's default resources (job_resources sizes a model's jobs)
    threads: 1
    params:
        # at job time: a config without a continue block only fails when this file is asked for
        spec=lambda w: lfcontinue.continue_spec(config),
        modelfiles=lambda w: lfcontinue.modelfiles_of(config),
    script:
        "../scripts/continue_config.py"


rule convert_base_gguf:
    """The un-fine-tuned base as the intermediate GGUF (adapter-only path: FROM base + ADAPTER)."""
    input:
        base=get_base,
        base_complete=get_base_complete,
    output:
        # kept when it is also the Modelfile.adapter's quant, as convert_gguf keeps a final intermediate
        gguf=(
            "results/{model}/base.{intermediate}.gguf"
            if EXPORT["modelfile_quant"] in INTERMEDIATE_TYPES
            else temp("results/{model}/base.{intermediate}.gguf")
        ),
    log:
        "logs/{model}/convert_base_gguf_{intermediate}.log",
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("convert_base_gguf")
    resources:
        **job_resources("convert_base_gguf"),
    params:
        outtype=lambda w: w.intermediate,
    script:
        "../scripts/convert_base_gguf.py"


rule quantize_base_gguf:
    """The base's GGUF at the Modelfile's quant: shared by every fine-tune of this base."""
    input:
        gguf=lambda w: f"results/{w.model}/base.{intermediate_of(w.model)}.gguf",
    output:
        gguf="results/{model}/base.{quant}.gguf",
    log:
        "logs/{model}/quantize_base_gguf_{quant}.log",
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("quantize_base_gguf")
    resources:
        **job_resources("quantize_base_gguf"),
    params:
        quant=lambda w: w.quant,
    script:
        "../scripts/quantize_base_gguf.py"


rule convert_adapter_gguf:
    """The LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py). Refused, before any job
    runs, for expert LoRA on a MoE (no LoRA GGUF form) and rsLoRA: those use the merged GGUFs.
    """
    input:
        adapter=lambda w: adapter_gguf_source(w.model),
        # only config.json is read: a base whose weights a consume-mode merge used up will do
        base=lambda w: ancient_while_built(
            base_dir(w.model), f"results/{w.model}/adapter.gguf"
        ),
    output:
        gguf="results/{model}/adapter.gguf",
    log:
        "logs/{model}/convert_adapter_gguf.log",
    priority: model_priority
    conda:
        "../envs/export.yaml"
    threads: job_threads("convert_adapter_gguf")
    resources:
        **job_resources("convert_adapter_gguf"),
    params:
        outtype="f16",
    script:
        "../scripts/convert_adapter_gguf.py"


rule write_adapter_modelfile:
    """Modelfile.adapter: FROM the base's GGUF plus ADAPTER adapter.gguf (same TEMPLATE, SYSTEM,
    parameters and stop tokens as the Modelfile): several fine-tunes share one base."""
    input:
        gguf=lambda w: f"results/{w.model}/base.{EXPORT['modelfile_quant']}.gguf",
        adapter_gguf="results/{model}/adapter.gguf",
        base_dir="results/{model}/adapter",
    output:
        modelfile="results/{model}/Modelfile.adapter",
    log:
        "logs/{model}/write_adapter_modelfile.log",
    priority: model_priority
    conda:
        "../envs/ollama.yaml"
    threads: job_threads("write_adapter_modelfile")
    resources:
        **job_resources("write_adapter_modelfile"),
    params:
        name=lambda w: settings(w.model)["ollama"]["name"] + "-lora",
        system=lambda w: settings(w.model)["ollama"]["system"],
        temperature=lambda w: settings(w.model)["ollama"]["temperature"],
        top_p=lambda w: settings(w.model)["ollama"]["top_p"],
        num_ctx=lambda w: settings(w.model)["ollama"]["num_ctx"],
        fim=lambda w: lfconfig.uses_fim(config, w.model),
    script:
        "../scripts/write_modelfile.py"


rule ollama_run:
    """Optional: ask the model registered by ollama_create one question (`ollama` on PATH and
    its server running). Not part of `all`: snakemake --cores 1 results/tiny/ollama-answer.txt
    """
    input:
        stamp="results/{model}/ollama-created.txt",
    output:
        answer="results/{model}/ollama-answer.txt",
    log:
        "logs/{model}/ollama_run.log",
    conda:
        "../envs/ollama.yaml"
    params:
        name=lambda w: settings(w.model)["ollama"]["name"],
        prompt="Write a Rails concern that adds soft delete to a model.",
    shell:
        "command -v ollama >/dev/null || {{ echo 'ollama is not on PATH' >&2; exit 1; }}; "
        "ollama run {params.name} {params.prompt:q} > {output.answer}.partial 2> {log} && "
        "mv {output.answer}.partial {output.answer}"
