"""The adapter guard's decisions and `loraforge restore-adapter`, on real adapter folders made
here (a LoRA safetensors file, adapter_config.json, the training record): no model, no
Snakemake run, so fast mode checks them. The real runs are in test_staleness and test_faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import small_config
from loraforge import training_record
from loraforge.cli import main
from loraforge.snakemake_bridge import PendingJob
from loraforge.workflow_hooks import AdapterGuardError, archive_adapter, guard_train_jobs

REPORTS = ("metrics.json", "loss.csv", "loss.png")


def make_adapter(folder: Path, tag: str, record: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    seed = sum(map(ord, tag))
    tensor = np.random.default_rng(seed).standard_normal((8, 16)).astype(np.float32)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": tensor},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "tag": tag}))
    if record is not None:
        training_record.write(folder, record)
    return folder


def make_reports(train: Path, tag: str) -> None:
    train.mkdir(parents=True, exist_ok=True)
    for name in REPORTS:
        (train / name).write_text(f"{name} of {tag}\n")


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path, monkeypatch) -> Path:
    """results/tiny of a workdir (the cwd: the config's paths are relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "results" / "tiny"


# ----------------------------------------------------------------------------- the guard


def train_job(model: str = "tiny", settings_changed: bool = False) -> PendingJob:
    out = f"results/{model}"
    return PendingJob(rule="train_adapter", wildcards={"model": model},
                      output={"adapter": f"{out}/adapter", "metrics": f"{out}/train/metrics.json",
                              "loss_csv": f"{out}/train/loss.csv", "loss_png": f"{out}/train/loss.png"},
                      reasons="updated input files", settings_changed=settings_changed)


def test_guard_refuses_a_retrain_with_unchanged_settings_and_keeps_the_adapter(model_dir):
    config = small_config()
    make_adapter(model_dir / "adapter", "v1", training_record.current_settings(config, "tiny"))
    make_reports(model_dir / "train", "v1")
    before = contents(model_dir / "adapter")
    with pytest.raises(AdapterGuardError) as refusal:
        guard_train_jobs([train_job()], config)
    message = str(refusal.value)
    assert "refusing to retrain" in message and "tiny: results/tiny/adapter was trained with today's settings" in message
    assert ("keep it: snakemake --cores 1 --touch results/tiny/adapter results/tiny/train/metrics.json "
            "results/tiny/train/loss.csv results/tiny/train/loss.png") in message
    assert contents(model_dir / "adapter") == before and not (model_dir / "adapter-archive").exists()


def test_guard_archives_an_adapter_whose_settings_changed_with_its_reports(model_dir):
    config = small_config()
    old = training_record.current_settings(config, "tiny")
    old["lora"]["r"] = 4  # trained with another rank
    make_adapter(model_dir / "adapter", "v1", old)
    make_reports(model_dir / "train", "v1")
    before = contents(model_dir / "adapter")
    [(model, archive)] = guard_train_jobs([train_job()], config)
    assert model == "tiny" and archive.parent == Path("results/tiny/adapter-archive")
    assert contents(archive / "adapter") == before and not (model_dir / "adapter").exists()
    assert sorted(p.name for p in (archive / "train").iterdir()) == sorted(REPORTS)


def test_guard_opt_in_and_adapters_without_a_record(model_dir):
    config = small_config()
    make_adapter(model_dir / "adapter", "v1", training_record.current_settings(config, "tiny"))
    # --config retrain=[tiny]: archived although nothing changed
    assert len(guard_train_jobs([train_job()], {**config, "retrain": ["tiny"]})) == 1
    # an adapter from before the record: Snakemake's params comparison decides
    make_adapter(model_dir / "adapter", "v0")
    with pytest.raises(AdapterGuardError, match="refusing to retrain"):
        guard_train_jobs([train_job(settings_changed=False)], config)
    assert len(guard_train_jobs([train_job(settings_changed=True)], config)) == 1
    # no adapter: nothing to guard
    assert guard_train_jobs([train_job()], config) == []


# ----------------------------------------------------------------------------- restore-adapter


def archived(model_dir: Path, tag: str) -> Path:
    """An archive of adapter `tag` and its reports, as a retrain leaves it."""
    make_adapter(model_dir / "adapter", tag)
    make_reports(model_dir / "train", tag)
    return archive_adapter(model_dir / "adapter", [model_dir / "train" / name for name in REPORTS])


def test_restore_after_moving_the_adapter_by_hand_keeps_the_moved_adapters_reports(model_dir, capsys):
    """The old advice: `mv adapter adapter.old`, then restore. The reports in train/ are adapter.old's:
    they are set aside under a clear name, never overwritten."""
    archive = archived(model_dir, "v1")
    v1 = contents(archive / "adapter")
    make_adapter(model_dir / "adapter", "v2")
    make_reports(model_dir / "train", "v2")
    (model_dir / "adapter").rename(model_dir / "adapter.old")
    assert main(["restore-adapter", str(archive)]) == 0
    out = capsys.readouterr().out
    assert contents(model_dir / "adapter") == v1
    assert {n: t.decode() for n, t in contents(model_dir / "train").items()} == {n: f"{n} of v1\n" for n in REPORTS}
    [aside] = (model_dir / "train").glob("replaced-by-restore-*")
    assert {n: t.decode() for n, t in contents(aside).items()} == {n: f"{n} of v2\n" for n in REPORTS}
    assert f"set aside {model_dir / 'train' / 'metrics.json'}" in out and str(aside) in out


def test_restore_over_an_adapter_archives_it_first_when_asked(model_dir, capsys):
    archive = archived(model_dir, "v1")
    make_adapter(model_dir / "adapter", "v2")
    make_reports(model_dir / "train", "v2")
    v1, v2 = contents(archive / "adapter"), contents(model_dir / "adapter")
    assert main(["restore-adapter", str(archive)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--archive-current" in err[0] and str(model_dir / "adapter") in err[0]
    assert contents(model_dir / "adapter") == v2
    assert main(["restore-adapter", "--archive-current", str(archive)]) == 0
    assert contents(model_dir / "adapter") == v1
    assert (model_dir / "train" / "metrics.json").read_text() == "metrics.json of v1\n"
    # v2 went to the archive with its own reports, and comes back the same way
    [kept] = [a for a in (model_dir / "adapter-archive").iterdir() if (a / "adapter").is_dir()]
    assert contents(kept / "adapter") == v2 and (kept / "train" / "metrics.json").read_text() == "metrics.json of v2\n"
    assert main(["restore-adapter", "--archive-current", str(kept)]) == 0
    assert contents(model_dir / "adapter") == v2
    assert (model_dir / "train" / "loss.csv").read_text() == "loss.csv of v2\n"
    assert not list((model_dir / "train").glob("replaced-by-restore-*"))  # every report went to an archive


@pytest.mark.parametrize("damage", ["weights missing", "weights truncated", "config missing"])
def test_restore_of_an_incomplete_archive_fails_naming_the_file(model_dir, capsys, damage):
    archive = archived(model_dir, "v1")
    weights, config = archive / "adapter" / "adapter_model.safetensors", archive / "adapter" / "adapter_config.json"
    if damage == "weights missing":
        weights.unlink()
        needle = f"{weights} is missing: the archive is incomplete; nothing was restored"
    elif damage == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        needle = f"{weights}: tensor"
    else:
        config.unlink()
        needle = f"{config} is missing"
    make_reports(model_dir / "train", "v2")
    assert main(["restore-adapter", str(archive)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (model_dir / "adapter").exists()
    assert (model_dir / "train" / "metrics.json").read_text() == "metrics.json of v2\n"  # untouched


# ----------------------------------------------------------------------------- in a real run


@pytest.mark.slow
def test_the_guard_refusal_is_one_message_without_a_traceback(tmp_path):
    """A real Snakemake run that would retrain an existing adapter: the onstart hook refuses, before
    any job, with lora-forge's one-line error (and the commands), not Snakemake's traceback of the hook."""
    from conftest import run_snakemake, write_config

    write_config(tmp_path, small_config())
    adapter = make_adapter(tmp_path / "results" / "tiny" / "adapter", "v1")
    before = contents(adapter)
    run = run_snakemake(tmp_path, "results/tiny/train/metrics.json", check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-3000:]
    assert "[lora-forge] error in rule train_adapter: refusing to retrain existing adapters" in run.stderr, out[-3000:]
    assert "keep it: snakemake --cores 1 --touch results/tiny/adapter" in out
    assert "Traceback" not in out and 'File "' not in out and "AdapterGuardError" not in out, out[-3000:]
    assert contents(adapter) == before and not (tmp_path / "results" / "tiny" / "base").exists()  # no job ran
    locks = tmp_path / ".snakemake" / "locks"
    assert not locks.exists() or not any(locks.iterdir())  # the lock was released
