rule write_modelfile:
    """Ollama Modelfile: FROM the configured quant, SYSTEM, ChatML TEMPLATE, parameters and the
    stop tokens Qwen needs; validated with Ollama's parser rules before it is moved into place.
    """
    input:
        gguf=get_modelfile_gguf,
        # the adapter folder carries the tokenizer and chat template (the base may be consumed)
        base_dir="results/{model}/adapter",
    output:
        modelfile="results/{model}/Modelfile",
    log:
        "logs/{model}/write_modelfile.log",
    priority: model_priority
    conda:
        "../envs/ollama.yaml"
    threads: job_threads("write_modelfile")
    resources:
        **job_resources("write_modelfile"),
    params:
        name=lambda w: settings(w.model)["ollama"]["name"],
        system=lambda w: settings(w.model)["ollama"]["system"],
        temperature=lambda w: settings(w.model)["ollama"]["temperature"],
        top_p=lambda w: settings(w.model)["ollama"]["top_p"],
        num_ctx=lambda w: settings(w.model)["ollama"]["num_ctx"],
        # the fill-in-the-middle TEMPLATE for the model Continue completes code with (ollama.fim)
        fim=lambda w: lfconfig.uses_fim(config, w.model),
    script:
        "../scripts/write_modelfile.py"


rule ollama_create:
    """Optional: register the model with a local Ollama (`ollama` must be on PATH). Not part
    of `all`; ask for it: snakemake --cores 1 results/tiny/ollama-created.txt"""
    input:
        modelfile="results/{model}/Modelfile",
        gguf=get_modelfile_gguf,
    output:
        stamp="results/{model}/ollama-created.txt",
    log:
        "logs/{model}/ollama_create.log",
    conda:
        "../envs/ollama.yaml"
    threads: job_threads("ollama_create")
    resources:
        **job_resources("ollama_create"),
    params:
        name=lambda w: settings(w.model)["ollama"]["name"],
    shell:
        "command -v ollama >/dev/null || {{ echo 'ollama is not on PATH' >&2; exit 1; }}; "
        "ollama create {params.name} -f {input.modelfile} > {log} 2>&1 && "
        "ollama show {params.name} --modelfile > {output.stamp}"
