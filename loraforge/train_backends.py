"""Training backends: which one runs (`train.backend: auto | unsloth | trl`), loading a base
with Unsloth, and the package versions recorded in metrics.json.

Both backends train with the same SFTConfig and TRL's SFTTrainer; they differ in how the model
is loaded and wrapped. TRL+PEFT: transformers' from_pretrained (+ bitsandbytes NF4 for QLoRA),
PEFT's get_peft_model. Unsloth: FastLanguageModel.from_pretrained / get_peft_model, which patch
attention, the MoE experts (grouped-mm LoRA), the loss and gradient checkpointing ("unsloth":
activations offloaded to CPU). Unsloth must be imported before trl/transformers, since it patches
them globally; `import_unsloth_first()` is called before anything else of the training stack."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

BACKENDS = ("auto", "unsloth", "trl")
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets",
                      "bitsandbytes", "unsloth", "unsloth_zoo")


class BackendError(RuntimeError):
    pass


def cuda_available() -> bool:
    """Whether a CUDA device is visible, without importing torch's CUDA state early when not needed."""
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def resolve_backend(requested: str, cuda: bool | None = None, unsloth: bool | None = None) -> str:
    """The backend that will train: 'unsloth' or 'trl'. auto picks Unsloth when CUDA and the
    unsloth package are both there (Unsloth's kernels are CUDA-only), else TRL+PEFT; an explicit
    'unsloth' that cannot run is refused, naming what is missing."""
    if requested not in BACKENDS:
        raise BackendError(f"train.backend: {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "trl":
        return "trl"
    cuda = cuda_available() if cuda is None else cuda
    unsloth = unsloth_installed() if unsloth is None else unsloth
    if requested == "auto":
        return "unsloth" if cuda and unsloth else "trl"
    missing = [what for what, ok in (("a CUDA GPU", cuda), ("the unsloth package (see README: Training on a GPU)", unsloth)) if not ok]
    if missing:
        raise BackendError(
            f"train.backend: unsloth needs {' and '.join(missing)}; use backend: auto or trl on this machine"
        )
    return "unsloth"


def import_unsloth_first() -> None:
    """`import unsloth` before trl/transformers/peft are imported (it patches them globally)."""
    import sys

    late = [m for m in ("trl", "peft") if m in sys.modules]
    if late:
        log.warning("unsloth imported after %s: some of its patches may not apply", ", ".join(late))
    os.environ.setdefault("UNSLOTH_SKIP_TORCHVISION_CHECK", "1")  # torchvision is not needed for text
    import unsloth  # noqa: F401


def versions(backend: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in VERSIONED_PACKAGES:
        if package in ("unsloth", "unsloth_zoo") and backend != "unsloth":
            continue
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


# train.gradient_checkpointing -> Unsloth's use_gradient_checkpointing: "unsloth" offloads the
# checkpointed hidden states to CPU memory, True keeps them on the GPU, False recomputes nothing
UNSLOTH_CHECKPOINTING = {"offload": "unsloth", "on": True, "off": False}


def load_unsloth(base_dir, lora: dict, train_params: dict):
    """The base as Unsloth loads it (bf16, or NF4 when load_in_4bit), wrapped in LoRA with the
    config's r/alpha/dropout/targets/seed and Unsloth's gradient checkpointing. For a MoE, Unsloth
    adds the fused expert parameters (gate_up_proj, down_proj) as target_parameters itself when
    gate/up/down_proj are among the targets."""
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(base_dir),
        max_seq_length=train_params["max_seq_length"],
        dtype=torch.bfloat16,
        load_in_4bit=train_params["load_in_4bit"],
        full_finetuning=False,
        local_files_only=True,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
        use_gradient_checkpointing=UNSLOTH_CHECKPOINTING[train_params.get("gradient_checkpointing", "offload")],
        random_state=train_params["seed"],
        use_rslora=lora["use_rslora"],
        max_seq_length=train_params["max_seq_length"],
    )
    return model


# Tokens of the warm-up batch: two packed samples of half this each (so the varlen attention path
# compiles too); small enough that the compile-time trials below cost well under 1 GiB.
COMPILE_WARMUP_TOKENS = 256


def warm_up_compiled_layers(trainer, collator, tokens: int = COMPILE_WARMUP_TOKENS) -> float:
    """One forward and backward on a short packed batch before training starts, on Unsloth's path;
    returns its seconds.

    Why: Unsloth compiles each decoder layer on its first call. When that call comes inside a
    checkpointed forward (grad disabled), it first runs a grad-mode trial of the layer and throws
    the output away (unsloth/models/_block_compile.py, "Grad-mode trial first"). Over the first
    forward of step 1 those trials' activations are all alive at once (memory history of the
    30B-A3B's step 1: every layer's routed rows, grouped-GEMM outputs and attention outputs, one
    block per layer), so step 1 peaks near the no-checkpointing footprint: ~2x the steady peak,
    out of memory on an 80 GB GPU at 2 x 8192 tokens. The layers are compiled with a dynamic
    sequence length, so compiling them on a 256-token batch serves the real batches unchanged, and
    the trials then cost what 256 tokens cost. The gradients are discarded; the optimizer does not
    exist yet, and no RNG the training uses is consumed (Unsloth forks it for the trials)."""
    import time

    import torch

    started = time.time()
    rows = [trainer.train_dataset[i] for i in range(min(2, len(trainer.train_dataset)))]
    per_row = max(tokens // max(len(rows), 1), 8)
    length = len(rows[0]["input_ids"])
    examples = []
    for row in rows:
        # cut every per-token field; the packed rows' seq_lengths no longer apply to a cut row
        ex = {k: (v[:per_row] if isinstance(v, list) and len(v) == len(row["input_ids"]) else v)
              for k, v in row.items() if k != "seq_lengths"}
        examples.append(ex)
    model = trainer.model
    was_training = model.training
    model.train()
    batch = trainer._prepare_inputs(collator(examples))
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss, batch
    model.train(was_training)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    log.info("compiled the layers on a %d-token warm-up batch (rows of %d cut to %d tokens) in %.1f s",
             per_row * len(rows), length, per_row, time.time() - started)
    return time.time() - started
