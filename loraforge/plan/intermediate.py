"""`export.intermediate: auto` (the default): quantize from 16-bit when the disk allows it; and
the joint disk decision of the auto settings (`resolve_disk_settings`): export.intermediate,
export.merge_mode and train.keep_checkpoints are chosen together, the first combination whose plan
of the model's whole chain (training checkpoints, merge, convert, quants, evaluation) fits
disk_quota, in the order of what each costs the user: a 16-bit intermediate first (quality), then
a kept base (link: no re-fetch), then two training checkpoints (one spare).

Requantizing the K-quants from a Q8_0 intermediate (the article's choice: the smallest one on
disk) costs measurable quality once a model is trained: 6-7% more mean KL divergence for
Q5_K_M and Q6_K on the longer-trained tiny base (docs/quality.md "Requantize from Q8_0, or quantize from
16-bit?"). So auto takes an F16 intermediate when the model's export chain planned with it (merge,
convert, every quant, and the evaluation when it is on) peaks within `disk_quota`, else Q8_0.

The decision is made while Snakemake reads the Snakefile (the intermediate's name is part of
the DAG), so it must give the same answer at any point of a run, also when a cluster job
reads the Snakefile again after a consume-mode merge used the base up: it plans from
config.yaml alone (`plan_steps(measure=False)`: `arch:`, a `path:` base's config.json, or a
built tiny architecture), never from what is on disk. The free space is checked at the start of
every run as before (a run that does not fit names `export.intermediate: Q8_0` among the
settings that would)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Mapping

from loraforge.plan.model import RESULTS_DIR, Step
from loraforge.sizes import human, parse_size

SIXTEEN_BIT = ("F16", "BF16")
AUTO_16BIT = "F16"  # what bench/requantize.py measured "from 16-bit" with, and the evaluation's reference
FALLBACK = "Q8_0"
KEPT_CANDIDATES = ("Q8_0", "F16", "BF16")


@dataclass(frozen=True)
class IntermediateChoice:
    ftype: str
    reason: str
    peak_16bit: int | None = None  # the planned peak of the chain from 16-bit (auto only)


def export_chain_steps(config: Mapping, model: str, intermediate: str, results_dir: str = RESULTS_DIR) -> list[Step]:
    """The jobs that export one model from its adapter, as the rules declare them (merge_adapter,
    convert_gguf, quantize_gguf per quant; base_gguf, reference_gguf, reference_logits,
    evaluate and conventions_score when quality.evaluate is on), with the rules' temp() files and
    priorities. tests/test_intermediate.py checks it against the DAG Snakemake builds."""
    from loraforge.plan.sizing import base_dir_of

    d = f"{results_dir}/{model}"
    base, adapter = base_dir_of(config, model, results_dir), f"{d}/adapter"
    export = config.get("export") or {}
    quants = list(export.get("quants") or [])
    inter = f"{d}/{intermediate}.gguf"
    keep_inter = intermediate in quants
    steps = [
        Step("merge_adapter", model, outputs=[f"{d}/merged"], inputs=[base, adapter], temp_outputs={f"{d}/merged"}),
        Step("convert_gguf", model, outputs=[inter], inputs=[f"{d}/merged"],
             temp_outputs=set() if keep_inter else {inter}),
    ]
    quant_files = [f"{d}/{q}.gguf" for q in quants]
    for q in quants:
        if q != intermediate:
            steps.append(Step("quantize_gguf", model, outputs=[f"{d}/{q}.gguf"], inputs=[inter, adapter],
                              wildcards={"quant": q}))
    if (config.get("quality") or {}).get("evaluate", True):
        reference = inter
        if intermediate not in SIXTEEN_BIT:
            reference = f"{d}/eval/reference-F16.gguf"
            steps.append(Step("reference_gguf", model, outputs=[reference], inputs=[f"{d}/merged"],
                              temp_outputs={reference}, priority=5))
        base_q8 = f"{d}/eval/base-Q8_0.gguf"
        logits, summary = f"{d}/eval/reference.logits", f"{d}/eval/reference.json"
        validation = f"{d}/data/validation.jsonl"
        steps += [
            Step("base_gguf", model, outputs=[base_q8], inputs=[base], temp_outputs={base_q8}, priority=5),
            Step("reference_logits", model, outputs=[logits, f"{d}/eval/validation.txt", summary],
                 inputs=[reference, validation], temp_outputs={logits}),
            Step("evaluate", model, outputs=[f"{d}/quality.tsv"], inputs=[logits, summary, *quant_files]),
            Step("conventions_score", model, outputs=[f"{d}/conventions.tsv"],
                 inputs=[base_q8, *quant_files, validation, f"{d}/eval/validation.txt", summary, adapter]),
        ]
    return steps


def resolve_intermediate(config: Mapping, model: str) -> IntermediateChoice:
    """The intermediate GGUF type of `model`: export.intermediate when set, else (auto) the joint
    disk decision's (F16 when some combination with it fits disk_quota, else Q8_0). A type that
    export.quants keeps is the intermediate itself (no second conversion)."""
    fixed = fixed_intermediate(config)
    if fixed is not None:
        if str((config.get("export") or {}).get("intermediate", "auto")) != "auto":
            return IntermediateChoice(fixed, "export.intermediate")
        return IntermediateChoice(fixed, f"{fixed} is one of export.quants: the kept GGUF is the intermediate")
    choice = resolve_disk_settings(config, model)
    return IntermediateChoice(choice.intermediate, choice.reason, choice.peak)


@dataclass(frozen=True)
class DiskChoice:
    intermediate: str
    merge_mode: str  # link | consume | copy: what the model's chain was planned with
    keep_checkpoints: int
    peak: int | None
    reason: str
    fits: bool = True


KEEP_CANDIDATES = (2, 1)  # train.keep_checkpoints: auto


def _keep_setting(config: Mapping, model: str):
    train = {**((config.get("defaults") or {}).get("train") or {}),
             **(((config.get("models") or {}).get(model) or {}).get("train") or {})}
    return train.get("keep_checkpoints", "auto")


def resolve_keep_checkpoints(config: Mapping, model: str) -> int:
    """train.keep_checkpoints of `model`: the setting, or for auto the joint disk decision's."""
    keep = _keep_setting(config, model)
    return int(keep) if keep != "auto" else resolve_disk_settings(config, model).keep_checkpoints


def resolve_disk_settings(config: Mapping, model: str) -> DiskChoice:
    """The joint decision of the auto disk settings for `model`, from config.yaml alone (the same
    answer at any point of a run; see the module docstring)."""
    return _resolve(json.dumps(config, sort_keys=True, default=str), model)


def model_chain_steps(config: Mapping, model: str, intermediate: str, results_dir: str = RESULTS_DIR) -> list[Step]:
    """Training (its checkpoints, the adapter) and the export chain of one model."""
    from loraforge.plan.sizing import base_dir_of

    d = f"{results_dir}/{model}"
    train = Step("train_adapter", model, outputs=[f"{d}/adapter", f"{d}/train/metrics.json"],
                 inputs=[base_dir_of(config, model, results_dir)])
    return [train, *export_chain_steps(config, model, intermediate, results_dir)]


def _with_settings(config: Mapping, model: str, intermediate: str, merge_mode: str, keep: int) -> dict:
    import copy

    cfg = copy.deepcopy(dict(config))
    cfg.setdefault("export", {})
    cfg["export"] = {**cfg["export"], "intermediate": intermediate, "merge_mode": merge_mode}
    models = cfg.setdefault("models", {})
    entry = models.setdefault(model, {})
    entry["train"] = {**(entry.get("train") or {}), "keep_checkpoints": keep}
    return cfg


def _candidates(config: Mapping, model: str) -> list[tuple[str, str, int]]:
    fixed = fixed_intermediate(config)
    intermediates = (fixed,) if fixed else (AUTO_16BIT, FALLBACK)
    merge = str((config.get("export") or {}).get("merge_mode", "auto"))
    users_base = "path" in ((((config.get("models") or {}).get(model) or {}).get("base")) or {})
    merges = (("link",) if users_base else ("link", "consume")) if merge == "auto" else (merge,)
    keep = _keep_setting(config, model)
    keeps = KEEP_CANDIDATES if keep == "auto" else (int(keep),)
    return [(i, m, k) for i in intermediates for m in merges for k in keeps]


def _words(intermediate: str, merge: str, keep: int) -> str:
    return f"{intermediate} intermediate, {merge} merge, {keep} training checkpoint{'s' if keep > 1 else ''}"


@functools.lru_cache(maxsize=64)
def _resolve(config_json: str, model: str) -> DiskChoice:
    """The first candidate that fits with the evaluation (quality.evaluate); when none does, the
    first that fits the export alone (the evaluation's run is then refused by its own plan, naming
    what would fit), so a large model still exports under the quota."""
    config = json.loads(config_json)
    evaluate = (config.get("quality") or {}).get("evaluate", True)
    choice = _first_fitting(config, model)
    if choice.fits or not evaluate:
        return choice
    export_only = _first_fitting({**config, "quality": {**(config.get("quality") or {}), "evaluate": False}}, model)
    if not export_only.fits:
        return choice
    return DiskChoice(export_only.intermediate, export_only.merge_mode, export_only.keep_checkpoints,
                      export_only.peak, f"{export_only.reason} (the export; with the evaluation no combination "
                                        f"fits: {choice.reason.split(': ', 1)[1]})")


def _first_fitting(config: dict, model: str) -> DiskChoice:
    from loraforge.plan.sizing import plan_steps

    quota = config.get("disk_quota")
    quota_bytes = parse_size(quota) if quota is not None else None
    candidates = _candidates(config, model)
    tried = []
    for intermediate, merge, keep in candidates:
        cfg = _with_settings(config, model, intermediate, merge, keep)
        plan = plan_steps(model_chain_steps(cfg, model, intermediate), cfg, quota=quota, free=None,
                          merge_mode=merge, measure=False)
        if any("sizes unknown" in n for n in plan.notes):
            i, m, k = candidates[-1]
            return DiskChoice(FALLBACK if len({c[0] for c in candidates}) > 1 else i, m, k, None,
                              "the model's size is unknown before the base is fetched (no `arch:` in config.yaml): "
                              "the lightest settings (Q8_0, the smallest intermediate)")
        if quota_bytes is None or plan.peak <= quota_bytes:
            where = "no disk_quota" if quota_bytes is None else f"within disk_quota {human(quota_bytes)}"
            over = f"; planned over it: {'; '.join(tried)}" if tried else ""
            return DiskChoice(intermediate, merge, keep, plan.peak,
                              f"{_words(intermediate, merge, keep)}: the model's chain peaks at {human(plan.peak)}, "
                              f"{where}{over}")
        tried.append(f"{_words(intermediate, merge, keep)} {human(plan.peak)}")
    return DiskChoice(intermediate, merge, keep, plan.peak,
                      f"no combination fits disk_quota {human(quota_bytes)}: the lightest, {tried[-1]}", fits=False)


def auto_notes(config: Mapping, models) -> list[str]:
    """`loraforge plan`'s line per model of the run: what the joint disk decision chose for the
    settings that are auto (export.intermediate, export.merge_mode, train.keep_checkpoints)."""
    notes = []
    for m in sorted(set(models)):
        if m not in (config.get("models") or {}):
            continue
        auto = [name for name, value in (
            ("export.intermediate", (config.get("export") or {}).get("intermediate", "auto")),
            ("export.merge_mode", (config.get("export") or {}).get("merge_mode", "auto")),
            ("train.keep_checkpoints", _keep_setting(config, m))) if value == "auto"]
        if "export.intermediate" in auto and fixed_intermediate(config) is not None:
            auto.remove("export.intermediate")
        if auto:
            c = resolve_disk_settings(config, m)
            notes.append(f"{', '.join(auto)} auto: {m}: {c.reason}")
    return notes


def fixed_intermediate(config: Mapping) -> str | None:
    """The intermediate when it is the same for every model: the one set, or under auto a type
    export.quants keeps; None when auto decides per model (F16 or Q8_0)."""
    export = config.get("export") or {}
    setting = str(export.get("intermediate", "auto"))
    if setting != "auto":
        return setting
    kept = [q for q in export.get("quants") or [] if q in KEPT_CANDIDATES]
    return kept[0] if kept else None


def candidate_intermediates(config: Mapping) -> tuple[str, ...]:
    """Every type an intermediate of this config can have (the rules' wildcard constraint)."""
    fixed = fixed_intermediate(config)
    return (fixed,) if fixed else (AUTO_16BIT, FALLBACK)
