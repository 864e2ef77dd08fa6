"""Progress where the user looks: `loraforge status` on a finished run, short `Params have
changed` reasons in a real dry run, `loraforge --help`, and plan tables within 120 columns."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, clone_pipeline, run_snakemake, small_config, write_config
from loraforge.snakemake_bridge import params_changes


def test_params_changes_name_only_the_changed_fields():
    old = {repr({"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
           repr({"max_steps": 3, "learning_rate": 0.01, "seed": 3407, "packing": True})}
    new = {repr({"r": 16, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
           repr({"max_steps": 40, "learning_rate": 0.01, "seed": 3407, "packing": True})}
    assert params_changes(old - new, new - old) == "max_steps 3 -> 40, r 8 -> 16"
    assert params_changes({"'a.jsonl'"}, {"'b.jsonl'"}) == "'a.jsonl' -> 'b.jsonl'"


def test_help_opens_with_a_whole_sentence_and_lists_status():
    run = subprocess.run([sys.executable, "-m", "loraforge.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    description = run.stdout.split("\n\n")[1]
    assert description.strip().endswith("."), description
    assert "status" in run.stdout


def test_plan_timeline_fits_120_columns():
    from test_plan import Planner, article_layout, article_sizes, chain

    from loraforge.plan import format_timeline

    text = format_timeline(Planner(chain(), article_sizes(), merge_mode="consume", layouts={"30b": article_layout()}).plan())
    assert max(map(len, text.splitlines())) <= 120, max(text.splitlines(), key=len)
    assert "<= peak" in text


@pytest.mark.slow
def test_status_of_a_finished_run(pipeline):
    run = subprocess.run([sys.executable, "-m", "loraforge.cli", "status", str(pipeline)], capture_output=True,
                         text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "run: finished" in out
    total = out.split("jobs: ")[1].split(" of ")[1].split()[0]
    assert f"jobs: {total} of {total} done (100%)" in out
    assert "trained tiny: 3 steps, final loss" in out and "trained tiny-moe: 3 steps" in out
    assert "planned peak of the latest run" in out and "measured peak" in out and "disk_quota" in out
    assert "GPU" in out


@pytest.mark.slow
def test_params_change_reason_is_short_in_a_dry_run(pipeline, tmp_path):
    work = clone_pipeline(pipeline, tmp_path / "work")
    write_config(work, small_config(models={"tiny": {"lora": {"r": 4}}}))
    run = run_snakemake(work, "-n", "results/tiny/Q5_K_M.gguf")
    reasons = [line for line in (run.stdout + run.stderr).splitlines() if "Params have changed" in line]
    assert reasons, run.stdout[-3000:]
    assert any(line.rstrip().endswith("Params have changed since last execution: r 8 -> 4") for line in reasons), reasons
    assert max(map(len, reasons)) < 200
