"""GGUF export on the tiny Qwen3 and Qwen3-MoE: conversion with llama.cpp's own converter
(normal and release-shards), quantization through llama-cpp-python, the smoke check, and
numbers: llama.cpp logits against the HF model and against transformers loading the same GGUF.

Each GGUF is built once per module (fixture `exports`); the file runs in about 1.5-2 minutes
on 2 cores, the tiny bases included.

Why the 16-bit GGUF is BF16: the tiny bases (like the real Qwen checkpoints) are bf16, and
`--outtype bf16` copies those weights bit for bit (transformers loading the BF16 GGUF gives
exactly the HF logits, asserted below). F16 is exact only inside f16's range (|w| < 65504,
and below 6.1e-5 it loses bits as a subnormal), so for a bf16 model it is the lossy one,
which is why the converter's `auto` picks bf16. In llama.cpp's CPU matmul the F16 file
scores *closer* to the fp32 HF logits (measured rel. L2 ~5e-5 vs ~4e-4) only because ggml
rounds the activations to the weight type (bf16 activations keep 8 bits of mantissa, f16 11).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from loraforge.gguf import (
    GGUFCheckError,
    check_gguf,
    convert_to_gguf,
    ftype_for,
    ftype_name,
    gguf_metadata,
    quant_types,
    quantize,
)

pytestmark = pytest.mark.slow

ARCHS = ("qwen3", "qwen3_moe")
GGUF_ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe"}
QUANTS = ("Q8_0", "Q4_K_M", "Q5_K_M")
# A ChatML conversation with Ruby code: special tokens, newlines, indentation, punctuation.
PROMPT = (
    "<|im_start|>system\nYou are an expert Ruby on Rails architect.<|im_end|>\n"
    "<|im_start|>user\nRefactor this controller to use concerns:\n"
    "class PostsController < ApplicationController\n"
    "  before_action :set_post, only: %i[show edit update]\n\n"
    "  def index\n    @posts = Post.where(published: true).order(created_at: :desc)\n  end\n"
    "end<|im_end|>\n<|im_start|>assistant\n"
)
THREADS = 1  # the tiny models need no more, and 2 cores are shared with the other tests
# llama.cpp logits of each quant vs the fp32 logits of the original bf16 HF model (rel. L2):
# 2.5x the largest of the two tiny bases, measured (2026-12-02): Q8_0 1.45e-3 / 1.53e-3,
# Q5_K_M 4.25e-3 / 5.13e-3, Q4_K_M 5.94e-3 / 7.77e-3 (qwen3 / qwen3_moe; deterministic)
VS_HF_BOUND = {"Q8_0": 0.004, "Q5_K_M": 0.013, "Q4_K_M": 0.02}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def llama_logits(gguf_path, ids) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), n_ctx=256, n_threads=THREADS, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_tokenize(gguf_path, text: str) -> list[int]:
    from llama_cpp import Llama

    from loraforge.gguf import llama_log_to

    with llama_log_to(lambda _: None):  # vocab_only warns about n_ctx_train 0
        llm = Llama(str(gguf_path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    finally:
        llm.close()


def hf_logits(model_dir, ids, gguf_file: str | None = None, config_dir=None) -> np.ndarray:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if gguf_file:
        # the HF config: transformers' GGUF->config mapping has no head_dim for Qwen3 (64 here)
        kwargs.update(gguf_file=gguf_file, config=AutoConfig.from_pretrained(config_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def exports(tiny_bases, tmp_path_factory):
    """Per arch: BF16, Q8_0 (converted directly), Q4_K_M and Q5_K_M (requantized from Q8_0),
    and a Q8_0 converted in release-shards mode from a private copy of the model."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"gguf-{arch}")
        times, paths = {}, {}
        t = time.time()
        paths["BF16"] = convert_to_gguf(tiny_bases[arch], d / "BF16.gguf", "bf16", threads=THREADS,
                                        log=d / "convert_bf16.log")
        times["convert BF16"] = time.time() - t
        t = time.time()
        paths["Q8_0"] = convert_to_gguf(tiny_bases[arch], d / "Q8_0.gguf", "q8_0", threads=THREADS,
                                        log=d / "convert_q8_0.log")
        times["convert Q8_0"] = time.time() - t
        for q in ("Q4_K_M", "Q5_K_M"):
            t = time.time()
            paths[q] = quantize(paths["Q8_0"], d / f"{q}.gguf", q, THREADS, log=d / f"quantize_{q}.log")
            times[f"quantize {q}"] = time.time() - t
        # consume mode on a copy with the same folder name (general.name comes from it); as a
        # "link"-mode merge would, one shard is a symlink and one a hard link to the base's:
        # releasing them must remove the names only, never the base's files
        base = Path(tiny_bases[arch])
        consumed = d / "consume" / base.name
        shutil.copytree(base, consumed)
        shards = sorted(p.name for p in consumed.glob("*.safetensors"))
        (consumed / shards[0]).unlink()
        (consumed / shards[0]).symlink_to(base / shards[0])
        (consumed / shards[1]).unlink()
        os.link(base / shards[1], consumed / shards[1])
        events = d / "release-events.jsonl"
        os.environ["LORAFORGE_RELEASE_EVENTS"] = str(events)
        try:
            t = time.time()
            paths["Q8_0-released"] = convert_to_gguf(consumed, d / "Q8_0-released.gguf", "q8_0",
                                                     release_shards=True, threads=THREADS,
                                                     log=d / "convert_release.log")
            times["convert Q8_0 release_shards"] = time.time() - t
        finally:
            os.environ.pop("LORAFORGE_RELEASE_EVENTS", None)
        out[arch] = {
            "dir": d, "paths": paths, "times": times, "consumed": consumed, "shards": shards, "base": base,
            "events": [json.loads(line) for line in events.read_text().splitlines()],
            "log_release": (d / "convert_release.log").read_text(),
            "sizes": {k: Path(p).stat().st_size for k, p in paths.items()},
        }
    yield out
    summary = {a: {"sizes": v["sizes"], "seconds": {k: round(s, 2) for k, s in v["times"].items()}}
               for a, v in out.items()}
    print("\nGGUF exports:", json.dumps(summary, indent=1))


@pytest.fixture(scope="module")
def reference(tiny_bases):
    """HF tokenization of PROMPT and the fp32 logits of each bf16 base model."""
    from transformers import AutoTokenizer

    ref = {}
    for arch in ARCHS:
        tok = AutoTokenizer.from_pretrained(str(tiny_bases[arch]))
        ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
        ref[arch] = {"ids": ids, "logits": hf_logits(tiny_bases[arch], ids)}
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_of_every_gguf(exports, arch):
    want = {"BF16": 32, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q8_0-released": 7}
    for name, path in exports[arch]["paths"].items():
        meta = gguf_metadata(path)
        assert meta["architecture"] == GGUF_ARCH[arch], name
        assert meta["file_type"] == want[name], (name, meta["file_type"])
        assert meta["chat_template"] and "<|im_start|>" in meta["chat_template"], name
        assert meta["eos_token_id"] == meta["im_end_id"] is not None, name
        assert meta["tensor_count"] > 0
        assert not list(Path(path).parent.glob("*.partial")), "a temporary file was left behind"
    sizes = exports[arch]["sizes"]
    assert sizes["Q4_K_M"] < sizes["Q5_K_M"] < sizes["Q8_0"] < sizes["BF16"], sizes
    # the K-quants really apply (every matrix width is a multiple of 256)
    types = gguf_metadata(exports[arch]["paths"]["Q4_K_M"])["tensor_types"]
    assert types.get("Q4_K", 0) > 0 and types.get("Q6_K", 0) > 0, types
    types = gguf_metadata(exports[arch]["paths"]["Q5_K_M"])["tensor_types"]
    assert types.get("Q5_K", 0) > 0, types


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_gguf_matches_hf_logits(exports, reference, tiny_bases, arch):
    ids, ref = reference[arch]["ids"], reference[arch]["logits"]
    path = exports[arch]["paths"]["BF16"]
    rel = rel_l2(llama_logits(path, ids), ref)
    print(f"{arch} BF16 llama.cpp vs HF fp32: rel L2 {rel:.2e}")
    assert rel <= 1e-2
    # bit-exact weights: transformers reading the BF16 GGUF reproduces the HF model exactly
    same = rel_l2(hf_logits(path.parent, ids, path.name, tiny_bases[arch]), ref)
    print(f"{arch} BF16 transformers(GGUF) vs HF: rel L2 {same:.2e}")
    assert same <= 1e-6


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", QUANTS)
def test_quant_llamacpp_matches_transformers_on_same_gguf(exports, reference, tiny_bases, arch, quant):
    # transformers 5.17 dequantizes every one of these types (gguf-py's dequantize) for
    # qwen3 and qwen3_moe alike, so both runtimes read the very same quantized weights.
    ids = reference[arch]["ids"]
    path = exports[arch]["paths"][quant]
    ours = llama_logits(path, ids)
    theirs = hf_logits(path.parent, ids, path.name, tiny_bases[arch])
    rel = rel_l2(ours, theirs)
    vs_hf = rel_l2(ours, reference[arch]["logits"])
    print(f"{arch} {quant}: llama.cpp vs transformers(same GGUF) rel L2 {rel:.2e}; vs HF bf16 model {vs_hf:.2e}")
    assert rel <= 0.05
    assert np.isfinite(ours).all()
    # and against the original HF model: the quantized file is still that model (both checks
    # above pass for a GGUF of the wrong weights, since both runtimes read the same file)
    assert vs_hf <= VS_HF_BOUND[quant], f"{quant} drifted from the HF model: rel L2 {vs_hf:.3f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_release_shards_same_gguf_and_shards_released_progressively(exports, arch):
    e = exports[arch]
    normal, released = e["paths"]["Q8_0"], e["paths"]["Q8_0-released"]
    # the same file, byte for byte (same converter, same metadata, same tensors)
    assert Path(normal).read_bytes() == Path(released).read_bytes()
    assert not list(e["consumed"].glob("*.safetensors")), "shards left after a release_shards conversion"
    assert (e["consumed"] / "config.json").is_file()  # small files stay
    plan = e["events"][0]
    releases = [ev for ev in e["events"] if ev["event"] == "release"]
    assert plan["event"] == "plan" and sorted(plan["shards"]) == e["shards"]
    assert sorted(ev["shard"] for ev in releases) == e["shards"]
    assert len(e["shards"]) >= 3
    # progressively: during the write, at distinct tensors, the first long before the end
    after = [ev["after_tensor"] for ev in releases]
    assert all(a is not None for a in after)
    assert len(set(after)) >= 2 and min(after) < plan["n_tensors"] // 2, after
    assert not any(ev["still_mapped"] for ev in releases)
    # the linked shards were names only: the base model keeps all its files
    assert [ev["shared_link"] for ev in sorted(releases, key=lambda ev: ev["shard"])][:3] == [True, True, False]
    assert sorted(p.name for p in e["base"].glob("*.safetensors")) == e["shards"]
    # peak disk: shards still there + GGUF written, at every release, stays within the
    # shards' total plus one shard (keeping all shards would peak at total + the whole GGUF)
    total = sum(s["bytes"] for s in plan["shards"].values())
    biggest = max(s["bytes"] for s in plan["shards"].values())
    peak = max(ev["shard_bytes_left"] + ev["bytes"] + ev["gguf_bytes_written"] for ev in releases)
    gguf_bytes = Path(released).stat().st_size
    assert peak <= total + biggest < total + gguf_bytes, (peak, total, biggest, gguf_bytes)
    assert "loraforge: released model-00001-of-" in e["log_release"]


def test_release_shards_bf16_and_unread_shard(exports, tiny_bases, tmp_path):
    """The 16-bit intermediate in consume mode: same file; a shard whose tensors are all
    skipped by the converter (here an extra one, listed in the index) goes too."""
    import torch
    from safetensors.torch import save_file

    base = Path(tiny_bases["qwen3"])
    model = tmp_path / base.name
    shutil.copytree(base, model)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    # rotary_emb.inv_freq: a tensor the converter skips ("we don't need these")
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(32)}, str(model / "extra.safetensors"))
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    out = convert_to_gguf(model, tmp_path / "BF16.gguf", "bf16", release_shards=True, threads=THREADS,
                          log=tmp_path / "log.txt")
    assert not list(model.glob("*.safetensors"))
    assert "released extra.safetensors" in (tmp_path / "log.txt").read_text()
    assert out.read_bytes() == exports["qwen3"]["paths"]["BF16"].read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenization_matches_hf(exports, reference, arch):
    for name in ("Q8_0", "Q4_K_M"):
        assert llama_tokenize(exports[arch]["paths"][name], PROMPT) == reference[arch]["ids"], name
    ids = reference[arch]["ids"]
    meta = gguf_metadata(exports[arch]["paths"]["Q8_0"])
    assert ids.count(meta["im_start_id"]) == 3 and ids.count(meta["im_end_id"]) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_check_gguf(exports, arch):
    paths = exports[arch]["paths"]
    report = check_gguf(paths["Q4_K_M"], expect_arch=GGUF_ARCH[arch], expect_ftype="Q4_K_M", threads=THREADS,
                        n_predict=4)
    assert report["ok"] and report["file_type"] == 15 and report["chat_template_present"]
    gen = report["llama_cpp"]
    assert 1 <= len(gen["generated_ids"]) <= 4 and gen["prompt_tokens"] > 10
    assert json.loads(json.dumps(report, default=str))["file_type_name"] == "Q4_K_M"
    with pytest.raises(GGUFCheckError, match="expected 17"):
        check_gguf(paths["Q4_K_M"], expect_ftype="Q5_K_M", load=False)
    with pytest.raises(GGUFCheckError, match="architecture"):
        check_gguf(paths["Q4_K_M"], expect_arch="llama", load=False)


def test_check_gguf_rejects_wrong_eos(exports, monkeypatch):
    """EOS not <|im_end|> (chat replies would never end) or no chat template: the check fails."""
    import loraforge.gguf as lg

    real = lg.gguf_metadata
    src = exports["qwen3"]["paths"]["Q4_K_M"]
    meta = real(src)
    monkeypatch.setattr(lg, "gguf_metadata", lambda p, **kw: dict(meta, eos_token_id=meta["endoftext_id"]))
    with pytest.raises(GGUFCheckError, match="not <\\|im_end\\|>"):
        check_gguf(src, load=False)
    monkeypatch.setattr(lg, "gguf_metadata", lambda p, **kw: dict(meta, chat_template=None))
    with pytest.raises(GGUFCheckError, match="chat_template is missing"):
        check_gguf(src, load=False)


def test_quantize_types_and_requantize(exports, tmp_path):
    import ctypes

    import llama_cpp

    types = quant_types()
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                 "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS",
                 "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0",
                 "TQ2_0", "MXFP4_MOE", "F16", "BF16", "F32"):
        assert name in types, name
    assert (ftype_for("q4_k_m"), ftype_for("Q5_K_M"), ftype_for("Q8_0")) == (15, 17, 7)
    assert ftype_name(15) == "Q4_K_M" and ftype_for("Q4_K") == 15
    with pytest.raises(ValueError, match="Q9_Z"):
        quantize(exports["qwen3"]["paths"]["Q8_0"], tmp_path / "x.gguf", "Q9_Z")
    # the article's fifth attempt: without allow_requantize llama.cpp refuses a Q8_0 source
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15
    params.nthread = THREADS
    assert not params.allow_requantize
    from loraforge.gguf import llama_log_to

    logs: list[str] = []
    with llama_log_to(logs.append):
        rc = llama_cpp.llama_model_quantize(str(exports["qwen3"]["paths"]["Q8_0"]).encode(),
                                            str(tmp_path / "refused.gguf").encode(), ctypes.byref(params))
    assert rc != 0 and "requantizing from type q8_0 is disabled" in "".join(logs)
    # quantizing from the 16-bit intermediate (export.intermediate: BF16) works as well
    out = quantize(exports["qwen3"]["paths"]["BF16"], tmp_path / "Q4_K_M.gguf", "Q4_K_M", THREADS)
    assert gguf_metadata(out)["file_type"] == 15
    # a type needing an importance matrix fails cleanly, leaving nothing behind
    with pytest.raises(RuntimeError, match="importance matrix"):
        quantize(exports["qwen3"]["paths"]["BF16"], tmp_path / "IQ2_XS.gguf", "IQ2_XS", THREADS)
    assert not (tmp_path / "IQ2_XS.gguf").exists() and not (tmp_path / "IQ2_XS.gguf.partial").exists()


def test_needs_imatrix_is_what_libllama_refuses(exports, tmp_path):
    """NEEDS_IMATRIX (which config validation rejects up front) is exactly the set of file
    types libllama refuses without an importance matrix: every type lora-forge knows,
    quantized from the tiny 16-bit GGUF (all widths multiples of 256, so no fallback hides an
    i-quant)."""
    from loraforge.constants import CONVERTER_FTYPES, FTYPE_DEFAULT, NEEDS_IMATRIX

    src = exports["qwen3"]["paths"]["BF16"]
    refused, failed = set(), {}
    for name in sorted(set(FTYPE_DEFAULT) - set(CONVERTER_FTYPES)):
        try:
            quantize(src, tmp_path / f"{name}.gguf", name, THREADS)
        except RuntimeError as e:
            if "requires an importance matrix" in str(e):
                refused.add(name)
            else:
                failed[name] = str(e)[-300:]
        (tmp_path / f"{name}.gguf").unlink(missing_ok=True)
    assert not failed, failed
    assert refused == NEEDS_IMATRIX, (sorted(refused - NEEDS_IMATRIX), sorted(NEEDS_IMATRIX - refused))


def test_convert_failure_leaves_no_output(tmp_path, tiny_bases):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny_bases["qwen3"]).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, broken / f.name)
    with pytest.raises(RuntimeError, match="convert_hf_to_gguf.py failed"):
        convert_to_gguf(broken, tmp_path / "out.gguf", "q8_0", log=tmp_path / "log.txt")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.gguf.partial").exists()
    assert "FAILED" in (tmp_path / "log.txt").read_text()
    with pytest.raises(ValueError, match="outtype"):
        convert_to_gguf(tiny_bases["qwen3"], tmp_path / "x.gguf", "q4_k_m")


def test_inspect_gguf_cli(exports, capsys):
    from loraforge.cli import main

    path = str(exports["qwen3_moe"]["paths"]["Q5_K_M"])
    assert main(["inspect-gguf", path, "--expect-ftype", "Q5_K_M", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "17 (Q5_K_M)" in out and "qwen3moe" in out and "check           ok" in out
    assert main(["inspect-gguf", path, "--expect-ftype", "Q4_K_M", "--no-load"]) == 1
    assert "CHECK FAILED" in capsys.readouterr().out
    assert main(["inspect-gguf", path, "--no-load", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["file_type_name"] == "Q5_K_M"
