"""`export.intermediate: auto` (the default): quantize from 16-bit when the disk allows it.

Requantizing the K-quants from a Q8_0 intermediate (the article's choice: the smallest one on
disk) costs measurable quality once a model is trained: 6-7% more mean KL divergence for
Q5_K_M and Q6_K on the longer-trained tiny base (README "Requantize from Q8_0, or quantize from
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
    """The intermediate GGUF type of `model`: export.intermediate when set, else (auto) F16
    when the export chain planned from config.yaml fits disk_quota, else Q8_0. A type that
    export.quants keeps is the intermediate itself (no second conversion)."""
    return _resolve(json.dumps(config, sort_keys=True, default=str), model)


@functools.lru_cache(maxsize=64)
def _resolve(config_json: str, model: str) -> IntermediateChoice:
    config = json.loads(config_json)
    fixed = fixed_intermediate(config)
    if fixed is not None:
        if str((config.get("export") or {}).get("intermediate", "auto")) != "auto":
            return IntermediateChoice(fixed, "export.intermediate")
        return IntermediateChoice(fixed, f"{fixed} is one of export.quants: the kept GGUF is the intermediate")
    quota = config.get("disk_quota")
    from loraforge.plan.sizing import plan_steps

    plan = plan_steps(export_chain_steps(config, model, AUTO_16BIT), config, quota=quota, free=None, measure=False)
    if any("sizes unknown" in n for n in plan.notes):
        return IntermediateChoice(FALLBACK, "the model's size is unknown before the base is fetched (no `arch:` "
                                            "in config.yaml): Q8_0, the smallest intermediate")
    if quota is None:
        return IntermediateChoice(AUTO_16BIT, "no disk_quota", plan.peak)
    quota_bytes = parse_size(quota)
    chain = f"the export from {AUTO_16BIT} peaks at {human(plan.peak)} ({plan.merge_mode} merge)"
    if plan.peak <= quota_bytes:
        return IntermediateChoice(AUTO_16BIT, f"{chain}, within disk_quota {human(quota_bytes)}: "
                                              f"the K-quants are quantized from 16-bit", plan.peak)
    return IntermediateChoice(FALLBACK, f"{chain}, over disk_quota {human(quota_bytes)}: the K-quants are "
                                        f"requantized from Q8_0", plan.peak)


def auto_notes(config: Mapping, models) -> list[str]:
    """`loraforge plan`'s line per model of the run whose intermediate auto chose."""
    if str((config.get("export") or {}).get("intermediate", "auto")) != "auto":
        return []
    notes = []
    for m in sorted(set(models)):
        if m in (config.get("models") or {}):
            c = resolve_intermediate(config, m)
            notes.append(f"export.intermediate auto: {m} {c.ftype} ({c.reason})")
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
