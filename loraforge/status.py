"""`loraforge status`: what the run in this folder is doing, or what the last one did, from
another terminal: Snakemake's jobs (done of total, the ones running, failures), each model's
training step, loss, tokens/s and ETA (train/progress.json, written by the training's progress
callback), the disk in use against the run's plan and quota (logs/disk/), and GPU memory
(nvidia-smi) where there is a GPU. It only reads files; it never takes Snakemake's lock."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from loraforge.sizes import human, measure
from loraforge.train_monitor import PROGRESS_FILE, progress_line

DISK_LOG_DIR = Path("logs") / "disk"
_STARTED = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")
_FINISHED = re.compile(r"^Finished job(?:id)?:? (\d+)")
_DONE = re.compile(r"^(\d+) of (\d+) steps \((\d+%)\) done")
_ERROR = re.compile(r"^Error in rule (\S+):")


def latest_snakemake_log(workdir: Path) -> Path | None:
    """The newest log of a run that executes jobs (`--report`, `--unlock` and the like write logs
    too); the newest log at all while a run is starting."""
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    if logs and is_running(workdir):
        return logs[-1]
    for log in reversed(logs):
        text = log.read_text(errors="replace")
        if "Select jobs to execute" in text or "Nothing to be done" in text:
            return log
    return None


def read_jobs(log: Path) -> dict:
    """Jobs of one Snakemake log: done/total, running (rule, wildcards), failed rules, finished."""
    running: dict[str, str] = {}
    rule, done, failed, complete = None, None, [], False
    for line in log.read_text(errors="replace").splitlines():
        if m := _STARTED.match(line):
            rule = m.group(1)
        elif (m := _JOBID.match(line)) and rule:
            running[m.group(1)] = rule
        elif (m := _WILDCARDS.match(line)) and rule and running:
            last = next(reversed(running))
            running[last] = f"{running[last]} ({m.group(1)})"
        elif m := _FINISHED.match(line):
            running.pop(m.group(1), None)
        elif m := _DONE.match(line):
            done = (int(m.group(1)), int(m.group(2)), m.group(3))
        elif m := _ERROR.match(line):
            failed.append(m.group(1))
        elif line.startswith("Complete log") or line.startswith("Nothing to be done"):
            complete = True
    return {"done": done, "running": list(running.values()), "failed": failed, "complete": complete}


def is_running(workdir: Path) -> bool:
    """Snakemake holds its lock files while a run is going (or after it was killed: then
    `snakemake --unlock`)."""
    locks = workdir / ".snakemake" / "locks"
    return locks.is_dir() and any(locks.iterdir())


def jobs_lines(workdir: Path) -> list[str]:
    log = latest_snakemake_log(workdir)
    if log is None:
        return ["run: no Snakemake run in this folder yet (.snakemake/log/ is empty)"]
    jobs = read_jobs(log)
    # the log's name is its start time: 2026-12-08T001831.826081.snakemake.log
    stamp = re.match(r"(\d{4}-\d\d-\d\d)T(\d\d)(\d\d)(\d\d)", log.name)
    started = f"{stamp[1]} {stamp[2]}:{stamp[3]}:{stamp[4]}" if stamp else log.name
    if is_running(workdir) and not jobs["complete"]:
        state = f"running (started {started})"
    elif jobs["failed"]:
        state = f"failed (started {started})"
    else:
        state = f"finished (started {started})" if jobs["complete"] else f"stopped (started {started}; killed?)"
    lines = [f"run: {state}; log {log}"]
    if jobs["done"]:
        done, total, share = jobs["done"]
        lines.append(f"jobs: {done} of {total} done ({share})")
    if jobs["running"] and state.startswith("running"):
        lines.append("running: " + ", ".join(jobs["running"]))
    if jobs["failed"]:
        lines.append("failed: " + ", ".join(jobs["failed"]) + " (see logs/<model>/<rule>.log)")
    return lines


def training_lines(workdir: Path) -> list[str]:
    lines = []
    for progress_file in sorted((workdir / "results").glob(f"*/train/{PROGRESS_FILE}")):
        model = progress_file.parent.parent.name
        try:
            p = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            continue
        metrics = progress_file.with_name("metrics.json")
        if metrics.exists() and metrics.stat().st_mtime >= progress_file.stat().st_mtime:
            try:
                m = json.loads(metrics.read_text())
                lines.append(f"trained {model}: {m.get('steps')} steps, final loss {m.get('final_loss'):.4f}, "
                             f"verdict {m.get('verdict')}")
                continue
            except (OSError, ValueError, TypeError):
                pass
        age = time.time() - p.get("updated", time.time())
        line = progress_line(model, p["step"], p["total"], p.get("loss"), p.get("tokens_per_s"), p.get("eta_seconds", 0))
        gpu = f", GPU {p['gpu_memory_gib']:.1f} GiB (peak {p['gpu_memory_peak_gib']:.1f})" if "gpu_memory_gib" in p else ""
        lines.append(f"training {line}{gpu} (updated {age:.0f} s ago)")
    return lines


def disk_lines(workdir: Path) -> list[str]:
    """The bytes under results/ (and the run's other measured folders) now, against the latest
    run's planned peak and quota (logs/disk/<time>.json, written when the run started)."""
    records = sorted((workdir / DISK_LOG_DIR).glob("*.json"))
    record = {}
    if records:
        try:
            record = json.loads(records[-1].read_text())
        except (OSError, ValueError):
            record = {}
    paths = [workdir / p for p in record.get("paths", ["results"])]
    used, _ = measure([str(p) for p in paths if p.exists()]) if any(p.exists() for p in paths) else (0, {})
    line = f"disk: {human(used)} in use ({', '.join(str(p.relative_to(workdir)) if p.is_relative_to(workdir) else str(p) for p in paths)})"
    if record.get("planned_peak_bytes"):
        line += f"; planned peak of the latest run {human(record['planned_peak_bytes'])}"
    if record.get("measured_peak_bytes"):
        line += f", measured peak {human(record['measured_peak_bytes'])}"
    if record.get("quota_bytes"):
        line += f"; disk_quota {human(record['quota_bytes'])}"
    return [line]


def gpu_lines() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ["GPU: none visible (no nvidia-smi)"]
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return [f"GPU: nvidia-smi failed ({e})"]
    lines = []
    for row in filter(None, (r.strip() for r in out.splitlines())):
        index, name, used, total = [c.strip() for c in row.split(",")]
        lines.append(f"GPU {index} ({name}): {float(used) / 1024:.1f} of {float(total) / 1024:.1f} GiB in use")
    return lines or ["GPU: none visible"]


def report(workdir: str | Path = ".") -> str:
    workdir = Path(workdir).resolve()
    return "\n".join(jobs_lines(workdir) + training_lines(workdir) + disk_lines(workdir) + gpu_lines())


# `loraforge status [DIR]`
def add_arguments(parser) -> None:
    parser.add_argument("directory", nargs="?", default=".", help="the run's working directory (default: here)")


def run(args) -> int:
    print(report(args.directory))
    return 0
