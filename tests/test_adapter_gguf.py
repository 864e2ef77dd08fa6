"""The adapter-only path: the LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py) on
the un-fine-tuned base's GGUF gives the merged model's logits in llama.cpp; expert LoRA on a MoE
has no such form and is refused, naming why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import clone_pipeline, run_snakemake, write_config
from loraforge import config as lfconfig
from loraforge.adapter_gguf import (AdapterGGUFError, adapter_gguf_info, config_refusal, convert_adapter_to_gguf,
                                    unsupported_reason)
from loraforge.gguf import convert_to_gguf, gguf_metadata
from loraforge.merge.stream import merge
from loraforge.modelfile import parse_modelfile, validate_modelfile

pytestmark = pytest.mark.slow  # converts GGUFs of the `pipeline` fixture's models

PROMPT = (b"<|im_start|>user\nWrite a Rails controller for posts.<|im_end|>\n<|im_start|>assistant\n"
          b"class PostsController < ApplicationController\n  def index\n    @posts = Post.all\n  end\nend\n")

# base + adapter (applied at run time, fp32) vs the merged model (W + scale*B@A rounded to bf16
# once, as the merged shards are): the difference is that bf16 rounding of the targeted weights.
# Measured on the tiny dense model: 1.1% of the LoRA effect, 1.8e-4 of the logits (relative L2).
MAX_REL_L2_OF_LORA_EFFECT = 0.05
MAX_REL_L2 = 1e-3


def _logits(model, lora=None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256,
                          logits_all=True, verbose=False, n_threads=2, seed=0)
    tokens = llm.tokenize(PROMPT, add_bos=False, special=True)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return out


def _rel_l2(x, y) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def test_base_plus_adapter_gguf_gives_the_merged_logits(pipeline, tmp_path, record_property):
    results = pipeline / "results" / "tiny"
    merged = tmp_path / "merged"
    merge(str(results / "base"), str(results / "adapter"), str(merged), mode="copy", progress=False)
    # F32 everywhere: no quantization between the two (the bf16 weights convert exactly)
    base_gguf = convert_to_gguf(results / "base", tmp_path / "base-F32.gguf", "f32")
    merged_gguf = convert_to_gguf(merged, tmp_path / "merged-F32.gguf", "f32")
    adapter_gguf = convert_adapter_to_gguf(results / "adapter", results / "base", tmp_path / "adapter.gguf", "f32")

    info = adapter_gguf_info(adapter_gguf)
    adapter_cfg = json.loads((results / "adapter" / "adapter_config.json").read_text())
    assert info["alpha"] == adapter_cfg["lora_alpha"]
    assert len(info["targets"]) == 4 * 7 and info["n_tensors"] == 2 * 4 * 7  # 4 layers x q,k,v,o,gate,up,down
    assert gguf_metadata(adapter_gguf, tensors=False).get("architecture") == "qwen3"

    base, merged_logits = _logits(base_gguf), _logits(merged_gguf)
    with_adapter = _logits(base_gguf, adapter_gguf)
    lora_effect = _rel_l2(base, merged_logits)
    diff = _rel_l2(with_adapter, merged_logits)
    ratio = float(np.linalg.norm(with_adapter - merged_logits) / np.linalg.norm(base - merged_logits))
    figures = {"max_abs": float(np.abs(with_adapter - merged_logits).max()), "rel_l2": diff,
               "lora_effect_rel_l2": lora_effect, "rel_l2_of_lora_effect": ratio}
    record_property("logits_base_plus_adapter_vs_merged", figures)
    print("base+adapter GGUF vs merged GGUF (F32):", json.dumps(figures))
    # the adapter must move the logits well beyond the tolerance, or the comparison proves nothing
    # (without it applied, rel_l2_of_lora_effect would be 1)
    assert lora_effect > 5 * MAX_REL_L2, figures
    assert diff < MAX_REL_L2 and ratio < MAX_REL_L2_OF_LORA_EFFECT, figures


def test_expert_lora_has_no_lora_gguf_form(pipeline, tmp_path):
    results = pipeline / "results" / "tiny-moe"
    reason = unsupported_reason(results / "adapter")
    assert "target_parameters" in reason and "Use the merged GGUFs" in reason
    with pytest.raises(AdapterGGUFError, match="expert LoRA on a MoE"):
        convert_adapter_to_gguf(results / "adapter", results / "base", tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()
    # what llama.cpp's converter itself does with PEFT's ParamWrapper keys (the reason for the refusal)
    with pytest.raises(RuntimeError) as err:
        convert_adapter_to_gguf(results / "adapter", results / "base", tmp_path / "adapter.gguf", check=False)
    assert "ValueError: Unprocessed experts: ['model.layers.0.mlp.experts.base_layer.weight', " \
        "'model.layers.0.mlp.experts.weight'" in str(err.value), str(err.value)[-2000:]
    assert not list(tmp_path.glob("adapter.gguf*")), "no half-written GGUF is left"
    # the config-level check (before any job runs): expert targets on a MoE, or rsLoRA
    cfg = yaml.safe_load((pipeline / "config.yaml").read_text())
    assert "models.tiny-moe.lora.target_modules" in config_refusal(lfconfig.validate(cfg), "tiny-moe")
    attention_only = lfconfig.validate(lfconfig.deep_merge(
        cfg, {"models": {"tiny-moe": {"lora": {"target_modules": ["q_proj", "v_proj"]}}}}))
    assert config_refusal(attention_only, "tiny-moe") is None
    rslora = lfconfig.validate(lfconfig.deep_merge(cfg, {"models": {"tiny": {"lora": {"use_rslora": True}}}}))
    assert "models.tiny.lora.use_rslora" in config_refusal(rslora, "tiny")


def test_adapter_modelfile_rule(pipeline, tmp_path):
    """In a copy of the pipeline: Modelfile.adapter (FROM the base's Q5_K_M + ADAPTER adapter.gguf)
    is built without retraining, loads in llama.cpp, and the plan sized the new artifacts; the
    MoE's is refused before any job runs."""
    import llama_cpp

    from loraforge.sizes import arch_from_config, gguf_bytes, lora_adapter_bytes

    work = clone_pipeline(pipeline, tmp_path / "work")
    results = work / "results" / "tiny"
    run = run_snakemake(work, "results/tiny/Modelfile.adapter")
    log = run.stdout + run.stderr
    for rule in ("convert_base_gguf", "quantize_base_gguf", "convert_adapter_gguf", "write_adapter_modelfile"):
        assert f"rule {rule}" in log or f"localrule {rule}" in log, rule
    assert "train_adapter" not in log and "merge_adapter" not in log
    assert "base.F16.gguf" in log, "the base converts to the export's intermediate (auto: F16)"
    assert not (results / "base.F16.gguf").exists(), "the base's intermediate is temp"
    text = (results / "Modelfile.adapter").read_text()
    commands = {c.name: c.value for c in parse_modelfile(text)}
    assert commands["model"] == "./base.Q5_K_M.gguf" and commands["adapter"] == "./adapter.gguf"
    assert validate_modelfile(text, results) == []
    assert "ollama create rails-coder-tiny-lora -f" in text
    same = {k: v for k, v in commands.items() if k not in ("model", "adapter")}
    assert same == {k: v for k, v in ((c.name, c.value) for c in parse_modelfile(
        (results / "Modelfile").read_text())) if k not in ("model", "adapter")}, "same TEMPLATE, SYSTEM, parameters"
    assert gguf_metadata(results / "base.Q5_K_M.gguf", tensors=False)["file_type_name"] == "Q5_K_M"
    # the quantized base with the f16 adapter loads and generates in llama.cpp
    llm = llama_cpp.Llama(model_path=str(results / "base.Q5_K_M.gguf"), lora_path=str(results / "adapter.gguf"),
                          n_ctx=256, verbose=False, n_threads=2, seed=0)
    out = llm.create_completion("class Post < ApplicationRecord\n", max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] > 0
    llm.close()
    # the disk plan's estimates of the new artifacts
    arch = arch_from_config(json.loads((results / "base" / "config.json").read_text()))
    planned = lora_adapter_bytes(arch, 8, None, dtype="float16")
    actual = (results / "adapter.gguf").stat().st_size
    assert abs(planned - actual) / actual < 0.1, (planned, actual)
    planned = gguf_bytes(arch, "Q5_K_M")
    actual = (results / "base.Q5_K_M.gguf").stat().st_size
    assert abs(planned - actual) / actual < 0.1, (planned, actual)
    # expert LoRA: refused before any job runs, naming the setting
    run = run_snakemake(work, "results/tiny-moe/Modelfile.adapter", check=False)
    assert run.returncode != 0
    assert "models.tiny-moe.lora.target_modules" in run.stdout + run.stderr
    assert not (work / "results" / "tiny-moe" / "base.Q8_0.gguf").exists()
