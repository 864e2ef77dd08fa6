"""Disk planning: size estimates (checked against transformers and, when built, llama.cpp
itself), the schedule simulation, the article's 95 GB scenario, and the Snakemake adapters."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraforge import sizes as S
from loraforge.plan import (
    ModelLayout,
    Plan,
    PlanError,
    Planner,
    Shard,
    Step,
    check,
    format_timeline,
    timeline_frame,
)
from loraforge.snakemake_bridge import plan_for_targets, steps_from_dag

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3
GB = 1000**3

# Qwen3-Coder-30B-A3B-Instruct's config.json (the article's 30B)
QWEN3_30B = dict(
    model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=151936,
    tie_word_embeddings=False, torch_dtype="bfloat16",
)


# ----------------------------------------------------------------------------- sizes


TINY_CONFIGS = {
    "qwen3": dict(intermediate_size=96),
    "qwen3-tied": dict(intermediate_size=96, tie_word_embeddings=True),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe-sparse-step": dict(intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                  num_experts_per_tok=2, decoder_sparse_step=2, num_hidden_layers=4),
    "qwen2": dict(intermediate_size=96),
    "llama": dict(intermediate_size=96, attention_bias=True),
}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tensor_shapes_match_save_pretrained(tmp_path, name):
    """Names and shapes from the config alone == what transformers writes (per-expert 2-D
    experts for Qwen3-MoE, qwen2's q/k/v biases, qwen3's q/k norms, tied embeddings)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = name.split("-")[0]
    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, vocab_size=128, tie_word_embeddings=False)
    kwargs.update(TINY_CONFIGS[name])
    cfg = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    real = {}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            real[k] = tuple(f.get_slice(k).get_shape())
    hf_config = json.loads((tmp_path / "config.json").read_text())
    estimated = S.tensor_shapes(hf_config)
    assert estimated == real
    # the file size too (data exact, header estimated)
    actual = (tmp_path / "model.safetensors").stat().st_size
    assert abs(S.safetensors_bytes(estimated, "bfloat16") - actual) <= 0.02 * actual
    if "moe" in name:
        assert any(".mlp.experts.3.down_proj.weight" in k for k in real)


def test_gguf_names_match_the_converter():
    """HF names -> GGUF names as llama.cpp's converter writes them (gguf-py's TensorNameMap;
    per-expert tensors stack into one 3-D tensor)."""
    expected = {
        "model.embed_tokens.weight": "token_embd.weight",
        "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.47.post_attention_layernorm.weight": "blk.47.ffn_norm.weight",
        "model.layers.3.self_attn.q_proj.weight": "blk.3.attn_q.weight",
        "model.layers.3.self_attn.k_norm.weight": "blk.3.attn_k_norm.weight",
        "model.layers.3.self_attn.o_proj.weight": "blk.3.attn_output.weight",
        "model.layers.5.mlp.gate.weight": "blk.5.ffn_gate_inp.weight",
        "model.layers.5.mlp.experts.0.gate_proj.weight": "blk.5.ffn_gate_exps.weight",
        "model.layers.5.mlp.experts.127.up_proj.weight": "blk.5.ffn_up_exps.weight",
        "model.layers.5.mlp.experts.7.down_proj.weight": "blk.5.ffn_down_exps.weight",
    }
    for hf, theirs in expected.items():
        assert S.gguf_name(hf, QWEN3_30B) == theirs, hf
    assert S.gguf_name("model.layers.1.mlp.down_proj.weight", dict(QWEN3_30B, model_type="qwen3")) == "blk.1.ffn_down.weight"
    assert S.gguf_name("model.layers.1.rotary_emb.inv_freq", QWEN3_30B) is None
    shapes = S.tensor_shapes(QWEN3_30B)
    assert all(S.gguf_name(hf, QWEN3_30B) for hf in shapes)
    exps = [t for t in S.gguf_tensors(QWEN3_30B) if t.name == "blk.0.ffn_down_exps.weight"][0]
    assert exps.shape == (128, 2048, 768) and exps.row == 768


def test_30b_gguf_sizes_near_the_article():
    """The article: F16 60 GB, Q8_0 31 GB, Q5_K_M 21 GB (5.69 bpw), Q4_K_M 18 GB (4.86 bpw)."""
    article = {"F16": 60, "Q8_0": 31, "Q5_K_M": 21, "Q4_K_M": 18}
    for ftype, gb in article.items():
        est = S.gguf_bytes(QWEN3_30B, ftype) / GB
        assert abs(est - gb) / gb < 0.10, (ftype, est)
    assert S.bits_per_weight(QWEN3_30B, "Q5_K_M") == pytest.approx(5.69, abs=0.02)
    assert S.bits_per_weight(QWEN3_30B, "Q4_K_M") == pytest.approx(4.86, abs=0.02)
    # the base: 57 GiB of bf16 shards, 16 of them at the hub's 4 GB
    shards, other = S.model_folder_bytes(QWEN3_30B)
    assert sum(s.bytes for s in shards) / GiB == pytest.approx(57, abs=0.5)
    assert len(shards) == 16


def test_30b_type_mixture_follows_llama_cpp():
    t = S.gguf_tensor_types(QWEN3_30B, "Q4_K_M")
    assert t["output.weight"] == "Q6_K"  # the head: more bits
    assert t["token_embd.weight"] == "Q4_K"  # untied: the default type
    assert t["blk.0.ffn_gate_inp.weight"] == "F32"  # the router is never quantized
    assert t["blk.0.attn_norm.weight"] == "F32" and t["blk.0.attn_q_norm.weight"] == "F32"
    # use_more_bits(i, 48): i < 6, i >= 42, or (i - 6) % 3 == 2
    assert t["blk.0.attn_v.weight"] == "Q6_K" and t["blk.6.attn_v.weight"] == "Q4_K"
    assert t["blk.8.attn_v.weight"] == "Q6_K" and t["blk.47.attn_v.weight"] == "Q6_K"
    assert t["blk.8.ffn_down_exps.weight"] == "Q6_K" and t["blk.9.ffn_down_exps.weight"] == "Q4_K"
    assert t["blk.9.ffn_gate_exps.weight"] == "Q4_K"
    assert S.gguf_tensor_types(QWEN3_30B, "Q8_0")["output.weight"] == "Q8_0"
    assert S.gguf_tensor_types(QWEN3_30B, "F16")["blk.0.ffn_gate_inp.weight"] == "F32"


def test_row_width_fallbacks_and_tied_embeddings():
    cfg = dict(model_type="qwen3", hidden_size=256, intermediate_size=320, num_hidden_layers=8,
               num_attention_heads=4, num_key_value_heads=1, head_dim=64, vocab_size=1000,
               tie_word_embeddings=True)
    t = S.gguf_tensor_types(cfg, "Q4_K_M")
    assert "output.weight" not in t
    assert t["token_embd.weight"] == "Q6_K"  # tied: quantized like the output head
    assert t["blk.1.ffn_down.weight"] == "Q5_0"  # row 320: Q4_K -> Q5_0
    assert t["blk.0.ffn_down.weight"] == "Q8_0"  # Q6_K (use_more_bits) -> Q8_0
    assert S.gguf_tensor_types(dict(cfg, intermediate_size=330), "Q4_K_M")["blk.1.ffn_down.weight"] == "F16"
    assert S.gguf_tensor_types(dict(cfg, intermediate_size=330), "Q8_0")["blk.1.ffn_down.weight"] == "F16"


def test_arch_block_of_config_yaml_is_accepted():
    a = S.arch_from_config({"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008,
                            "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                            "vocab_size": 151936, "tie_word_embeddings": True, "torch_dtype": "bfloat16"})
    assert a.head_dim == 128 and a.tie_word_embeddings
    shapes = S.tensor_shapes(a)
    assert "lm_head.weight" not in shapes and "model.layers.0.self_attn.q_proj.bias" in shapes
    assert S.parameter_count(shapes) / 1e9 == pytest.approx(3.09, abs=0.01)  # Qwen2.5-3B
    with pytest.raises(ValueError, match="unsupported model_type"):
        S.arch_from_config({"model_type": "gpt2"})


def test_targeted_shards_from_the_index(tmp_path):
    """A shard holding only the embedding is untargeted: a link-mode merge hard-links it."""
    base = tmp_path / "base"
    base.mkdir()
    files = {"model-00001-of-00002.safetensors": ["model.embed_tokens.weight"],
             "model-00002-of-00002.safetensors": ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]}
    weight_map = {}
    for f, names in files.items():
        (base / f).write_bytes(b"x" * (1000 if "00001" in f else 3000))
        weight_map.update({n: f for n in names})
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shards = S.read_base_shards(base)
    assert [(s.bytes, s.targeted) for s in shards] == [(1000, False), (3000, True)]
    assert [s.targeted for s in S.read_base_shards(base, {"v_proj"})] == [False, False]
    L = ModelLayout("m", str(base), shards, other_bytes=100)
    assert L.merged_bytes("link") == 3100 and L.merged_bytes("copy") == L.merged_bytes("consume") == 4100
    assert S.is_targeted("model.layers.3.mlp.experts.7.up_proj.weight")
    assert not S.is_targeted("model.layers.3.mlp.gate.weight")  # the router
    assert not S.is_targeted("model.layers.3.self_attn.q_proj.bias")


def test_parse_size_and_human():
    assert S.parse_size("95GB") == 95 * 10**9
    assert S.parse_size("95G") == S.parse_size("95GiB") == 95 * 2**30
    assert S.parse_size(1234) == 1234
    assert S.human(57 * GiB) == "57.0 GiB" and S.human(-3 * 2**20, signed=True) == "-3.0 MiB"
    with pytest.raises(ValueError):
        S.parse_size("lots")


def _llama_cpp_tools():
    return REPO / "tools" / "llama.cpp" / "convert_hf_to_gguf.py"  # setup.sh extracts it


@pytest.mark.slow
def test_estimates_match_llama_cpp_tensor_for_tensor(tmp_path):
    """Convert a small Qwen3-MoE with llama.cpp's converter, quantize it with llama.cpp, and
    compare every tensor's type and the file size with the estimate. Widths are chosen so
    that fallbacks happen (expert rows of 96: Q4_K->Q5_0, Q6_K->Q8_0)."""
    import ctypes

    import llama_cpp
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.base import read_corpus, train_tokenizer

    model_dir = tmp_path / "moe"
    train_tokenizer(read_corpus([REPO / "data" / "corpus"]), model_dir, vocab_size=512)
    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=96,
                               num_experts=4, num_experts_per_tok=2, num_hidden_layers=8, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=64, vocab_size=512, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(model_dir, max_shard_size="1MB")
    # the converter has no SentencePiece path for qwen3_moe: give it the dense model's
    wrapper = tmp_path / "convert.py"
    wrapper.write_text(textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, {str(_llama_cpp_tools().parent)!r})
        sys.path.insert(1, {str(_llama_cpp_tools().parent / 'gguf-py')!r})
        from conversion import qwen
        qwen.Qwen3MoeModel.set_vocab = lambda self: self._set_vocab_sentencepiece()
        sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
        runpy.run_path({str(_llama_cpp_tools())!r}, run_name="__main__")
    """))
    f16 = tmp_path / "F16.gguf"
    r = subprocess.run([sys.executable, str(wrapper), str(model_dir), "--outtype", "f16", "--outfile", str(f16)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"llama.cpp's converter failed: {r.stderr[-2000:]}"
    hf = json.loads((model_dir / "config.json").read_text())
    ftypes = {"Q4_K_M": 15, "Q5_K_M": 17, "Q3_K_M": 12, "Q6_K": 18, "Q8_0": 7}
    for name, ftype in [("F16", None), *ftypes.items()]:
        out = f16 if ftype is None else tmp_path / f"{name}.gguf"
        if ftype is not None:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = 2
            assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) == 0
        real = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
        assert S.gguf_tensor_types(hf, name) == real, name
        actual = out.stat().st_size
        est = S.gguf_bytes(hf, name)
        assert actual <= est <= actual + 64 * 1024, (name, actual, est)  # metadata over-estimated a little


# ----------------------------------------------------------------------------- planner


def chain(model="30b", prio=0, quants=("Q4_K_M", "Q5_K_M"), inter="Q8_0", base_rule="fetch_base"):
    """The contract's chain for one model, as steps."""
    r = f"results/{model}"
    steps = []
    if base_rule:
        steps.append(Step(base_rule, model, [f"{r}/base"], [], priority=prio))
    steps += [
        Step("prepare_data", model, [f"{r}/data/train.jsonl"], ["data/rails_chat.jsonl"], priority=prio),
        Step("train_adapter", model, [f"{r}/adapter"], [f"{r}/base", f"{r}/data/train.jsonl"], priority=prio),
        Step("merge_adapter", model, [f"{r}/merged"], [f"{r}/base", f"{r}/adapter"],
             temp_outputs={f"{r}/merged"}, priority=prio),
        Step("convert_gguf", model, [f"{r}/{inter}.gguf"], [f"{r}/merged"],
             temp_outputs={f"{r}/{inter}.gguf"}, priority=prio),
    ]
    steps += [Step("quantize_gguf", model, [f"{r}/{q}.gguf"], [f"{r}/{inter}.gguf", f"{r}/adapter"],
                   priority=prio, wildcards={"model": model, "quant": q}) for q in quants]
    steps.append(Step("write_modelfile", model, [f"{r}/Modelfile"], [f"{r}/{quants[-1]}.gguf"], priority=prio))
    return steps


def article_layout(model="30b", targeted=True, unit=GiB):
    """57 'GB' of base in 15 shards of 3.8, Q8_0 31, F16 57, Q4_K_M 18, Q5_K_M 21."""
    shards = [Shard(f"model-{i:05d}.safetensors", int(3.8 * unit), targeted=targeted) for i in range(15)]
    return ModelLayout(model, f"results/{model}/base", shards, 0,
                       {"Q8_0": 31 * unit, "F16": 57 * unit, "BF16": 57 * unit})


def article_sizes(model="30b", unit=GiB, inter="Q8_0"):
    r = f"results/{model}"
    base = 15 * int(3.8 * unit)  # == article_layout().base_bytes
    return {f"{r}/base": base, f"{r}/adapter": unit // 5, f"{r}/merged": base,
            f"{r}/{inter}.gguf": (31 if inter == "Q8_0" else 57) * unit,
            f"{r}/Q4_K_M.gguf": 18 * unit, f"{r}/Q5_K_M.gguf": 21 * unit}


def events_of(plan: Plan, event: str):
    return [(e.rule, e.path) for e in plan.events if e.event == event]


def test_temp_files_go_after_their_last_consumer():
    p = Planner(chain(), article_sizes(), layouts={"30b": article_layout()}).plan()
    rules = [s.rule for s in p.order]
    assert rules == ["fetch_base", "prepare_data", "train_adapter", "merge_adapter", "convert_gguf",
                     "quantize_gguf", "quantize_gguf", "write_modelfile"]
    # merged/ goes when convert is done; Q8_0 only after the second quantize
    assert events_of(p, "delete temp") == [("convert_gguf", "results/30b/merged"),
                                           ("quantize_gguf", "results/30b/Q8_0.gguf")]
    q8_deleted = next(e for e in p.events if e.event == "delete temp" and e.path.endswith("Q8_0.gguf"))
    assert q8_deleted.step == 7
    assert p.final == 15 * int(3.8 * GiB) + (18 + 21) * GiB + GiB // 5  # base, quants, adapter


def test_a_temp_with_no_consumer_in_the_run_goes_at_once_and_a_target_stays():
    steps = [Step("a", "m", ["results/m/x"], [], temp_outputs={"results/m/x"}),
             Step("b", "m", ["results/m/y"], [])]
    p = Planner(steps, {"results/m/x": 100, "results/m/y": 10}).plan()
    assert events_of(p, "delete temp") == [("a", "results/m/x")]
    assert p.peak == 100 and p.final == 10
    # steps_from_dag drops the temp flag of targets: the planner then keeps them
    p = Planner([Step("a", "m", ["results/m/x"], []), steps[1]], {"results/m/x": 100, "results/m/y": 10}).plan()
    assert p.final == 110


def test_merge_modes():
    """copy: base + all shards; link: base + targeted shards only; consume: base + one shard,
    and the converter releases merged shards as the GGUF grows."""
    sizes = article_sizes()
    layout = article_layout()
    layout.shards[0].targeted = layout.shards[1].targeted = False  # e.g. embedding-only shards
    copy = Planner(chain(), sizes, merge_mode="copy", layouts={"30b": layout}).plan()
    link = Planner(chain(), sizes, merge_mode="link", layouts={"30b": layout}).plan()
    consume = Planner(chain(), sizes, merge_mode="consume", layouts={"30b": layout}).plan()
    base = 15 * int(3.8 * GiB)
    adapter = GiB // 5

    def merged_row(p):
        return next(e for e in p.events if e.rule == "merge_adapter" and e.path.startswith("results/30b/merged"))

    assert merged_row(copy).delta == base
    assert merged_row(link).delta == 13 * int(3.8 * GiB)
    assert copy.peak == base + adapter + base + 31 * GiB  # at the end of convert_gguf
    assert copy.peak_event.rule == link.peak_event.rule == "convert_gguf"
    assert link.peak == copy.peak - 2 * int(3.8 * GiB)
    transient = next(e for e in consume.events if e.rule == "merge_adapter" and e.event.startswith("merging"))
    # base + two shards: the next shard is written while the one before is made durable
    # (merge._Finisher), before either base shard is dropped
    assert transient.used == base + adapter + 2 * int(3.8 * GiB)
    assert merged_row(consume).used == base + adapter  # the base is gone
    conv = next(e for e in consume.events if e.rule == "convert_gguf" and e.event.startswith("converting"))
    assert conv.used < base + adapter + int(3.8 * GiB)  # releasing: never base + whole GGUF
    assert consume.peak == 31 * GiB + adapter + 18 * GiB + 21 * GiB  # Q8_0 + both quants
    assert consume.peak < link.peak < copy.peak


def test_the_articles_95gb_quota():
    """57 GB base, 95 GB quota. Copying (or linking an MoE, whose every shard holds experts)
    needs 57 + 57 + 31: too big; the error names the step and suggests consume, which fits.
    Without the converter releasing shards, consume mode peaks at the article's 88 GB."""
    quota = 95 * GiB
    copy = Planner(chain(), article_sizes(), merge_mode="copy", layouts={"30b": article_layout()}).plan()
    with pytest.raises(PlanError) as err:
        check(copy, quota)
    msg = str(err.value)
    assert "convert_gguf" in msg and "model=30b" in msg
    assert "exceeds the disk quota 95.0 GiB" in msg
    assert re.search(r"^  fits +consume merge mode  ", msg, re.M)
    assert "Suggested: consume merge mode" in msg and "export.merge_mode: consume" in msg
    alts = {a.name: a for a in err.value.alternatives}
    assert alts["consume merge mode"].fits and not alts["one quant per run"].fits

    consume = Planner(chain(), article_sizes(), merge_mode="consume", layouts={"30b": article_layout()}).plan()
    assert check(consume, quota) is consume
    article = Planner(chain(), article_sizes(), merge_mode="consume", layouts={"30b": article_layout()},
                      release_in_convert=False).plan()
    assert article.peak == pytest.approx(88 * GiB, rel=0.01)  # "Peak disk usage: 88 GB"
    assert article.peak_event.rule == "convert_gguf"  # "after Q8_0 conversion, before deleting F16"
    check(article, quota)


def test_the_articles_scenario_with_estimated_sizes():
    """The same with every size estimated from the real 30B config and config.yaml's
    `disk_quota: 95GB` (decimal)."""
    shards, other = S.model_folder_bytes(QWEN3_30B)
    gguf = {t: S.gguf_bytes(QWEN3_30B, t) for t in ("Q8_0", "F16", "Q4_K_M", "Q5_K_M")}
    layout = ModelLayout("30b", "results/30b/base", shards, other, gguf)
    r = "results/30b"
    sizes = {f"{r}/base": layout.base_bytes, f"{r}/adapter": S.lora_adapter_bytes(QWEN3_30B),
             f"{r}/Q8_0.gguf": gguf["Q8_0"], f"{r}/Q4_K_M.gguf": gguf["Q4_K_M"], f"{r}/Q5_K_M.gguf": gguf["Q5_K_M"]}
    quota = S.parse_size("95GB")
    for mode in ("copy", "link"):
        p = Planner(chain(), sizes, merge_mode=mode, layouts={"30b": layout}).plan()
        assert p.peak > quota
        with pytest.raises(PlanError, match="consume merge mode"):
            check(p, quota)
    p = Planner(chain(), sizes, merge_mode="consume", layouts={"30b": layout}).plan()
    assert check(p, quota) is p
    assert p.peak / GiB == pytest.approx(71.4, abs=1.0)


def test_training_checkpoints_count_and_keeping_one_is_offered():
    """The article's 30B trains next to its 57 GB base: with checkpoints every save_steps (one is
    the fp32 adapter plus Adam's two moments, ~11 GiB) and the default keep of 2, three exist
    for a moment, which alone pushes the training step past the 95 GB quota; keeping one fits."""
    shards, other = S.model_folder_bytes(QWEN3_30B)
    layout = ModelLayout("30b", "results/30b/base", shards, other, {t: S.gguf_bytes(QWEN3_30B, t) for t in ("Q8_0", "Q4_K_M", "Q5_K_M")})
    r = "results/30b"
    adapter = S.lora_adapter_bytes(QWEN3_30B)  # fp32, as PEFT saves it
    sizes = {f"{r}/base": layout.base_bytes, f"{r}/adapter": adapter, **{f"{r}/{t}.gguf": b for t, b in layout.gguf.items()}}
    one = S.training_checkpoint_bytes(adapter)
    assert one == 3 * adapter + 64 * 1024
    quota = S.parse_size("95GB")
    plain = Planner(chain(), sizes, merge_mode="consume", layouts={"30b": layout}).plan()
    ckpt = Planner(chain(), sizes, merge_mode="consume", layouts={"30b": layout}, checkpoints={f"{r}/adapter": (one, 2)}).plan()
    # while training: keep + 1 checkpoints beside the base (the adapter is written at the end, beside
    # the `keep` last checkpoints, which are removed once it is in place)
    during, at_end = [e for e in ckpt.events if e.rule == "train_adapter" and "checkpoint" in e.event]
    assert during.used == layout.base_bytes + 3 * one
    assert at_end.used == layout.base_bytes + adapter + 2 * one
    assert ckpt.peak == max(during.used, at_end.used) > quota > plain.peak
    assert ckpt.peak_event.rule == "train_adapter"
    with pytest.raises(PlanError) as err:
        check(ckpt, quota)
    alts = {a.name: a for a in err.value.alternatives}
    assert alts["one training checkpoint"].fits
    assert alts["one training checkpoint"].peak == layout.base_bytes + max(2 * one, adapter + one)
    # the alternative names the key in the forms both commands accept, and what a too-big one misses
    assert "snakemake --config 'defaults={train: {keep_checkpoints: 1}}'" in str(err.value)
    assert "loraforge plan --config defaults.train.keep_checkpoints=1" in str(err.value)
    assert re.search(r"^  too big \(quota\) +one quant per run ", str(err.value), re.M)


def test_the_last_quantize_frees_the_intermediate_in_consume_mode():
    """With the tensors known (the architecture), consume mode's last quantize job frees the
    Q8_0 as its output grows: the peak is no longer Q8_0 + both quants at its end but the
    merge (base + two shards). The first quantize keeps it (another consumer follows)."""
    a = S.arch_from_config(QWEN3_30B)
    shards, other = S.model_folder_bytes(a)
    gguf = {t: S.gguf_bytes(a, t) for t in ("Q8_0", "Q4_K_M", "Q5_K_M")}
    layout = ModelLayout("30b", "results/30b/base", shards, other, gguf, S.gguf_metadata_bytes(a), arch=a)
    r = "results/30b"
    adapter = S.lora_adapter_bytes(a)
    sizes = {f"{r}/base": layout.base_bytes, f"{r}/adapter": adapter, **{f"{r}/{t}.gguf": b for t, b in gguf.items()}}
    consume = Planner(chain(), sizes, merge_mode="consume", layouts={"30b": layout}).plan()
    held = Planner(chain(), sizes, merge_mode="consume", layouts={"30b": layout}, release_in_quantize=False).plan()
    assert held.peak == gguf["Q8_0"] + gguf["Q4_K_M"] + gguf["Q5_K_M"] + adapter
    assert held.peak_event.rule == "quantize_gguf"
    # Snakemake breaks the tie between the two quantize jobs either way: the plan takes the
    # worse order, the smaller quant last (Q5_K_M sits next to the Q8_0 while Q4_K_M releases it)
    assert [s.wildcards.get("quant") for s in consume.order if s.rule == "quantize_gguf"] == ["Q5_K_M", "Q4_K_M"]
    assert [s.wildcards.get("quant") for s in held.order if s.rule == "quantize_gguf"] == ["Q4_K_M", "Q5_K_M"]
    released = [e for e in consume.events if e.event == "write quant, intermediate released"]
    assert [(e.step, e.path) for e in released] == [(7, f"{r}/Q4_K_M.gguf")]
    assert released[0].delta == gguf["Q4_K_M"] - gguf["Q8_0"]
    assert not any(e.path == f"{r}/Q8_0.gguf" for e in consume.events if e.event == "delete temp")
    # while it quantizes: above Q8_0 + Q5_K_M only what is written before a tensor is freed
    (quantizing,) = [e for e in consume.events if e.event.startswith("quantizing")]
    assert quantizing.used - quantizing.delta == gguf["Q8_0"] + gguf["Q5_K_M"] + adapter
    assert 0 < quantizing.delta < 0.02 * gguf["Q4_K_M"]
    assert consume.peak < held.peak and consume.peak_event.rule == "merge_adapter"
    assert consume.final == held.final
    # link mode and layouts without the tensors never release
    link = Planner(chain(), sizes, merge_mode="link", layouts={"30b": layout}).plan()
    assert not any(e.event.startswith("quantizing") for e in link.events)
    assert layout.quantize_sequence("Q8_0", "Q5_K_M") and article_layout().quantize_sequence("Q8_0", "Q5_K_M") is None


def test_q8_0_intermediate_alternative():
    sizes = article_sizes(inter="F16")
    layout = article_layout()
    p = Planner(chain(inter="F16"), sizes, merge_mode="consume", layouts={"30b": layout}).plan()
    with pytest.raises(PlanError) as err:
        check(p, 80 * GiB)
    alts = {a.name: a for a in err.value.alternatives}
    assert alts["Q8_0 intermediate"].fits
    assert alts["Q8_0 intermediate"].peak == pytest.approx(70.2 * GiB, rel=0.01)
    assert "export.intermediate: Q8_0" in str(err.value)


def test_one_quant_per_run_rebuilds_the_temp_intermediate():
    p = Planner(chain(), article_sizes(), merge_mode="link", layouts={"30b": article_layout()})
    runs = p.plan_one_quant_per_run()
    assert [e.run for e in runs.events][-1] == 2
    rules_run2 = [e.rule for e in runs.events if e.run == 2 and e.step]
    assert "merge_adapter" in rules_run2 and "convert_gguf" in rules_run2  # temp intermediates are gone
    assert "train_adapter" not in rules_run2 and "fetch_base" not in rules_run2
    assert runs.feasible
    # a user's base folder consumed by run 1 cannot feed run 2
    user = chain(base_rule=None)
    for s in user:
        s.inputs = ["/data/hf/30b" if x == "results/30b/base" else x for x in s.inputs]
    layout = article_layout()
    layout.base_dir = "/data/hf/30b"
    sizes = article_sizes()
    planner = Planner(user, sizes, existing={"/data/hf/30b": 57 * GiB}, merge_mode="consume",
                      layouts={"30b": layout})
    single = planner.plan()
    assert single.initial == 57 * GiB  # a base outside results/ counts
    runs = planner.plan_one_quant_per_run()
    assert not runs.feasible and "earlier run removed" in runs.notes[0]


def test_priorities_keep_one_models_chain_together():
    """With per-model priorities a --cores 1 run finishes 30b before 8b starts; without, the
    stable (toposort) order interleaves the models and two merged copies coexist."""
    def two(prio_a, prio_b):
        steps = chain("30b", prio_a) + chain("8b", prio_b)
        # interleave like a toposort does: all bases, then all trainings, ...
        steps.sort(key=lambda s: ["fetch_base", "prepare_data", "train_adapter", "merge_adapter",
                                  "convert_gguf", "quantize_gguf", "write_modelfile"].index(s.rule))
        sizes = {**article_sizes("30b"), **{k.replace("30b", "8b"): v // 4 for k, v in article_sizes("8b").items()}}
        layouts = {"30b": article_layout("30b"), "8b": article_layout("8b")}
        for sh in layouts["8b"].shards:
            sh.bytes //= 4
        return Planner(steps, sizes, merge_mode="link", layouts=layouts).plan()

    together = two(20, 10)
    models = [s.model for s in together.order]
    assert models == ["30b"] * 8 + ["8b"] * 8
    interleaved = two(0, 0)
    assert [s.model for s in interleaved.order][:2] == ["30b", "8b"]
    assert interleaved.peak > together.peak


def test_existing_files_count_and_stale_outputs_are_removed_first():
    sizes = article_sizes()
    existing = {"results/30b/base": 57 * GiB, "results/30b/adapter": GiB // 5,
                "results/30b/data/train.jsonl": 1000, "results/30b/Q4_K_M.gguf": 17 * GiB}
    steps = [s for s in chain() if s.rule not in ("fetch_base", "prepare_data", "train_adapter")]
    for s in steps:
        s.deps = None
    p = Planner(steps, sizes, existing=existing, merge_mode="consume",
                layouts={"30b": article_layout()}, background=5 * GiB).plan()
    assert p.initial == 5 * GiB + 57 * GiB + GiB // 5 + 1000 + 17 * GiB
    old = next(e for e in p.events if e.event == "remove old output")
    assert old.path == "results/30b/Q4_K_M.gguf" and old.delta == -17 * GiB
    assert p.peak_event.used == p.peak


def test_timeline_outputs():
    p = Planner(chain(), article_sizes(), merge_mode="consume", layouts={"30b": article_layout()}).plan()
    df = timeline_frame(p)
    assert list(df.columns) == ["run", "step", "rule", "model", "event", "path", "delta", "used", "peak"]
    assert df["used"].max() == p.peak and df["peak"].is_monotonic_increasing
    state = df[~df["event"].str.match("merging|converting")]  # in-job high-water marks aside
    assert (state["used"].diff().iloc[1:] == state["delta"].iloc[1:]).all()
    text = format_timeline(p)
    assert "<= peak" in text and "GiB" in text and "quantize_gguf" in text


# ----------------------------------------------------------------------------- Snakemake


TOY_SNAKEFILE = """
MODELS = list(config["models"])
EXPORT = config["export"]
INTER = EXPORT["intermediate"]
wildcard_constraints:
    model="|".join(MODELS),
    quant="|".join(EXPORT["quants"]),

def prio(wc):
    return 10 * (len(MODELS) - MODELS.index(wc.model)) if config.get("priorities", True) else 0

rule all:
    input: expand("results/{m}/Modelfile", m=config["targets"])

rule fetch_base:
    output: base=directory("results/{model}/base")
    priority: prio
    shell: "mkdir -p {output}"

rule train_adapter:
    input: base="results/{model}/base"
    output: adapter=directory("results/{model}/adapter")
    priority: prio
    shell: "mkdir -p {output}"

rule merge_adapter:
    input: base="results/{model}/base", adapter="results/{model}/adapter"
    output: merged=temp(directory("results/{model}/merged")), report="results/{model}/reports/merge.json"
    priority: prio
    shell: "mkdir -p {output.merged} && touch {output.report}"

rule convert_gguf:
    input: merged="results/{model}/merged"
    output: gguf=temp("results/{model}/" + INTER + ".gguf")
    priority: prio
    shell: "touch {output}"

rule quantize_gguf:
    input: gguf="results/{model}/" + INTER + ".gguf", adapter="results/{model}/adapter"
    output: gguf="results/{model}/{quant}.gguf"
    priority: prio
    shell: "touch {output}"

rule write_modelfile:
    input: expand("results/{{model}}/{quant}.gguf", quant=EXPORT["quants"])
    output: "results/{model}/Modelfile"
    priority: prio
    shell: "touch {output}"
"""

TOY_CONFIG = {
    "targets": ["30b"],
    "models": {
        "30b": {"base": {"hub": "unsloth/qwen3-coder-30b-a3b-instruct"}, "arch": QWEN3_30B},
        "8b": {"base": {"hub": "Qwen/Qwen3-8B"},
               "arch": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                            tie_word_embeddings=False, torch_dtype="bfloat16")},
    },
    "export": {"quants": ["Q4_K_M", "Q5_K_M"], "intermediate": "Q8_0", "merge_mode": "copy"},
    "disk_quota": "95GB",
}


@pytest.fixture
def toy_workflow(tmp_path):
    import yaml

    (tmp_path / "Snakefile").write_text('configfile: "config.yaml"\n' + TOY_SNAKEFILE)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TOY_CONFIG))
    return tmp_path


@pytest.mark.slow
def test_steps_from_a_snakemake_dag(toy_workflow):
    from loraforge.snakemake_bridge import build_dag

    wf = build_dag(toy_workflow / "Snakefile", ["all"], {"targets": ["30b", "8b"]}, toy_workflow)
    steps = steps_from_dag(wf.dag)
    assert len(steps) == 2 * 7 + 1
    merge = next(s for s in steps if s.rule == "merge_adapter" and s.model == "30b")
    assert merge.temp_outputs == {"results/30b/merged"}
    assert set(merge.outputs) == {"results/30b/merged", "results/30b/reports/merge.json"}
    assert merge.priority == 20 and merge.wildcards == {"model": "30b"}
    assert {steps[d].rule for d in merge.deps} == {"fetch_base", "train_adapter"}
    q = next(s for s in steps if s.rule == "quantize_gguf" and s.model == "8b")
    assert q.priority == 10 and q.wildcards["quant"] in ("Q4_K_M", "Q5_K_M")
    conv = next(s for s in steps if s.rule == "convert_gguf" and s.model == "8b")
    assert conv.temp_outputs == {"results/8b/Q8_0.gguf"}
    # the toposort interleaves the models; the priorities of the Snakefile undo it
    plan = Planner(steps, {}).plan()
    assert [s.model for s in plan.order if s.model] == ["30b"] * 7 + ["8b"] * 7


def test_plan_for_targets_keeps_targeted_temp_files(toy_workflow):
    p = plan_for_targets(toy_workflow / "Snakefile", ["results/30b/Q8_0.gguf"], workdir=toy_workflow)
    assert [s.rule for s in p.order] == ["fetch_base", "train_adapter", "merge_adapter", "convert_gguf"]
    assert not any(e.path.endswith("Q8_0.gguf") for e in p.events if e.event == "delete temp")
    assert p.quota == 95 * GB
    assert not (toy_workflow / "results").exists()  # a dry run


def test_cli_plan_fails_in_copy_mode_and_fits_in_consume_mode(toy_workflow, capsys):
    from loraforge.cli import main

    rc = main(["plan", "results/30b/Modelfile", "-d", str(toy_workflow), "--free", "10T"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "convert_gguf" in out and "<= peak" in out and "Jobs (7)" in out
    assert "exceeds the disk quota" in err and "Suggested: consume merge mode" in err
    rc = main(["plan", "results/30b/Modelfile", "-d", str(toy_workflow), "--free", "10T",
               "--config", "export.merge_mode=consume"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "merge mode: consume" in out and "(fits)" in out


@pytest.mark.slow
def test_onstart_hook_aborts_before_any_job(toy_workflow):
    """The plan checked in `onstart:` raises before the first job: nothing is written."""
    sf = toy_workflow / "Snakefile"
    sf.write_text(sf.read_text() + textwrap.dedent("""
        onstart:
            from loraforge.plan import check
            from loraforge.snakemake_bridge import plan_from_dag
            check(plan_from_dag(workflow.dag, config))
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    snakemake = Path(sys.executable).parent / "snakemake"
    r = subprocess.run([str(snakemake), "--cores", "1", "-d", str(toy_workflow), "-s", str(sf)],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "disk plan does not fit" in r.stdout + r.stderr
    assert not (toy_workflow / "results" / "30b" / "base").exists()


def test_the_repository_workflow_plans(tmp_path):
    """The real Snakefile, on a copy: the 30B in copy mode does not fit. Every failure to
    build the DAG is a failure of this test (a script a rule names must exist)."""
    scripts = [l.split('"')[1] for f in (REPO / "rules").glob("*.smk") for l in f.read_text().splitlines()
               if l.strip().startswith('"../scripts/')]
    assert scripts and all((REPO / "rules" / s).exists() for s in scripts), scripts
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("rules", "schemas", "scripts", "report", "envs"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, tmp_path / name)
    (tmp_path / "data").symlink_to(REPO / "data")
    p = plan_for_targets(tmp_path / "Snakefile", ["results/30b/Q5_K_M.gguf"],
                         {"export": {"merge_mode": "copy"}}, workdir=tmp_path)
    rules = [s.rule for s in p.order]
    assert rules.index("merge_adapter") < rules.index("convert_gguf") < rules.index("quantize_gguf")
    with pytest.raises(PlanError, match="consume merge mode"):
        check(p, S.parse_size("95GB"), 10**15)


def test_auto_merge_mode_links_when_it_fits_and_consumes_when_it_must(toy_workflow, capsys):
    """The article's 30B under its 95 GB quota: auto picks consume (link would not fit); with a
    quota link fits, it links; a user's own base folder is never consumed, so auto then fails
    with the check's alternatives instead."""
    from loraforge.cli import main

    rc = main(["plan", "results/30b/Modelfile", "-d", str(toy_workflow), "--free", "10T",
               "--config", "export.merge_mode=auto"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "merge mode: consume" in out and "export.merge_mode auto: consume (link would peak at" in out
    rc = main(["plan", "results/30b/Modelfile", "-d", str(toy_workflow), "--free", "10T",
               "--config", "export.merge_mode=auto", "disk_quota=1TB"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "merge mode: link" in out and "export.merge_mode auto: link (link fits)" in out
    users = {"models": {"30b": {"base": {"path": str(toy_workflow / "my-30b")}}}}
    p = plan_for_targets(toy_workflow / "Snakefile", ["results/30b/Modelfile"],
                         {"export": {"merge_mode": "auto"}, **users}, workdir=toy_workflow, free=10**13)
    assert p.merge_mode == "link" and any("never consumed" in n for n in p.notes)
    with pytest.raises(PlanError) as e:
        check(p)
    assert "consume merge mode" not in str(e.value)


@pytest.mark.slow
def test_a_dry_run_ends_with_the_planned_disk_and_vram(tmp_path):
    """`snakemake -n` (onstart does not run there) ends with one line: the planned peak disk
    against disk_quota and the GPU memory each training job plans, or why it was not planned."""
    from conftest import run_snakemake, small_config, write_config

    write_config(tmp_path, small_config(disk_quota="1GB", gpu_memory="80GB"))
    out = run_snakemake(tmp_path, "-n", "results/tiny/Q5_K_M.gguf").stdout
    line = [x for x in out.splitlines() if x.startswith("[lora-forge] dry run:")]
    assert len(line) == 1, out[-2000:]
    assert re.search(r"peak disk [\d.]+ MiB of disk_quota 953.7 MiB, .* free \(fits\)", line[0]), line[0]
    assert re.search(r"VRAM tiny [\d.]+ GiB of 74.5 GiB \(gpu_memory in the config\)", line[0]), line[0]
    tight = run_snakemake(tmp_path, "-n", "results/tiny/Q5_K_M.gguf", "--config", "disk_quota=1MB").stdout
    assert "(does NOT fit: loraforge plan says what would)" in tight
