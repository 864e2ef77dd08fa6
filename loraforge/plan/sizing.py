"""The sizes a plan of a lora-forge run starts from: every path a step reads or writes,
measured when it exists, else estimated from the model's config (the conventions of
config.yaml and the rules), and `plan_steps`, which plans steps with them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from loraforge import data_sources
from loraforge import sizes as S
from loraforge.fileio import read_hf_config
from loraforge.plan.model import DEFAULT_ROLES, RESULTS_DIR, ModelLayout, Plan, Step, _norm
from loraforge.plan.simulate import Planner
from loraforge.sizes import human, parse_size

SMALL_FILE = 64 * 1024
# bench/requantize.py (docs/quality.md "Requantize from Q8_0, or quantize from 16-bit?")
REQUANTIZE_COST = ("mean KLD requantized/direct 0.98-1.02x on the tiny default, 1.00-1.07x on a longer-trained "
                   "tiny base (Q5_K_M 1.07x, Q6_K 1.06x); docs/quality.md \"Requantize from Q8_0, or quantize from 16-bit?\"")


def _model_cfg(config: Mapping, key: str) -> dict:
    return dict((config.get("models") or {}).get(key) or {})


def base_dir_of(config: Mapping, key: str, results_dir: str = RESULTS_DIR) -> str:
    base = _model_cfg(config, key).get("base")
    if isinstance(base, Mapping) and base.get("path"):
        return _norm(base["path"])
    if isinstance(base, str) and os.path.isdir(base):
        return _norm(base)
    return _norm(f"{results_dir}/{key}/base")


def hf_config_of(config: Mapping, key: str, base_dir: str) -> dict | None:
    """The model's HF config: base/config.json when it exists, else `arch:`, else the tiny
    architecture a `build:` base will get."""
    local = read_hf_config(base_dir)
    if local:
        return local
    return configured_hf_config(config, key)


def configured_hf_config(config: Mapping, key: str) -> dict | None:
    """The HF config config.yaml alone gives: `arch:`, else a `path:` base's own config.json (a
    user's folder: never changed by the workflow), else the tiny architecture of a `build:` base;
    None for a hub base without `arch:`. The same answer before and after any job runs."""
    m = _model_cfg(config, key)
    if m.get("arch"):
        return dict(m["arch"])
    base = m.get("base")
    if isinstance(base, Mapping) and base.get("path"):
        return read_hf_config(base["path"])
    if isinstance(base, Mapping) and base.get("build"):
        from loraforge.base import TINY_ARCHS

        arch = dict(TINY_ARCHS.get(base["build"], {}))
        if arch:
            tiny = config.get("tiny_base") or {}
            arch.update(vocab_size=int(tiny.get("vocab_size", 2048)), tie_word_embeddings=True, dtype="bfloat16")
            return arch
    return None


def _targets_of(config: Mapping, key: str, results_dir: str | None) -> set[str] | None:
    """The trained adapter's targets (its adapter_config.json), else config.yaml's (also when
    results_dir is None: config alone)."""
    adapter_cfg = Path(results_dir) / key / "adapter" / "adapter_config.json" if results_dir else None
    if adapter_cfg is not None and adapter_cfg.is_file():
        import json

        try:
            return S.adapter_targets(json.loads(adapter_cfg.read_text()))
        except ValueError:
            pass
    lora = {**((config.get("defaults") or {}).get("lora") or {}), **(_model_cfg(config, key).get("lora") or {})}
    tm = lora.get("target_modules")
    if tm:
        return S.adapter_targets({"target_modules": tm})
    return None


def _train_setting(config: Mapping, key: str, name: str, default: int) -> int:
    train = {**((config.get("defaults") or {}).get("train") or {}), **(_model_cfg(config, key).get("train") or {})}
    return int(train.get(name, default) or 0)


def _lora_rank(config: Mapping, key: str) -> int:
    lora = {**((config.get("defaults") or {}).get("lora") or {}), **(_model_cfg(config, key).get("lora") or {})}
    return int(lora.get("r", 16))


@dataclass
class RunInputs:
    sizes: dict[str, int]
    existing: dict[str, int]
    layouts: dict[str, ModelLayout]
    background: int
    merge_mode: str
    notes: list[str]
    # adapter path -> (bytes of one training checkpoint, checkpoints kept): train_adapter holds
    # keep + 1 of them at once while it runs, removed once the adapter is in place
    checkpoints: dict[str, tuple[int, int]] = field(default_factory=dict)


def gather_sizes(steps: list[Step], config: Mapping, results_dir: str = RESULTS_DIR,
                 measure: bool = True) -> RunInputs:
    """Sizes of every path the steps touch (measured when it exists, estimated from the
    model config otherwise), the model layouts, and the bytes already under results/.
    Paths are relative to the current directory (the workflow's workdir).

    measure=False: estimated from config.yaml alone (`configured_hf_config`), nothing on disk
    read, nothing else under results/; every input no step writes is taken as present before
    the run. The same answer at any point of a run (export.intermediate auto decides with it)."""
    export = dict(config.get("export") or {})
    merge_mode = str(export.get("merge_mode", "link"))
    intermediate = str(export.get("intermediate", "Q8_0"))
    notes: list[str] = []
    models = sorted({s.model for s in steps if s.model})
    layouts: dict[str, ModelLayout] = {}
    archs: dict[str, S.Arch | None] = {}
    seen: set = set()
    existing: dict[str, int] = {}

    # base folders first, so hard links in merged/ count for the base
    for key in models:
        base = base_dir_of(config, key, results_dir)
        for s in steps:  # the merge's input is authoritative when the rules name it
            if s.model == key and DEFAULT_ROLES.get(s.rule) == "merge":
                cand = [p for p in s.inputs if os.path.basename(p) == "base" or p == base]
                if cand:
                    base = cand[0]
        hf = hf_config_of(config, key, base) if measure else configured_hf_config(config, key)
        try:
            arch = S.arch_from_config(hf) if hf else None
        except ValueError as e:
            notes.append(f"{key}: {e}; its sizes are unknown (0)")
            arch = None
        archs[key] = arch
        targets = _targets_of(config, key, results_dir if measure else None)
        shards = S.read_base_shards(base, targets) if measure else None
        if shards is not None:
            total, _ = S.measure([base], seen)
            existing[base] = total
            other = max(0, total - sum(sh.bytes for sh in shards))
        elif arch is not None:
            max_shard = 2_000_000 if (isinstance(_model_cfg(config, key).get("base"), Mapping)
                                      and _model_cfg(config, key)["base"].get("build")) else S.DEFAULT_SHARD_BYTES
            shards, other = S.model_folder_bytes(arch, max_shard)
            for sh in shards:
                sh.targeted = True  # no index to read yet: assume every shard is rewritten
        else:
            shards, other = [], 0
            notes.append(f"{key}: no config.json and no `arch:` in config.yaml; sizes unknown (0)"
                         if measure else f"{key}: no `arch:` in config.yaml; sizes unknown (0)")
        gguf: dict[str, int] = {}
        meta = 0
        if arch is not None:
            wanted = {intermediate, "Q8_0", "F16", "BF16", *map(str, export.get("quants") or [])}
            for t in wanted:
                try:
                    gguf[S.ftype_name(t)] = S.gguf_bytes(arch, t)
                except ValueError:
                    pass
            meta = S.gguf_metadata_bytes(arch)
        layouts[key] = ModelLayout(key, base, shards, other, gguf, meta, arch)

    sizes: dict[str, int] = {}
    sample_bytes = data_sources.sample_bytes(config)
    all_paths = list(dict.fromkeys(p for s in steps for p in [*s.outputs, *s.inputs]))
    for s in steps:
        for p in s.outputs:
            if p in sizes:
                continue
            L = layouts.get(s.model or "")
            arch = archs.get(s.model or "")
            sizes[p] = _estimate(p, s, L, arch, config, sample_bytes, results_dir if measure else None)
    if not measure:
        written = {p for s in steps for p in s.outputs}
        for s in steps:
            for p in s.inputs:
                if p not in written and p not in existing:
                    L = layouts.get(s.model or "")
                    existing[p] = sizes[p] = _estimate(p, s, L, archs.get(s.model or ""), config, sample_bytes, None)
        return RunInputs(sizes, existing, layouts, 0, merge_mode, notes,
                         _training_checkpoints(steps, config, archs, None))
    for p in all_paths:
        if p in existing:
            sizes[p] = existing[p]
            continue
        if os.path.lexists(p):
            total, _ = S.measure([p], seen)
            existing[p] = total
            sizes[p] = total
    total_results, _ = S.measure([results_dir], seen)  # what no step touches
    return RunInputs(sizes, existing, layouts, total_results, merge_mode, notes,
                     _training_checkpoints(steps, config, archs, results_dir))


def _training_checkpoints(steps: list[Step], config: Mapping, archs: Mapping, results_dir: str | None) -> dict[str, tuple[int, int]]:
    """train_adapter's checkpoints (every train.save_steps, train.keep_checkpoints kept, deleted
    once the adapter is in place), by adapter path: for the 30B MoE (a ~4 GiB fp32 adapter) one
    checkpoint is ~11 GiB and three exist at once with the default keep of 2."""
    from loraforge.plan.intermediate import resolve_keep_checkpoints

    found = {}
    for s in steps:
        key, arch = s.model or "", archs.get(s.model or "")
        if s.rule != "train_adapter" or arch is None or not _train_setting(config, key, "save_steps", 0):
            continue
        adapter = next((p for p in s.outputs if os.path.basename(p) == "adapter"), None)
        if adapter:
            fp32 = S.lora_adapter_bytes(arch, _lora_rank(config, key), _targets_of(config, key, results_dir))
            found[adapter] = (S.training_checkpoint_bytes(fp32), resolve_keep_checkpoints(config, key))
    return found


REFERENCE_LOGITS = "reference.logits"  # rules/quality.smk: results/{model}/eval/reference.logits (temp)


def reference_logits_bytes(config: Mapping, vocab: int) -> int:
    """The reference logits file at its bound (quality.chunks chunks of quality.ctx tokens)."""
    from loraforge.quality import logits_file_bytes

    q = config.get("quality") or {}
    return logits_file_bytes(int(q.get("ctx", 256)), int(q.get("chunks", 32)), int(vocab))


def _estimate(path: str, step: Step, L: ModelLayout | None, arch, config, sample_bytes: int,
              results_dir: str | None) -> int:
    name = os.path.basename(path)
    if L is not None:
        if _norm(path) == L.base_dir or name == "base":
            return L.base_bytes
        if name == "merged":
            return L.merged_bytes("copy")
        if name == "adapter.gguf" and arch is not None:  # the LoRA GGUF (convert_adapter_gguf: f16)
            return S.lora_adapter_bytes(arch, _lora_rank(config, step.model or ""),
                                        _targets_of(config, step.model or "", results_dir), dtype="float16")
        if name.endswith(".gguf"):
            # eval/reference-F16.gguf, eval/base-Q8_0.gguf (the evaluation), base.Q5_K_M.gguf (the
            # adapter-only path): the un-fine-tuned base's GGUFs have the merged ones' size
            t = name[: -len(".gguf")].removeprefix("base.").rsplit("-", 1)[-1]
            try:
                t = S.ftype_name(t)
            except ValueError:
                return 0
            if t not in L.gguf and arch is not None:
                L.gguf[t] = S.gguf_bytes(arch, t)
            return L.gguf.get(t, 0)
    if name == REFERENCE_LOGITS and arch is not None:
        return reference_logits_bytes(config, arch.vocab_size)
    if name == "adapter" and arch is not None:
        return S.lora_adapter_bytes(arch, _lora_rank(config, step.model or ""),
                                    _targets_of(config, step.model or "", results_dir))
    if name in ("train.jsonl",):
        return int(sample_bytes * 1.2)
    if name in ("validation.jsonl",):
        return int(sample_bytes * 0.2)
    return SMALL_FILE


def plan_steps(steps: list[Step], config: Mapping, workdir: str | os.PathLike | None = None,
               quota: int | str | None = None, free: int | None = None,
               merge_mode: str | None = None, results_dir: str = RESULTS_DIR, measure: bool = True) -> Plan:
    """Plan `steps` of a lora-forge run with sizes from `config` (files relative to workdir).
    measure=False: from config.yaml alone (gather_sizes), and free space only when given."""
    cwd = os.getcwd()
    if workdir is not None:
        os.chdir(workdir)
    try:
        ri = gather_sizes(steps, config, results_dir, measure=measure)
        free_now = free
        if free_now is None and measure:
            probe = results_dir if os.path.isdir(results_dir) else "."
            free_now = shutil.disk_usage(probe).free
    finally:
        os.chdir(cwd)
    if quota is None and config.get("disk_quota") is not None:
        quota = config["disk_quota"]
    quota_bytes = parse_size(quota) if quota is not None else None
    users_bases = {m for m, cfg in (config.get("models") or {}).items() if "path" in (cfg.get("base") or {})}
    # llama-quantize --imatrix (export.imatrix) reads its input whole: no release in consume mode
    imatrix = bool(((config.get("export") or {}).get("imatrix") or {}).get("enabled"))
    planner = Planner(steps, ri.sizes, ri.existing, "link", ri.layouts, results_dir,
                      release_in_quantize=False if imatrix else None, comparison_quants=imatrix,
                      background=max(0, ri.background),
                      consumable=not any(s.model in users_bases for s in steps), checkpoints=ri.checkpoints)
    mode = merge_mode or ri.merge_mode
    if mode == "auto":
        plan, reason = _choose_merge_mode(planner, quota_bytes, free_now)
        plan.notes.append(f"export.merge_mode auto: {plan.merge_mode} ({reason})")
    else:
        plan = planner.replace(merge_mode=mode).plan()
    plan.quota = quota_bytes  # the one place the quota is read: `quota`, else the config's disk_quota
    plan.free = free_now
    plan.notes.extend(ri.notes)
    if measure:  # (the auto decision itself plans with measure=False)
        from loraforge.plan.intermediate import auto_notes

        plan.notes.extend(auto_notes(config, {s.model for s in steps if s.model and DEFAULT_ROLES.get(s.rule) == "convert"}))
    source_note = quantize_source_note(plan, quota_bytes, free_now)
    if source_note:
        plan.notes.append(source_note)
    plan.config = config  # for the VRAM plan of the training jobs (loraforge.vram)
    return plan


def quantize_source_note(plan: Plan, quota: int | None, free: int | None) -> str | None:
    """When the run requantizes K-quants from a Q8_0 intermediate: whether quantizing from 16-bit
    (export.intermediate: F16) would fit this run's disk, measured cost included (docs/quality.md,
    "Requantize from Q8_0, or quantize from 16-bit?")."""
    from loraforge.plan.fit import fits

    planner = plan.planner
    if planner is None or not planner.quant_steps():
        return None
    if set(planner.intermediates().values()) != {"Q8_0"}:
        return None
    f16 = planner.with_intermediate("F16").replace(merge_mode=plan.merge_mode).plan()
    verdict = "fits" if fits(f16, quota, free) else "does not fit"
    return (f"export.intermediate Q8_0: the K-quants are requantized from Q8_0 (measured: "
            f"{REQUANTIZE_COST}); export.intermediate: F16 would quantize from 16-bit and peak at "
            f"{human(f16.peak)}: it {verdict}")


def _choose_merge_mode(planner: Planner, quota: int | None, free: int | None) -> tuple[Plan, str]:
    """export.merge_mode auto: link when it fits, else consume when that fits and every base
    of the run is the workflow's own; else link (the check then names what would fit)."""
    from loraforge.plan.fit import fits

    link = planner.replace(merge_mode="link").plan()
    if fits(link, quota, free):
        return link, "link fits"
    if not planner.consumable:
        return link, "link does not fit, and a user's own base folder is never consumed"
    consume = planner.replace(merge_mode="consume").plan()
    if fits(consume, quota, free):
        return consume, f"link would peak at {human(link.peak)}, consume peaks at {human(consume.peak)} and fits"
    return link, "neither link nor consume fits"
