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
