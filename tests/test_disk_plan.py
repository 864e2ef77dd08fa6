"""The disk plan against real runs of the workflow: planned vs measured peak, the quota
check before any job, and the low-disk (consume) mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import clone_pipeline, run_snakemake, small_config, write_config

pytestmark = pytest.mark.slow  # real Snakemake runs (the `pipeline` fixture and copies)


def disk_reports(workdir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((workdir / "logs" / "disk").glob("*.json"))]


def test_plan_matches_the_measured_peak_within_10_percent(pipeline):
    (report,) = disk_reports(pipeline)
    assert report["success"]
    planned, measured = report["planned_peak_bytes"], report["measured_peak_bytes"]
    assert measured > 0
    assert abs(planned - measured) <= 0.10 * measured, report
    timeline = sorted((pipeline / "logs" / "disk").glob("*.png"))
    assert timeline and timeline[0].read_bytes()[:4] == b"\x89PNG"


def test_a_quota_below_the_peak_aborts_before_any_job(tmp_path):
    write_config(tmp_path, small_config(disk_quota="5MB"))
    run = run_snakemake(tmp_path, check=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "exceeds the disk quota" in out and "Peak:" in out, out[-3000:]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.gguf"))
    assert not (tmp_path / "results" / "tiny" / "base").exists(), "no job ran"


def test_consume_mode_uses_the_base_up_and_never_retrains(pipeline, tmp_path):
    work = clone_pipeline(pipeline, tmp_path / "work")
    for q in ("Q4_K_M", "Q5_K_M"):
        (work / "results" / "tiny" / f"{q}.gguf").unlink()
    # Q8_0 set (auto takes F16 for the tiny model): this real run covers requantizing
    write_config(work, small_config(export={"merge_mode": "consume", "intermediate": "Q8_0"}))
    adapter_mtime = (work / "results/tiny/adapter/adapter_model.safetensors").stat().st_mtime_ns
    run = run_snakemake(work, "results/tiny/Q4_K_M.gguf", "results/tiny/Q5_K_M.gguf")
    assert "results/tiny/Q8_0.gguf" in run.stdout + run.stderr and "F16.gguf" not in run.stdout + run.stderr
    tiny = work / "results" / "tiny"
    assert (tiny / "Q4_K_M.gguf").exists() and (tiny / "Q5_K_M.gguf").exists()
    assert not list((tiny / "base").glob("*.safetensors")), "consume mode uses the base's weights up"
    assert not (work / "results/tiny/base.complete").exists()
    assert not (tiny / "merged").exists() and not (tiny / "Q8_0.gguf").exists()
    merge = json.loads((tiny / "reports" / "merge.json").read_text())
    assert merge["mode"] == "consume"
    report = disk_reports(work)[-1]
    assert abs(report["planned_peak_bytes"] - report["measured_peak_bytes"]) <= 0.10 * report["measured_peak_bytes"]
    # a later export rebuilds the base (tiny: built again; hub: fetched again) but never trains:
    # the train job is planned (its base comes back) and keeps the adapter when the base's
    # weights are the same (tests/test_faults.py: ...consume_mode_merge_the_base_comes_back...)
    write_config(work, small_config(export={"merge_mode": "consume", "intermediate": "Q8_0",
                                            "quants": ["Q4_K_M", "Q5_K_M", "Q6_K"]}))
    out = run_snakemake(work, "-n", "results/tiny/Q6_K.gguf").stdout
    assert "build_tiny_base" in out and "merge_adapter" in out
    assert "prepare_data" not in out
    assert (tiny / "adapter/adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime
