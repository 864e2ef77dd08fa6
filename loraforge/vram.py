"""Peak GPU memory of a training job, planned from the config before anything runs, and the
refusal of a run whose training would not fit the GPU (`gpu_memory`, or the visible GPU's).

peak = weights + LoRA training state + activations, with
  weights     every parameter at its training dtype: bf16, or NF4 (bitsandbytes, double-quantised
              absmax: 0.516 bytes/param) for the 2-D Linear weights when load_in_4bit. Embedding
              and LM head stay 16-bit. A MoE's fused 3-D expert tensors: bitsandbytes leaves them
              16-bit on the TRL path (transformers 5 keeps them as 3-D parameters), Unsloth
              (unsloth_zoo) quantizes them too. TRL's QLoRA preparation upcasts the rest (embedding,
              head, norms) to fp32.
  LoRA state  trainable parameters x 16 bytes (fp32 weight, gradient, two Adam moments; 12 fitted
              for Unsloth's MoE path, see UNSLOTH_MOE_LORA_STATE_BYTES). Counted
              as PEFT creates them: r x (in + out) per targeted Linear, E x r x (in + out) per fused
              expert parameter, with PEFT's doubled rank for gate_up_proj on the TRL path (its
              rank_pattern) and none on Unsloth's.
  activations per micro-batch token: a per-layer part (checkpointed hidden states; Unsloth
              offloads them to the CPU; every activation with gradient_checkpointing: off) and a
              per-vocabulary part (logits, their gradient), with coefficients fitted to the H200
              runs in bench/h200/ (see ACTIVATION_BYTES, NO_CHECKPOINT_BYTES).
  DDP buckets with train.gpus > 1: DistributedDataParallel keeps a flat fp32 copy of every trainable
              gradient for its all-reduce (trainable parameters x 4 bytes; not yet measured on GPUs).

The plan is per GPU: with `train.gpus: N` every GPU holds a full replica and its own micro-batch
(data parallelism), and each of the N GPUs must fit it.

Planned vs measured on the H200 (bench/h200/gpu_backends-h200.jsonl): -1% to +9.4% for all 17
full-depth runs (in-sample: the coefficients are fitted to them); see docs/gpu.md and bench/h100/gpu_backends-h100.md."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 * (1 + 4 / 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax
LORA_STATE_BYTES = 16  # fp32 weight + grad + Adam exp_avg + exp_avg_sq
# Unsloth on a MoE: fitted, not read from its code. Its 30B-A3B shape at two depths on the H100
# (12 and 48 layers, 2 x 8192, offloaded checkpoints, bench/h100) puts the steady allocator peak at
# weights + activations + 4.7 bytes per trainable parameter (its LoRA state) + a fixed 3 bf16
# copies of one layer's full expert stack (Unsloth dequantizes a layer's whole NF4 stack for each
# grouped GEMM, forward and recompute: UNSLOTH_MOE_DEQUANT_STACKS); both depths within 0.3%.
UNSLOTH_MOE_LORA_STATE_BYTES = 4.7
UNSLOTH_MOE_DEQUANT_STACKS = 3.0
DDP_BUCKET_BYTES = 4  # DistributedDataParallel's fp32 gradient buckets (a copy of the gradients)
# Activation bytes per micro-batch token: (x layers x hidden, x vocabulary), by (backend, MoE).
# Fitted to the H200 runs (bench/h200, so a fit, not a model). Unsloth's from its runs at seq 4096
# and 8192 (the slope between them: 3B and 8B give 1.0 per layer x hidden + 0.3 per vocabulary
# entry, the MoE 2.2 per layer x hidden); it offloads the checkpointed hidden states to the CPU and
# chunks the loss. TRL's from seq 8192: it keeps more per layer, and on a dense QLoRA model the fp32
# LM head's logits add about 1 byte per vocabulary entry and token.
ACTIVATION_BYTES = {
    ("unsloth", False): (1.0, 0.3),
    ("unsloth", True): (2.2, 0.3),
    ("trl", False): (5.5, 1.1),
    ("trl", True): (2.2, 0.0),
}
# gradient_checkpointing: on (Unsloth): each layer's checkpointed bf16 hidden state stays on the
# GPU instead of CPU memory: 2 more bytes per layer x hidden per token (TRL keeps them there anyway).
ON_GPU_CHECKPOINT_BYTES = 2.0
# gradient_checkpointing: off: every layer keeps all its activations for the backward pass. Bytes
# per layer and micro-batch token = a x hidden + b x MLP width (intermediate_size; a MoE's routed
# width, experts per token x moe_intermediate_size), by (backend, MoE); the per-vocabulary part is
# ACTIVATION_BYTES'. Fitted to the H200 runs (bench/h200, third session): Unsloth's dense pair from
# the 3B and 8B (two shapes, two unknowns: an exact fit), its MoE `a` from the 30B-A3B at 1 x 8192
# and 2 x 8192 tokens (both within 1%) with the dense `b`; TRL's dense from the 3B (as Unsloth's
# pair x 2.87: one shape, so the split between a and b is Unsloth's). TRL's bytes per token grow
# with the micro-batch (3B: x 2.56 at 2048 tokens, 2.70 at 4096, 2.87 at 8192, and 2 x 8192 ran
# out of 139.8 GiB, planned at 126 GiB): fitted to the 8192-token run, and check_training warns
# beyond it. TRL on a MoE without checkpointing was not measured: planned as Unsloth's MoE x 2.87.
NO_CHECKPOINT_BYTES = {
    ("unsloth", False): (23.9, 2.47),
    ("unsloth", True): (47.7, 2.47),
    ("trl", False): (68.6, 7.09),
    ("trl", True): (136.9, 7.09),
}
# The largest micro-batch (tokens) that TRL without checkpointing was measured at (see above).
MEASURED_TRL_NO_CHECKPOINT_MICRO_TOKENS = 8192
# Allocator slack and workspace (cuBLAS, Triton autotune), by backend. Unsloth's dense runs at two
# sequence lengths put the intercept (tokens -> 0) at weights + LoRA state (3B -0.15, 8B +0.05 GiB):
# no room for a separate term there.
FIXED_BYTES = {"trl": 0.75 * GIB, "unsloth": 0.0}
# What the driver holds beyond the allocator's peak (the figure the plan is judged against: NVML's
# used memory): the CUDA context and cuBLAS/NCCL handles (0.71 GiB before loading on the H100) and
# the caching allocator's reserve over what is allocated. Fitted to the H100 runs: driver - allocator
# peak was 1.0-1.6 GiB (3B 1.03, 8B 1.04, 30B-A3B 1.33-1.61).
DRIVER_OVERHEAD_BYTES = 1.0 * GIB
ALLOCATOR_RESERVE = 0.025
DENSE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class VramError(RuntimeError):
    pass


@dataclass
class VramPlan:
    weights: float
    lora_state: float
    activations: float
    fixed: float
    trainable_parameters: int
    backend: str
    moe: bool = False
    ddp_buckets: float = 0.0
    gpus: int = 1
    checkpointing: str = "offload"

    @property
    def allocated(self) -> float:
        """The allocator's peak (torch.cuda.max_memory_allocated over the whole run)."""
        return self.weights + self.lora_state + self.activations + self.fixed + self.ddp_buckets

    @property
    def driver(self) -> float:
        """CUDA context and the allocator's reserve: what the driver sees beyond `allocated`."""
        return DRIVER_OVERHEAD_BYTES + ALLOCATOR_RESERVE * self.allocated

    @property
    def total(self) -> float:
        """Bytes on each GPU as the driver sees them (NVML used memory): the figure to hold
        against the card."""
        return self.allocated + self.driver

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def as_dict(self) -> dict:
        d = {k: (round(v / GIB, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        return {**d, "allocated_gib": round(self.allocated / GIB, 2), "driver_gib": round(self.driver / GIB, 2),
                "total_gib": round(self.total_gib, 2)}

    def describe(self) -> str:
        ddp = f" + DDP buckets {self.ddp_buckets / GIB:.1f}" if self.gpus > 1 else ""
        where = f"; per GPU, on each of {self.gpus} GPUs" if self.gpus > 1 else ""
        return (f"{self.total_gib:.1f} GiB = weights {self.weights / GIB:.1f} + LoRA state {self.lora_state / GIB:.1f} "
                f"+ activations {self.activations / GIB:.1f} + fixed {self.fixed / GIB:.1f}{ddp} "
                f"+ CUDA context and allocator reserve {self.driver / GIB:.1f} "
                f"({self.backend}, {self.checkpointing_words}{where})")

    @property
    def checkpointing_words(self) -> str:
        if self.checkpointing == "off":
            return "no gradient checkpointing"
        # TRL keeps its checkpoints on the GPU with either value
        offloaded = self.checkpointing == "offload" and self.backend == "unsloth"
        return "checkpoints offloaded to CPU memory" if offloaded else "checkpoints on the GPU"


def _shape(cfg: dict) -> dict:
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    kv = int(cfg.get("num_key_value_heads") or heads)
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    return {
        "hidden": hidden, "layers": int(cfg["num_hidden_layers"]), "vocab": int(cfg["vocab_size"]),
        "q": heads * head_dim, "kv": kv * head_dim, "inter": int(cfg["intermediate_size"]),
        "experts": experts, "moe_inter": int(cfg.get("moe_intermediate_size") or 0),
        "experts_per_token": int(cfg.get("num_experts_per_tok") or 0),
        "tied": bool(cfg.get("tie_word_embeddings", False)),
    }


def _linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each 2-D Linear of one decoder layer (a MoE: attention + router)."""
    h = s["hidden"]
    shapes = {"q_proj": (h, s["q"]), "k_proj": (h, s["kv"]), "v_proj": (h, s["kv"]), "o_proj": (s["q"], h)}
    if s["experts"]:
        shapes["router"] = (h, s["experts"])
    else:
        shapes.update(gate_proj=(h, s["inter"]), up_proj=(h, s["inter"]), down_proj=(s["inter"], h))
    return shapes


def trainable_parameters(cfg: dict, lora: dict, backend: str) -> int:
    s = _shape(cfg)
    r, targets = int(lora["r"]), set(lora["target_modules"])
    per_layer = sum(r * (i + o) for name, (i, o) in _linear_shapes(s).items() if name in targets)
    if s["experts"]:
        h, mi, e = s["hidden"], s["moe_inter"], s["experts"]
        if targets & {"gate_proj", "up_proj"}:
            r_gate_up = r if backend == "unsloth" else 2 * r  # PEFT's rank_pattern doubles gate_up
            per_layer += e * r_gate_up * (h + 2 * mi)
        if "down_proj" in targets:
            per_layer += e * r * (mi + h)
    return per_layer * s["layers"]


def estimate(cfg: dict, lora: dict, train: dict, backend: str) -> VramPlan:
    """The planned peak of one training job: `cfg` is the base's HF config (config.json or the
    model's `arch:`), `lora`/`train` its effective settings, backend 'unsloth' or 'trl'."""
    s = _shape(cfg)
    q4 = bool(train["load_in_4bit"])
    linear = s["layers"] * sum(i * o for i, o in _linear_shapes(s).values())
    experts = s["layers"] * s["experts"] * 3 * s["moe_inter"] * s["hidden"]
    norms = s["layers"] * 2 * s["hidden"] + s["hidden"]
    embed_head = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
    if q4:
        expert_bytes = NF4_BYTES if backend == "unsloth" else 2
        rest_bytes = 4 if backend == "trl" else 2  # prepare_model_for_kbit_training upcasts to fp32
        weights = linear * NF4_BYTES + experts * expert_bytes + (embed_head + norms) * rest_bytes
    else:
        weights = 2.0 * (linear + experts + embed_head + norms)
    trainable = trainable_parameters(cfg, lora, backend)
    per_hidden, per_vocab = ACTIVATION_BYTES[(backend, bool(s["experts"]))]
    checkpointing = train.get("gradient_checkpointing", "offload")
    if checkpointing == "off":
        a, b = NO_CHECKPOINT_BYTES[(backend, bool(s["experts"]))]
        mlp_width = s["experts_per_token"] * s["moe_inter"] if s["experts"] else s["inter"]
        per_layer = a * s["hidden"] + b * mlp_width
    else:
        if backend == "unsloth" and checkpointing == "on":
            per_hidden += ON_GPU_CHECKPOINT_BYTES
        per_layer = per_hidden * s["hidden"]
    tokens = int(train["per_device_batch_size"]) * int(train["max_seq_length"])
    activations = tokens * (per_layer * s["layers"] + per_vocab * s["vocab"])
    gpus = int(train.get("gpus", 1))
    ddp_buckets = trainable * DDP_BUCKET_BYTES if gpus > 1 else 0
    unsloth_moe = backend == "unsloth" and bool(s["experts"])
    state_bytes = UNSLOTH_MOE_LORA_STATE_BYTES if unsloth_moe else LORA_STATE_BYTES
    fixed = FIXED_BYTES[backend]
    if unsloth_moe and q4:
        fixed += UNSLOTH_MOE_DEQUANT_STACKS * 2 * s["experts"] * 3 * s["moe_inter"] * s["hidden"]
    if unsloth_moe and checkpointing != "off" and not train.get("compile_warmup", True):
        # without the compile warm-up, step 1 keeps every layer's activations while Unsloth
        # compiles (bench/h100: 24.4 against 12.0 GiB steady on 12 layers; out of memory on 48 at
        # 2 x 8192): planned as the no-checkpointing footprint
        return estimate(cfg, lora, {**train, "gradient_checkpointing": "off", "compile_warmup": True}, backend)
    return VramPlan(float(weights), float(trainable * state_bytes), float(activations), float(fixed),
                    trainable, backend, bool(s["experts"]), float(ddp_buckets), gpus, checkpointing)


def alternatives(cfg: dict, lora: dict, train: dict, backend: str, limit: float) -> list[str]:
    """Single changes that bring the plan under `limit` bytes; when none does, pairs of changes."""
    options = []
    if not train["load_in_4bit"]:
        options.append(("load_in_4bit: true", {"load_in_4bit": True}, None))
    if backend == "trl":
        options.append(("backend: unsloth", {}, "unsloth"))
    checkpointing = train.get("gradient_checkpointing", "offload")
    # less kept on the GPU: on (Unsloth) keeps the checkpoints there, offload moves them to the
    # CPU (TRL checkpoints on the GPU with either, so for it only offload is a change from off)
    lighter = {"off": ("on", "offload") if backend == "unsloth" else ("offload",), "on": ("offload",)}
    for value in lighter.get(checkpointing, ()):
        options.append((f"gradient_checkpointing: {value}", {"gradient_checkpointing": value}, None))
    if train["per_device_batch_size"] > 1:
        b = train["per_device_batch_size"]
        options.append((f"per_device_batch_size: 1 (gradient_accumulation_steps: {train['gradient_accumulation_steps'] * b})",
                        {"per_device_batch_size": 1, "gradient_accumulation_steps": train["gradient_accumulation_steps"] * b}, None))
    for seq in (train["max_seq_length"] // 2, train["max_seq_length"] // 4):
        if seq >= 512:
            options.append((f"max_seq_length: {seq}", {"max_seq_length": seq}, None))
    def plan_of(change: dict, new_backend: str | None) -> VramPlan:
        return estimate(cfg, lora, {**train, **change}, new_backend or backend)

    singles = [(name, plan_of(change, nb)) for name, change, nb in options]
    fits = [f"{name} ({plan.total_gib:.1f} GiB)" for name, plan in singles if plan.total <= limit]
    if fits:
        return fits
    for i, (name, change, nb) in enumerate(options):
        for name2, change2, nb2 in options[i + 1:]:
            if change.keys() & change2.keys():
                continue  # two values of one field
            plan = plan_of({**change, **change2}, nb2 or nb)
            if plan.total <= limit:
                fits.append(f"{name} + {name2} ({plan.total_gib:.1f} GiB)")
    return fits


# gradient_checkpointing: auto keeps this share of the GPU's memory free: the plan's error against
# the driver-level peak (within 10% on the runs measured, bench/h100) with room to spare.
AUTO_MARGIN = 0.08
# Fastest first (bench/h200, bench/h100): no checkpointing, then checkpoints kept on the GPU, then
# offloaded to CPU memory; within each, the larger micro-batch.
CHECKPOINTING_SPEED_ORDER = ("off", "on", "offload")


@dataclass
class AutoChoice:
    train: dict  # the train settings with gradient_checkpointing and the micro-batch resolved
    plan: VramPlan | None
    message: str


def auto_candidates(train: dict, backend: str) -> list[tuple[str, int, int]]:
    """(gradient_checkpointing, per_device_batch_size, gradient_accumulation_steps), fastest first.
    The effective batch (micro-batch x accumulation) stays as configured; micro-batches larger
    than the configured one are not tried (beyond what was measured), and with train.gpus the
    accumulation must divide over the processes."""
    micro, accum = int(train["per_device_batch_size"]), int(train["gradient_accumulation_steps"])
    effective, gpus = micro * accum, int(train.get("gpus", 1))
    micros = [m for m in range(micro, 0, -1) if effective % m == 0 and (effective // m) % gpus == 0]
    # TRL keeps checkpoints on the GPU with offload as with on: one value covers both
    modes = CHECKPOINTING_SPEED_ORDER if backend == "unsloth" else ("off", "on")
    return [(mode, m, effective // m) for mode in modes for m in micros]


def _setting_words(mode: str, micro: int, accum: int) -> str:
    return f"{mode}, micro-batch {micro} x {accum}"


def choose_auto(cfg: dict, lora: dict, train: dict, backend: str, limit: int | None,
                source: str = "the GPU", margin: float = AUTO_MARGIN) -> AutoChoice:
    """Resolve gradient_checkpointing: auto: the fastest candidate whose plan fits `limit` bytes
    less `margin`. Without a GPU size (CPU training) the configured micro-batch with offload (TRL:
    checkpoints on, as the default). Raises VramError naming what to change when nothing fits."""
    if limit is None:
        resolved = {**train, "gradient_checkpointing": "offload"}
        return AutoChoice(resolved, None, f"gradient_checkpointing auto: offload (no GPU memory known: {source})")
    budget = limit * (1 - margin)
    skipped = []
    for mode, micro, accum in auto_candidates(train, backend):
        resolved = {**train, "gradient_checkpointing": mode, "per_device_batch_size": micro,
                    "gradient_accumulation_steps": accum}
        plan = estimate(cfg, lora, resolved, backend)
        if plan.total <= budget:
            why = (f"; faster settings planned over it: {', '.join(skipped)}" if skipped else "; the fastest setting")
            return AutoChoice(resolved, plan, (
                f"gradient_checkpointing auto: {_setting_words(mode, micro, accum)} (plan {plan.total_gib:.1f} GiB "
                f"<= {budget / GIB:.1f} GiB = {limit / GIB:.1f} GiB of {source} less {margin:.0%} margin){why}"))
        skipped.append(f"{mode} {micro} x {accum} ({plan.total_gib:.1f} GiB)")
    fits = alternatives(cfg, lora, {**train, "gradient_checkpointing": "offload", "per_device_batch_size": 1,
                                    "gradient_accumulation_steps": int(train["per_device_batch_size"])
                                    * int(train["gradient_accumulation_steps"])}, backend, budget)
    hint = ("; would fit with " + "; or ".join(fits)) if fits else "; nothing tried fits: use a larger GPU"
    raise VramError(f"gradient_checkpointing auto: no setting fits {budget / GIB:.1f} GiB ({limit / GIB:.1f} GiB of "
                    f"{source} less {margin:.0%} margin); the lightest, {skipped[-1]}, does not{hint}")


def visible_gpu_memory(gpus: int = 1) -> int | None:
    """The memory of the smallest of the first `gpus` visible GPUs (each holds a replica), or None."""
    try:
        import torch

        if torch.cuda.is_available():
            count = min(gpus, torch.cuda.device_count())
            return min(int(torch.cuda.get_device_properties(i).total_memory) for i in range(count))
    except ImportError:
        pass
    return None


def gpu_memory_limit(config: dict, gpus: int = 1) -> tuple[int | None, str]:
    """(bytes per GPU, where from): the config's gpu_memory (the memory of each GPU), else the
    visible GPU's (the smallest of the first `gpus`), else (None, why)."""
    if config.get("gpu_memory") is not None:
        from loraforge.sizes import parse_size

        return parse_size(config["gpu_memory"]), "gpu_memory in the config"
    visible = visible_gpu_memory(gpus)
    if visible:
        return visible, "the visible GPU" if gpus == 1 else f"the smallest of the {gpus} visible GPUs"
    return None, "no gpu_memory in the config and no GPU visible"


def _hf_config(config: dict, key: str, results_dir: str) -> dict:
    from loraforge.plan import base_dir_of, hf_config_of

    return hf_config_of(config, key, base_dir_of(config, key, results_dir))


def plan_training(config: dict, models: list[str], results_dir: str = "results") -> list[tuple[str, VramPlan | None, str]]:
    """(model, plan, backend note) for each model that trains; plan None when its shape is unknown.
    gradient_checkpointing: auto is planned as it will resolve (see resolve_training)."""
    return [(key, plan, backend) for key, plan, backend, _, _ in _plans(config, models, results_dir)]


def _plans(config: dict, models: list[str], results_dir: str):
    """(model, plan, backend, auto choice or None, HF config) for each model that trains."""
    from loraforge.config import model_settings
    from loraforge.train_backends import BackendError, resolve_backend

    out = []
    for key in models:
        try:
            s = model_settings(config, key)
        except (KeyError, TypeError):  # a config without lora-forge's defaults (not validated)
            out.append((key, None, "unknown", None, None))
            continue
        try:
            backend = resolve_backend(s["train"].get("backend", "auto"))
        except BackendError:
            backend = "unsloth"  # planned as requested; the training job itself refuses if it cannot run
        cfg = _hf_config(config, key, results_dir)
        if not cfg or "hidden_size" not in cfg:
            out.append((key, None, backend, None, cfg))
            continue
        train, choice = s["train"], None
        if train.get("gradient_checkpointing") == "auto":
            limit, source = gpu_memory_limit(config, int(train.get("gpus", 1)))
            choice = choose_auto(cfg, s["lora"], train, backend, limit, source)
            train = choice.train
        out.append((key, estimate(cfg, s["lora"], train, backend), backend, choice, cfg))
    return out


def resolve_training(cfg: dict, lora: dict, train: dict, backend: str, limit: int | None,
                     source: str = "the visible GPU") -> tuple[dict, str | None]:
    """The train settings a job runs with: gradient_checkpointing: auto (and its micro-batch)
    resolved for `limit` bytes of GPU memory; other settings as they are. (settings, message)."""
    if train.get("gradient_checkpointing") != "auto":
        return train, None
    choice = choose_auto(cfg, lora, train, backend, limit, source)
    return choice.train, choice.message


# The largest micro-batch (tokens) measured on Unsloth's MoE path: 2 x 8192 peaked at 25.7 GiB on
# the 30B-A3B shape, 4 x 8192 ran out of 139 GiB (bench/h200), which this plan does not model.
MEASURED_MOE_MICRO_TOKENS = 16384


def _note_faster_fit(cfg: dict, settings: dict, backend: str, limit: int, source: str, key: str, say) -> None:
    """A job that checkpoints and would also fit without: say so (on the H200 that was 1.1-1.4x
    the tokens/s, bench/h200/gpu_backends-h200.md), since the default favours small GPUs."""
    train = settings["train"]
    if train.get("gradient_checkpointing", "offload") == "off":
        return
    off = estimate(cfg, settings["lora"], {**train, "gradient_checkpointing": "off"}, backend)
    if off.total <= limit:
        say(f"note: {key} would also fit without gradient checkpointing ({off.total_gib:.1f} GiB of the "
            f"{limit / GIB:.1f} GiB of {source}): models.{key}.train.gradient_checkpointing: off trained "
            "1.1-1.4x faster on the H200 (bench/h200/gpu_backends-h200.md)")


def check_training(config: dict, models: list[str], results_dir: str = "results", say=print) -> None:
    """Print each training job's VRAM plan; raise VramError naming what would fit when one does
    not fit the GPU. Nothing is checked without a GPU size (CPU training)."""
    from loraforge.config import model_settings

    if not models:
        return
    for key, plan, backend, choice, cfg in _plans(config, models, results_dir):
        if plan is None:
            say(f"VRAM plan of {key}: unknown (no train settings, or no config.json or arch: for its base)")
            continue
        limit, source = gpu_memory_limit(config, plan.gpus)
        if choice is not None:
            say(f"{key}: {choice.message}")
        say(f"VRAM plan of {key}: {plan.describe()}")
        settings = model_settings(config, key)
        train = choice.train if choice is not None else settings["train"]
        settings = {**settings, "train": train}
        micro_tokens = train["per_device_batch_size"] * train["max_seq_length"]
        if backend == "unsloth" and plan.moe and micro_tokens > MEASURED_MOE_MICRO_TOKENS:
            say(f"warning: {key}: a micro-batch of {micro_tokens} tokens is beyond what was measured for Unsloth's "
                f"MoE path ({MEASURED_MOE_MICRO_TOKENS}); 4 x 8192 ran out of 139 GiB on the H200 although "
                "planned at 29 GiB: keep per_device_batch_size x max_seq_length <= 16384")
        if backend == "trl" and train.get("gradient_checkpointing") == "off" and micro_tokens > MEASURED_TRL_NO_CHECKPOINT_MICRO_TOKENS:
            say(f"warning: {key}: TRL without gradient checkpointing was measured up to micro-batches of "
                f"{MEASURED_TRL_NO_CHECKPOINT_MICRO_TOKENS} tokens, and its memory per token grows with them: "
                f"this plan ({micro_tokens} tokens) is likely low (2 x 8192 ran out of 139.8 GiB on the H200 "
                "although planned at 126 GiB)")
        if limit is None:
            continue
        if plan.total <= limit:
            if choice is None:  # auto already took the fastest setting that fits
                _note_faster_fit(cfg, settings, backend, limit, source, key, say)
            continue
        fits = alternatives(cfg, settings["lora"], train, backend, limit)
        hint = ("; would fit with models." + key + ".train " + "; or ".join(fits)) if fits else "; nothing tried fits: use a larger GPU"
        raise VramError(
            f"training {key} needs about {plan.total_gib:.1f} GiB of GPU memory, more than the "
            f"{limit / GIB:.1f} GiB of {source}{hint}"
        )
