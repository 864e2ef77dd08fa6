"""The schema fills defaults and rejects bad input with a message naming the field."""

import copy

import pytest
import yaml

from conftest import REPO
from loraforge import config as lfconfig

SHIPPED = yaml.safe_load((REPO / "config.yaml").read_text())


def validated(overrides=None, base=None):
    cfg = lfconfig.deep_merge(copy.deepcopy(base or SHIPPED), overrides or {})
    return lfconfig.validate(cfg)


def error_of(overrides, base=None) -> str:
    with pytest.raises(lfconfig.ConfigError) as info:
        validated(overrides, base)
    return str(info.value)


def test_shipped_config_is_valid_and_has_the_articles_models():
    cfg = validated()
    assert set(cfg["models"]) >= {"tiny", "tiny-moe", "3b", "8b", "30b"}
    s30 = lfconfig.model_settings(cfg, "30b")
    assert s30["base"] == {"hub": "unsloth/qwen3-coder-30b-a3b-instruct"}
    assert (s30["lora"]["r"], s30["lora"]["alpha"], s30["train"]["epochs"]) == (16, 32, 1)
    s3 = lfconfig.model_settings(cfg, "3b")
    assert (s3["lora"]["r"], s3["lora"]["alpha"], s3["train"]["epochs"]) == (32, 64, 3)
    s8 = lfconfig.model_settings(cfg, "8b")
    assert (s8["lora"]["r"], s8["train"]["epochs"]) == (16, 2)
    for key in ("3b", "8b", "30b"):
        s = lfconfig.model_settings(cfg, key)
        assert s["lora"]["alpha"] == 2 * s["lora"]["r"]
        assert s["lora"]["dropout"] == 0
        assert s["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        t = s["train"]
        assert t["load_in_4bit"] and t["packing"]
        assert (t["max_seq_length"], t["per_device_batch_size"], t["gradient_accumulation_steps"]) == (8192, 2, 8)
        assert (t["learning_rate"], t["lr_scheduler"], t["warmup_ratio"]) == (2e-5, "cosine", 0.03)
    assert lfconfig.is_moe(cfg, "30b") and lfconfig.is_moe(cfg, "tiny-moe") and not lfconfig.is_moe(cfg, "8b")
    assert cfg["ollama"]["temperature"] == 0.4 and cfg["ollama"]["top_p"] == 0.8 and cfg["ollama"]["num_ctx"] == 32768
    assert "Rails architect" in cfg["ollama"]["system"]
    assert cfg["export"]["quants"] == ["Q4_K_M", "Q5_K_M"]


def test_defaults_are_filled_for_a_minimal_config():
    cfg = lfconfig.validate({"models": {"m": {"base": {"build": "qwen3"}}}, "targets": ["m"]})
    s = lfconfig.model_settings(cfg, "m")
    assert s["lora"]["r"] == 16 and s["lora"]["alpha"] == 32
    assert s["train"]["learning_rate"] == 2e-5 and s["train"]["seed"] == 3407
    assert cfg["data"]["max_source_share"] == 0.2
    assert cfg["export"]["intermediate"] == "auto" and cfg["export"]["merge_mode"] == "auto"
    assert lfconfig.parse_size(cfg["disk_quota"]) == 95_000_000_000


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        ({"models": {"tiny": {"lora": {"r": 0}}}}, "models.tiny.lora.r", "minimum of 1"),
        ({"defaults": {"lora": {"r": -3}}}, "defaults.lora.r", "minimum of 1"),
        ({"models": {"3b": {"train": {"learning_rate": 0}}}}, "models.3b.train.learning_rate", "minimum of 0"),
        ({"defaults": {"train": {"learning_rate": -1e-5}}}, "defaults.train.learning_rate", "minimum of 0"),
        ({"export": {"quants": ["Q4_K_M", "Q4_K_X"]}}, "export.quants[1]", "'Q4_K_X' is not one of"),
        ({"export": {"modelfile_quant": "Q9"}}, "export.modelfile_quant", "'Q9' is not one of"),
        ({"targets": ["tiny", "70b"]}, "targets[1]", "unknown model key '70b'"),
        ({"retrain": ["nope"]}, "retrain[0]", "unknown model key 'nope'"),
        ({"models": {"30b": {"lora": {"dropout": 0.05}}}}, "models.30b.lora.dropout", "ParamWrapper"),
        ({"models": {"tiny-moe": {"lora": {"dropout": 0.1}}}}, "models.tiny-moe.lora.dropout", "crash hours in"),
        ({"models": {"x": {"base": {"hub": "a/b", "build": "qwen3"}}}}, "models.x.base", "exactly one of build, hub or path"),
        ({"models": {"tiny": {"lora": {"rank": 8}}}}, "models.tiny.lora", "'rank' was unexpected"),
        ({"export": {"quants": ["IQ2_XS"]}}, "export.quants[0]", "importance matrix"),
        ({"data": {"max_source_share": 1.5}}, "data.max_source_share", "maximum of 1"),
        ({"disk_quota": "lots"}, "disk_quota", "does not match"),
    ],
)
def test_bad_input_is_rejected_naming_the_field(overrides, field, words):
    message = error_of(overrides)
    assert f"{field}:" in message, message
    assert words in message, message


def test_dropout_is_allowed_on_dense_models():
    cfg = validated({"models": {"8b": {"lora": {"dropout": 0.05}}}})
    assert lfconfig.model_settings(cfg, "8b")["lora"]["dropout"] == 0.05


def test_unknown_model_key_in_settings_lookup():
    with pytest.raises(lfconfig.ConfigError, match="unknown model key 'nope'"):
        lfconfig.model_settings(validated(), "nope")


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text(yaml.safe_dump({"models": {"m": {"base": {"build": "qwen3"}, "lora": {"r": 0}}}}))
    with pytest.raises(lfconfig.ConfigError, match=r"config.yaml: invalid configuration:\n  models.m.lora.r"):
        lfconfig.load(bad)


@pytest.mark.parametrize("text, expected", [("95GB", 95e9), ("500MiB", 500 * 2**20), ("1.5 TB", 1.5e12), (1024, 1024)])
def test_parse_size(text, expected):
    assert lfconfig.parse_size(text) == int(expected)


@pytest.mark.slow
def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path):
    import subprocess

    from conftest import snakemake_cmd

    cfg = copy.deepcopy(SHIPPED)
    cfg["models"]["tiny"]["lora"]["r"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run(snakemake_cmd(tmp_path, "-n"), capture_output=True, text=True)
    assert run.returncode != 0
    assert "models.tiny.lora.r: 0 is less than the minimum of 1" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


def test_a_quant_needing_an_importance_matrix_is_allowed_with_one():
    cfg = lfconfig.load(REPO / "config.yaml", {"export": {"quants": ["IQ2_XS", "Q4_K_M"], "modelfile_quant": "Q4_K_M",
                                                          "imatrix": {"enabled": True}}})
    assert cfg["export"]["quants"] == ["IQ2_XS", "Q4_K_M"]


def test_unquoted_on_and_off_are_checkpointing_words(tmp_path):
    """YAML reads an unquoted `gradient_checkpointing: off` as false; the config takes it as written."""
    text = (REPO / "config.yaml").read_text()
    line = "    max_seq_length: 8192\n"
    assert text.count(line) == 1  # the defaults' train block
    path = tmp_path / "config.yaml"
    path.write_text(text.replace(line, line + "    gradient_checkpointing: off\n"))
    assert yaml.safe_load(path.read_text())["defaults"]["train"]["gradient_checkpointing"] is False
    config = lfconfig.load(path, {"models": {"tiny": {"train": {"gradient_checkpointing": True}}}})
    assert config["defaults"]["train"]["gradient_checkpointing"] == "off"
    assert lfconfig.model_settings(config, "30b")["train"]["gradient_checkpointing"] == "off"
    assert lfconfig.model_settings(config, "tiny")["train"]["gradient_checkpointing"] == "on"
