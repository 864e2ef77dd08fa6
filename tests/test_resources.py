"""Scheduler resources: precedence of config.yaml's `resources:` and per-model overrides, disk_mb
from the size model, what real Snakemake jobs declare (dry runs, --set-resources), the
`loraforge plan --resources` table, config errors and the cluster profiles' options."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_snakemake, small_config, write_config
from loraforge import config as lfconfig
from loraforge import resources as R
from loraforge import sizes as S
from loraforge.cli import main as cli_main


def validated(**overrides) -> dict:
    return lfconfig.validate(small_config(**overrides))


def test_shipped_defaults_keep_todays_threads_and_fill_the_rest():
    cfg = validated()
    assert R.threads(cfg, "train_adapter", "tiny") == 2
    assert R.threads(cfg, "convert_gguf", "tiny") == 2
    assert R.threads(cfg, "prepare_data", "tiny") == 1  # no threads: before this change either
    assert R.resource(cfg, "train_adapter", "mem_mb", "tiny") == 16000
    assert R.resource(cfg, "write_modelfile", "runtime", "tiny") == 30  # resources.default
    assert R.resource(cfg, "train_adapter", "gpu", "tiny") is None  # never declared unless set
    assert R.resource(cfg, "train_adapter", "gpu", "30b") == 1


def test_precedence_model_rule_over_model_default_over_rule_over_default():
    cfg = validated(
        resources={"default": {"mem_mb": 111}, "merge_adapter": {"mem_mb": 222}},
        models={"tiny": {"resources": {"default": {"mem_mb": 333, "runtime": 7},
                                       "merge_adapter": {"mem_mb": 444, "gpu_model": "h100"}}}},
    )
    assert R.resource(cfg, "merge_adapter", "mem_mb", "tiny") == 444
    assert R.resource(cfg, "convert_gguf", "mem_mb", "tiny") == 333  # model default beats rule
    assert R.resource(cfg, "convert_gguf", "mem_mb", "tiny-moe") == 8000  # rule (schema default)
    assert R.resource(cfg, "memory_table", "mem_mb", "tiny-moe") == 111  # resources.default
    assert R.resource(cfg, "merge_adapter", "runtime", "tiny") == 7
    assert R.resource(cfg, "merge_adapter", "gpu_model", "tiny") == "h100"
    assert R.resource(cfg, "merge_adapter", "gpu_model", "tiny-moe") is None


def test_disk_mb_is_inputs_plus_outputs_from_the_size_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing exists: all estimates
    cfg = validated()
    arch = cfg["models"]["30b"]["arch"]
    shards, other = S.model_folder_bytes(arch)
    base = other + sum(sh.bytes for sh in shards)
    q8, q5 = S.gguf_bytes(arch, "Q8_0"), S.gguf_bytes(arch, "Q5_K_M")

    def mb(nbytes):
        return int(-(-nbytes * R.DISK_HEADROOM // R.MB)) + R.DISK_EXTRA_MB

    inputs = ["results/30b/Q8_0.gguf", "results/30b/adapter"]
    adapter = S.lora_adapter_bytes(arch, 16)
    quantize = R.resource(cfg, "quantize_gguf", "disk_mb", "30b", inputs, {"model": "30b", "quant": "Q5_K_M"})
    assert abs(quantize - mb(q8 + adapter + q5)) <= 1
    merge = R.resource(cfg, "merge_adapter", "disk_mb", "30b", ["results/30b/base", "results/30b/adapter"],
                       {"model": "30b"})
    assert abs(merge - mb(2 * base + adapter)) <= 1  # base in, merged out (staged: a full copy)
    assert 120_000 < merge < 150_000  # a 30B-A3B in bf16 is ~61 GB


def test_disk_mb_measures_what_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = validated()
    merged = tmp_path / "results" / "tiny" / "merged"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"\1" * 50_000_000)
    convert = R.resource(cfg, "convert_gguf", "disk_mb", "tiny", ["results/tiny/merged"],
                         {"model": "tiny", "intermediate": "Q8_0"})
    q8 = R._artifact_estimates(R._config_key(cfg), "tiny", str(tmp_path))["results/tiny/Q8_0.gguf"]
    assert convert == int(-(-(50_000_000 + q8) * R.DISK_HEADROOM // R.MB)) + R.DISK_EXTRA_MB


def test_check_gguf_memory_comes_from_the_memory_model():
    cfg = validated()
    mem = R.resource(cfg, "check_gguf", "mem_mb", "30b", wildcards={"model": "30b", "quant": "Q5_K_M"})
    # a ~21 GB Q5_K_M GGUF is mapped whole, plus KV/compute at 256 tokens and the process
    assert 20_000 < mem < 24_000
    assert R.resource(validated(resources={"check_gguf": {"mem_mb": 999}}), "check_gguf", "mem_mb", "30b",
                      wildcards={"model": "30b", "quant": "Q5_K_M"}) == 999


@pytest.mark.parametrize("override, field", [
    ({"resources": {"train_adapter": {"mem_gb": 4}}}, "resources.train_adapter"),
    ({"resources": {"train_adaptor": {"mem_mb": 4}}}, "resources"),
    ({"models": {"30b": {"resources": {"train_adapter": {"gpu": -1}}}}}, "models.30b.resources.train_adapter.gpu"),
    ({"resources": {"default": {"threads": 0}}}, "resources.default.threads"),
])
def test_bad_resources_name_the_field(override, field):
    with pytest.raises(lfconfig.ConfigError) as e:
        validated(**override)
    assert f"{field}:" in str(e.value), str(e.value)


def declared_resources(output: str) -> dict[str, dict[str, str]]:
    """{rule[wildcards]: {name: value}} from a Snakemake dry run's job listing."""
    jobs, rule, wildcards = {}, None, ""
    for line in output.splitlines():
        if m := re.match(r"rule (\w+):", line.strip()):
            rule, wildcards = m.group(1), ""
        elif line.strip().startswith("wildcards:"):
            wildcards = line.split(":", 1)[1].strip()
        elif line.strip().startswith("threads:") and rule:
            jobs.setdefault(f"{rule}[{wildcards}]", {})["threads"] = line.split(":", 1)[1].strip()
        elif line.strip().startswith("resources:") and rule:
            pairs = dict(kv.strip().split("=", 1) for kv in line.split(":", 1)[1].split(","))
            jobs.setdefault(f"{rule}[{wildcards}]", {}).update(pairs)
    return jobs


@pytest.mark.slow
def test_rules_declare_the_resources_and_set_resources_overrides_them(tmp_path):
    write_config(tmp_path, small_config(models={"tiny": {"resources": {"train_adapter": {"gpu": 1, "gpu_model": "a100"}}}}))
    run = run_snakemake(tmp_path, "-n", "results/tiny/Q4_K_M.gguf", "results/tiny/checks/Q4_K_M.json",
                        "--set-resources", "merge_adapter:mem_mb=1234", "--set-threads", "quantize_gguf=1")
    jobs = declared_resources(run.stdout + run.stderr)
    train = jobs["train_adapter[model=tiny]"]
    assert train["gpu"] == "1" and train["gpu_model"] == "a100" and train["mem_mb"] == "16000"
    assert train["runtime"] == "240" and train["threads"] == "2"
    assert jobs["merge_adapter[model=tiny]"]["mem_mb"] == "1234"
    assert jobs["quantize_gguf[model=tiny, quant=Q4_K_M]"].get("threads", "1") == "1"
    for job, res in jobs.items():
        assert int(res["disk_mb"]) > R.DISK_EXTRA_MB, job  # every job: an estimate, not Snakemake's default
        if not job.startswith("train_adapter"):
            assert "gpu" not in res, job


@pytest.mark.slow
def test_plan_prints_the_resource_table(tmp_path, capsys, monkeypatch):
    write_config(tmp_path, small_config())
    rc = cli_main(["plan", "--resources", "-d", str(tmp_path), "-s", str(REPO / "Snakefile"),
                   "--quota", "1TB", "--free", "1TB", "results/tiny/Q4_K_M.gguf", "results/30b/Q5_K_M.gguf"])
    out = capsys.readouterr().out
    assert rc == 0, out
    monkeypatch.chdir(tmp_path)
    table = out.split("Resources each job requests")[1].split("Disk timeline")[0]
    rows = {tuple(line.split()[:2]): line.split() for line in table.splitlines()[3:] if line.strip()}
    train_30b = rows[("train_adapter", "model=30b")]
    assert train_30b[2:7] == ["8", "96000", train_30b[4], "720", "1"]
    cfg = lfconfig.validate(small_config())
    assert int(train_30b[4]) == R.resource(cfg, "train_adapter", "disk_mb", "30b",
                                           ["results/30b/base", "results/30b/data/train.jsonl",
                                            "results/30b/data/validation.jsonl"], {"model": "30b"})
    assert rows[("build_tiny_base", "model=tiny")][2:4] == ["2", "4000"]


@pytest.mark.parametrize("profile", ["slurm", "kubernetes"])
def test_cluster_profiles_are_valid_snakemake_options(profile):
    """Every key of the profile is an option of this Snakemake with its executor plugin
    installed (Snakemake's own parser reads the profile)."""
    from snakemake.cli import get_argument_parser

    settings = yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())
    assert settings["executor"] == profile
    parser = get_argument_parser()
    known = {opt for action in parser._actions for opt in action.option_strings}
    unknown = [key for key in settings if f"--{key}" not in known]
    assert not unknown, f"profiles/{profile}: not Snakemake options: {unknown}"
    from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

    assert ExecutorPluginRegistry().get_plugin(profile) is not None
