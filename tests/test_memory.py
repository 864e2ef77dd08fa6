"""The memory table: KV cache from the config (exact, checked against llama.cpp's own KV
buffer), compute buffer estimate (checked against llama.cpp's), totals, TSV."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from loraforge.memory import (
    GIB,
    MIB,
    RUNTIME_OVERHEAD_BYTES,
    compute_buffer_bytes,
    dims_from_gguf,
    format_table,
    kv_cache_bytes,
    memory_table,
    model_dims,
    write_memory_tsv,
)

# config.yaml's `arch:` blocks (HF config field names)
QWEN3_CODER_30B = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                       num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                       num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                       torch_dtype="bfloat16")
QWEN3_8B = dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                tie_word_embeddings=False, torch_dtype="bfloat16")
QWEN25_CODER_3B = dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       torch_dtype="bfloat16")


def test_kv_cache_of_the_article_models():
    # 2 * 48 layers * 4 KV heads * 128 * 32768 tokens * 2 bytes = 3 GiB
    assert kv_cache_bytes(QWEN3_CODER_30B, 32768) == 3 * GIB
    assert kv_cache_bytes(QWEN3_8B, 32768) == int(4.5 * GIB)
    # no head_dim in a Qwen2.5 config: hidden / heads = 128
    assert model_dims(QWEN25_CODER_3B).head_dim == 128
    assert kv_cache_bytes(QWEN25_CODER_3B, 32768) == int(1.125 * GIB)
    assert kv_cache_bytes(QWEN3_CODER_30B, 32768, "q8_0") == int(1.5 * GIB)
    assert kv_cache_bytes(QWEN3_CODER_30B, 8192) == int(0.75 * GIB)
    with pytest.raises(ValueError, match="q3"):
        kv_cache_bytes(QWEN3_CODER_30B, 1024, "q3")


def test_memory_table_30b_makes_the_rule_of_thumb_exact():
    df = memory_table([], QWEN3_CODER_30B, 32768, estimate_quants=["Q4_K_M", "Q5_K_M"])
    assert list(df["quant"]) == ["Q4_K_M", "Q5_K_M"] and set(df["source"]) == {"estimated"}
    for r in df.to_dict("records"):
        assert r["kv_cache_bytes"] == 3 * GIB
        assert r["total_bytes"] == r["file_bytes"] + r["kv_cache_bytes"] + r["compute_bytes"] + r["overhead_bytes"]
        extra = (r["total_bytes"] - r["file_bytes"]) / GIB
        assert 3.0 < extra < 4.0, extra  # the article's "file size plus 2-4 GB", at 32k context
    q4, q5 = df.to_dict("records")
    # the article's table: 30B Q4_K_M 18 GB / min 20 GB, Q5_K_M 21 GB / min 24 GB, recommended 24/32 GB
    assert 17e9 < q4["file_bytes"] < 19.5e9 and 20.5e9 < q5["file_bytes"] < 22.5e9
    assert q5["min_ram_gib"] == 24 and q5["recommended_ram_gib"] == 32
    assert q4["total_bytes"] < q5["total_bytes"]
    # flash attention off: the f32 KQ scores of 32 heads add ~2 GiB of compute buffer
    assert compute_buffer_bytes(QWEN3_CODER_30B, 32768, flash_attention=False) > 2 * GIB
    assert compute_buffer_bytes(QWEN3_CODER_30B, 32768) < 0.5 * GIB
    assert "Q5_K_M" in format_table(df)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_bases, tmp_path_factory):
    from loraforge.gguf import convert_to_gguf, quantize

    d = tmp_path_factory.mktemp("memory")
    q8 = convert_to_gguf(tiny_bases["qwen3_moe"], d / "Q8_0.gguf", "q8_0", threads=1)
    q4 = quantize(q8, d / "Q4_K_M.gguf", "Q4_K_M", 1)
    return {"config": tiny_bases["qwen3_moe"] / "config.json", "paths": [q4, q8]}


def _llama_cpp_buffers(path, n_ctx: int, flash_attn: bool) -> tuple[float, float]:
    """(KV cache MiB, compute buffer MiB) as llama.cpp reports them when loading."""
    from llama_cpp import Llama

    from loraforge.gguf import llama_log_to

    logs: list[str] = []
    with llama_log_to(logs.append):
        llm = Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=1, flash_attn=flash_attn,
                    verbose=False)
    llm.close()
    text = "".join(logs)
    kv = float(re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB", text).group(1))
    compute = float(re.search(r"CPU compute buffer size =\s*([\d.]+) MiB", text).group(1))
    return kv, compute


@pytest.mark.slow
def test_memory_table_on_tiny_gguf(tiny_gguf, tmp_path):
    df = memory_table(tiny_gguf["paths"], tiny_gguf["config"], 4096)
    assert list(df["quant"]) == ["Q4_K_M", "Q8_0"] and set(df["source"]) == {"measured"}
    q4, q8 = df.to_dict("records")
    assert q4["file_bytes"] == tiny_gguf["paths"][0].stat().st_size < q8["file_bytes"]
    # 2 * 4 layers * 2 KV heads * head_dim 64 * 4096 * 2 bytes = 8 MiB
    assert q4["kv_cache_bytes"] == 8 * MIB
    assert q4["overhead_bytes"] == RUNTIME_OVERHEAD_BYTES
    assert q4["total_bytes"] == q4["file_bytes"] + 8 * MIB + q4["compute_bytes"] + RUNTIME_OVERHEAD_BYTES
    # the dimensions read back from the GGUF are the config's; without a config they are used
    assert dims_from_gguf(tiny_gguf["paths"][0]) == model_dims(tiny_gguf["config"])
    pd.testing.assert_frame_equal(memory_table(tiny_gguf["paths"], None, 4096), df)
    out = write_memory_tsv(df, tmp_path / "memory.tsv")
    back = pd.read_csv(out, sep="\t")
    assert list(back.columns) == list(df.columns) and back["total_bytes"].tolist() == df["total_bytes"].tolist()
    assert not (tmp_path / "memory.tsv.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx", [512, 4096])
@pytest.mark.parametrize("flash_attn", [True, False])
def test_estimates_match_llama_cpp(tiny_gguf, n_ctx, flash_attn):
    kv_mib, compute_mib = _llama_cpp_buffers(tiny_gguf["paths"][0], n_ctx, flash_attn)
    assert kv_cache_bytes(tiny_gguf["config"], n_ctx) == pytest.approx(kv_mib * MIB, abs=0.01 * MIB)
    est = compute_buffer_bytes(tiny_gguf["config"], n_ctx, flash_attention=flash_attn) / MIB
    # within 0.5 MiB with flash attention; without it ~2 MiB high (the scores and the layer
    # activations are not all alive at once), which is noise next to the KQ term at real contexts
    assert est == pytest.approx(compute_mib, rel=0.1, abs=2.5), (est, compute_mib)
