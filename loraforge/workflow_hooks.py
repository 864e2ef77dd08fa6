"""What runs in the Snakefile's onstart/onsuccess/onerror: after the DAG is built and before
any job (so nothing has been deleted yet), and after the run.

on_start
  1. adapter safety: an existing adapter that a train job would replace is archived first
     (moved, free on one filesystem), and a retrain whose settings did not change (a forced
     run, a touched file) needs an explicit `--config retrain=[MODEL]`. A train job whose only
     reason is its base being built or fetched again (a consume-mode merge used the weights up)
     puts the adapter on hold instead: the job keeps it when the base comes back with the same
     weights and retrains (the old adapter archived) when it does not;
  2. the disk plan of the jobs about to run, checked against disk_quota and the free space;
  3. a disk sampler that records what results/ and the base folders really use;
  4. in consume merge mode, the consumers file of every temp intermediate GGUF the run's
     quantize jobs read (`logs/{model}/release/{name}.json`: the outputs of all its
     consumers in this run, this process's pid, the start time): the job that finds every
     other consumer finished may free the intermediate while it quantizes it
     (`loraforge.gguf.release_decision`).
on_finish
  stops the sampler and writes the measured timeline (TSV + PNG) next to the plan; removes
  the consumers files; after a successful run writes results/summary.html.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import sys
import time
from pathlib import Path

from loraforge import merge_mode, snakemake_bridge
from loraforge.errors import UserError
from loraforge.fileio import write_json_atomic

log = logging.getLogger("loraforge")

TRAIN_RULE = "train_adapter"
BASE_RULES = ("build_tiny_base", "fetch_base")
ON_HOLD_NOTE = "adapter-on-hold.json"  # <model>/train/: the archive the train job keeps or retrains
QUANTIZE_RULE = "quantize_gguf"
RELEASE_DIRNAME = "release"
ARCHIVE_DIRNAME = "adapter-archive"
ARCHIVED_ADAPTER = "adapter"  # <model>/adapter-archive/<time>/adapter/
ARCHIVED_REPORTS = "train"  # <model>/adapter-archive/<time>/train/{metrics.json,loss.csv,loss.png}
REPORT_OUTPUTS = ("metrics", "loss_csv", "loss_png")  # named outputs of the train rule
REPORT_FILES = ("metrics.json", "loss.csv", "loss.png")  # their file names, in <model>/train/
DISK_LOG_DIR = Path("logs") / "disk"

_state: dict = {}


class AdapterGuardError(UserError, RuntimeError):
    pass


def _train_refusals() -> tuple[type, ...]:
    """The refusals of the run's checks that concern the training jobs."""
    from loraforge.lora_targets import TargetModulesError
    from loraforge.vram import VramError

    return (AdapterGuardError, TargetModulesError, VramError)


def _say(message: str) -> None:
    # onstart runs inside Snakemake's process; print so it shows in the console and log
    print(f"[lora-forge] {message}", flush=True)


def archive_adapter(adapter_dir: str | os.PathLike, reports: list[str | os.PathLike] = ()) -> Path:
    """Move an adapter folder to <model>/adapter-archive/<UTC time>/adapter/ and its training
    reports (metrics.json, loss.csv, loss.png) to .../train/; return the archive folder.
    `loraforge restore-adapter <archive>` puts both back."""
    adapter_dir = Path(adapter_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(adapter_dir.stat().st_mtime))
    archive = adapter_dir.parent / ARCHIVE_DIRNAME / stamp
    n = 1
    while archive.exists():
        archive = adapter_dir.parent / ARCHIVE_DIRNAME / f"{stamp}-{n}"
        n += 1
    archive.mkdir(parents=True)
    os.rename(adapter_dir, archive / ARCHIVED_ADAPTER)
    for report in map(Path, reports):
        if report.exists():
            (archive / ARCHIVED_REPORTS).mkdir(exist_ok=True)
            os.rename(report, archive / ARCHIVED_REPORTS / report.name)
    return archive


def archived_adapter_problem(adapter: Path) -> str | None:
    """Why an archived adapter folder cannot be restored as it is (a file missing, unreadable or
    cut short), or None: PEFT needs both adapter_config.json and adapter_model.safetensors."""
    from loraforge.merge.common import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
    from loraforge.safetensors_io import SafetensorsFormatError, read_header

    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
        if not (adapter / name).is_file():
            return f"{adapter / name} is missing: the archive is incomplete"
    try:
        json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        return f"{adapter / ADAPTER_CONFIG_NAME}: not valid JSON ({e})"
    try:
        read_header(str(adapter / ADAPTER_WEIGHTS_NAME))
    except (OSError, SafetensorsFormatError) as e:
        return str(e)
    return None


def _set_aside_reports(train_dir: Path, archived_reports: Path) -> list[tuple[Path, Path]]:
    """Move the training reports in `train_dir` that are not the archive's own (those of another
    adapter: one moved away by hand, or deleted) to train/replaced-by-restore-<UTC time>/, so
    restoring never overwrites a report it did not archive. Returns (from, to) pairs."""
    archived = {f.name: f for f in archived_reports.iterdir()} if archived_reports.is_dir() else {}
    names = sorted(set(archived) | set(REPORT_FILES))
    aside = train_dir / f"replaced-by-restore-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    moved = []
    for name in names:
        current = train_dir / name
        if not current.is_file() or (name in archived and filecmp.cmp(current, archived[name], shallow=False)):
            continue  # nothing there, or the very report being restored
        aside.mkdir(exist_ok=True)
        os.rename(current, aside / name)
        moved.append((current, aside / name))
    return moved


def restore_adapter(archive: str | os.PathLike, archive_current: bool = False) -> tuple[Path, list[Path], list[str]]:
    """Put an archived adapter (and its reports) back: <model>/adapter-archive/<time> ->
    <model>/adapter and <model>/train/. Returns (adapter, restored reports, what else was done).

    Refuses an incomplete archive, and an existing adapter unless `archive_current` (then that one
    is archived with its reports first, as a retrain does). Reports in train/ that are not the
    archive's are set aside (`_set_aside_reports`), never overwritten."""
    archive = Path(archive)
    model_dir = archive.parent.parent
    source = archive / ARCHIVED_ADAPTER
    if archive.parent.name != ARCHIVE_DIRNAME or not source.is_dir():
        raise AdapterGuardError(f"{archive}: not an adapter archive (expected <model>/{ARCHIVE_DIRNAME}/<time>/{ARCHIVED_ADAPTER}/)")
    problem = archived_adapter_problem(source)
    if problem is not None:
        raise AdapterGuardError(f"{problem}; nothing was restored")
    target, train_dir, done = model_dir / "adapter", model_dir / "train", []
    if target.exists() and not archive_current:
        raise AdapterGuardError(
            f"{target} exists: keep it in the archive with its reports and restore in one go with "
            f"`loraforge restore-adapter --archive-current {archive}`, or delete it first")
    if target.exists():
        kept = archive_adapter(target, [train_dir / name for name in REPORT_FILES])
        done.append(f"archived the current adapter and its reports to {kept}")
    train_dir.mkdir(exist_ok=True)
    done += [f"set aside {src} (not this archive's) as {dst}" for src, dst in
             _set_aside_reports(train_dir, archive / ARCHIVED_REPORTS)]
    reports = []
    if (archive / ARCHIVED_REPORTS).is_dir():
        for f in sorted((archive / ARCHIVED_REPORTS).iterdir()):
            os.replace(f, train_dir / f.name)
            reports.append(train_dir / f.name)
    os.rename(source, target)
    return target, reports, done


def _settings_field(config, model: str, section: str, key: str) -> str:
    own = (config["models"][model].get(section) or {})
    return f"models.{model}.{section}.{key}" if key in own else f"defaults.{section}.{key}"


def check_train_targets(trains, config) -> None:
    """lora.target_modules typos fail before anything is archived or trained."""
    from loraforge import training_record
    from loraforge.config import model_settings
    from loraforge.lora_targets import check_target_modules

    for job in trains:
        model = job.wildcards["model"]
        check_target_modules(
            model_settings(config, model)["lora"]["target_modules"],
            training_record.base_dir(config, model),
            field=_settings_field(config, model, "lora", "target_modules"),
        )


def _retrain_decision(job, config, base_rebuilt: bool = False) -> tuple[bool, str]:
    """(deliberate, why). Judged against the settings recorded in the adapter when it was
    trained; adapters from before that record fall back to Snakemake's params comparison. While
    this run builds or fetches the base again, its weights are not known yet: the base counts by
    its declaration (build settings, hub repo and revision)."""
    from loraforge import training_record

    recorded = training_record.read(job.output["adapter"])
    if recorded is None:
        return job.settings_changed, "settings changed (Snakemake params)" if job.settings_changed else job.reasons
    current = training_record.current_settings(config, job.wildcards["model"], with_base=not base_rebuilt)
    diff = training_record.changes(recorded, current)
    return (True, "; ".join(diff)) if diff else (False, job.reasons)


def _only_for_the_base(job, config) -> bool:
    """The train job runs only because the base it reads is built or fetched again."""
    from loraforge import training_record

    model = job.wildcards["model"]
    base = os.path.normpath(training_record.base_dir(config, model))
    return job.rerun_for is not None and job.rerun_for <= {base, base + ".complete"}


def _note_path(job) -> Path:
    return Path(job.output["metrics"]).parent / ON_HOLD_NOTE


def settle_adapter_on_hold(out_dir: str | os.PathLike, record: dict) -> Path | None:
    """In the train job: an adapter the guard put on hold (the base was being built or fetched
    again) is restored when its record matches today's settings and the base's weights as they
    came back; returns the adapter then (nothing to train). Otherwise None: train (the old adapter
    stays archived)."""
    from loraforge import training_record

    note = Path(out_dir) / ON_HOLD_NOTE
    try:
        held = Path(json.loads(note.read_text())["archive"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    note.unlink()
    old = training_record.read(held / ARCHIVED_ADAPTER)
    diff = training_record.changes(old, record) if old is not None else ["no training record"]
    if diff:
        log.warning("retraining: %s (the adapter trained before stays in %s)", "; ".join(diff), held)
        return None
    adapter, _, _ = restore_adapter(held)
    for folder in (held / ARCHIVED_REPORTS, held, held.parent):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    log.info("the base came back with the weights %s was trained on: adapter kept, nothing to train", adapter)
    return adapter


def guard_adapters(workflow, config) -> list[tuple[str, Path]]:
    """Refuse accidental retrains; archive every adapter a train job of this run is about to replace."""
    pending = snakemake_bridge.pending_jobs(workflow.dag)
    rebuilt = {j.wildcards.get("model") for j in pending if j.rule in BASE_RULES}
    return guard_train_jobs([j for j in pending if j.rule == TRAIN_RULE], config, rebuilt)


def guard_train_jobs(trains: list[snakemake_bridge.PendingJob], config,
                     rebuilt: set[str] | frozenset = frozenset()) -> list[tuple[str, Path]]:
    """guard_adapters on these pending train jobs (`rebuilt`: the models whose base this run builds
    or fetches again): AdapterGuardError naming the way to keep each adapter whose settings did not
    change (unless --config retrain opts in), else archive every adapter that will be replaced, with
    its reports. Returns (model, archive) pairs."""
    check_train_targets(trains, config)
    opted_in = set(config.get("retrain", []))
    refused, to_archive, on_hold = [], [], []
    for job in trains:
        model = job.wildcards["model"]
        adapter = Path(job.output["adapter"])
        if not adapter.exists():
            continue
        if model in opted_in or "all" in opted_in:
            to_archive.append((model, job, "--config retrain"))
            continue
        deliberate, why = _retrain_decision(job, config, base_rebuilt=model in rebuilt)
        if deliberate:
            to_archive.append((model, job, why))
        elif model in rebuilt and _only_for_the_base(job, config):
            on_hold.append((model, job))
        else:
            reports = " ".join(job.output[k] for k in REPORT_OUTPUTS if k in job.output)
            refused.append(
                f"  {model}: {adapter} was trained with today's settings, but Snakemake would retrain it ({why}).\n"
                f"    keep it: snakemake --cores 1 --touch {adapter} {reports}"
            )
    if refused:
        raise AdapterGuardError(
            "refusing to retrain existing adapters whose settings did not change:\n"
            + "\n".join(refused)
            + "\nTo retrain anyway (the old adapter is archived, not deleted), add "
            "--config retrain=[MODEL,...] (or retrain=[all]). `--touch` marks the adapter and its "
            "reports up to date (it trains nothing); if a report is missing, restore the adapter from "
            "its archive with `loraforge restore-adapter <archive>` first."
        )
    archived = []
    for model, job, why in to_archive:
        reports = [job.output[k] for k in REPORT_OUTPUTS if k in job.output]
        _note_path(job).unlink(missing_ok=True)  # a hold of an earlier run no longer applies
        dest = archive_adapter(job.output["adapter"], reports)
        _say(
            f"adapter of {model} archived to {dest} before retraining ({why}); "
            f"restore: loraforge restore-adapter {dest}"
        )
        archived.append((model, dest))
    for model, job in on_hold:
        dest = archive_adapter(job.output["adapter"], [job.output[k] for k in REPORT_OUTPUTS if k in job.output])
        write_json_atomic(_note_path(job), {"archive": str(dest)})
        _say(
            f"the base of {model} is built or fetched again: its adapter waits in {dest} and is kept if the "
            "base comes back with the weights it was trained on (retrained, the old one staying archived, if not)"
        )
        archived.append((model, dest))
    return archived


def release_manifest_path(model: str, intermediate: str | os.PathLike) -> Path:
    """The consumers file of an intermediate GGUF: logs/{model}/release/{file name}.json (not
    under results/: it is no artifact)."""
    return Path("logs") / str(model) / RELEASE_DIRNAME / (Path(intermediate).name + ".json")


def write_release_manifests(workflow, config) -> list[Path]:
    """Consume mode: for each temp intermediate GGUF read by quantize jobs of this run, the
    list of its consumers (their outputs), for the last of them to release it while it reads.

    Nothing is written (so nothing is released) for an intermediate that is not temp, that
    is a target, that a job of another rule also reads, or with --notemp."""
    setting = (config.get("export") or {}).get("merge_mode", "auto")
    if setting not in ("consume", "auto") or snakemake_bridge.keeps_temp_files(workflow):
        return []
    steps = snakemake_bridge.steps_from_dag(workflow.dag)
    temp = set().union(*(s.temp_outputs | s.temp_inputs for s in steps)) if steps else set()
    readers: dict[str, list] = {}
    for step in steps:
        for f in step.inputs:
            readers.setdefault(os.path.normpath(f), []).append(step)
    written, started = [], time.time()
    seen: set[str] = set()
    for step in steps:
        if step.rule != QUANTIZE_RULE:
            continue
        for inter in (os.path.normpath(f) for f in step.inputs if f.endswith(".gguf")):
            if inter in seen:
                continue
            seen.add(inter)
            jobs = readers[inter]
            if inter not in temp or any(j.rule != QUANTIZE_RULE for j in jobs):
                continue
            model = step.model or Path(inter).parent.name
            users = model in config.get("models", {}) and merge_mode.base_is_users(config, model)
            if merge_mode.effective_mode(setting, users) != "consume":
                continue
            path = release_manifest_path(model, inter)
            path.parent.mkdir(parents=True, exist_ok=True)
            info = {
                "intermediate": os.path.abspath(inter),
                "consumers": sorted(os.path.abspath(o) for j in jobs for o in j.outputs if o.endswith(".gguf")),
                "pid": os.getpid(),
                "started": started,
            }
            write_json_atomic(path, info)
            written.append(path)
            # a half-released copy left by a killed run: garbage (the intermediate is rebuilt)
            from loraforge.gguf import releasing_path

            stale = releasing_path(inter)
            if stale.exists():
                stale.unlink()
                _say(f"removed {stale}, left by an interrupted release")
    return written


def on_start(workflow, config, logfile=None) -> None:
    """_on_start; a refusal the user can act on (UserError: the adapter guard, a target typo, a
    GPU too small, the disk plan) ends the run with its message and exit status 1, as a failed
    rule does (loraforge.rulelog), not with Snakemake's traceback of the hook."""
    from loraforge.vram import VramError  # a refusal too, though no UserError

    try:
        _on_start(workflow, config)
    except (UserError, VramError) as e:
        where = f"rule {TRAIN_RULE}" if isinstance(e, _train_refusals()) else "the run's checks (no job started)"
        print(f"[lora-forge] error in {where}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None  # Snakemake's lock is released on the way out


def _on_start(workflow, config) -> None:
    if snakemake_bridge.is_touch_run(workflow):
        return  # --touch only updates timestamps: nothing is trained, deleted or written
    from loraforge import plan as planning
    from loraforge import vram

    # checks that refuse a run come before anything is archived: the GPU is too small...
    trains = snakemake_bridge.pending_jobs(workflow.dag, rule=TRAIN_RULE)
    vram.check_training(config, sorted({j.wildcards["model"] for j in trains}), say=_say)
    guard_adapters(workflow, config)  # ...or lora.target_modules has a typo (checked first in there)
    plan = snakemake_bridge.plan_from_dag(workflow.dag, config)
    _say("disk plan of this run:\n" + planning.format_timeline(plan))
    try:
        planning.check(plan)  # against the plan's quota (disk_quota) and the free space
    except planning.PlanError as e:
        if config.get("disk_check", "abort") != "warn":
            raise
        _say(f"WARNING (disk_check: warn, going on): {e}")
    if (config.get("export") or {}).get("merge_mode") == "auto":
        reason = next((n.split(": ", 1)[1] for n in plan.notes if n.startswith("export.merge_mode auto")), "")
        merge_mode.write_decision(plan.merge_mode, reason)
        _say(f"export.merge_mode auto: this run merges in {plan.merge_mode} mode ({reason})")
    _state["manifests"] = write_release_manifests(workflow, config)
    _state["ran_jobs"] = True  # not a --touch run: the summary page is written at the end
    _start_sampler(config, plan)


def dry_run_summary(workflow, config) -> str:
    """The one line a dry run ends with (onstart does not run under -n): the run's planned peak
    disk against disk_quota and the free space, and each training job's planned GPU memory
    against the GPU, or why either could not be planned."""
    from loraforge import plan as planning
    from loraforge import vram
    from loraforge.sizes import human

    try:
        plan = snakemake_bridge.plan_from_dag(workflow.dag, config)
        quota = f"disk_quota {human(plan.quota)}" if plan.quota is not None else "no disk_quota"
        verdict = "fits" if planning.fits(plan, plan.quota, plan.free) else "does NOT fit: loraforge plan says what would"
        free = f", {human(plan.free)} free" if plan.free is not None else ""
        disk = f"peak disk {human(plan.peak)} of {quota}{free} ({verdict})"
    except Exception as e:  # a plan that cannot be made is reported, never raised, in a preview
        disk = f"disk not planned ({type(e).__name__}: {e})"
    parts = [disk]
    try:
        models = sorted({j.wildcards["model"] for j in snakemake_bridge.pending_jobs(workflow.dag, rule=TRAIN_RULE)})
        for key, plan, _backend in vram.plan_training(config, models):
            if plan is None:
                parts.append(f"VRAM of {key} not planned (no config.json or arch: for its base)")
                continue
            limit, source = vram.gpu_memory_limit(config, plan.gpus)
            against = f" of {limit / vram.GIB:.1f} GiB ({source})" if limit else f" ({source})"
            parts.append(f"VRAM {key} {plan.total_gib:.1f} GiB{against}")
    except Exception as e:
        parts.append(f"VRAM not planned ({type(e).__name__}: {e})")
    return "[lora-forge] dry run: " + "; ".join(parts)


def announce_dry_run_plan(workflow, config) -> None:
    """Under `snakemake -n` (from its command line): the plan is made from the DAG when Snakemake
    first counts its jobs (DAG.stats, before the dry run marks them done) and printed as
    dry_run_summary's one line when the process exits."""
    args = snakemake_bridge.command_line_arguments()
    if args is None or not getattr(args, "dryrun", False):
        return
    import atexit

    from snakemake.dag import DAG

    line: list[str] = []
    stats = DAG.stats

    def stats_then_plan(dag, *a, **kw):
        if not line and dag is getattr(workflow, "dag", None):
            try:
                line.append(dry_run_summary(workflow, config))
            except Exception as e:  # a preview never fails for its summary
                line.append(f"[lora-forge] dry run: not planned ({type(e).__name__}: {e})")
        return stats(dag, *a, **kw)

    DAG.stats = stats_then_plan
    atexit.register(lambda: line and print(line[0], flush=True))


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
    # what `loraforge status` sets the disk in use against while the run goes (on_finish rewrites it)
    write_json_atomic(tsv.with_suffix(".json"), _disk_record(config, plan, running=True))
    _state.update(sampler=sampler, tsv=tsv, plan=plan, config=config)


def _disk_record(config, plan, **fields) -> dict:
    return {**fields, "planned_peak_bytes": getattr(plan, "peak_bytes", None),
            "quota_bytes": getattr(plan, "quota", None), "paths": _measured_paths(config)}


def on_finish(workflow, config, logfile=None, success=True) -> None:
    for path in _state.pop("manifests", []):
        Path(path).unlink(missing_ok=True)
        try:
            Path(path).parent.rmdir()  # only when empty
        except OSError:
            pass
    sampler = _state.pop("sampler", None)
    if sampler is not None:
        _finish_disk_record(config, sampler, success)
    if success and _state.pop("ran_jobs", False):
        _write_summary_page(config)


def _finish_disk_record(config, sampler, success: bool) -> None:
    sampler.stop()
    tsv, plan = _state.pop("tsv"), _state.pop("plan", None)
    from loraforge import diskmon

    planned = getattr(plan, "peak_bytes", None)
    png = tsv.with_suffix(".png")
    diskmon.plot_timeline(tsv, png, planned_peak=planned)
    measured = diskmon.peak(tsv)
    (DISK_LOG_DIR / "latest.tsv").unlink(missing_ok=True)
    os.symlink(tsv.name, DISK_LOG_DIR / "latest.tsv")
    record = _disk_record(_state.pop("config", config), plan, success=success, measured_peak_bytes=measured)
    write_json_atomic(tsv.with_suffix(".json"), record)
    msg = f"measured peak disk {measured / 1e6:.1f} MB ({tsv}, {png})"
    if planned:
        msg += f"; planned {planned / 1e6:.1f} MB ({100 * (measured - planned) / planned:+.1f}%)"
    _say(msg)


def _write_summary_page(config) -> None:
    """results/summary.html, the run's tables and curves (loraforge.summary_page); a page that
    cannot be written costs a warning, never the run."""
    from loraforge.summary_page import write_summary

    try:
        _say(f"summary of the run: {write_summary(config)} (also the landing page of snakemake --report)")
    except Exception as e:  # noqa: BLE001 - the run's artifacts are all in place already
        _say(f"WARNING: could not write the summary page: {type(e).__name__}: {e}")


# `loraforge restore-adapter ARCHIVE`
def add_arguments(parser) -> None:
    parser.add_argument("archive", help="results/<model>/adapter-archive/<time>")
    parser.add_argument("--archive-current", action="store_true",
                        help="archive the adapter now in place (with its training reports) first, then restore")


def run(args) -> int:
    try:
        adapter, reports, done = restore_adapter(args.archive, archive_current=args.archive_current)
    except AdapterGuardError as e:
        print(f"loraforge restore-adapter: {e}", file=sys.stderr)
        return 1
    for line in done:
        print(line)
    print(f"restored {adapter}" + "".join(f"\nrestored {r}" for r in reports))
    return 0
