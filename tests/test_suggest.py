"""Errors that suggest the fix: a misspelled config key gets the nearest name and its line in
config.yaml, a key given at the wrong level (as `--config` does) gets its full path, and a
target no rule makes gets the nearest buildable name and the model's buildable files (real
Snakemake runs: the message replaces Snakemake's MissingRuleException)."""

from __future__ import annotations

import copy

import pytest
import yaml

import loraforge.config as lfconfig
from conftest import REPO, run_snakemake, small_config, write_config
from loraforge.suggest import nearest


def _error(config: dict, source=None) -> str:
    with pytest.raises(lfconfig.ConfigError) as e:
        lfconfig.validate(copy.deepcopy(config), source=source)
    return str(e.value)


def test_typo_gets_did_you_mean_and_its_line(tmp_path):
    cfg = small_config()
    cfg["defaults"]["lora"]["rank"] = 16  # Axolotl's/PEFT's name for r
    cfg["models"]["tiny"]["train"]["max_stepz"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    lines = path.read_text().splitlines()
    message = _error(cfg, source=path)
    rank_line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith("rank:"))
    stepz_line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith("max_stepz:"))
    assert f"defaults.lora: 'rank' was unexpected (config.yaml line {rank_line}): did you mean 'r'?" in message
    assert f"models.tiny.train: 'max_stepz' was unexpected (config.yaml line {stepz_line}): did you mean 'max_steps'?" in message


def test_command_line_key_without_its_prefix_gets_the_full_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(small_config(), sort_keys=False))
    cfg = small_config()
    cfg["max_steps"] = 3  # snakemake --config max_steps=3 puts it at the top level
    message = _error(cfg, source=path)
    assert "'max_steps' was unexpected (from --config): it belongs under defaults.train.max_steps" in message
    assert "--config 'defaults={train: {max_steps: 3}}'" in message


def test_value_errors_name_their_line(tmp_path):
    cfg = small_config()
    cfg["models"]["tiny"]["lora"]["r"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "r: 0")
    assert f"models.tiny.lora.r: 0 is less than the minimum of 1 (config.yaml line {line})" in _error(cfg, source=path)


def test_nearest_prefers_known_aliases_then_spelling():
    assert nearest("rank", ["r", "alpha", "dropout"]) == "r"
    assert nearest("lerning_rate", ["learning_rate", "lr_scheduler"]) == "learning_rate"
    assert nearest("zzz", ["r", "alpha"]) is None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("targets")
    write_config(work, small_config())
    return work


@pytest.mark.slow  # real Snakemake runs (each stops while parsing: seconds)
@pytest.mark.parametrize(
    "target, expected",
    [
        ("results/tinyy/Q5_K_M.gguf", "unknown model 'tinyy' (models in config.yaml: tiny, tiny-moe, 3b, 8b, 30b); "
                                      "did you mean results/tiny/Q5_K_M.gguf?"),
        ("results/tiny/Q5_KM.gguf", "results/tiny/Q5_KM.gguf: no rule makes this file; did you mean results/tiny/Q5_K_M.gguf?"),
        ("results/tiny/Q6_K.gguf", "results/tiny/Q6_K.gguf: Q6_K is not in export.quants (Q4_K_M, Q5_K_M): add it there"),
    ],
)
def test_unknown_target_suggests_what_can_be_built(workdir, target, expected):
    run = run_snakemake(workdir, "-n", target, check=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert expected in out, out[-3000:]
    assert "what can be built for tiny (in results/tiny/):" in out and "Q4_K_M.gguf" in out and "Modelfile" in out
    assert "MissingRuleException" not in out


@pytest.mark.slow
def test_buildable_target_still_plans(workdir):
    run = run_snakemake(workdir, "-n", "results/tiny/Q5_K_M.gguf")
    assert "quantize_gguf" in run.stdout + run.stderr


@pytest.mark.slow
def test_plan_of_an_unknown_target_suggests_too(workdir):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "loraforge.cli", "plan", "--snakefile", str(REPO / "Snakefile"),
                          "results/tiny/Q5_KM.gguf"], cwd=workdir, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    assert "did you mean results/tiny/Q5_K_M.gguf?" in run.stdout + run.stderr, run.stderr[-2000:]
