"""Data-parallel training over several GPUs of one host (`train.gpus: N`): what one of the N
processes needs to know about the others.

torchrun starts the N processes (loraforge.train_launch) and sets RANK, LOCAL_RANK and WORLD_SIZE;
transformers' Trainer (through accelerate) sees them, joins the process group (NCCL on GPUs, gloo
on CPU), wraps the model in DistributedDataParallel and shards every batch across the processes.
The effective batch stays the configured one: per_device_batch_size x gradient_accumulation_steps
samples per optimizer step, split as N processes x gradient_accumulation_steps / N micro-batches."""

from __future__ import annotations

import os

from loraforge.errors import UserError


class DistributedConfigError(UserError, ValueError):
    """A train.gpus setting that cannot keep the effective batch; the message names the field."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def accumulation_per_process(gradient_accumulation_steps: int, gpus: int, field: str = "train") -> int:
    """gradient_accumulation_steps / gpus, so that gpus x per-process accumulation x
    per_device_batch_size is the configured effective batch; refused when it does not divide."""
    if gpus < 1:
        raise DistributedConfigError(f"{field}.gpus: {gpus} must be at least 1")
    if gradient_accumulation_steps % gpus:
        raise DistributedConfigError(
            f"{field}.gradient_accumulation_steps: {gradient_accumulation_steps} is not a multiple of "
            f"{field}.gpus ({gpus}): each of the {gpus} processes accumulates gradient_accumulation_steps / gpus "
            "micro-batches so that the effective batch (per_device_batch_size x gradient_accumulation_steps) "
            "stays the same; choose a gpus that divides it, or a gradient_accumulation_steps that is a multiple of it"
        )
    return gradient_accumulation_steps // gpus


def per_process_accumulation(train_params: dict, world: int) -> int:
    """The accumulation each of `world` processes runs; the launch must match train.gpus."""
    gpus = int(train_params.get("gpus", 1))
    if world != gpus:
        raise DistributedConfigError(
            f"train.gpus: {gpus}, but this training runs as {world} processes (WORLD_SIZE): start it through "
            "the train_adapter rule (loraforge.train_launch), which launches exactly train.gpus processes"
        )
    return accumulation_per_process(int(train_params["gradient_accumulation_steps"]), gpus)


def trainer_arguments(backend: str, world: int, on_gpu: bool) -> dict:
    """TrainingArguments for a data-parallel run (none for a single process)."""
    if world == 1:
        return {}
    args = {"ddp_backend": "nccl" if on_gpu else "gloo"}
    if not on_gpu:
        # accelerate counts N CPU processes as data-parallel (MULTI_CPU) only when told it runs
        # on the CPU; otherwise each process would train alone on unsharded data
        args["use_cpu"] = True
    if backend == "trl":
        # Every LoRA parameter gets a gradient each step (attention and MLP LoRA, and PEFT's
        # fused-expert wrappers, which apply the delta to all experts). transformers would ask DDP
        # to search for unused parameters for any PEFT model, which costs a graph walk per step
        # and breaks reentrant gradient checkpointing ("marked as ready twice"). Unsloth makes this
        # choice itself (unsloth/models/_ddp_defaults.py), so its default is kept.
        args["ddp_find_unused_parameters"] = False
    return args


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def sum_over_processes(value: int) -> int:
    """The sum of an integer over all processes (itself when there is one)."""
    if not _initialized():
        return value
    import torch
    import torch.distributed as dist

    device = f"cuda:{local_rank()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def gather(value) -> list:
    """[value of rank 0, value of rank 1, ...] (a list of one without a process group)."""
    if not _initialized():
        return [value]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
