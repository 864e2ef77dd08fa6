"""How the train_adapter rule runs training: in its own process (`train.gpus: 1`), or as N
data-parallel processes on N GPUs of this host, started with torchrun (`train.gpus: N`).

Why torchrun (`python -m torch.distributed.run`) and not `accelerate launch`: it ships with torch,
takes its whole setup from the command line (`--standalone --nproc-per-node N`: one host, a free
local rendezvous port, so two jobs on one node never collide), and reads no per-user file.
`accelerate launch` would also apply ~/.cache/huggingface/accelerate/default_config.yaml when one
exists (mixed precision, process count, DeepSpeed/FSDP), so the same config.yaml could train
differently on two machines. Inside each process transformers' Trainer still uses accelerate
(it reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE), as Unsloth's DDP guide expects.

The launcher does what must happen once, before any process starts: the checks that fail fast
with a clear message (base folder, target modules, backend, GPUs visible), clearing a stale
`adapter.partial`, and preparing the checkpoints (resume or discard, loraforge.train_monitor).
Rank 0 then writes the adapter (atomically), loss.csv, loss.png and metrics.json.

`LORAFORGE_DDP_ON_CPU=1` (tests only) runs the N processes on the CPU with the gloo backend, so the
data-parallel path is tested on a machine without GPUs; without it, `train.gpus: N` needs N
visible CUDA GPUs and is refused otherwise."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

from loraforge.errors import UserError

log = logging.getLogger(__name__)

CPU_OVERRIDE_ENV = "LORAFORGE_DDP_ON_CPU"
LAUNCH_FILE = "launch.json"  # the processes' arguments, in the training's out_dir while they run
ERROR_FILE = "launch-error.txt"  # a user-fixable error of rank 0, for the launcher's message

# What the log says about Unsloth and several GPUs (checked in unsloth 2026.10.9's source and docs).
UNSLOTH_DDP_NOTE = (
    "Unsloth 2026.10.9 runs under DDP: its loader pins each process to cuda:LOCAL_RANK "
    "(unsloth/models/loader_utils.py prepare_device_map) and it picks DDP's find_unused_parameters itself "
    "(False for a dense LoRA model under gradient checkpointing; left to transformers, i.e. True, for MoE "
    "expert LoRA: unsloth/models/_ddp_defaults.py). Its documentation still calls multi-GPU support "
    "unofficial (\"we'll be announcing official multi-GPU support for Unsloth soon\"); lora-forge has tested "
    "data-parallel training with the trl backend on CPU only, not Unsloth on several GPUs"
)


class LaunchError(UserError, RuntimeError):
    """The data-parallel processes could not start or one of them failed; the message says why."""


def cpu_override() -> bool:
    return os.environ.get(CPU_OVERRIDE_ENV, "") == "1"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(gpus: int, visible: int | None = None, on_cpu: bool | None = None) -> None:
    """Refuse train.gpus: N when fewer than N CUDA GPUs are visible (unless the CPU test override is set)."""
    if gpus <= 1:
        return
    on_cpu = cpu_override() if on_cpu is None else on_cpu
    if on_cpu:
        return
    visible = visible_gpus() if visible is None else visible
    if visible < gpus:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else ""
        raise LaunchError(
            f"train.gpus: {gpus} data-parallel processes need {gpus} CUDA GPUs on this host, {visible} visible{where}; "
            "set train.gpus to the GPUs a training job gets (the train_adapter rule requests them as its gpu resource)"
        )


def torchrun_command(gpus: int, launch_file: str | os.PathLike) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(gpus),
        "-m", "loraforge.train_launch", str(launch_file),
    ]


def process_environment(gpus: int, threads: int) -> dict[str, str]:
    """The environment of the N processes: CPU threads shared out (the job's `threads:`), and no
    GPU at all under the CPU override (so no process picks one up by accident)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, threads // gpus))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parent.parent)  # this loraforge, whatever the job's cwd
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if cpu_override():
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere). The
    launcher, torchrun and the N processes form a chain: a training job killed by a scheduler or by
    hand takes all of them with it, so no orphaned rank goes on to write an adapter behind a rerun."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl: do what it would have done
        os.kill(os.getpid(), signal.SIGKILL)


def run_training(base_dir, train_jsonl, validation_jsonl, adapter_dir, out_dir, lora: dict, train_params: dict,
                 record: dict | None = None, threads: int = 1) -> dict:
    """Train as the config says: one process, or train.gpus data-parallel processes. Returns metrics."""
    from loraforge.train import train

    gpus = int(train_params.get("gpus", 1))
    if gpus == 1:
        return train(base_dir, train_jsonl, validation_jsonl, adapter_dir=adapter_dir, out_dir=out_dir, lora=lora,
                     train_params=train_params, record=record)

    from loraforge import training_record
    from loraforge.base_weights import require_weights
    from loraforge.distributed import accumulation_per_process
    from loraforge.lora_targets import check_target_modules
    from loraforge.train_backends import resolve_backend
    from loraforge.train_monitor import CHECKPOINTS_DIRNAME, fingerprint, prepare_checkpoints

    accumulation_per_process(int(train_params["gradient_accumulation_steps"]), gpus)
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    require_weights(base_dir)
    check_target_modules(lora["target_modules"], base_dir)
    backend = resolve_backend(train_params.get("backend", "auto"))
    check_gpus(gpus)
    if backend == "unsloth":
        log.warning("train.gpus: %d with Unsloth: %s", gpus, UNSLOTH_DDP_NOTE)

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(adapter_dir.with_name(adapter_dir.name + ".partial"), ignore_errors=True)
    identity = training_record.identity_for_training(base_dir, record)
    prepare_checkpoints(out_dir / CHECKPOINTS_DIRNAME, fingerprint(identity, train_jsonl, lora, train_params, backend))
    (out_dir / "metrics.json").unlink(missing_ok=True)  # so a stale one is never read back as this run's
    launch_file, error_file = out_dir / LAUNCH_FILE, out_dir / ERROR_FILE
    error_file.unlink(missing_ok=True)
    launch_file.write_text(json.dumps({
        "base_dir": str(base_dir), "train_jsonl": str(train_jsonl),
        "validation_jsonl": str(validation_jsonl) if validation_jsonl else None,
        "adapter_dir": str(adapter_dir), "out_dir": str(out_dir), "lora": lora, "train_params": train_params,
        "record": record,
    }))
    command = torchrun_command(gpus, launch_file)
    log.info("launching %d data-parallel training processes%s: %s", gpus,
             " on the CPU (gloo; %s=1)" % CPU_OVERRIDE_ENV if cpu_override() else "", " ".join(command))
    tail: deque[str] = deque(maxlen=40)
    # the processes' output goes to the rule log line by line (progress included)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=process_environment(gpus, threads), preexec_fn=die_with_parent) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.startswith("[lora-forge] "):  # rank 0's progress and errors: the terminal too
                print(line, end="", file=sys.__stderr__, flush=True)
            tail.append(line.rstrip())
    launch_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        if error_file.exists():
            message = error_file.read_text().strip()
            error_file.unlink()
            raise LaunchError(message)
        raise RuntimeError(
            f"data-parallel training ({gpus} processes) failed with exit status {proc.returncode}; "
            "last lines:\n" + "\n".join(tail)
        )
    return json.loads((out_dir / "metrics.json").read_text())


def worker_main(launch_file: str) -> int:
    """One of the N processes torchrun starts: train with the launcher's arguments."""
    from loraforge.distributed import rank

    die_with_parent()  # torchrun's worker: gone when torchrun is
    me = rank()
    logging.basicConfig(
        level=logging.INFO if me == 0 else logging.WARNING,  # one progress report, not N
        format=f"%(asctime)s %(levelname)s [rank {me}] %(name)s: %(message)s",
        stream=sys.stdout,
    )
    args = json.loads(Path(launch_file).read_text())
    from loraforge.errors import explain
    from loraforge.train import train

    try:
        train(args["base_dir"], args["train_jsonl"], args["validation_jsonl"], adapter_dir=args["adapter_dir"],
              out_dir=args["out_dir"], lora=args["lora"], train_params=args["train_params"], record=args["record"])
    except Exception as exc:
        logging.exception("rank %d: training failed", me)
        message = explain(exc, [args["adapter_dir"]])
        if message is not None and me == 0:
            try:
                (Path(args["out_dir"]) / ERROR_FILE).write_text(message + "\n")
            except OSError:  # a full disk: the launcher reports the log's last lines instead
                pass
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1]))
