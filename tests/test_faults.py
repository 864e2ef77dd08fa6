"""Fault injection: a hostile user's day, on private copies of the finished tiny pipeline.

Kills during each rule, a full disk during each writing rule, bad config, bad data, bad
adapter and base folders, concurrent runs and the adapter guard's edge cases. Every case
checks the same three promises: the run ends in one clear message naming the file (or field)
and the cause, never a bare traceback; nothing is lost (the adapter survives, the user's own
folders are untouched); and the same command, rerun after the cause is fixed, finishes.

Counts of what was injected are written to $LORAFORGE_FAULT_COUNTS (a JSON file) when set."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, clone_pipeline, copy_base, run_snakemake, small_config, snakemake_cmd, write_config

TINY_FINALS = ["results/tiny/Q4_K_M.gguf", "results/tiny/Q5_K_M.gguf", "results/tiny/Modelfile"]
COUNTS: dict[str, int] = {"faults_injected": 0, "bad_inputs_tried": 0, "runs_that_lost_or_corrupted": 0}


def count(kind: str, n: int = 1) -> None:
    COUNTS[kind] += n
    if os.environ.get("LORAFORGE_FAULT_COUNTS"):
        Path(os.environ["LORAFORGE_FAULT_COUNTS"]).write_text(json.dumps(COUNTS, indent=2))


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def console(run) -> str:
    return run.stdout + run.stderr


def assert_clear_failure(run, *needles: str) -> str:
    """A failed run whose console names the cause, without a Python traceback of ours."""
    out = console(run)
    assert run.returncode != 0, out[-3000:]
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-4000:]}"
    assert "Traceback (most recent call last)" not in out, out[-4000:]
    return out


@pytest.fixture
def work(pipeline, tmp_path) -> Path:
    return clone_pipeline(pipeline, tmp_path / "work")


def adapter_digest(work: Path, model: str = "tiny") -> dict[str, str]:
    return digest(work / "results" / model / "adapter")


def check_unharmed(work: Path, adapter_before: dict[str, str], model: str = "tiny") -> None:
    """The adapter is byte-identical, and every GGUF in place is a finished one (the converter
    and the quantizer write under another name and rename at the end)."""
    if adapter_digest(work, model) != adapter_before:
        count("runs_that_lost_or_corrupted")
        raise AssertionError(f"the adapter of {model} changed")
    for p in (work / "results" / model).glob("*.gguf"):
        if p.read_bytes()[:4] != b"GGUF":
            count("runs_that_lost_or_corrupted")
            raise AssertionError(f"{p} looks finished but is not a GGUF")


def run_concurrently(jobs: list[tuple[Path, tuple[str, ...]]]) -> list[subprocess.CompletedProcess]:
    """`run_snakemake(workdir, *args, check=False)` for each (workdir, args), all at once (each
    in its own workdir); the results in the same order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: run_snakemake(job[0], *job[1], check=False), jobs))


def unlock(work: Path) -> None:
    """`snakemake --unlock` where a killed run left its locks behind. A run that ended by itself
    (finished or failed) releases them, and --unlock would only start Snakemake to do nothing."""
    locks = work / ".snakemake" / "locks"
    if locks.is_dir() and any(locks.iterdir()):
        run_snakemake(work, "--unlock")


# --------------------------------------------------------------------------------------
# bad config: refused before any job, naming the field
# --------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "modelfile quant not built": (
        {"export": {"modelfile_quant": "Q6_K"}}, "export.modelfile_quant: Q6_K is not built"),
    "consume a user's folder": (
        {"export": {"merge_mode": "consume"}, "models": {"tiny": {"base": "USERS_BASE"}}},
        "models.tiny.base.path: export.merge_mode consume would move the shards out of your own folder"),
    "negative rank": ({"models": {"tiny": {"lora": {"r": 0}}}}, "models.tiny.lora.r"),
    "unknown quant": ({"export": {"quants": ["Q4_K_M", "Q9_X"]}}, "export.quants[1]"),
    "dropout on a MoE": ({"models": {"tiny-moe": {"lora": {"dropout": 0.1}}}}, "models.tiny-moe.lora.dropout"),
    "unknown target": ({"targets": ["tiny", "huge"]}, "targets[1]: unknown model key 'huge'"),
    "bad disk quota": ({"disk_quota": "lots"}, "disk_quota"),
    "missing dataset": ({"data": {"samples": "no/such/file.jsonl"}}, "no/such/file.jsonl"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_before_any_job(work, tmp_path, case):
    overrides, needle = BAD_CONFIGS[case]
    cfg = small_config(**{k: v for k, v in overrides.items() if k != "models"})
    users_base = None
    for model, settings in overrides.get("models", {}).items():
        if settings.get("base") == "USERS_BASE":
            users_base = copy_base(work / "results/tiny/base", tmp_path / "my-base")
            cfg["models"][model]["base"] = {"path": str(users_base)}
        else:
            cfg["models"][model] = {**cfg["models"][model], **{k: {**cfg["models"][model].get(k, {}), **v}
                                                              for k, v in settings.items()}}
    write_config(work, cfg)
    before = adapter_digest(work)
    users_before = digest(users_base) if users_base else None
    count("bad_inputs_tried")
    run = run_snakemake(work, *TINY_FINALS, check=False)
    out = console(run)
    assert run.returncode != 0 and needle in out, out[-3000:]
    assert "Traceback (most recent call last)" not in out
    assert "localrule" not in out and "rule train_adapter" not in out, "no job may start"
    check_unharmed(work, before)
    if users_base:
        assert digest(users_base) == users_before, "the user's folder was touched"


@pytest.mark.slow
def test_consume_refusal_reaches_the_merge_itself(tiny_bases, tmp_path):
    """The config check is the first line; the merge refuses a user's folder on its own too."""
    from loraforge.merge import MergeError, merge
    from merge_helpers import build_adapter

    base = copy_base(tiny_bases["qwen3"], tmp_path / "users-base")
    adapter = build_adapter(str(base), str(tmp_path / "adapter"), r=4, lora_alpha=8,
                            target_modules=["q_proj", "v_proj"])
    before = digest(base)
    count("bad_inputs_tried")
    with pytest.raises(MergeError, match="refusing to consume your own base folder"):
        merge(str(base), adapter, str(tmp_path / "merged"), mode="consume", base_is_users=True)
    assert digest(base) == before and not (tmp_path / "merged").exists()
    assert not (tmp_path / "merged.partial").exists()


@pytest.mark.slow
def test_plan_never_offers_consume_for_a_users_folder(pipeline, tmp_path):
    """With a quota too small for link mode, `loraforge plan` names what fits; consume mode is
    not among the choices when the base is the user's own folder."""
    cfg = small_config(disk_quota="1MB")
    users = small_config(disk_quota="1MB")
    users["models"]["tiny"]["base"] = {"path": str(pipeline / "results/tiny/base")}
    outs = {}
    for name, c in (("built", cfg), ("users", users)):
        work = clone_pipeline(pipeline, tmp_path / name)
        write_config(work, c)
        for q in ("Q4_K_M", "Q5_K_M"):
            (work / f"results/tiny/{q}.gguf").unlink()
        rc = subprocess.run([sys.executable, "-m", "loraforge.cli", "plan", "-s", str(REPO / "Snakefile"),
                             "results/tiny/Q4_K_M.gguf"],
                            cwd=work, capture_output=True, text=True)
        outs[name] = rc.stdout + rc.stderr
    assert "consume merge mode" in outs["built"], outs["built"][-2000:]
    assert "consume merge mode" not in outs["users"], outs["users"][-2000:]


# --------------------------------------------------------------------------------------
# bad data: file:line and the cause
# --------------------------------------------------------------------------------------

GOOD_LINE = json.dumps({"source": "x", "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]})
BAD_DATA = {
    "invalid utf-8": (GOOD_LINE.encode() + b"\n" + b'{"source": "x\xff\xfe"}\n', ":2: not valid UTF-8"),
    "invalid json": ((GOOD_LINE + "\n{not json\n").encode(), ":2: invalid JSON"),
    "no assistant turn": ((GOOD_LINE + "\n" + json.dumps({"source": "x", "messages": [
        {"role": "user", "content": "hi"}]}) + "\n").encode(), ":2: field 'messages': no assistant turn"),
    "bad role": ((json.dumps({"source": "x", "messages": [{"role": "robot", "content": "hi"}]}) + "\n").encode(),
                 ":1: field 'messages[0].role'"),
    "empty file": (b"", "no samples"),
}


@pytest.mark.slow
def test_bad_data_names_file_and_line(work, tmp_path):
    # The cases are independent, so each gets its own copy of the pipeline and the runs go at
    # once: a run is mostly Snakemake's and the job's start-up on one core, and the suite runs
    # tests one at a time on two. Every case is still a real run with all its checks.
    cases = []
    for i, (case, (content, needle)) in enumerate(BAD_DATA.items()):
        w = work if i == 0 else clone_pipeline(work, tmp_path / f"work-{i}")
        cases.append((w, case, content, needle))
    befores = [adapter_digest(w) for w, *_ in cases]
    for w, case, content, _ in cases:
        bad = w / f"bad-{case.replace(' ', '-')}.jsonl"
        bad.write_bytes(content)
        write_config(w, small_config(data={"samples": str(bad)}))
        count("bad_inputs_tried")
    runs = run_concurrently([(w, ("results/tiny/data/train.jsonl",)) for w, *_ in cases])
    for (w, case, _, needle), run, before in zip(cases, runs, befores):
        bad = w / f"bad-{case.replace(' ', '-')}.jsonl"
        out = assert_clear_failure(run, "error in rule prepare_data", str(bad) + needle if needle.startswith(":") else needle)
        assert "UnicodeDecodeError" not in out
        check_unharmed(w, before)


# --------------------------------------------------------------------------------------
# bad adapter and base folders
# --------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated weights", "adapter_config not json", "weights missing"])
def test_bad_adapter_folder_is_named(work, case):
    adapter = work / "results/tiny/adapter"
    if case == "truncated weights":
        _truncate(adapter / "adapter_model.safetensors")
        needle = "adapter_model.safetensors"
    elif case == "adapter_config not json":
        (adapter / "adapter_config.json").write_text("{broken")
        needle = "adapter_config.json: not valid JSON"
    else:
        (adapter / "adapter_model.safetensors").unlink()
        needle = "adapter_model.safetensors not found"
    before = adapter_digest(work)
    (work / "results/tiny/Q4_K_M.gguf").unlink()
    count("bad_inputs_tried")
    run = run_snakemake(work, "results/tiny/Q4_K_M.gguf", check=False)
    out = console(run)
    if case == "weights missing":
        # a missing adapter file makes the adapter look unfinished: the guard refuses to retrain
        assert run.returncode != 0 and ("refusing to retrain" in out or needle in out), out[-3000:]
    else:
        assert_clear_failure(run, "error in rule merge_adapter", needle)
    check_unharmed(work, before)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no config.json", "truncated shard", "folder missing"])
def test_bad_users_base_folder_is_named(work, tmp_path, case):
    base = copy_base(work / "results/tiny/base", tmp_path / "my-base")
    cfg = small_config()
    cfg["models"]["tiny"]["base"] = {"path": str(base)}
    write_config(work, cfg)
    # the adapter was trained on this very base: accept it as moved (what the guard asks for)
    run_snakemake(work, "--touch", "results/tiny/adapter", "results/tiny/train/metrics.json",
                  "results/tiny/train/loss.csv", "results/tiny/train/loss.png")
    if case == "no config.json":
        (base / "config.json").unlink()
        needle = "config.json not found"
    elif case == "truncated shard":
        _truncate(sorted(base.glob("*.safetensors"))[0])
        needle = "safetensors"
    else:
        shutil.rmtree(base)
        needle = str(base)
    before = adapter_digest(work)
    (work / "results/tiny/Q4_K_M.gguf").unlink()
    count("bad_inputs_tried")
    run = run_snakemake(work, "results/tiny/Q4_K_M.gguf", check=False)
    out = console(run)
    assert run.returncode != 0 and needle in out, out[-3000:]
    assert "Traceback (most recent call last)" not in out, out[-3000:]
    check_unharmed(work, before)


# --------------------------------------------------------------------------------------
# the adapter guard's edge cases (issue: a failed retrain must not open the door)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_target_module_typo_fails_before_anything_is_archived(work):
    before = adapter_digest(work)
    write_config(work, small_config(models={"tiny": {"lora": {"target_modules": ["q_proj", "v_prog"]}}}))
    count("bad_inputs_tried")
    run = run_snakemake(work, *TINY_FINALS, check=False)
    out = assert_clear_failure(run, "models.tiny.lora.target_modules: 'v_prog' match no module", "v_proj")
    assert "localrule" not in out
    assert not (work / "results/tiny/adapter-archive").exists()
    check_unharmed(work, before)


@pytest.mark.slow
def test_restored_adapter_after_failed_retrain_is_not_retrained(work):
    """The hostile pass: a settings change archives the adapter, the retrain fails (killed),
    the user restores the adapter and the config. The next run must not retrain silently:
    the adapter's recorded settings equal today's."""
    original = adapter_digest(work)
    reports = digest(work / "results/tiny/train")
    write_config(work, small_config(models={"tiny": {"lora": {"r": 4, "alpha": 8}}}))
    killed = kill_during(work, "train_adapter", "results/tiny/train/metrics.json")
    count("faults_injected")
    assert killed, "the retrain was not running when killed"
    archives = sorted((work / "results/tiny/adapter-archive").iterdir())
    assert len(archives) == 1
    # training reports were archived with the adapter
    assert sorted(p.name for p in (archives[0] / "train").iterdir()) == ["loss.csv", "loss.png", "metrics.json"]
    # the user restores both
    rc = subprocess.run([str(REPO / ".venv/bin/loraforge"), "restore-adapter", str(archives[0])], cwd=work,
                        capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert adapter_digest(work) == original and digest(work / "results/tiny/train") == reports
    write_config(work, small_config())
    unlock(work)
    run = run_snakemake(work, *TINY_FINALS, check=False)
    out = console(run)
    # either nothing to retrain, or a refusal naming the way to keep the adapter; never a retrain
    if run.returncode != 0:
        assert "refusing to retrain" in out and "was trained with today's settings" in out, out[-3000:]
        assert len(list((work / "results/tiny/adapter-archive").iterdir())) == 1, "archived again"
        keep = next(line for line in out.splitlines() if "keep it: snakemake" in line).split("keep it: ")[1]
        run_snakemake(work, *keep.split()[1:])  # the command the message gives
        run_snakemake(work, *TINY_FINALS)
    assert adapter_digest(work) == original


@pytest.mark.slow
def test_same_base_moved_to_a_path_folder_does_not_retrain(work, tmp_path):
    original = adapter_digest(work)
    moved = tmp_path / "bases" / "tiny"
    moved.parent.mkdir()
    shutil.move(str(work / "results/tiny/base"), moved)
    cfg = small_config()
    cfg["models"]["tiny"]["base"] = {"path": str(moved)}
    write_config(work, cfg)
    for q in ("Q4_K_M", "Q5_K_M"):
        (work / f"results/tiny/{q}.gguf").unlink()
    run = run_snakemake(work, *TINY_FINALS, check=False)
    out = console(run)
    if run.returncode != 0:
        assert "refusing to retrain" in out and "was trained with today's settings" in out, out[-3000:]
        keep = next(line for line in out.splitlines() if "keep it: snakemake" in line).split("keep it: ")[1]
        run_snakemake(work, *keep.split()[1:])
        run = run_snakemake(work, *TINY_FINALS)
    assert "localrule train_adapter" not in console(run)
    assert adapter_digest(work) == original
    assert not (work / "results/tiny/adapter-archive").exists()
    assert (work / "results/tiny/Q4_K_M.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_changed_dataset_setting_reruns_data_and_retrains_per_the_adapter_rules(work):
    samples = work / "my-samples.jsonl"
    shutil.copy(REPO / "data/rails_chat.jsonl", samples)
    write_config(work, small_config(data={"samples": str(samples)}))
    dry = console(run_snakemake(work, "-n", *TINY_FINALS))
    assert "rule prepare_data" in dry and "rule train_adapter" in dry
    # a changed setting pointing at a missing file: an error naming it, never "Nothing to be done"
    write_config(work, small_config(data={"samples": str(work / "gone.jsonl")}))
    run = run_snakemake(work, *TINY_FINALS, check=False)
    out = console(run)
    assert run.returncode != 0 and "gone.jsonl" in out and "Nothing to be done" not in out, out[-3000:]


# --------------------------------------------------------------------------------------
# kills during each rule, and concurrent runs
# --------------------------------------------------------------------------------------


def _running_rules(work: Path) -> set[str]:
    """Rules with a job started and not finished: Snakemake's incomplete markers name outputs."""
    import base64

    marks = work / ".snakemake" / "incomplete"
    names = set()
    if marks.is_dir():
        for p in marks.iterdir():
            try:
                names.add(base64.b64decode(p.name.replace("_", "/")).decode())
            except Exception:  # noqa: BLE001
                names.add(p.name)
    return names


def kill_during(work: Path, rule: str, *targets: str, extra: tuple[str, ...] = (), timeout: float = 300) -> bool:
    """Start a run, SIGKILL its whole process group as soon as a job of `rule` has started
    (its log file appears), and say whether that job was still running then."""
    logdir = work / "logs" / "tiny"
    stamps = {p: p.stat().st_mtime_ns for p in logdir.glob(f"{rule}*.log")}
    proc = subprocess.Popen(snakemake_cmd(work, *extra, *targets), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    started = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            fresh = [p for p in logdir.glob(f"{rule}*.log") if p.stat().st_mtime_ns != stamps.get(p)]
            if fresh:
                started = True
                break
            time.sleep(0.02)
        running = proc.poll() is None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the run had already finished
            pass
    finally:
        proc.wait()
    return started and running


EXPORT_RULES = ["merge_adapter", "convert_gguf", "quantize_gguf", "check_gguf", "write_modelfile", "memory_table"]


@pytest.mark.slow
def test_killed_at_every_export_rule_then_rerun_finishes(work):
    """SIGKILL the run (Snakemake and its jobs) while each export rule runs, one after the other,
    rerunning the same command in between: the final artifacts equal an uninterrupted run's."""
    before = adapter_digest(work)
    finals = {p: (work / p).read_bytes() for p in TINY_FINALS}
    for p in TINY_FINALS + ["results/tiny/memory.tsv"]:
        (work / p).unlink()
    hits = []
    for rule in EXPORT_RULES:
        unlock(work)
        hits.append((rule, kill_during(work, rule, *TINY_FINALS, "results/tiny/memory.tsv")))
        count("faults_injected")
        check_unharmed(work, before)
    unlock(work)
    run_snakemake(work, *TINY_FINALS, "results/tiny/memory.tsv")
    check_unharmed(work, before)
    for p, data in finals.items():
        if p.endswith(".gguf"):  # quantization is deterministic
            assert (work / p).read_bytes() == data, f"{p} differs from the uninterrupted run's"
    assert (work / "results/tiny/Modelfile").read_text() == finals["results/tiny/Modelfile"].decode()
    killed_in = [rule for rule, hit in hits if hit]
    assert "merge_adapter" in killed_in and "convert_gguf" in killed_in, hits


@pytest.mark.slow
def test_killed_during_training_then_rerun_trains(work):
    write_config(work, small_config(models={"tiny": {"lora": {"r": 4, "alpha": 8}}}))
    original = adapter_digest(work)
    assert kill_during(work, "train_adapter", "results/tiny/train/metrics.json"), "not killed during training"
    count("faults_injected")
    assert not (work / "results/tiny/adapter").exists(), "no half-written adapter in place"
    archive = next((work / "results/tiny/adapter-archive").iterdir())
    assert digest(archive / "adapter") == original
    unlock(work)
    run_snakemake(work, "results/tiny/train/metrics.json")
    assert json.loads((work / "results/tiny/adapter/adapter_config.json").read_text())["r"] == 4


@pytest.mark.slow
def test_killed_during_base_build_and_data_preparation(work):
    for path in ("results/tiny/base", "results/tiny/base.complete", "results/tiny/data"):
        p = work / path
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = adapter_digest(work)
    for rule, target in (("build_tiny_base", "results/tiny/base.complete"),
                         ("prepare_data", "results/tiny/data/train.jsonl")):
        unlock(work)
        assert kill_during(work, rule, target), f"not killed during {rule}"
        count("faults_injected")
        unlock(work)
        run_snakemake(work, target)
        check_unharmed(work, before)
    # the rebuilt base and data are the same as before: no retraining is asked for
    assert "train_adapter" not in console(run_snakemake(work, "-n", *TINY_FINALS))


@pytest.mark.slow
def test_concurrent_run_is_refused_and_the_first_finishes(work):
    before = adapter_digest(work)
    (work / "results/tiny/Q4_K_M.gguf").unlink()
    first = subprocess.Popen(snakemake_cmd(work, "results/tiny/Q4_K_M.gguf"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not list((work / ".snakemake" / "locks").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_snakemake(work, "results/tiny/Q4_K_M.gguf", check=False)
    count("faults_injected")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    assert second.returncode != 0 and "cannot be locked" in console(second), console(second)[-2000:]
    check_unharmed(work, before)


# --------------------------------------------------------------------------------------
# a full disk during each writing rule (a small tmpfs; needs root)
# --------------------------------------------------------------------------------------

WRITING_RULES = {
    # rule: (outputs to remove so that it runs, target)
    "build_tiny_base": (["results/tiny/base", "results/tiny/base.complete", "results/tiny/reports/base.json"],
                        "results/tiny/base.complete"),
    "prepare_data": (["results/tiny/data"], "results/tiny/data/train.jsonl"),
    "train_adapter": (["results/tiny/adapter", "results/tiny/train"], "results/tiny/train/metrics.json"),
    "merge_adapter": (["results/tiny/Q4_K_M.gguf"], "results/tiny/Q4_K_M.gguf"),
    "convert_gguf": (["results/tiny/Q4_K_M.gguf"], "results/tiny/Q4_K_M.gguf"),
    "quantize_gguf": (["results/tiny/Q4_K_M.gguf"], "results/tiny/Q4_K_M.gguf"),
    "check_gguf": (["results/tiny/checks/Q4_K_M.json"], "results/tiny/checks/Q4_K_M.json"),
    "write_modelfile": (["results/tiny/Modelfile"], "results/tiny/Modelfile"),
    "memory_table": (["results/tiny/memory.tsv"], "results/tiny/memory.tsv"),
}


def _mount_tmpfs(where: Path, size_mb: int) -> bool:
    where.mkdir(parents=True)
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)], capture_output=True)
    return rc.returncode == 0


@pytest.fixture
def small_disk(pipeline, tmp_path):
    """A copy of the tiny pipeline whose results/ is a 48 MB tmpfs (logs and Snakemake's own
    metadata stay on the normal disk, as they do for a results volume with a quota)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    work = clone_pipeline(pipeline, tmp_path / "work")
    shutil.rmtree(work / "results/tiny-moe")
    stash = tmp_path / "results-stash"
    shutil.move(str(work / "results"), stash)
    if not _mount_tmpfs(work / "results", 48):
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(stash, work / "results", symlinks=True, copy_function=shutil.copy2, dirs_exist_ok=True)
        cfg = small_config(targets=["tiny"], disk_check="warn")
        write_config(work, cfg)
        yield work
    finally:
        subprocess.run(["umount", "-l", str(work / "results")], capture_output=True)


def _fill(fs: Path, leave: int) -> Path:
    ballast = fs / "ballast"
    free = shutil.disk_usage(fs).free
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave, 0))
    return ballast


@pytest.mark.slow
@pytest.mark.parametrize("rule", sorted(WRITING_RULES))
def test_disk_full_during_each_writing_rule(small_disk, rule):
    work = small_disk
    remove, target = WRITING_RULES[rule]
    adapter_before = adapter_digest(work) if rule != "train_adapter" else None
    for path in remove:
        p = work / path
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if rule in ("convert_gguf", "quantize_gguf"):
        # run up to the rule before, keeping the temp intermediates, then fill the disk
        upstream = {"convert_gguf": "results/tiny/merged", "quantize_gguf": "results/tiny/F16.gguf"}[rule]
        run_snakemake(work, "--notemp", upstream)
    ballast = _fill(work / "results", leave=0)
    count("faults_injected")
    run = run_snakemake(work, target, check=False)
    out = assert_clear_failure(run, f"error in rule {rule}", "no space left on device")
    assert "requested and" not in out.split("[lora-forge]")[-1]
    if adapter_before is not None:
        check_unharmed(work, adapter_before)
    assert not (work / target).exists()
    # free the space: the same command finishes
    ballast.unlink()
    unlock(work)
    run_snakemake(work, target)
    if adapter_before is not None:
        check_unharmed(work, adapter_before)
    assert (work / target).exists()


# --------------------------------------------------------------------------------------
# an adapter belongs to one base: weight identity, checkpoints (fast unit tests, real files)
# --------------------------------------------------------------------------------------


def _small_base(folder: Path, seed: int = 0) -> Path:
    """A base folder as the pipeline sees one: config, two safetensors shards, tokenizer files."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    gen = torch.Generator().manual_seed(seed)
    for i in (1, 2):
        save_file({f"model.layers.{i}.w.weight": torch.randn(8, 8, generator=gen)},
                  str(folder / f"model-0000{i}-of-00002.safetensors"))
    (folder / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    (folder / "tokenizer_config.json").write_text('{"eos_token": "a"}')
    return folder


def _train_settings(**over) -> dict:
    return {"learning_rate": 2e-4, "max_steps": 10, "seed": 1, "save_steps": 5, "gpus": 1, **over}


def test_base_identity_covers_weights_and_tokenizer_but_not_the_path(tmp_path):
    from loraforge.training_record import base_identity, identity_changes

    base = _small_base(tmp_path / "a" / "base")
    before = base_identity(base)
    count("bad_inputs_tried")
    # the same files elsewhere (a moved checkout): the same identity
    moved = tmp_path / "b" / "base"
    shutil.copytree(base, moved)
    assert base_identity(moved) == before
    # other weights, same names, shapes and dtypes (another seed): another identity
    other = _small_base(tmp_path / "c" / "base", seed=1)
    assert base_identity(other)["layout"] == before["layout"]
    assert identity_changes(before, base_identity(other)) == [
        "base model weights: 2 of 2 shards differ (model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)"]
    # another tokenizer, same weights
    (moved / "tokenizer.json").write_text('{"vocab": {"b": 0}}')
    assert identity_changes(before, base_identity(moved)) == ["base model: different config, tensor layout or tokenizer"]
    # a record of an older lora-forge (the layout digest alone) compares by layout
    assert identity_changes(before["layout"], base_identity(other)) == []


def test_shard_digests_are_kept_in_the_flag_and_rechecked_by_size_and_mtime(tmp_path):
    from loraforge.base_weights import complete_flag, read_manifest, weight_digests, write_manifest

    base = _small_base(tmp_path / "base")
    write_manifest(base)
    flag = complete_flag(base)
    recorded = read_manifest(flag)
    assert flag == tmp_path / "base.complete" and sorted(recorded) == sorted(p.name for p in base.glob("*.safetensors"))
    shard = base / "model-00001-of-00002.safetensors"
    assert recorded[shard.name]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    # unchanged size and mtime: the recorded digest is used, the shard is not read again
    doctored = {**recorded, shard.name: {**recorded[shard.name], "sha256": "recorded"}}
    flag.write_text(json.dumps({"format": 1, "shards": doctored}))
    assert weight_digests(base)[shard.name] == "recorded"
    # rewritten in place (new mtime): hashed again
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    count("faults_injected")
    assert weight_digests(base)[shard.name] == hashlib.sha256(bytes(data)).hexdigest()
    # a shard a consume-mode merge has moved out (merge still under way): the flag says what it was
    shard.unlink()
    assert weight_digests(base)[shard.name] == "recorded"
    # a user's own folder: a cache under results/, never a file in the folder
    cache = tmp_path / "results" / "base-digests.json"
    assert weight_digests(base, cache=cache) and cache.is_file()


def test_checkpoint_fingerprint_covers_learning_rate_and_base_weights_not_paths(tmp_path, caplog):
    from loraforge.train_monitor import fingerprint, prepare_checkpoints
    from loraforge.training_record import base_identity

    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    lora = {"r": 8, "alpha": 16}
    base = _small_base(tmp_path / "one" / "base")
    identity = base_identity(base)
    fp = fingerprint(identity, data, lora, _train_settings(), "trl")
    assert "/" not in json.dumps({k: v for k, v in fp.items() if k != "lora"}), "no paths in a fingerprint"
    assert fingerprint(identity, data, lora, _train_settings(learning_rate=1e-4), "trl") != fp
    assert fingerprint(identity, data, lora, _train_settings(save_steps=7), "trl") == fp  # when, not what
    ck = tmp_path / "checkpoints"
    prepare_checkpoints(ck, fp)
    _real_checkpoint(ck / "checkpoint-5")
    # the same base moved elsewhere: the checkpoint is kept
    moved = tmp_path / "two" / "base"
    shutil.copytree(base, moved)
    assert prepare_checkpoints(ck, fingerprint(base_identity(moved), data, lora, _train_settings(), "trl")) == ck / "checkpoint-5"
    # other weights under the same folder name: discarded, never resumed
    other = _small_base(tmp_path / "three" / "base", seed=1)
    count("faults_injected")
    with caplog.at_level("WARNING"):
        assert prepare_checkpoints(ck, fingerprint(base_identity(other), data, lora, _train_settings(), "trl")) is None
    assert "made with other base_identity" in caplog.text and not (ck / "checkpoint-5").exists()


def test_training_is_up_to_date_by_the_adapter_record(tmp_path, monkeypatch):
    """What decides, before Snakemake plans, whether training takes its base as an ancient() input
    (a base rebuilt for an export must not retrain) or not (a target must build in one run)."""
    from loraforge import training_record as tr
    from loraforge.config import validate

    monkeypatch.chdir(tmp_path)
    cfg = validate(small_config())
    model = tmp_path / "results" / "tiny"
    (model / "adapter").mkdir(parents=True)
    (model / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    tr.write(model / "adapter", tr.current_settings(cfg, "tiny", with_base=False))
    for folder, names in (("train", tr.TRAIN_REPORTS), ("data", tr.DATA_FILES)):
        (model / folder).mkdir()
        for name in names:
            (model / folder / name).write_text("x")
    assert tr.training_is_current(cfg, "tiny") and tr.data_is_current(cfg, "tiny")
    seeded = validate(small_config(tiny_base={"seed": 1}))  # another base will be built
    assert not tr.training_is_current(seeded, "tiny") and not tr.data_is_current(seeded, "tiny")
    ranked = validate(small_config(models={"tiny": {"lora": {"r": 4}}}))
    assert not tr.training_is_current(ranked, "tiny") and tr.data_is_current(ranked, "tiny")
    assert not tr.training_is_current({**cfg, "retrain": ["tiny"]}, "tiny")
    # a record of an older lora-forge (no build settings recorded) still counts as up to date
    old = tr.read(model / "adapter")
    old["base"].pop("tiny_base")
    tr.write(model / "adapter", old)
    assert tr.training_is_current(cfg, "tiny")
    (model / "train" / "loss.png").unlink()  # a report missing: the train job must run
    assert not tr.training_is_current(cfg, "tiny")


def test_an_adapter_on_hold_is_kept_only_for_the_same_weights(tmp_path, monkeypatch):
    """The train job of a base built again for an export: the adapter the guard put on hold comes
    back (with its reports, the archive gone) when the record matches the base as it came back;
    with other weights it stays archived and the job trains."""
    import torch
    from safetensors.torch import save_file

    from loraforge import training_record as tr
    from loraforge import workflow_hooks as wh

    monkeypatch.chdir(tmp_path)
    base = _small_base(tmp_path / "results/tiny/base")
    record = {"lora": {"r": 8}, "base_identity": tr.base_identity(base)}
    adapter, reports = tmp_path / "results/tiny/adapter", tmp_path / "results/tiny/train"
    for case, current in (("same", record),
                          ("other", {**record, "base_identity": tr.base_identity(_small_base(tmp_path / "b", 1))})):
        shutil.rmtree(adapter, ignore_errors=True)
        adapter.mkdir(parents=True)
        # a complete adapter folder (restore-adapter checks the archive before restoring it)
        save_file({"lora_A": torch.full((2, 2), 7.0)}, adapter / "adapter_model.safetensors")
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
        weights = (adapter / "adapter_model.safetensors").read_bytes()
        tr.write(adapter, record)
        reports.mkdir(parents=True, exist_ok=True)
        (reports / "metrics.json").write_text("{}")
        held = wh.archive_adapter(adapter, [reports / "metrics.json"])
        (reports / wh.ON_HOLD_NOTE).write_text(json.dumps({"archive": str(held)}))
        count("faults_injected")
        kept = wh.settle_adapter_on_hold(reports, current)
        assert not (reports / wh.ON_HOLD_NOTE).exists()
        if case == "same":
            assert kept == adapter and (adapter / "adapter_model.safetensors").read_bytes() == weights
            assert (reports / "metrics.json").is_file() and not (tmp_path / "results/tiny/adapter-archive").exists()
        else:
            assert kept is None and not adapter.exists()
            assert (held / "adapter" / "adapter_model.safetensors").read_bytes() == weights


def _real_checkpoint(d: Path, step: int = 5) -> Path:
    """What transformers writes into checkpoint-N, made with the same libraries: a torch-saved
    optimizer and scheduler state, RNG state, the adapter's safetensors, trainer_state.json."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    param = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones(4, 4)
    opt.step()
    torch.save(opt.state_dict(), d / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict(), d / "scheduler.pt")
    torch.save({"python": 1, "torch": torch.get_rng_state()}, d / "rng_state.pth")
    save_file({"lora_A": torch.randn(2, 4)}, str(d / "adapter_model.safetensors"))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return d


@pytest.mark.parametrize("damage", ["truncated optimizer.pt", "torn trainer_state.json", "truncated adapter weights"])
def test_a_bad_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, caplog, damage):
    from loraforge.train_monitor import SET_ASIDE_DIRNAME, prepare_checkpoints

    fp = {"train": {"learning_rate": 1e-3}}
    ck = tmp_path / "train" / "checkpoints"
    prepare_checkpoints(ck, fp)
    _real_checkpoint(ck / "checkpoint-20", 20)
    newest = _real_checkpoint(ck / "checkpoint-40", 40)
    if damage == "truncated optimizer.pt":
        _truncate(newest / "optimizer.pt")
    elif damage == "torn trainer_state.json":
        text = (newest / "trainer_state.json").read_text()
        (newest / "trainer_state.json").write_text(text[: len(text) // 2])
    else:
        _truncate(newest / "adapter_model.safetensors")
    count("faults_injected")
    kept = {p.name: p.read_bytes() for p in newest.iterdir()}
    with caplog.at_level("INFO"):
        assert prepare_checkpoints(ck, fp) == ck / "checkpoint-20"
    aside = tmp_path / "train" / SET_ASIDE_DIRNAME / "checkpoint-40"
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == kept, "set aside, byte for byte"
    assert not newest.exists()
    assert damage.split()[1] in caplog.text and "resuming from " + str(ck / "checkpoint-20") in caplog.text


def test_no_good_checkpoint_left_starts_over_and_says_so(tmp_path, caplog):
    from loraforge.train_monitor import SET_ASIDE_DIRNAME, prepare_checkpoints

    fp = {"train": {"learning_rate": 1e-3}}
    ck = tmp_path / "train" / "checkpoints"
    prepare_checkpoints(ck, fp)
    only = _real_checkpoint(ck / "checkpoint-40", 40)
    (only / "scheduler.pt").write_bytes(b"garbage")
    count("faults_injected")
    with caplog.at_level("INFO"):
        assert prepare_checkpoints(ck, fp) is None
    assert "scheduler.pt" in caplog.text and "training starts over from step 0" in caplog.text
    assert (tmp_path / "train" / SET_ASIDE_DIRNAME / "checkpoint-40" / "scheduler.pt").read_bytes() == b"garbage"


def test_merge_refuses_an_adapter_trained_on_other_weights(tmp_path, monkeypatch):
    from loraforge.base_weights import write_manifest
    from loraforge.errors import explain
    from loraforge.training_record import AdapterBaseMismatch, base_identity, check_adapter_base, write

    monkeypatch.chdir(tmp_path)
    base = _small_base(tmp_path / "results" / "tiny" / "base")
    write_manifest(base)
    cfg = {"models": {"tiny": {"base": {"build": "qwen3"}}}}
    adapter = tmp_path / "results" / "tiny" / "adapter"
    adapter.mkdir()
    write(adapter, {"base_identity": base_identity(base)})
    assert check_adapter_base(cfg, "tiny", adapter, base) == base_identity(base)["weights"]
    # the base is built again with another seed: the adapter's weights record no longer matches
    shutil.rmtree(base)
    _small_base(base, seed=1)
    write_manifest(base)
    count("faults_injected")
    with pytest.raises(AdapterBaseMismatch) as e:
        check_adapter_base(cfg, "tiny", adapter, base)
    line = explain(e.value)
    assert "trained on other weights" in line and "--config retrain=[tiny]" in line and "\n" not in line


# --------------------------------------------------------------------------------------
# an adapter belongs to one base: real Snakemake runs
# --------------------------------------------------------------------------------------


def planned_rules(work: Path, *targets: str) -> set[str]:
    import re

    out = console(run_snakemake(work, "-n", *targets))
    return set(re.findall(r"^(?:local)?rule (\w+):", out, re.M)) - {"all"}


def _record(work: Path, model: str = "tiny") -> dict:
    return json.loads((work / "results" / model / "adapter" / "lora-forge-training.json").read_text())


@pytest.mark.slow
def test_a_base_built_with_other_settings_retrains_and_every_target_builds_in_one_run(work):
    """Issue 21, 2 and 3: a rebuilt base (tiny_base.seed) means other weights: with the adapter
    there, the run retrains it before any merge (the guard archives it:
    test_a_changed_base_declaration_is_a_deliberate_retrain); with the adapter gone, each kind of
    target (adapter, training reports, base, a GGUF) plans the base and everything up to itself,
    and one run builds it (it used to build the base alone, say "100% done" and exit 0)."""
    write_config(work, small_config(tiny_base={"seed": 1}))
    count("faults_injected")
    assert {"build_tiny_base", "train_adapter", "merge_adapter"} <= planned_rules(work, "results/tiny/Q4_K_M.gguf")
    shutil.rmtree(work / "results/tiny/adapter")
    for name in ("metrics.json", "loss.csv", "loss.png"):
        (work / "results/tiny/train" / name).unlink()
    count("faults_injected")
    for target, wanted in (("results/tiny/adapter", {"build_tiny_base", "train_adapter"}),
                           ("results/tiny/train/metrics.json", {"build_tiny_base", "train_adapter"}),
                           ("results/tiny/base", {"build_tiny_base"}),
                           ("results/tiny/Q4_K_M.gguf", {"build_tiny_base", "train_adapter", "merge_adapter",
                                                         "convert_gguf", "quantize_gguf"})):
        assert wanted <= planned_rules(work, target), target
    run_snakemake(work, "results/tiny/adapter")
    assert (work / "results/tiny/adapter/adapter_model.safetensors").is_file()
    assert (work / "results/tiny/train/metrics.json").is_file()
    record = _record(work)
    assert record["base"]["tiny_base"]["seed"] == 1
    assert record["base_identity"]["weights"] == {
        k: v["sha256"] for k, v in json.loads((work / "results/tiny/base.complete").read_text())["shards"].items()}
    assert planned_rules(work, "results/tiny/adapter", "results/tiny/train/metrics.json") == set()


def test_a_changed_base_declaration_is_a_deliberate_retrain(tmp_path, monkeypatch):
    """While the run builds the base again its weights are unknown: the adapter guard judges the
    base by its declaration (a new seed: archive and retrain, never a silent merge); with nothing
    changed and the base coming back for an export, the adapter is put on hold, not refused."""
    from loraforge import training_record as tr
    from loraforge import workflow_hooks as wh
    from loraforge.config import validate
    from loraforge.snakemake_bridge import PendingJob

    monkeypatch.chdir(tmp_path)
    cfg = validate(small_config())
    adapter = tmp_path / "results/tiny/adapter"
    adapter.mkdir(parents=True)
    tr.write(adapter, tr.current_settings(cfg, "tiny", with_base=False))
    base = {"results/tiny/base", "results/tiny/base.complete"}
    job = PendingJob("train_adapter", {"model": "tiny"}, {"adapter": str(adapter), "metrics": "results/tiny/train/m.json"},
                     "updated input", False, frozenset(base))
    seeded = validate(small_config(tiny_base={"seed": 1}))
    assert wh._retrain_decision(job, seeded, base_rebuilt=True) == (True, "base.tiny_base.seed: 0 -> 1")
    assert wh._retrain_decision(job, cfg, base_rebuilt=True)[0] is False
    assert wh._only_for_the_base(job, cfg)
    forced = PendingJob("train_adapter", {"model": "tiny"}, job.output, "forced", False, None)
    assert not wh._only_for_the_base(forced, cfg)


@pytest.mark.slow
def test_after_a_consume_mode_merge_the_base_comes_back_before_training(work):
    """Issue 21, 6: a consume-mode merge (set here; auto picks it under a small disk_quota) uses the
    base's weights up. A
    later export builds the base again and keeps the adapter (the base came back with the same
    weights: nothing is trained); a settings change after that builds the base again, by the
    workflow's own dependencies, before training (it used to fail with FileNotFoundError on every
    rerun)."""
    consume = {"export": {"merge_mode": "consume"}}
    write_config(work, small_config(**consume))
    for q in ("Q4_K_M", "Q5_K_M"):
        (work / f"results/tiny/{q}.gguf").unlink()
    original = adapter_digest(work)
    run_snakemake(work, "results/tiny/Q4_K_M.gguf")
    assert not (work / "results/tiny/base.complete").exists() and not list((work / "results/tiny/base").glob("*.safetensors"))
    assert json.loads((work / "results/tiny/reports/merge.json").read_text())["mode"] == "consume"
    count("faults_injected")

    run = run_snakemake(work, "results/tiny/Q5_K_M.gguf")
    assert (work / "results/tiny/Q5_K_M.gguf").read_bytes()[:4] == b"GGUF"
    assert adapter_digest(work) == original, "the adapter was retrained or changed"
    assert not (work / "results/tiny/adapter-archive").exists(), "nothing left archived"
    assert "adapter kept, nothing to train" in (work / "logs/tiny/train_adapter.log").read_text()
    assert "Traceback" not in console(run)

    write_config(work, small_config(models={"tiny": {"lora": {"r": 4, "alpha": 8}}}, **consume))
    count("faults_injected")
    run_snakemake(work, "results/tiny/train/metrics.json")
    assert json.loads((work / "results/tiny/adapter/adapter_config.json").read_text())["r"] == 4
    assert (work / "results/tiny/base.complete").is_file()
    archived = next((work / "results/tiny/adapter-archive").iterdir())
    assert digest(archived / "adapter") == original
