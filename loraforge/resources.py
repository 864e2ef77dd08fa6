"""What every job asks a scheduler for: CPU threads, memory, disk, wall time and GPUs.

The rules declare these as Snakemake `threads:` and `resources:` (rules/common.smk:
`job_threads(rule)`, `job_resources(rule)`), so a cluster executor turns them into its own
requests (Slurm: --cpus-per-task, --mem, --time, --gpus; Kubernetes: cpu, memory,
ephemeral-storage and nvidia.com/gpu requests) and `--set-resources` / `--set-threads`
override them per rule. A local run only counts the resources given to `--resources`, so it
schedules as before.

Where each value comes from, first match wins:

1. `models.<key>.resources.<rule>.<name>` (one model, one rule),
2. `models.<key>.resources.default.<name>` (one model, every rule),
3. `resources.<rule>.<name>` (config.yaml; the schema fills the shipped defaults),
4. an estimate: `disk_mb` of every job from the size model the disk plan uses
   (loraforge.sizes: the bytes of the job's inputs plus its outputs, measured when they
   exist; what a node holds when a storage provider stages files, and an upper bound on a
   shared filesystem), `mem_mb` of `check_gguf` from loraforge.memory (llama.cpp loading the
   GGUF at the check's context),
5. `resources.default.<name>`.

A value left unset is not declared at all (a Kubernetes executor adds GPU tolerations as soon
as a job has a `gpu` resource, even 0).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Iterable, Mapping

from loraforge import data_sources
from loraforge import sizes as S
from loraforge.plan.intermediate import candidate_intermediates, resolve_intermediate

# the names a rule may declare; threads is Snakemake's `threads:`, the rest are `resources:`
INT_RESOURCES = ("mem_mb", "disk_mb", "runtime", "gpu", "nodes")
STR_RESOURCES = ("gpu_model", "gpu_manufacturer", "slurm_partition", "slurm_account", "constraint",
                 "qos", "slurm_extra")
RESOURCE_NAMES = INT_RESOURCES + STR_RESOURCES
TABLE_COLUMNS = ("threads", "mem_mb", "disk_mb", "runtime", "gpu", "gpu_model")

MB = 1_000_000  # Snakemake's *_mb resources are decimal megabytes
DISK_HEADROOM = 1.1  # estimates are logical bytes; logs, reports and filesystem slack on top
DISK_EXTRA_MB = 100
# a Python process with llama-cpp-python and gguf imported, on top of llama.cpp's own needs
CHECK_PROCESS_MB = 500
CHECK_NUM_CTX = 256  # loraforge.gguf.check_gguf's context

RESULTS_DIR = "results"


def _layers(config: Mapping, model: str | None, rule: str) -> list[Mapping]:
    """The config blocks that may set a resource of `rule` for `model`, highest precedence first."""
    model_res = ((config.get("models") or {}).get(model) or {}).get("resources") or {} if model else {}
    top = config.get("resources") or {}
    return [model_res.get(rule) or {}, model_res.get("default") or {}, top.get(rule) or {}]


def _default(config: Mapping, name: str):
    return ((config.get("resources") or {}).get("default") or {}).get(name)


def declared_resource(config: Mapping, rule: str, name: str, model: str | None = None) -> tuple[Any, str | None]:
    """(value, the config field that sets it) of a resource as config.yaml declares it, or (None, None)."""
    fields = ([f"models.{model}.resources.{rule}", f"models.{model}.resources.default"] if model else ["", ""])
    fields.append(f"resources.{rule}")
    for field, layer in zip(fields, _layers(config, model, rule)):
        if layer.get(name) is not None:
            return layer[name], f"{field}.{name}"
    if _default(config, name) is not None:
        return _default(config, name), f"resources.default.{name}"
    return None, None


def train_gpus(config: Mapping, model: str | None) -> int:
    """The model's train.gpus (1 when unset): the data-parallel processes its training launches."""
    if model is None:
        return 1
    own = (((config.get("models") or {}).get(model) or {}).get("train") or {}).get("gpus")
    if own is None:
        own = ((config.get("defaults") or {}).get("train") or {}).get("gpus")
    return int(own or 1)


def threads(config: Mapping, rule: str, model: str | None = None) -> int:
    """CPU threads of a job of `rule` (1 when nothing sets it); a training over train.gpus
    processes gets at least one thread per process (each drives its GPU from its own Python loop)."""
    value = None
    for layer in _layers(config, model, rule):
        if layer.get("threads") is not None:
            value = int(layer["threads"])
            break
    if value is None:
        value = int(_default(config, "threads") or 1)
    if rule == "train_adapter":
        value = max(value, train_gpus(config, model))
    return value


def resource(config: Mapping, rule: str, name: str, model: str | None = None,
             inputs: Iterable[str] = (), wildcards: Mapping | None = None):
    """The value of one resource of a job, or None when it is not declared."""
    if rule == "train_adapter" and name in ("gpu", "nodes") and train_gpus(config, model) > 1:
        # data-parallel over train.gpus GPUs of one host (the config check refuses another
        # declared gpu count); nodes: 1 keeps a scheduler from spreading the GPUs over hosts
        return train_gpus(config, model) if name == "gpu" else 1
    for layer in _layers(config, model, rule):
        if layer.get(name) is not None:
            return layer[name]
    estimate = None
    if name == "disk_mb" and model is not None:
        estimate = disk_mb_estimate(config, rule, model, inputs, wildcards or {})
    elif name == "mem_mb" and rule == "check_gguf" and model is not None:
        estimate = check_mem_mb_estimate(config, model, (wildcards or {}).get("quant"))
    if estimate is not None:
        return estimate
    return _default(config, name)


def job_request(config: Mapping, rule: str, model: str | None = None, inputs: Iterable[str] = (),
                wildcards: Mapping | None = None) -> dict[str, Any]:
    """Everything a job of `rule` requests: threads plus every declared resource."""
    out: dict[str, Any] = {"threads": threads(config, rule, model)}
    inputs = list(inputs)
    for name in RESOURCE_NAMES:
        value = resource(config, rule, name, model, inputs, wildcards)
        if value is not None:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------
# estimates from the size model
# --------------------------------------------------------------------------------------


def _config_key(config: Mapping) -> str:
    return json.dumps(config, sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _artifact_estimates(config_json: str, model: str, cwd: str) -> dict[str, int]:
    """Estimated bytes of a model's artifacts, keyed by path (as the rules name them):
    base folder, prepared data, adapter, merged folder and every GGUF type it may write."""
    from loraforge.plan import sizing as P  # the disk plan's conventions for paths and archs

    config = json.loads(config_json)
    base = P.base_dir_of(config, model)
    hf = P.hf_config_of(config, model, base)
    out: dict[str, int] = {}
    sample_bytes = data_sources.sample_bytes(config, model)
    d = f"{RESULTS_DIR}/{model}"
    out[f"{d}/data/train.jsonl"] = int(sample_bytes * 1.2)  # as the disk plan estimates them
    out[f"{d}/data/validation.jsonl"] = int(sample_bytes * 0.2)
    try:
        arch = S.arch_from_config(hf) if hf else None
    except ValueError:
        arch = None
    if arch is None:
        return out
    is_built = "build" in (((config.get("models") or {}).get(model) or {}).get("base") or {})
    shards, other = S.model_folder_bytes(arch, 2_000_000 if is_built else S.DEFAULT_SHARD_BYTES)
    folder = other + sum(sh.bytes for sh in shards)
    out[base] = folder
    out[f"{d}/merged"] = folder
    out[f"{d}/adapter"] = S.lora_adapter_bytes(arch, P._lora_rank(config, model),
                                               P._targets_of(config, model, RESULTS_DIR))
    export = config.get("export") or {}
    for ftype in {*candidate_intermediates(config), *(export.get("quants") or [])}:
        try:
            out[f"{d}/{S.ftype_name(ftype)}.gguf"] = S.gguf_bytes(arch, ftype)
        except ValueError:
            pass
    # the evaluation's temp files (rules/quality.smk)
    out[f"{d}/eval/reference-F16.gguf"] = S.gguf_bytes(arch, "F16")
    out[f"{d}/eval/base-Q8_0.gguf"] = S.gguf_bytes(arch, "Q8_0")
    out[f"{d}/eval/{P.REFERENCE_LOGITS}"] = P.reference_logits_bytes(config, arch.vocab_size)
    return out


def artifact_bytes(config: Mapping, model: str, path: str) -> int:
    """Bytes of one file or folder of a model: measured when it exists, else estimated
    (0 for small files the size model does not cover)."""
    path = os.path.normpath(str(path))
    measured = S.path_bytes(path)
    if measured is not None:
        return measured
    return _artifact_estimates(_config_key(config), model, os.getcwd()).get(path, 0)


def rule_outputs(config: Mapping, rule: str, model: str, wildcards: Mapping) -> list[str]:
    """The large outputs of a job (small reports and logs are covered by the headroom)."""
    d = f"{RESULTS_DIR}/{model}"
    from loraforge.plan import sizing as P

    return {
        "build_tiny_base": [P.base_dir_of(config, model)],
        "fetch_base": [P.base_dir_of(config, model)],
        "prepare_data": [f"{d}/data/train.jsonl", f"{d}/data/validation.jsonl"],
        "train_adapter": [f"{d}/adapter"],
        "merge_adapter": [f"{d}/merged"],
        "convert_gguf": [f"{d}/{wildcards.get('intermediate') or resolve_intermediate(config, model).ftype}.gguf"],
        "quantize_gguf": [f"{d}/{wildcards.get('quant')}.gguf"] if wildcards.get("quant") else [],
        "reference_gguf": [f"{d}/eval/reference-F16.gguf"],
        "base_gguf": [f"{d}/eval/base-Q8_0.gguf"],
        "reference_logits": [f"{d}/eval/{P.REFERENCE_LOGITS}"],
        # the adapter-only path (rules/ide.smk): the un-fine-tuned base as GGUF, the adapter as GGUF
        "convert_base_gguf": [f"{d}/base.{wildcards.get('intermediate') or resolve_intermediate(config, model).ftype}.gguf"],
        "quantize_base_gguf": [f"{d}/base.{wildcards.get('quant')}.gguf"] if wildcards.get("quant") else [],
        "convert_adapter_gguf": [f"{d}/adapter.gguf"],
    }.get(rule, [])


def disk_mb_estimate(config: Mapping, rule: str, model: str, inputs: Iterable[str],
                     wildcards: Mapping) -> int:
    """MB a job needs on its node: its inputs and outputs (see the module docstring)."""
    paths = list(dict.fromkeys(os.path.normpath(str(p)) for p in
                               [*inputs, *rule_outputs(config, rule, model, wildcards)]))
    total = sum(artifact_bytes(config, model, p) for p in paths)
    return int(math.ceil(total * DISK_HEADROOM / MB)) + DISK_EXTRA_MB


def check_mem_mb_estimate(config: Mapping, model: str, quant: str | None) -> int | None:
    """Memory of check_gguf: llama.cpp's needs for the GGUF at the check's context
    (loraforge.memory: file + KV cache + compute buffer + runtime) plus the Python process."""
    if not quant:
        return None
    from loraforge import memory as M
    from loraforge.plan import sizing as P

    hf = P.hf_config_of(config, model, P.base_dir_of(config, model))
    if not hf:
        return None
    gguf = artifact_bytes(config, model, f"{RESULTS_DIR}/{model}/{quant}.gguf")
    try:
        row = M.memory_row(f"{quant}.gguf", quant, gguf, M.model_dims(hf), CHECK_NUM_CTX)
    except (ValueError, KeyError, ZeroDivisionError):
        return None
    return int(math.ceil(row["total_bytes"] / MB)) + CHECK_PROCESS_MB


# --------------------------------------------------------------------------------------
# the table `loraforge plan --resources` prints
# --------------------------------------------------------------------------------------


def jobs_table(config: Mapping, jobs: Iterable[tuple[str, Mapping, Iterable[str]]]) -> list[dict[str, Any]]:
    """One row per job (rule, wildcards, input paths): what a cluster run would request."""
    rows = []
    for rule, wildcards, inputs in jobs:
        wildcards = {k: str(v) for k, v in dict(wildcards).items()}
        model = wildcards.get("model")
        req = job_request(config, rule, model, inputs, wildcards)
        label = ", ".join(f"{k}={v}" for k, v in wildcards.items())
        rows.append({"rule": rule, "wildcards": label, **req})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: rule, wildcards, threads, mem_mb, disk_mb, runtime (min), gpu,
    gpu_model, and any other declared resource in a last column."""
    head = ("rule", "wildcards", "threads", "mem_mb", "disk_mb", "runtime_min", "gpu", "gpu_model", "other")
    table = [head]
    for r in rows:
        other = ", ".join(f"{k}={r[k]}" for k in RESOURCE_NAMES if k in r and k not in TABLE_COLUMNS)
        table.append((r["rule"], r["wildcards"] or "-", *(str(r.get(k, "-")) for k in TABLE_COLUMNS), other or "-"))
    from loraforge.plan.report import format_table

    return format_table(table, right={2, 3, 4, 5, 6})


def format_plan(plan, config: Mapping, workdir: str | os.PathLike) -> str:
    """The resource table of a disk plan's jobs, in its run order (sizes relative to workdir)."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        rows = jobs_table(config, [(s.rule, s.wildcards, s.inputs) for s in plan.order])
    finally:
        os.chdir(cwd)
    return format_table(rows)
