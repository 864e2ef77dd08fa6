"""What runs in the Snakefile's onstart/onsuccess/onerror: after the DAG is built and before
any job (so nothing has been deleted yet), and after the run.

on_start
  1. adapter safety: an existing adapter that a train job would replace is archived first
     (moved, free on one filesystem), and a retrain whose settings did not change (a forced
     run, a touched file) needs an explicit `--config retrain=[MODEL]`;
  2. the disk plan of the jobs about to run, checked against disk_quota and the free space;
  3. a disk sampler that records what results/ and the base folders really use;
  4. in consume merge mode, the consumers file of every temp intermediate GGUF the run's
     quantize jobs read (`logs/{model}/release/{name}.json`: the outputs of all its
     consumers in this run, this process's pid, the start time): the job that finds every
     other consumer finished may free the intermediate while it quantizes it
     (`loraforge.gguf.release_decision`).
on_finish
  stops the sampler and writes the measured timeline (TSV + PNG) next to the plan; removes
  the consumers files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("loraforge")

TRAIN_RULE = "train_adapter"
QUANTIZE_RULE = "quantize_gguf"
RELEASE_DIRNAME = "release"
ARCHIVE_DIRNAME = "adapter-archive"
DISK_LOG_DIR = Path("logs") / "disk"

_state: dict = {}


class AdapterGuardError(RuntimeError):
    pass


def _say(message: str) -> None:
    # onstart runs inside Snakemake's process; print so it shows in the console and log
    print(f"[lora-forge] {message}", flush=True)


def _ancestors(dag, job, seen=None):
    seen = set() if seen is None else seen
    for dep in dag.dependencies[job]:
        if dep not in seen:
            seen.add(dep)
            _ancestors(dag, dep, seen)
    return seen


def _is_deliberate(dag, job, needrun) -> bool:
    """A retrain is deliberate when a setting changed: the train job's own params, or the
    params of a job upstream of it in this run (e.g. the data cap)."""
    if dag.reason(job).params_changed:
        return True
    return any(dag.reason(dep).params_changed for dep in _ancestors(dag, job) if dep in needrun)


def archive_adapter(adapter_dir: str | os.PathLike) -> Path:
    """Move an adapter folder into <model>/adapter-archive/<UTC time>/ and return the new path."""
    adapter_dir = Path(adapter_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(adapter_dir.stat().st_mtime))
    archive = adapter_dir.parent / ARCHIVE_DIRNAME / stamp
    n = 1
    while archive.exists():
        archive = adapter_dir.parent / ARCHIVE_DIRNAME / f"{stamp}-{n}"
        n += 1
    archive.parent.mkdir(parents=True, exist_ok=True)
    os.rename(adapter_dir, archive)
    return archive


def guard_adapters(dag, config) -> list[tuple[str, Path]]:
    """Refuse accidental retrains; archive every adapter a train job is about to replace."""
    needrun = set(dag.needrun_jobs())
    trains = [j for j in needrun if j.rule.name == TRAIN_RULE]
    opted_in = set(config.get("retrain", []))
    refused, to_archive = [], []
    for job in trains:
        model = job.wildcards.model
        adapter = Path(job.output.adapter)
        if not adapter.exists():
            continue
        if _is_deliberate(dag, job, needrun) or model in opted_in or "all" in opted_in:
            to_archive.append((model, adapter))
        else:
            reasons = ", ".join(dag.reason(job).get_names()) or "unknown"
            refused.append(f"  {model}: {adapter} would be retrained ({reasons})")
    if refused:
        raise AdapterGuardError(
            "refusing to retrain existing adapters whose settings did not change:\n"
            + "\n".join(refused)
            + "\nTo retrain anyway (the old adapter is archived, not deleted), add "
            "--config retrain=[MODEL,...] (or retrain=[all]). To keep the adapter and mark its "
            "inputs up to date instead: snakemake --touch <the adapter folder>."
        )
    archived = []
    for model, adapter in to_archive:
        dest = archive_adapter(adapter)
        _say(f"adapter of {model} archived to {dest} before retraining (restore: mv {dest} {adapter})")
        archived.append((model, dest))
    return archived


def release_manifest_path(model: str, intermediate: str | os.PathLike) -> Path:
    """The consumers file of an intermediate GGUF: logs/{model}/release/{file name}.json (not
    under results/: it is no artifact)."""
    return Path("logs") / str(model) / RELEASE_DIRNAME / (Path(intermediate).name + ".json")


def _notemp(workflow) -> bool:
    settings = getattr(workflow, "storage_settings", None)
    return bool(getattr(settings, "notemp", False))


def write_release_manifests(workflow, config) -> list[Path]:
    """Consume mode: for each temp intermediate GGUF read by quantize jobs of this run, the
    list of its consumers (their outputs), for the last of them to release it while it reads.

    Nothing is written (so nothing is released) for an intermediate that is not temp, that
    is a target, that a job of another rule also reads, or with --notemp."""
    export = dict(config.get("export") or {})
    if export.get("merge_mode") != "consume" or _notemp(workflow):
        return []
    dag = workflow.dag
    needrun = list(dag.needrun_jobs())
    targets = {os.path.normpath(str(f)) for f in getattr(dag, "targetfiles", set())}
    targets |= {os.path.normpath(str(f)) for f in getattr(dag, "derived_targetfiles", set())}
    readers: dict[str, list] = {}
    for job in needrun:
        for f in job.input:
            readers.setdefault(os.path.normpath(str(f)), []).append(job)
    written, started = [], time.time()
    seen: set[str] = set()
    for job in needrun:
        if job.rule.name != QUANTIZE_RULE or "gguf" not in job.input.keys():
            continue
        inter = os.path.normpath(str(job.input.gguf))
        if inter in seen:
            continue
        seen.add(inter)
        jobs = readers.get(inter, [])
        producer_temp = any(
            inter in {os.path.normpath(str(o)) for o in dep.temp_output}
            for dep, files in dag.dependencies[job].items()
            if inter in {os.path.normpath(str(x)) for x in files}
        )
        if not producer_temp or inter in targets or any(j.rule.name != QUANTIZE_RULE for j in jobs):
            continue
        model = job.wildcards_dict.get("model") or Path(inter).parent.name
        path = release_manifest_path(model, inter)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "intermediate": os.path.abspath(inter),
            "consumers": sorted(os.path.abspath(str(j.output.gguf)) for j in jobs),
            "pid": os.getpid(),
            "started": started,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)
        written.append(path)
        # a half-released copy left by a killed run: garbage (the intermediate is rebuilt)
        from loraforge.gguf import releasing_path

        stale = releasing_path(inter)
        if stale.exists():
            stale.unlink()
            _say(f"removed {stale}, left by an interrupted release")
    return written


def on_start(workflow, config, logfile=None) -> None:
    if getattr(workflow, "touch", False):
        return  # --touch only updates timestamps: nothing is trained, deleted or written
    dag = workflow.dag
    guard_adapters(dag, config)
    from loraforge import vram  # refuses a training job that would not fit the GPU, before any job runs

    vram.check_training(config, sorted({j.wildcards.model for j in dag.needrun_jobs() if j.rule.name == TRAIN_RULE}), say=_say)
    plan = None
    try:
        from loraforge import plan as planning
    except ImportError:  # pragma: no cover - plan module is optional at import time
        planning = None
    if planning is not None and hasattr(planning, "plan_from_dag"):
        plan = planning.plan_from_dag(dag, config)
        _say("disk plan of this run:\n" + planning.format_timeline(plan))
        planning.check_plan(plan, config)
    _state["manifests"] = write_release_manifests(workflow, config)
    _start_sampler(config, plan)


def _measured_paths(config) -> list[str]:
    paths = ["results"]
    for model in config["models"].values():
        base = model["base"]
        if "path" in base:
            paths.append(base["path"])
    return paths


def _start_sampler(config, plan) -> None:
    if os.environ.get("LORAFORGE_NO_DISK_SAMPLER"):
        return
    try:
        from loraforge.diskmon import DiskSampler
    except ImportError:  # pragma: no cover
        return
    DISK_LOG_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    tsv = DISK_LOG_DIR / f"{stamp}.tsv"
    sampler = DiskSampler(_measured_paths(config), tsv)
    sampler.start()
    _state.update(sampler=sampler, tsv=tsv, plan=plan)


def on_finish(workflow, config, logfile=None, success=True) -> None:
    for path in _state.pop("manifests", []):
        Path(path).unlink(missing_ok=True)
        try:
            Path(path).parent.rmdir()  # only when empty
        except OSError:
            pass
    sampler = _state.pop("sampler", None)
    if sampler is None:
        return
    sampler.stop()
    tsv, plan = _state.pop("tsv"), _state.pop("plan", None)
    from loraforge import diskmon

    planned = getattr(plan, "peak_bytes", None)
    png = tsv.with_suffix(".png")
    diskmon.plot_timeline(tsv, png, planned_peak=planned)
    measured = diskmon.peak(tsv)
    (DISK_LOG_DIR / "latest.tsv").unlink(missing_ok=True)
    os.symlink(tsv.name, DISK_LOG_DIR / "latest.tsv")
    tsv.with_suffix(".json").write_text(
        json.dumps({"success": success, "measured_peak_bytes": measured, "planned_peak_bytes": planned}, indent=2)
    )
    msg = f"measured peak disk {measured / 1e6:.1f} MB ({tsv}, {png})"
    if planned:
        msg += f"; planned {planned / 1e6:.1f} MB ({100 * (measured - planned) / planned:+.1f}%)"
    _say(msg)
