"""The IDE side: Continue's config.yaml (validated with Continue's own schema, the npm package
@continuedev/config-yaml) and the fill-in-the-middle TEMPLATE of the autocomplete model's
Modelfile (rendered by Go's text/template, as Ollama renders it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, clone_pipeline, run_snakemake, small_config, write_config
from loraforge import config as lfconfig
from loraforge.constants import FIM_GO_TEMPLATE, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, FIM_TOKENS
from loraforge.continue_config import continue_spec, modelfiles_of, write_continue_config
from loraforge.modelfile import ModelfileError, modelfile_for_model, parse_modelfile, validate_modelfile

# Continue's config schema, pinned: the npm package Continue itself loads config.yaml with
CONFIG_YAML_PACKAGE = "@continuedev/config-yaml"
CONFIG_YAML_VERSION = "1.42.0"
VALIDATOR = REPO / "tests" / "continue_validate.mjs"


def _package_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lora-forge" / "npm" / f"config-yaml-{CONFIG_YAML_VERSION}"


@pytest.fixture(scope="session")
def continue_schema():
    """A function validating a Continue config.yaml with Continue's own code (parseConfigYaml +
    validateConfigYaml of the pinned @continuedev/config-yaml), installed once with npm into a
    cache outside the repository (~/.cache/lora-forge/npm). Returns the validator's JSON:
    ok, error, issues (code, path, message), warnings, dropped (keys Continue would ignore)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed to validate with Continue's schema (apt-get install nodejs npm)")
    target = _package_dir()
    if not (target / "node_modules" / CONFIG_YAML_PACKAGE / "package.json").is_file():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        install = subprocess.run(
            [npm, "install", "--prefix", str(partial), "--no-audit", "--no-fund", "--no-save",
             f"{CONFIG_YAML_PACKAGE}@{CONFIG_YAML_VERSION}"],
            capture_output=True, text=True, timeout=300)
        if install.returncode != 0:
            pytest.skip(f"npm could not install {CONFIG_YAML_PACKAGE}@{CONFIG_YAML_VERSION}: "
                        f"{install.stderr.strip()[-500:]}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)

    def validate(path: Path) -> dict:
        run = subprocess.run([node, str(VALIDATOR), str(target), str(path)], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["version"] == CONFIG_YAML_VERSION
        return result

    return validate


def _config(**overrides) -> dict:
    return lfconfig.validate(small_config(**overrides))


# --------------------------------------------------------------------------------------
# Continue's config.yaml
# --------------------------------------------------------------------------------------

def test_continue_config_passes_continues_own_schema(continue_schema, tmp_path):
    cfg = _config()
    out = write_continue_config(tmp_path / "config.yaml", continue_spec(cfg), modelfiles_of(cfg))
    result = continue_schema(out)
    assert result["ok"], result
    assert result["dropped"] == [] and result["warnings"] == [], result  # every key is one Continue reads
    doc = yaml.safe_load(out.read_text())
    assert doc["schema"] == "v1" and doc["name"] == "lora-forge"
    chat, autocomplete = doc["models"]
    # the article's pair: the 30B chats, edits and applies; the 3B completes code
    assert chat["model"] == "rails-coder-30b" and chat["roles"] == ["chat", "edit", "apply"]
    assert autocomplete["model"] == "rails-coder-3b" and autocomplete["roles"] == ["autocomplete"]
    for entry, key in ((chat, "30b"), (autocomplete, "3b")):
        ollama = lfconfig.model_settings(cfg, key)["ollama"]
        assert entry["provider"] == "ollama" and entry["apiBase"] == "http://localhost:11434"
        assert entry["defaultCompletionOptions"] == {
            "temperature": ollama["temperature"], "topP": ollama["top_p"], "contextLength": ollama["num_ctx"]}
    assert autocomplete["autocompleteOptions"]["modelTimeout"] > 150  # Continue's default is for hosted models
    assert "autocompleteOptions" not in chat
    assert "ollama create rails-coder-3b -f results/3b/Modelfile" in out.read_text()


def test_continue_schema_refuses_a_wrong_role_and_shows_ignored_keys(continue_schema, tmp_path):
    cfg = _config()
    good = write_continue_config(tmp_path / "config.yaml", continue_spec(cfg))
    bad = tmp_path / "bad-role.yaml"
    bad.write_text(good.read_text().replace("- autocomplete\n", "- autocompletion\n"))
    result = continue_schema(bad)
    assert not result["ok"]
    assert {"code": "invalid_enum_value", "path": "models.1.roles.0"} in [
        {k: i[k] for k in ("code", "path")} for i in result["issues"]], result
    # a misspelt option is no error for Continue (zod drops it); the validator names it
    typo = tmp_path / "typo.yaml"
    typo.write_text(good.read_text().replace("contextLength:", "contextLenght:", 1))
    result = continue_schema(typo)
    assert result["ok"] and result["dropped"] == ["models.0.defaultCompletionOptions.contextLenght"], result


def test_continue_block_is_schema_validated():
    cfg = _config(**{"continue": {"chat_model": "tiny-moe", "autocomplete_model": "tiny"}})
    assert cfg["continue"]["api_base"] == "http://localhost:11434"
    assert cfg["continue"]["autocomplete_options"]["maxPromptTokens"] == 1024
    assert lfconfig.uses_fim(cfg, "tiny") and not lfconfig.uses_fim(cfg, "tiny-moe")
    for overrides, message in [
        ({"continue": {"chat_model": "40b"}}, "continue.chat_model: unknown model key '40b'"),
        ({"continue": {"autocomplete_options": {"debounce": 1}}}, "continue.autocomplete_options: 'debounce' was unexpected"),
        ({"continue": {"api_base": "localhost:11434"}}, "continue.api_base: 'localhost:11434' does not match"),
        ({"models": {"tiny": {"ollama": {"fim": "yes"}}}}, "models.tiny.ollama.fim: 'yes' is not one of"),
        ({"models": {"continue": {"base": {"build": "qwen3"}}}}, "models.continue: the key `continue` is taken"),
    ]:
        with pytest.raises(lfconfig.ConfigError, match=message.replace("(", r"\(")):
            _config(**overrides)
    # a config without the block: no FIM anywhere, and the Continue config asks for the keys
    minimal = lfconfig.validate({"models": {"m": {"base": {"build": "qwen3"}}}, "targets": ["m"]})
    assert not lfconfig.uses_fim(minimal, "m")
    with pytest.raises(lfconfig.ConfigError, match="continue.chat_model is not set"):
        continue_spec(minimal)
    # explicit settings win over auto
    cfg = _config(models={"tiny": {"ollama": {"fim": False}}, "tiny-moe": {"ollama": {"fim": True}}},
                  **{"continue": {"autocomplete_model": "tiny"}})
    assert not lfconfig.uses_fim(cfg, "tiny") and lfconfig.uses_fim(cfg, "tiny-moe")


@pytest.mark.slow
def test_continue_config_rule_needs_no_model(continue_schema, tmp_path):
    """A real Snakemake run: the Continue config is written without building any model (its
    inputs are settings only), and rewritten when a setting it holds changes."""
    cfg = small_config(**{"continue": {"chat_model": "tiny-moe", "autocomplete_model": "tiny"}})
    write_config(tmp_path, cfg)
    run = run_snakemake(tmp_path, "results/continue/config.yaml")
    assert "continue_config" in run.stderr + run.stdout
    # nothing else was built (the run's summary page is written after every successful run)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["continue", "summary.html"]
    out = tmp_path / "results" / "continue" / "config.yaml"
    result = continue_schema(out)
    assert result["ok"] and not result["dropped"], result
    doc = yaml.safe_load(out.read_text())
    assert [m["model"] for m in doc["models"]] == ["rails-coder-tiny-moe", "rails-coder-tiny"]
    # a changed Modelfile setting reaches the Continue config (params trigger)
    cfg["ollama"]["temperature"] = 0.2
    write_config(tmp_path, cfg)
    run_snakemake(tmp_path, "results/continue/config.yaml")
    doc = yaml.safe_load(out.read_text())
    assert [m["defaultCompletionOptions"]["temperature"] for m in doc["models"]] == [0.2, 0.2]
    again = run_snakemake(tmp_path, "results/continue/config.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


# --------------------------------------------------------------------------------------
# fill-in-the-middle TEMPLATE
# --------------------------------------------------------------------------------------

def _tokenizer_folder(path: Path, tokens: list[str]) -> Path:
    path.mkdir()
    added = {str(100 + i): {"content": t, "special": True} for i, t in enumerate(tokens)}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "added_tokens_decoder": added,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}))
    return path


def test_fim_template_needs_the_fim_tokens(tmp_path):
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    plain = _tokenizer_folder(tmp_path / "plain", chatml)
    kwargs = dict(system=None, temperature=0.4, top_p=0.8, num_ctx=4096)
    with pytest.raises(ModelfileError) as err:
        modelfile_for_model(tmp_path / "a.gguf", tmp_path / "Modelfile", plain, fim=True, **kwargs)
    assert f"{FIM_PREFIX}, {FIM_SUFFIX}, {FIM_MIDDLE} is not a token" in str(err.value)
    assert str(plain / "tokenizer_config.json") in str(err.value)
    # one missing token is named alone
    partial = _tokenizer_folder(tmp_path / "partial", [*chatml, FIM_PREFIX, FIM_MIDDLE])
    with pytest.raises(ModelfileError, match=r"fill-in-the-middle TEMPLATE: <\|fim_suffix\|> is not a token"):
        modelfile_for_model(tmp_path / "a.gguf", tmp_path / "Modelfile", partial, fim=True, **kwargs)
    fim = _tokenizer_folder(tmp_path / "fim", [*chatml, *FIM_TOKENS])
    text = modelfile_for_model(tmp_path / "a.gguf", tmp_path / "Modelfile", fim, fim=True, **kwargs)
    template = next(c.value for c in parse_modelfile(text) if c.name == "template")
    assert template == FIM_GO_TEMPLATE and ".Suffix" in template
    assert validate_modelfile(text) == []
    # without fim the chat template has no .Suffix: Continue would not use native FIM
    text = modelfile_for_model(tmp_path / "a.gguf", tmp_path / "Modelfile", fim, **kwargs)
    assert ".Suffix" not in text


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")
def test_fim_template_renders_qwen_fim_and_the_chat(tmp_path, tiny_tokenizer):
    """Go's text/template (Ollama's engine) on the FIM TEMPLATE: a request with a suffix gives
    exactly Qwen's FIM prompt; chat requests give exactly what the HF chat template gives."""
    from jinja2 import Template

    from loraforge.modelfile import chat_template_of
    from loraforge.tokenizer import load_tokenizer
    from test_modelfile import render_with_go

    prefix, suffix = "class Post < ApplicationRecord\n  def publish!\n    ", "\n  end\nend\n"
    msgs = [("system", "You are a Rails expert."), ("user", "Refactor:\nclass A; end")]
    M = [{"Role": r, "Content": c} for r, c in msgs]
    cases = [
        {"Prompt": prefix, "Suffix": suffix, "Response": ""},  # Continue's autocomplete (/api/generate + suffix)
        {"System": msgs[0][1], "Messages": M, "Response": ""},  # chat API
        {"System": msgs[0][1], "Prompt": msgs[1][1], "Response": ""},  # generate API without suffix
    ]
    fim, chat, legacy = render_with_go(tmp_path, FIM_GO_TEMPLATE, cases)
    assert fim == f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
    base = tiny_tokenizer  # the tiny bases' tokenizer (loraforge.base.train_tokenizer)
    expected = Template(chat_template_of(base)).render(
        messages=[{"role": r, "content": c} for r, c in msgs], add_generation_prompt=True)
    assert chat == expected and legacy == expected
    # the tiny tokenizer has Qwen's FIM tokens, each one token
    tokenizer = load_tokenizer(base)
    for token in FIM_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    fim_ids = [tokenizer.convert_tokens_to_ids(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)]
    assert [i for i in tokenizer(fim, add_special_tokens=False)["input_ids"] if i in fim_ids] == fim_ids


@pytest.mark.slow
def test_autocomplete_model_gets_the_fim_modelfile(pipeline, tmp_path):
    """In a copy of the tiny pipeline, making tiny the Continue autocomplete model rewrites only
    its Modelfile (a params change), now with the FIM TEMPLATE; tiny-moe's stays chat-only."""
    work = clone_pipeline(pipeline, tmp_path / "work")
    before = (work / "results" / "tiny" / "Modelfile").read_text()
    assert ".Suffix" not in before
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["continue"] = {"chat_model": "tiny-moe", "autocomplete_model": "tiny"}
    write_config(work, cfg)
    run = run_snakemake(work, "results/tiny/Modelfile", "results/tiny-moe/Modelfile")
    log = run.stdout + run.stderr
    assert "write_modelfile" in log and "train_adapter" not in log and "quantize_gguf" not in log
    text = (work / "results" / "tiny" / "Modelfile").read_text()
    assert next(c.value for c in parse_modelfile(text) if c.name == "template") == FIM_GO_TEMPLATE
    assert validate_modelfile(text, work / "results" / "tiny") == []
    assert ".Suffix" not in (work / "results" / "tiny-moe" / "Modelfile").read_text()
