"""LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer + PEFT.

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

log = logging.getLogger(__name__)

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


def _load_chat_dataset(path: str | os.PathLike):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")
    # SFTTrainer formats the conversational `messages` column with the chat template
    return ds.select_columns(["messages"])


def load_model(base_dir: str | os.PathLike, load_in_4bit: bool):
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = torch.cuda.is_available()
    kwargs = {}
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
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, **kwargs)
    if "quantization_config" in kwargs:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
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
) -> dict:
    """Train a LoRA adapter; writes adapter_dir and out_dir/{loss.csv,loss.png,metrics.json}."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTConfig

    from loraforge.base import load_tokenizer

    if train_params.get("backend", "trl") != "trl":
        raise ValueError(f"train.backend: {train_params['backend']!r} is not available; use 'trl'")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not Path(base_dir).is_dir():
        raise FileNotFoundError(
            f"base model folder {base_dir} is missing (a consume-mode merge uses it up): "
            f"build or fetch it first, e.g. snakemake --cores 1 {base_dir}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    on_gpu = torch.cuda.is_available()

    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, train_params["load_in_4bit"])
    # the LoRA A matrices are drawn here, before the trainer seeds anything: without this every
    # run starts from another init and no two adapters (local, or on a cluster) are equal
    set_seed(train_params["seed"])
    model = get_peft_model(model, lora_config(lora))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)

    train_ds = _load_chat_dataset(train_jsonl)
    eval_ds = _load_chat_dataset(validation_jsonl) if validation_jsonl and Path(validation_jsonl).stat().st_size else None

    args = SFTConfig(
        output_dir=str(partial.with_name(partial.name + "-checkpoints")),
        num_train_epochs=train_params["epochs"],
        max_steps=train_params["max_steps"],
        per_device_train_batch_size=train_params["per_device_batch_size"],
        per_device_eval_batch_size=train_params["per_device_batch_size"],
        gradient_accumulation_steps=train_params["gradient_accumulation_steps"],
        learning_rate=train_params["learning_rate"],
        lr_scheduler_type=train_params["lr_scheduler"],
        warmup_steps=train_params["warmup_ratio"],  # TRL 1.x: a float < 1 is a ratio
        packing=train_params["packing"],
        max_length=train_params["max_seq_length"],
        seed=train_params["seed"],
        data_seed=train_params["seed"],
        bf16=on_gpu,  # SFTConfig defaults to bf16=True, which fails on CPU
        logging_steps=1,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer)

    started = time.time()
    result = trainer.train()
    seconds = time.time() - started
    steps = trainer.state.global_step
    eval_loss = trainer.evaluate()["eval_loss"] if eval_ds is not None else None

    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)  # so the adapter folder is self-contained for PEFT/Unsloth
    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    _write_loss_csv(history, out_dir / "loss.csv")
    _plot_loss(history, out_dir / "loss.png", eval_loss)

    losses = [h["loss"] for h in history]
    status, message = verdict(losses[-1] if losses else None, steps)
    if status != "ok":
        log.warning("loss verdict: %s", message)
    metrics = {
        "steps": steps,
        "epochs": result.metrics.get("epoch"),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss_mean": result.training_loss,
        "eval_loss": eval_loss,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": "cuda" if on_gpu else "cpu",
        "verdict": status,
        "verdict_message": message,
        "lora": lora,
        "train": train_params,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(args.output_dir, ignore_errors=True)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(partial, adapter_dir)
    return metrics


def _write_loss_csv(history: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "learning_rate", "grad_norm"])
        for h in history:
            w.writerow([h["step"], h["loss"], h.get("learning_rate", ""), h.get("grad_norm", "")])


def _plot_loss(history: list[dict], path: Path, eval_loss: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".", label="train loss")
    if eval_loss is not None and history:
        ax.axhline(eval_loss, color="tab:orange", linestyle=":", label=f"validation loss {eval_loss:.3f}")
    ax.axhspan(OVERFIT_BELOW, NOT_LEARNING_ABOVE, color="tab:green", alpha=0.08, label="healthy range (article)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
