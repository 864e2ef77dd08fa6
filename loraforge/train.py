"""LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer, on PEFT or Unsloth (train_backends).

Writes the adapter folder atomically (a `.partial` folder renamed at the very end, so a
crash never leaves something that looks like a finished adapter), the per-step loss CSV,
a loss-curve PNG, and a metrics JSON with the article's verdict on the final loss."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from loraforge.errors import UserError
from loraforge.packing import TRAINING_ATTENTION

log = logging.getLogger(__name__)


class TrainConfigError(UserError, ValueError):
    """A train setting the model cannot be trained with; names the field."""

# The article's reading of a final training loss.
OVERFIT_BELOW = 0.3
NOT_LEARNING_ABOVE = 1.0
MANY_STEPS = 100  # "above 1.0 after many steps"


def verdict(final_loss: float | None, steps: int) -> tuple[str, str]:
    """(status, message): 'ok', 'overfitting', 'not-learning' or 'too-short'. A warning, never a failure."""
    if final_loss is None or math.isnan(final_loss):
        return "unknown", "no loss was logged"
    if final_loss < OVERFIT_BELOW:
        return "overfitting", f"final loss {final_loss:.3f} < {OVERFIT_BELOW}: the model may have memorised the training data"
    if final_loss > NOT_LEARNING_ABOVE:
        if steps >= MANY_STEPS:
            return "not-learning", f"final loss {final_loss:.3f} > {NOT_LEARNING_ABOVE} after {steps} steps: check data quality"
        return "too-short", f"final loss {final_loss:.3f} > {NOT_LEARNING_ABOVE} after only {steps} steps (a smoke run)"
    return "ok", f"final loss {final_loss:.3f} is in the healthy range [{OVERFIT_BELOW}, {NOT_LEARNING_ABOVE}]"


def _trainer_class():
    """SFTTrainer, with the model's own causal-LM loss where TRL's fused LM head cannot run.

    TRL 1.15 computes the SFT loss with a Triton kernel (its fused LM head), and Triton
    kernels only run on CUDA/XPU: on CPU every step fails with "'NoneType' object has no
    attribute 'apply'". There the standard Trainer loss (full logits, same cross-entropy)
    is used instead; on GPU nothing changes."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    if torch.cuda.is_available():
        return SFTTrainer

    class PortableSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        def _load_optimizer_and_scheduler(self, checkpoint):
            # Resuming N CPU processes (gloo): transformers 5.17 loads the optimizer state with
            # map_location=args.device when world_size > 1, which is "cpu:0" there, and torch.load
            # cannot restore that location. Load it on the CPU, as it does for one process.
            if checkpoint is None or self.args.world_size == 1:
                return super()._load_optimizer_and_scheduler(checkpoint)
            self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu",
                                                      weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    return PortableSFTTrainer


def lora_config(lora: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        use_rslora=lora["use_rslora"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def training_chat_template(template: str | None) -> str | None:
    """The chat template to train on with assistant-only loss: ours with {% generation %} markers
    for the ChatML template of the tiny bases; any other as it is (TRL swaps in its own training
    version of the templates it knows, e.g. Qwen2.5 and Qwen3)."""
    from loraforge.constants import CHATML_JINJA_TEMPLATE, CHATML_TRAINING_TEMPLATE

    return CHATML_TRAINING_TEMPLATE if template == CHATML_JINJA_TEMPLATE else template


def _load_chat_dataset(path: str | os.PathLike):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")
    # SFTTrainer formats the conversational `messages` column with the chat template
    return ds.select_columns(["messages"])


def load_model(base_dir: str | os.PathLike, load_in_4bit: bool, gradient_checkpointing: bool = True):
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.distributed import local_rank, world_size

    on_gpu = torch.cuda.is_available()
    kwargs = {}
    if on_gpu and world_size() > 1:
        # one process per GPU: each loads its replica onto its own card (bitsandbytes-quantized
        # weights cannot be moved after loading, so this is decided at load time)
        kwargs["device_map"] = {"": local_rank()}
    if load_in_4bit and on_gpu:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif load_in_4bit:
        log.warning("load_in_4bit ignored: no CUDA device (bitsandbytes 4-bit needs a GPU); training in fp32 LoRA")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    # packed samples must not see each other: an attention measured to honour packed position_ids
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, attn_implementation=TRAINING_ATTENTION,
                                                 **kwargs)
    if "quantization_config" in kwargs:
        from peft import prepare_model_for_kbit_training

        # it turns gradient checkpointing on unless told not to (train.gradient_checkpointing: off)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        # bitsandbytes quantizes nn.Linear only: fused MoE experts (3-D parameters) stay 16-bit,
        # and prepare_model_for_kbit_training upcasts them to fp32 (2x memory, +70% s/step on
        # the H200, off the bf16 grouped-mm path). Keep them bf16.
        experts = [p for p in model.parameters() if p.ndim >= 3 and p.dtype == torch.float32]
        for p in experts:
            p.data = p.data.to(torch.bfloat16)
        if experts:
            log.warning(
                "QLoRA on a MoE: bitsandbytes 4-bit covers the Linear layers (attention) only; "
                "the %d fused expert tensors stay bf16", len(experts)
            )
    return model


def train(
    base_dir: str | os.PathLike,
    train_jsonl: str | os.PathLike,
    validation_jsonl: str | os.PathLike | None,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    lora: dict,
    train_params: dict,
    record: dict | None = None,
) -> dict:
    """Train a LoRA adapter; writes adapter_dir and out_dir/{loss.csv,loss.png,metrics.json}.
    `record` (loraforge.training_record) is saved in the adapter folder for the adapter guard.

    Checkpoints (out_dir/checkpoints) are resumed by a rerun and removed once the adapter is in place.

    Run as one of N data-parallel processes (loraforge.train_launch starts them with torchrun), each
    process accumulates gradient_accumulation_steps / N micro-batches, so the effective batch stays
    per_device_batch_size x gradient_accumulation_steps; only rank 0 writes the adapter and the reports."""
    from loraforge import distributed
    from loraforge.train_backends import (
        import_unsloth_first, load_unsloth, resolve_backend, versions, warm_up_compiled_layers,
    )

    backend = resolve_backend(train_params.get("backend", "auto"))
    if backend == "unsloth":
        import_unsloth_first()  # before trl/transformers/peft: it patches them

    import torch
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTConfig

    from loraforge import training_record
    from loraforge.gpu_memory import RunPeak, step_marker
    from loraforge.base_weights import require_weights
    from loraforge.lora_targets import check_target_modules
    from loraforge.tokenizer import load_tokenizer
    from loraforge.train_monitor import (
        CHECKPOINTS_DIRNAME, KEEP_CHECKPOINTS, StepClock, TokenCounter, complete_checkpoints, eval_trend,
        fingerprint, prepare_checkpoints, progress_callback,
    )

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    require_weights(base_dir)
    check_target_modules(lora["target_modules"], base_dir)  # a typo fails now, not after loading
    world, is_main = distributed.world_size(), distributed.is_main_process()
    accumulation = distributed.per_process_accumulation(train_params, world)
    partial = adapter_dir.with_name(adapter_dir.name + ".partial")
    on_gpu = torch.cuda.is_available()
    if on_gpu and world > 1:
        torch.cuda.set_device(distributed.local_rank())  # this process's GPU, before anything lands on cuda:0
    checkpoints = out_dir / CHECKPOINTS_DIRNAME
    requested_checkpointing = train_params.get("gradient_checkpointing", "offload")
    train_params, auto_message = _resolve_auto(base_dir, lora, train_params, backend, on_gpu)
    if auto_message:
        log.info("%s", auto_message)
        accumulation = distributed.per_process_accumulation(train_params, world)
    if world == 1:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        identity = training_record.identity_for_training(base_dir, record)
        resume_from = prepare_checkpoints(checkpoints, fingerprint(identity, train_jsonl, lora, train_params, backend))
    else:
        # the launcher prepared the folders and the checkpoints before starting the processes:
        # here they are only read, so no rank deletes what another is about to resume from
        complete = complete_checkpoints(checkpoints, world)
        resume_from = complete[-1] if complete else None
    log.info("training backend: %s (train.backend: %s)%s", backend, train_params.get("backend", "auto"),
             f", {world} data-parallel processes x {accumulation} accumulation steps" if world > 1 else "")

    tokenizer = load_tokenizer(base_dir)
    if not tokenizer.chat_template:  # TRL would fail deep inside with a TypeError
        raise TrainConfigError(
            f"{base_dir}: the base's tokenizer has no chat template (chat_template in tokenizer_config.json or "
            "chat_template.jinja), and chat data cannot be rendered without one: copy the base model's tokenizer "
            "files (tokenizer_config.json, tokenizer.json, chat_template.jinja) into the folder, or use a chat/instruct base"
        )
    # LoRA's A matrices are initialised randomly: seed first, so a run is reproducible (the
    # Trainer seeds only after the model exists)
    set_seed(train_params["seed"])
    checkpointing_off = train_params.get("gradient_checkpointing", "offload") == "off"
    # the run's true peak, model loading and the compiling first step included
    run_peak = RunPeak().start() if on_gpu else None
    if backend == "unsloth":
        model = load_unsloth(base_dir, lora, train_params)
    else:
        model = load_model(base_dir, train_params["load_in_4bit"], gradient_checkpointing=not checkpointing_off)
        model = get_peft_model(model, lora_config(lora))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)

    saved_template = tokenizer.chat_template
    if train_params.get("assistant_only_loss", True):
        tokenizer.chat_template = training_chat_template(tokenizer.chat_template)
    train_ds = _load_chat_dataset(train_jsonl)
    eval_ds = _load_chat_dataset(validation_jsonl) if validation_jsonl and Path(validation_jsonl).stat().st_size else None
    save_steps, eval_steps = train_params.get("save_steps", 0), train_params.get("eval_steps", 0)

    args = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=train_params["epochs"],
        max_steps=train_params["max_steps"],
        per_device_train_batch_size=train_params["per_device_batch_size"],
        per_device_eval_batch_size=train_params["per_device_batch_size"],
        gradient_accumulation_steps=accumulation,
        learning_rate=train_params["learning_rate"],
        lr_scheduler_type=train_params["lr_scheduler"],
        warmup_steps=train_params["warmup_ratio"],  # TRL 1.x: a float < 1 is a ratio
        packing=train_params["packing"],
        assistant_only_loss=bool(train_params.get("assistant_only_loss", True)),
        max_length=train_params["max_seq_length"],
        seed=train_params["seed"],
        data_seed=train_params["seed"],
        bf16=on_gpu,  # SFTConfig defaults to bf16=True, which fails on CPU
        logging_steps=1,
        logging_first_step=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        # "auto" is resolved by the rule script (the joint disk decision); called directly, the default
        save_total_limit=_int_or(train_params.get("keep_checkpoints"), KEEP_CHECKPOINTS),
        eval_strategy="steps" if eval_steps and eval_ds is not None else "no",
        eval_steps=eval_steps or None,
        report_to="none",
        disable_tqdm=True,  # progress goes to the rule log as step/total, s/step, ETA lines
        dataloader_num_workers=0,
        # SFTConfig checkpoints by default; only "off" changes that (Unsloth honours an explicit False)
        **({"gradient_checkpointing": False} if checkpointing_off else {}),
        **distributed.trainer_arguments(backend, world, on_gpu),
    )
    try:
        trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                   processing_class=tokenizer)
    except ValueError as e:
        if args.assistant_only_loss and "generation" in str(e):
            raise TrainConfigError(
                f"train.assistant_only_loss: {base_dir}'s chat template has no {{% generation %}} markers and TRL "
                f"has no training version of it ({e}); set train.assistant_only_loss: false to train on every token"
            ) from None
        raise
    trainer.add_callback(progress_callback(out_dir=out_dir if is_main else None, tokens=lambda: counter.tokens * world,
                                           console=is_main))  # a line on the terminal too, not only in the log
    clock = StepClock()
    trainer.add_callback(clock.callback)
    if run_peak is not None:
        trainer.add_callback(step_marker(run_peak))
    counter = TokenCounter(trainer.data_collator, trainer.model)
    trainer.data_collator = counter
    warmup_seconds = None
    if backend == "unsloth" and on_gpu and train_params.get("compile_warmup", True):
        # compile on a short batch, so step 1 does not peak at ~2x the steady memory (see there)
        warmup_seconds = warm_up_compiled_layers(trainer, counter.collator)

    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.time() - started
    steps = trainer.state.global_step
    evaluated_last = any(h.get("step") == steps and "eval_loss" in h for h in trainer.state.log_history)
    if eval_ds is not None and not evaluated_last:
        trainer.evaluate()  # appends the final eval_loss to log_history
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    eval_loss = evals[-1] if evals else None
    gpu_peaks = run_peak.stop().as_metrics() if run_peak is not None else {}
    peak_gpu = gpu_peaks.get("peak_gpu_memory_gib")
    # every process counted its own share; these collectives also wait for every rank to finish
    train_tokens = distributed.sum_over_processes(counter.tokens)
    loss_tokens = distributed.sum_over_processes(counter.loss_tokens)
    peaks_gpu = distributed.gather(peak_gpu)
    if not is_main:
        return {"rank": distributed.rank(), "steps": steps}

    model.save_pretrained(partial)
    tokenizer.chat_template = saved_template  # the base's own template, never the training one
    tokenizer.save_pretrained(partial)  # so the adapter folder is self-contained for PEFT/Unsloth
    if record is not None:
        training_record.write(partial, record)
    history = trainer.state.log_history  # restored from the checkpoint on resume: the curve continues
    _write_loss_csv(history, out_dir / "loss.csv")
    _plot_loss(history, out_dir / "loss.png", eval_loss)

    losses = [h["loss"] for h in history if "loss" in h and "step" in h]
    status, message = verdict(losses[-1] if losses else None, steps)
    trend = eval_trend(history)
    if trend is not None:
        status, message = trend[0], f"{trend[1]}; {message}"
    if status != "ok":
        log.warning("loss verdict: %s", message)
    metrics = {
        "steps": steps,
        "epochs": result.metrics.get("epoch"),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        # over the whole curve: after a resume, result.training_loss covers only this process's steps
        "train_loss_mean": sum(losses) / len(losses) if losses else None,
        "eval_loss": eval_loss,
        "eval_losses": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "resumed_from_step": int(resume_from.name.split("-")[1]) if resume_from else None,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "compile_warmup_seconds": round(warmup_seconds, 1) if warmup_seconds is not None else None,
        # after the first steps of this process (compilation, autotuning): what compares runs
        "seconds_per_step_steady": round(clock.steady_seconds_per_step(), 3) if clock.steady_seconds_per_step() else None,
        "train_tokens": train_tokens,
        # the tokens the loss is taken on (assistant_only_loss: the answers only)
        "train_loss_tokens": loss_tokens,
        "tokens_per_second": round(train_tokens / seconds, 1) if seconds > 0 else None,
        "peak_gpu_memory_gib": round(max(peaks_gpu), 3) if peak_gpu is not None else None,
        "peak_gpu_memory_gib_per_gpu": [round(p, 3) for p in peaks_gpu] if peak_gpu is not None else None,
        # this process's GPU: reserved and driver-level (NVML) peaks, the first step's and the rest's
        **{k: v for k, v in gpu_peaks.items() if k != "peak_gpu_memory_gib"},
        "processes": world,
        "gradient_accumulation_steps_per_process": accumulation,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": "cuda" if on_gpu else "cpu",
        "backend": backend,
        # train.gradient_checkpointing, and whether transformers' checkpointing was on while training
        "gradient_checkpointing": train_params.get("gradient_checkpointing", "offload"),
        "gradient_checkpointing_requested": requested_checkpointing,
        "auto_choice": auto_message,
        "checkpointing_active": counter.checkpointing,
        "versions": versions(backend),
        "verdict": status,
        "verdict_message": message,
        "lora": lora,
        "train": train_params,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(partial, adapter_dir)
    shutil.rmtree(checkpoints, ignore_errors=True)  # only once the adapter is in place
    return metrics


def _int_or(value, default: int) -> int:
    return int(value) if isinstance(value, int) or str(value).isdigit() else default


def _resolve_auto(base_dir, lora: dict, train_params: dict, backend: str, on_gpu: bool) -> tuple[dict, str | None]:
    """train.gradient_checkpointing: auto resolved for this process's GPU (see vram.choose_auto)."""
    if train_params.get("gradient_checkpointing") != "auto":
        return train_params, None
    import torch

    from loraforge.fileio import read_hf_config
    from loraforge.vram import resolve_training

    limit = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory) if on_gpu else None
    return resolve_training(read_hf_config(base_dir), lora, train_params, backend, limit,
                            "this GPU" if on_gpu else "no GPU: CPU training")


def _write_loss_csv(history: list[dict], path: Path) -> None:
    from loraforge.train_monitor import loss_rows

    columns = ["step", "loss", "learning_rate", "grad_norm", "eval_loss"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in loss_rows(history):
            w.writerow([row.get(c, "") for c in columns])


def _plot_loss(history: list[dict], path: Path, eval_loss: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    eval_points = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in train_points], [v for _, v in train_points], marker=".", label="train loss")
    if len(eval_points) > 1:
        ax.plot([s for s, _ in eval_points], [v for _, v in eval_points], marker="o", color="tab:orange",
                label="validation loss")
    elif eval_loss is not None and train_points:
        ax.axhline(eval_loss, color="tab:orange", linestyle=":", label=f"validation loss {eval_loss:.3f}")
    ax.axhspan(OVERFIT_BELOW, NOT_LEARNING_ABOVE, color="tab:green", alpha=0.08, label="healthy range (article)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
