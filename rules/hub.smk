from loraforge.hub.settings import hub_settings


rule upload_hub:
    """Optional: publish the adapter and the chosen GGUFs, with model cards, to the Hugging Face
    Hub (HF_TOKEN), verified by sha256. Not part of `all`; ask for it:
    snakemake --cores 1 results/tiny/hub-upload.json"""
    input:
        ggufs=lambda w: [
            f"results/{w.model}/{q}.gguf"
            for q in hub_settings(config, w.model)["quants"]
        ],
        adapter="results/{model}/adapter",
        memory="results/{model}/memory.tsv",
    output:
        record="results/{model}/hub-upload.json",
    log:
        "logs/{model}/upload_hub.log",
    conda:
        "../envs/hub.yaml"
    threads: job_threads("upload_hub")
    resources:
        **job_resources("upload_hub"),
    params:
        model=lambda w: w.model,
        hub=lambda w: hub_settings(config, w.model),
        base_model=lambda w: config["models"][w.model]["base"].get("hub"),
        lora=lambda w: settings(w.model)["lora"],
        modelfile_quant=EXPORT["modelfile_quant"],
        # read when present (another rule measures it); not an input, so its absence is fine
        quality=lambda w: f"results/{w.model}/quality.tsv",
    script:
        "../scripts/upload_hub.py"
