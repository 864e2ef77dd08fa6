"""The tiny pipeline through a real Slurm cluster: `snakemake --profile profiles/slurm` on a
single-node slurmctld + slurmd started on localhost (tests/slurm_cluster.py), from the data
to results/tiny/Q4_K_M.gguf. Checks that every job went through Slurm (slurmctld's log and its
job-completion records), that the resources the rules declare reached Slurm, that temp()
files were removed and the adapter kept, and that the GGUF is the local run's, byte for byte.

Skips, with the exact reason, only when Slurm cannot start here (no root to install it, a
daemon that does not come up)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, small_config, write_config
from slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TARGET = "results/tiny/Q4_K_M.gguf"
# the tiny base is the local run's (its pre-training is a test fixture, not part of a cluster
# export, and would double this test's time): everything from the data on runs on Slurm
REUSED_BASE = ("results/tiny/base", "results/tiny/base.complete", "results/tiny/reports/base.json")
RULES_TO_TARGET = {"prepare_data", "train_adapter", "merge_adapter", "convert_gguf", "quantize_gguf"}
TRAIN_MEM_MB = 3000  # a per-model override, to see it arrive in Slurm's allocation


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm") / "cluster")
    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        pytest.skip(f"Slurm cannot run here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def slurm_run(cluster: LocalSlurm, workdir: Path, *targets: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {
        **cluster.env,
        # the jobs run `python -m snakemake` and the rule scripts on the node: the same venv,
        # and this checkout's loraforge (sbatch --export=ALL carries the environment over)
        "PATH": f"{bin_dir}{os.pathsep}{cluster.env.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), cluster.env.get("PYTHONPATH")) if p),
    }
    cmd = [
        str(bin_dir / "snakemake"),
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--workflow-profile", str(REPO / "profiles" / "default"),
        "--profile", str(REPO / "profiles" / "slurm"),
        # this test cluster has no accounting database (sacct) and no accounts
        "--slurm-status-command", "squeue",
        "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-keep-successful-logs",
        "--latency-wait", "5",
        *targets,
    ]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)


def submitted_jobs(output: str) -> dict[str, str]:
    """{Slurm job id: rule} from Snakemake's "submitted with SLURM jobid" lines."""
    jobs = {}
    for m in re.finditer(r"submitted with SLURM jobid (\d+) \(log: ([^)]*)\)", output):
        rule = re.search(r"rule_(\w+?)/", m.group(2))
        jobs[m.group(1)] = rule.group(1) if rule else "?"
    return jobs


def test_tiny_pipeline_runs_through_slurm_and_matches_the_local_run(slurm, pipeline, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # the `pipeline` fixture's config; resources are no params, so the outputs must not change
    write_config(workdir, small_config(models={"tiny": {"resources": {"train_adapter": {"mem_mb": TRAIN_MEM_MB}}}}))
    for rel in REUSED_BASE:  # timestamps kept, so Snakemake sees the base as built
        src, dst = pipeline / rel, workdir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)

    run = slurm_run(slurm, workdir, TARGET)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"snakemake --profile profiles/slurm failed:\n{output[-6000:]}"

    # every job was submitted with sbatch, and slurmctld saw each one submitted and completed
    jobs = submitted_jobs(output)
    assert set(jobs.values()) == RULES_TO_TARGET, output[-4000:]
    assert set(jobs) <= set(slurm.submitted_job_ids())
    completed = {j["JobId"]: j for j in slurm.completed_jobs()}
    for job_id, rule in jobs.items():
        assert job_id in completed, f"{rule} (Slurm job {job_id}) has no completion record"
        assert completed[job_id]["JobState"] == "COMPLETED", completed[job_id]
        assert completed[job_id]["NodeList"] == slurm.hostname

    # the rules' threads and resources are what Slurm allocated (config.yaml + the override)
    tres = {rule: completed[job_id]["Tres"] for job_id, rule in jobs.items()}
    assert f"mem={TRAIN_MEM_MB}M" in tres["train_adapter"] and "cpu=2" in tres["train_adapter"]
    assert "mem=4000M" in tres["quantize_gguf"] and "cpu=2" in tres["quantize_gguf"]
    assert "mem=8000M" in tres["merge_adapter"] and "cpu=1" in tres["merge_adapter"]

    # temp() intermediates were removed by the submitting Snakemake; the adapter is kept
    tiny = workdir / "results" / "tiny"
    assert not (tiny / "merged").exists() and not (tiny / "F16.gguf").exists()
    assert (tiny / "adapter" / "adapter_model.safetensors").is_file()

    # the same bytes as the local run of the same config: preparing the data and training are
    # seeded (tests/test_reproducible_training.py), the rest is exact
    local = pipeline / "results" / "tiny"
    for name in ("data/train.jsonl", "adapter/adapter_model.safetensors"):
        assert (tiny / name).read_bytes() == (local / name).read_bytes(), f"{name} differs from the local run's"
    assert (workdir / TARGET).read_bytes() == (pipeline / TARGET).read_bytes(), "the GGUF differs from the local run's"


def test_a_cluster_that_cannot_start_says_why_and_leaves_nothing_running(tmp_path, monkeypatch):
    """The skip reason of the test above: the daemon that failed and its log's last lines."""
    monkeypatch.setattr(LocalSlurm, "slurm_conf", lambda self: "ClusterName=broken\nNoSuchOption=1\n")
    cluster = LocalSlurm(tmp_path / "cluster")
    with pytest.raises(SlurmUnavailable, match=r"slurmctld exited with \d+: .*NoSuchOption"):
        with cluster:
            pass
    assert not cluster.procs  # munged, started first, was stopped again
