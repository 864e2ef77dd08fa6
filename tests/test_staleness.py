"""Only stale artifacts rebuild: each case is a real Snakemake run (dry run for the decision,
real run where the effect on files matters) on a private copy of the finished tiny pipeline."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO, clone_pipeline, run_snakemake, small_config, write_config

pytestmark = pytest.mark.slow  # real Snakemake runs on a copy of the `pipeline` fixture

BOTH = ("tiny", "tiny-moe")
EXPORT_CHAIN = {"merge_adapter", "convert_gguf"}


def planned_jobs(workdir: Path, *args: str) -> set[tuple]:
    """(rule, model, quant-or-None) of every job a dry run says it would run."""
    out = run_snakemake(workdir, "-n", *args).stdout
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not m or m.group(1) == "all":  # the target rule itself, not an artifact
            continue
        w = re.search(r"wildcards: (.*)", block)
        wildcards = dict(kv.split("=", 1) for kv in w.group(1).split(", ")) if w else {}
        jobs.add((m.group(1), wildcards.get("model"), wildcards.get("quant")))
    return jobs


def rules_of(jobs, model=None) -> set[str]:
    return {rule for rule, m, _ in jobs if model is None or m == model}


def mtimes(workdir: Path, pattern: str) -> dict[str, float]:
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in sorted(workdir.glob(pattern))}


@pytest.fixture
def work(pipeline, tmp_path) -> Path:
    return clone_pipeline(pipeline, tmp_path / "work")


def test_finished_pipeline_is_up_to_date(work):
    assert planned_jobs(work) == set()
    # the temp intermediates are gone, the finals are there
    for model in BOTH:
        assert not (work / "results" / model / "merged").exists()
        assert not (work / "results" / model / "F16.gguf").exists()  # export.intermediate auto: F16
        assert (work / "results" / model / "Q5_K_M.gguf").exists()


def test_system_prompt_change_reruns_only_modelfiles(work):
    write_config(work, small_config(ollama={"system": "You are a terse Rails reviewer."}))
    assert planned_jobs(work) == {("write_modelfile", m, None) for m in BOTH}
    ggufs = mtimes(work, "results/*/*.gguf")
    run_snakemake(work)
    assert mtimes(work, "results/*/*.gguf") == ggufs
    assert "You are a terse Rails reviewer." in (work / "results/tiny/Modelfile").read_text()


def test_new_quant_builds_only_that_quant_and_its_intermediates(work):
    write_config(work, small_config(export={"quants": ["Q4_K_M", "Q5_K_M", "Q6_K"]}))
    # ask for the new quant's artifacts (a bare run would also requantize the other quants:
    # Snakemake reruns every consumer of a temp file it regenerates; see README)
    targets = [f"results/{m}/{f}" for m in BOTH for f in ("Q6_K.gguf", "checks/Q6_K.json")]
    jobs = planned_jobs(work, *targets)
    assert jobs == {(r, m, q) for m in BOTH for r, q in [("merge_adapter", None), ("convert_gguf", None),
                                                          ("quantize_gguf", "Q6_K"), ("check_gguf", "Q6_K")]}
    finals = mtimes(work, "results/*/Q[45]_K_M.gguf")
    run_snakemake(work, *targets)
    assert (work / "results/tiny/Q6_K.gguf").exists()
    assert mtimes(work, "results/*/Q[45]_K_M.gguf") == finals
    assert not (work / "results/tiny/F16.gguf").exists(), "the intermediate is temp again"


def test_rank_change_rebuilds_that_model_only_and_archives_its_adapter(work):
    old_adapter = (work / "results/tiny/adapter/adapter_model.safetensors").read_bytes()
    write_config(work, small_config(models={"tiny": {"lora": {"r": 4, "alpha": 8}}}))
    jobs = planned_jobs(work)
    assert {m for _, m, _ in jobs} == {"tiny"}, "nothing of tiny-moe reruns"
    assert rules_of(jobs) == {"train_adapter", "merge_adapter", "convert_gguf", "quantize_gguf", "check_gguf",
                              "memory_table", "write_modelfile",
                              # the new adapter's quality is measured again (rules/quality.smk); the
                              # F16 intermediate (export.intermediate auto) is the reference itself
                              "reference_logits", "evaluate", "base_gguf", "conventions_score"}
    assert "prepare_data" not in rules_of(jobs) and "build_tiny_base" not in rules_of(jobs)
    moe_files = mtimes(work, "results/tiny-moe/**/*")
    run_snakemake(work)
    assert mtimes(work, "results/tiny-moe/**/*") == moe_files
    config = json.loads((work / "results/tiny/adapter/adapter_config.json").read_text())
    assert config["r"] == 4
    # the rank-8 adapter was archived, not deleted
    archived = list((work / "results/tiny/adapter-archive").glob("*/adapter/adapter_model.safetensors"))
    assert len(archived) == 1 and archived[0].read_bytes() == old_adapter


def test_data_cap_change_reruns_data_and_training_downstream(work):
    write_config(work, small_config(data={"max_source_share": 0.25}))
    jobs = planned_jobs(work)
    for model in BOTH:
        assert {"prepare_data", "train_adapter", "merge_adapter", "quantize_gguf"} <= rules_of(jobs, model)
    assert "build_tiny_base" not in rules_of(jobs)


def test_touched_scripts_and_a_fresh_clone_rerun_nothing(work, tmp_path):
    # a fresh clone: every workflow file gets a new mtime
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".venv", "tools", "results", "logs", ".snakemake", ".git"))
    now = os.stat(clone / "Snakefile").st_mtime + 10
    for path in clone.rglob("*"):
        os.utime(path, (now, now))
    import subprocess

    from conftest import snakemake_cmd

    cmd = snakemake_cmd(work, "-n")
    cmd[cmd.index("--snakefile") + 1] = str(clone / "Snakefile")
    cmd[cmd.index("--workflow-profile") + 1] = str(clone / "profiles" / "default")
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]


def test_retrained_adapter_makes_its_ggufs_stale(work):
    run_snakemake(work, "--forcerun", "train_adapter", "--config", "retrain=[tiny]", "--",
                  "results/tiny/train/metrics.json")
    jobs = planned_jobs(work)
    assert {m for _, m, _ in jobs} == {"tiny"}
    assert {("quantize_gguf", "tiny", "Q4_K_M"), ("quantize_gguf", "tiny", "Q5_K_M")} <= jobs
    assert "train_adapter" not in rules_of(jobs)
    # Up to here merge.json, stale as well, also carries the change down the temp files. Build
    # one quant of the new adapter: merge.json is new again and merged/ and the F16 intermediate are gone, so
    # the other quant, still from the old adapter, is stale only through its direct adapter
    # input (snakemake#2011; without it Snakemake says "Nothing to be done" here).
    run_snakemake(work, "results/tiny/Q4_K_M.gguf")
    assert not (work / "results/tiny/F16.gguf").exists() and not (work / "results/tiny/merged").exists()
    jobs = planned_jobs(work, "results/tiny/Q5_K_M.gguf")
    assert ("quantize_gguf", "tiny", "Q5_K_M") in jobs and "train_adapter" not in rules_of(jobs)


def test_q4_after_q8_deleted_reruns_export_chain_never_training(work):
    (work / "results/tiny/Q4_K_M.gguf").unlink()
    jobs = planned_jobs(work, "results/tiny/Q4_K_M.gguf")
    assert jobs == {("merge_adapter", "tiny", None), ("convert_gguf", "tiny", None), ("quantize_gguf", "tiny", "Q4_K_M")}
    q5 = mtimes(work, "results/tiny/Q5_K_M.gguf")
    adapter = mtimes(work, "results/tiny/adapter/*")
    run_snakemake(work, "results/tiny/Q4_K_M.gguf")
    assert (work / "results/tiny/Q4_K_M.gguf").exists()
    assert mtimes(work, "results/tiny/Q5_K_M.gguf") == q5
    assert mtimes(work, "results/tiny/adapter/*") == adapter
    # `all` then refreshes what reads the new Q4_K_M: its check, the memory table and the quality
    # table. The evaluation's temp F16 reference comes from a fresh merge, and Snakemake reruns
    # every job whose input another job updates, so the export chain runs again (README
    # "Quality"): never data preparation, never training
    rest = planned_jobs(work)
    assert {("check_gguf", "tiny", "Q4_K_M"), ("memory_table", "tiny", None), ("evaluate", "tiny", None)} <= rest
    assert not {rule for rule, _, _ in rest} & {"build_tiny_base", "prepare_data", "train_adapter"}


# --- adapter safety -----------------------------------------------------------------------

def test_forced_retrain_without_opt_in_is_refused_and_the_adapter_survives(work):
    adapter = work / "results/tiny/adapter"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    run = run_snakemake(work, "--forcerun", "train_adapter", "--", "results/tiny/train/metrics.json", check=False)
    assert run.returncode != 0
    assert "refusing to retrain existing adapters" in run.stdout + run.stderr
    assert "retrain=[tiny]" in (run.stdout + run.stderr).replace("MODEL,...", "tiny")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert not (work / "results/tiny/adapter-archive").exists()


def test_touched_training_data_does_not_retrain(work):
    # Snakemake compares the content of small inputs: a touch alone changes nothing
    for name in ("train.jsonl", "validation.jsonl"):
        os.utime(work / "results/tiny/data" / name)
    assert planned_jobs(work, "results/tiny/train/metrics.json") == set()


def test_changed_training_data_with_unchanged_settings_is_not_retrained_silently(work):
    with open(work / "results/tiny/data/train.jsonl", "a") as f:  # edited by hand
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    run = run_snakemake(work, "results/tiny/train/metrics.json", check=False)
    assert run.returncode != 0 and "refusing to retrain" in run.stdout + run.stderr
    assert (work / "results/tiny/adapter/adapter_model.safetensors").exists()
    # the way out the message offers: keep the adapter, mark it up to date
    run_snakemake(work, "--touch", "results/tiny/adapter", "results/tiny/train/metrics.json")
    assert "train_adapter" not in rules_of(planned_jobs(work, "results/tiny/train/metrics.json"))


def test_opted_in_retrain_archives_the_old_adapter(work):
    old = (work / "results/tiny/adapter/adapter_model.safetensors").read_bytes()
    run_snakemake(work, "--forcerun", "train_adapter", "--config", "retrain=[tiny]", "--",
                  "results/tiny/train/metrics.json")
    archived = list((work / "results/tiny/adapter-archive").glob("*/adapter/adapter_model.safetensors"))
    assert len(archived) == 1 and archived[0].read_bytes() == old
    assert (work / "results/tiny/adapter/adapter_model.safetensors").exists()


def test_failed_training_keeps_the_archived_adapter_and_can_be_rerun(work):
    old = (work / "results/tiny/adapter/adapter_model.safetensors").read_bytes()
    write_config(work, small_config(models={"tiny": {"lora": {"r": 4, "alpha": 8}}}))
    # training crashes part-way: a base shard is corrupt (truncated)
    shard = sorted((work / "results/tiny/base").glob("*.safetensors"))[-1]
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    run = run_snakemake(work, "results/tiny/train/metrics.json", check=False)
    assert run.returncode != 0
    assert not (work / "results/tiny/adapter/adapter_model.safetensors").exists(), "no half-written adapter"
    archived = list((work / "results/tiny/adapter-archive").glob("*/adapter/adapter_model.safetensors"))
    assert len(archived) == 1 and archived[0].read_bytes() == old
    # fix the cause and rerun: the failed step simply runs again
    shard.write_bytes(good)
    run_snakemake(work, "results/tiny/train/metrics.json")
    assert json.loads((work / "results/tiny/adapter/adapter_config.json").read_text())["r"] == 4
