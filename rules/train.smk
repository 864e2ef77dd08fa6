rule train_adapter:
    """LoRA/QLoRA SFT (Unsloth or TRL + PEFT: train.backend); a rerun after a crash resumes
    from results/{model}/train/checkpoints. The adapter is the expensive artifact: an existing
    one is archived before any retraining, and retraining with unchanged settings needs an
    explicit `--config retrain=[MODEL]` (see README: Adapter safety). With train.gpus: N it runs
    N data-parallel processes (torchrun) and requests N GPUs on one node (README: Several GPUs).
    """
    input:
        unpack(get_training_base),
        train="results/{model}/data/train.jsonl",
        validation="results/{model}/data/validation.jsonl",
    output:
        adapter=directory("results/{model}/adapter"),
        metrics="results/{model}/train/metrics.json",
        loss_csv="results/{model}/train/loss.csv",
        loss_png=report(
            "results/{model}/train/loss.png",
            caption="../report/loss.rst",
            category="Training",
        ),
    log:
        "logs/{model}/train_adapter.log",
    priority: model_priority
    conda:
        "../envs/train.yaml"
    threads: job_threads("train_adapter")
    resources:
        **job_resources("train_adapter"),
    params:
        base_dir=lambda w: base_dir(w.model),
        lora=lambda w: settings(w.model)["lora"],
        train=lambda w: tracked_train_settings(w.model),
    script:
        "../scripts/train_adapter.py"
