"""What a long training run needs besides the trainer: resumable checkpoints, progress in the
rule log, a token count for tokens/s, and reading eval loss against train loss.

Checkpoints live in `<model>/train/checkpoints/checkpoint-N` (transformers' own format:
adapter, optimizer, scheduler, RNG and trainer state), never next to the adapter, so the adapter
guard never takes one for a finished adapter. A rerun after a crash resumes from the newest
complete one when it was made with the same settings, data and base weights
(checkpoints/fingerprint.json: no paths, so a moved checkout keeps its checkpoints); checkpoints
of other settings are discarded, with a log line. Before resuming, the newest checkpoint is
checked (every file there, trainer_state.json readable JSON, the .pt/.pth files complete zip
archives, the adapter's safetensors header and size): a bad one is set aside (renamed into
checkpoints-set-aside/, never deleted) and the previous one is tried, or training starts over."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

from loraforge.fileio import sha256_file, write_json_atomic
from loraforge.safetensors_io import SafetensorsFormatError, read_header

log = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
FINGERPRINT_FILE = "fingerprint.json"
KEEP_CHECKPOINTS = 2  # train.keep_checkpoints default
# What transformers writes into a checkpoint; trainer_state.json comes last, so a checkpoint
# killed while saving lacks it and is skipped.
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")
# Settings that do not change what is trained (when a checkpoint is taken, how often eval runs,
# how many are kept, where the checkpointed activations live).
NOT_FINGERPRINTED = ("save_steps", "eval_steps", "keep_checkpoints", "gradient_checkpointing", "compile_warmup")
# Settings that do not change what the adapter is, so changing them never retrains: the above, and
# train.gpus (the same effective batch, learning-rate schedule and number of optimizer steps on any
# number of GPUs: each optimizer step averages the gradient over the same number of samples; only
# the float summation order and which samples share a step differ). A checkpoint, though, resumes
# only with the gpus it was made with (it holds per-process RNG states and a data position counted
# in per-process batches), so gpus stays in the checkpoint fingerprint.
NOT_RECORDED = NOT_FINGERPRINTED + ("gpus",)


SET_ASIDE_DIRNAME = "checkpoints-set-aside"  # next to checkpoints/: bad checkpoints, renamed, never deleted


def fingerprint(base_identity: dict | str | None, train_jsonl, lora: dict, train_params: dict, backend: str) -> dict:
    """What a checkpoint must have been trained with to be resumed: the base's identity
    (training_record.base_identity: layout and per-shard weight digests), the training data's
    digest, the settings that decide the steps, the backend. No paths."""
    if not base_identity:
        raise ValueError("a checkpoint fingerprint needs the base's identity (its weights are missing)")
    return {
        "base_identity": base_identity,
        "train_sha256": sha256_file(train_jsonl),
        "lora": lora,
        "train": {k: v for k, v in sorted(train_params.items()) if k not in NOT_FINGERPRINTED},
        "backend": backend,
    }


def complete_checkpoints(checkpoints: Path, processes: int = 1) -> list[Path]:
    """checkpoint-N folders that hold every file a resume needs, oldest first. A checkpoint of N
    data-parallel processes also needs each one's RNG state (rng_state_<rank>.pth): each rank
    writes its own, with no barrier before rank 0 writes trainer_state.json."""
    wanted = list(CHECKPOINT_FILES)
    if processes > 1:
        wanted += [f"rng_state_{r}.pth" for r in range(processes)]
    found = []
    for d in checkpoints.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir() and all((d / f).exists() for f in wanted):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def prepare_checkpoints(checkpoints: Path, expected: dict) -> Path | None:
    """The checkpoint to resume from (None: start fresh). Checkpoints made with other settings,
    or without a fingerprint, are removed; so are incomplete ones."""
    recorded_file = checkpoints / FINGERPRINT_FILE
    if checkpoints.exists():
        try:
            recorded = json.loads(recorded_file.read_text())
        except (OSError, ValueError):  # missing, or torn by a crash or a full disk: not trusted
            recorded = None
        if recorded != json.loads(json.dumps(expected)):
            changed = sorted(k for k in expected if recorded is None or recorded.get(k) != expected[k])
            log.warning("discarding checkpoints in %s: made with other %s", checkpoints, ", ".join(changed) or "settings")
            shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recorded_file, expected)
    complete = complete_checkpoints(checkpoints, int((expected.get("train") or {}).get("gpus", 1)))
    for d in checkpoints.glob("checkpoint-*"):
        if d not in complete:
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", d)
            shutil.rmtree(d, ignore_errors=True)
    return newest_good_checkpoint(complete)


def newest_good_checkpoint(complete: list[Path]) -> Path | None:
    """The newest checkpoint that checks out (checkpoint_problem), newest first; each bad one is
    set aside on the way. Says which one training resumes from, or that it starts over."""
    for d in reversed(complete):
        problem = checkpoint_problem(d)
        if problem is None:
            log.info("resuming from %s", d)
            return d
        moved = set_aside(d)
        log.warning("checkpoint %s is unusable (%s): set aside as %s", d, problem, moved)
    if complete:
        log.warning("no usable checkpoint left in %s: training starts over from step 0", complete[0].parent)
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint (naming the file), or None when it can be resumed:
    trainer_state.json is JSON with a global_step, every .pt/.pth file is a complete zip archive
    (torch.save's format; a cut-off file has no central directory, a torn one fails its CRC),
    the adapter's safetensors header is readable and its data all there."""
    state_file = checkpoint / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            return f"{state_file.name} has no global_step"
    except (OSError, ValueError) as e:
        return f"{state_file.name}: not valid JSON ({e})"
    for f in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{f.name}: not a complete torch file ({e})"
        if bad is not None:
            return f"{f.name}: {bad} is corrupt (CRC mismatch)"
    weights = checkpoint / "adapter_model.safetensors"
    try:
        read_header(str(weights))  # checks every tensor's data lies within the file
    except (OSError, SafetensorsFormatError) as e:
        return f"{weights.name}: {e}"
    return None


def set_aside(checkpoint: Path) -> Path:
    """Move a bad checkpoint to <train>/checkpoints-set-aside/<name>[-k] (a rename: nothing is
    deleted; the trainer's rotation of old checkpoints never sees it there)."""
    dest_dir = checkpoint.parent.parent / SET_ASIDE_DIRNAME
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest, n = dest_dir / checkpoint.name, 1
    while dest.exists():
        dest, n = dest_dir / f"{checkpoint.name}-{n}", n + 1
    checkpoint.rename(dest)
    return dest


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


PROGRESS_FILE = "progress.json"  # in the training's out_dir: read by `loraforge status`


def progress_line(model: str | None, step: int, total: int, loss, tokens_per_s, eta_s: float) -> str:
    """`tiny: step 40/192 (21%), loss 5.1234, 2,345 tokens/s, ETA 1m20s` (the console's form)."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s:
        parts.append(f"{tokens_per_s:,.0f} tokens/s")
    parts.append(f"ETA {_duration(eta_s)}")
    return (f"{model}: " if model else "") + ", ".join(parts)


def progress_callback(min_interval_s: float = 10.0, out_dir=None, tokens=None, console: bool = False):
    """A TrainerCallback for progress at most every min_interval_s (and the first and last step),
    from the steps of this process, so a resumed run's ETA is not skewed: a `step k/total, s/step,
    ETA, loss` line in the rule log; with `console` also a `[lora-forge] model: step k/total, loss,
    tokens/s, ETA` line on the process's original stderr (the rule script's output goes to the
    log; that stream is Snakemake's terminal); with `out_dir`, `progress.json` there for `loraforge status`.
    `tokens()` counts the tokens trained so far (for tokens/s)."""
    from transformers import TrainerCallback

    model = Path(out_dir).parent.name if out_dir is not None else None

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step, self.started, self.last_logged = state.global_step, time.time(), 0.0
            self.last_loss, self.start_tokens = None, tokens() if tokens else 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.last_loss = logs["loss"]
            if logs and "eval_loss" in logs:
                log.info("step %d/%d: eval loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            done = state.global_step - self.start_step
            last = state.global_step >= state.max_steps
            if done != 1 and not last and now - self.last_logged < min_interval_s:
                return
            self.last_logged = now
            elapsed = now - self.started
            per_step = elapsed / max(done, 1)
            eta = per_step * max(state.max_steps - state.global_step, 0)
            loss = f", loss {self.last_loss:.4f}" if self.last_loss is not None else ""
            log.info(
                "step %d/%d (%.0f%%), %.2f s/step, ETA %s%s",
                state.global_step, state.max_steps, 100 * state.global_step / max(state.max_steps, 1),
                per_step, _duration(eta), loss,
            )
            tokens_per_s = (tokens() - self.start_tokens) / elapsed if tokens and elapsed > 0 else None
            if console:
                line = progress_line(model, state.global_step, state.max_steps, self.last_loss, tokens_per_s, eta)
                print(f"[lora-forge] {line}", file=sys.__stderr__, flush=True)
            if out_dir is not None:
                write_progress(Path(out_dir) / PROGRESS_FILE, state.global_step, state.max_steps, self.last_loss,
                               tokens_per_s, per_step, eta)

    return Progress()


def write_progress(path: Path, step: int, total: int, loss, tokens_per_s, seconds_per_step: float, eta_s: float) -> None:
    """The training's latest progress, for `loraforge status` (a plain overwrite of a small file;
    written atomically so a reader never sees half of it)."""
    record = {"step": step, "total": total, "loss": loss, "tokens_per_s": tokens_per_s,
              "seconds_per_step": seconds_per_step, "eta_seconds": eta_s, "updated": time.time()}
    try:
        import torch

        if torch.cuda.is_available():
            record["gpu_memory_gib"] = torch.cuda.memory_allocated() / 2**30
            record["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except ImportError:  # pragma: no cover
        pass
    try:
        write_json_atomic(path, record)
    except OSError as e:  # a full disk must not stop training for a progress file
        log.warning("could not write %s: %s", path, e)


# Steps left out of the steady s/step (kernel compilation, autotuning, allocator warm-up).
WARMUP_STEPS = 2


class StepClock:
    """A TrainerCallback's step timestamps (the GPU synchronised, so a step's time is its work):
    `steady_seconds_per_step()` is the mean step time after the first WARMUP_STEPS of this process,
    the figure that compares runs (1 vs N GPUs) without the first steps' compilation."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self
        self.times: list[float] = []

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.times = [clock._now()]

            def on_step_end(self, args, state, control, **kwargs):
                clock.times.append(clock._now())

        self.callback = _Callback()

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def steady_seconds_per_step(self) -> float | None:
        steps = [b - a for a, b in zip(self.times, self.times[1:])]
        steady = steps[WARMUP_STEPS:]
        return sum(steady) / len(steady) if steady else None


class TokenCounter:
    """Wraps a data collator and counts the real (unpadded) tokens of training batches (Unsloth's
    trainer logs no num_tokens, and tokens/s is the figure that compares backends), and of those
    the tokens the loss is taken on (labels not -100), which shows whether answers-only applied."""

    def __init__(self, collator, model):
        self.collator, self.model, self.tokens, self.loss_tokens = collator, model, 0, 0
        self.checkpointing = None  # transformers' gradient checkpointing flag, seen while training

    def __call__(self, features):
        batch = self.collator(features)
        if getattr(self.model, "training", True):
            if self.checkpointing is None:
                self.checkpointing = getattr(self.model, "is_gradient_checkpointing", None)
            mask = batch.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            labels = batch.get("labels")
            if labels is not None:
                self.loss_tokens += int((labels != -100).sum())
        return batch


# Eval loss that rose this much above its best while train loss fell flags overfitting.
EVAL_RISE = 0.02


def eval_trend(history: list[dict]) -> tuple[str, str] | None:
    """('overfitting', message) when the last eval loss is more than EVAL_RISE above the best
    earlier one while the train loss fell between those steps; None otherwise (or < 2 evals)."""
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    trains = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if len(evals) < 2 or not trains:
        return None

    def train_loss_at(step: int) -> float:
        near = [loss for s, loss in trains if s <= step] or [trains[0][1]]
        return near[-1]

    best_step, best = min(evals[:-1], key=lambda e: e[1])
    last_step, last = evals[-1]
    if math.isnan(last) or last <= best * (1 + EVAL_RISE):
        return None
    train_then, train_now = train_loss_at(best_step), train_loss_at(last_step)
    if train_now >= train_then:
        return None
    return "overfitting", (
        f"validation loss rose from {best:.3f} (step {best_step}) to {last:.3f} (step {last_step}) while train "
        f"loss fell from {train_then:.3f} to {train_now:.3f}: the model is memorising the training data"
    )


def loss_rows(history: list[dict]) -> list[dict]:
    """One row per optimizer step that logged something: train loss, lr, grad norm, eval loss."""
    rows: dict[int, dict] = {}
    for h in history:
        if "step" not in h or not ("loss" in h or "eval_loss" in h):
            continue
        row = rows.setdefault(h["step"], {"step": h["step"]})
        for key in ("loss", "learning_rate", "grad_norm", "eval_loss"):
            if key in h:
                row[key] = h[key]
    return [rows[s] for s in sorted(rows)]
