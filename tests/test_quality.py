"""The evaluation (rules/quality.smk, loraforge.quality, loraforge.conventions): llama.cpp's
KL divergence and perplexity of every quant, the conventions score, and their sizes in the plan."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from loraforge import conventions as C
from loraforge import quality as Q
from loraforge.data import load_samples, prepare

REPO = Path(__file__).resolve().parent.parent
DATASET = REPO / "data" / "rails_chat.jsonl"


def _tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ----------------------------------------------------------------------------- fast


def test_logits_file_size_model():
    # 64 chunks of 128 tokens, vocab 2048: a real llama-perplexity file measured 16,580,116 bytes
    assert Q.logits_file_bytes(128, 64, 2048) == 16_580_116
    # odd vocab sizes are rounded up to even
    assert Q.logits_file_bytes(256, 1, 151_937) == Q.logits_file_bytes(256, 1, 151_938)


def test_parse_failures_name_the_log(tmp_path):
    log = tmp_path / "evaluate.log"
    with pytest.raises(Q.QualityError, match=str(log)):
        Q.parse_kld("Mean PPL(Q) : 1.0\nsomething else", log)
    with pytest.raises(Q.QualityError, match=str(log)):
        Q.parse_ppl("no estimate here", log)


def test_validation_split_holds_out_contrastive_pairs_and_their_prompts(tmp_path):
    out = [tmp_path / n for n in ("train.jsonl", "validation.jsonl", "summary.tsv")]
    prepare(DATASET, *out, max_source_share=0.2, contrastive_weight=2, validation_fraction=0.1, seed=42,
            validation_pairs=8)
    train, validation = ([json.loads(line) for line in open(p)] for p in out[:2])  # train has repeats
    items, skipped = C.load_items(out[1])
    assert len(items) + len(skipped) == 8
    held_pairs = {s["pair"] for s in validation if s.get("kind") == "contrastive"}
    assert len(held_pairs) == 8
    assert not any(s.get("pair") in held_pairs for s in train)
    held_prompts = {m["content"].strip() for s in validation if s.get("kind") == "contrastive"
                    for m in s["messages"] if m["role"] == "user"}
    assert not any(m["content"].strip() in held_prompts for s in train for m in s["messages"] if m["role"] == "user")


def test_contrastive_items_compare_code_blocks():
    samples = load_samples(DATASET)
    items, skipped = C.contrastive_items(samples)
    assert len(items) + len(skipped) == 32 and len(items) >= 28
    for it in items:
        assert it.right.startswith("```") and it.wrong.startswith("```") and it.right != it.wrong
        assert it.prompt[-1]["role"] == "user"


def test_llama_perplexity_runs_through_the_log_draining_runner():
    """The pinned build exports the entry point and the logger symbols the runner needs, so every
    evaluation goes through it (llama.cpp#22142: the tool alone loses its last lines under load)."""
    from loraforge import llama_tool_runner

    assert llama_tool_runner.available()
    assert Q.perplexity_command("m.gguf", ctx=64, chunks=2)[1:3] == ["-m", "loraforge.llama_tool_runner"]


def test_split_without_validation_pairs_is_unchanged():
    from loraforge.data import split

    samples = load_samples(DATASET)
    assert split(samples, 0.1, 42) == split(samples, 0.1, 42, contrastive_pairs=0)


def test_plan_sizes_the_evaluation_files():
    from loraforge import sizes as S
    from loraforge.plan.model import Step
    from loraforge.plan.sizing import gather_sizes, reference_logits_bytes

    from conftest import small_config

    cfg = small_config()
    cfg["models"]["30b"]["base"] = {"hub": "unsloth/qwen3-coder-30b-a3b-instruct"}
    steps = [
        Step("reference_gguf", "30b", outputs=["results/30b/eval/reference-F16.gguf"], inputs=["results/30b/merged"]),
        Step("base_gguf", "30b", outputs=["results/30b/eval/base-Q8_0.gguf"], inputs=["results/30b/base"]),
        Step("reference_logits", "30b", outputs=["results/30b/eval/reference.logits"],
             inputs=["results/30b/eval/reference-F16.gguf"]),
    ]
    sizes = gather_sizes(steps, cfg, results_dir="/nonexistent/results").sizes
    arch = S.arch_from_config(cfg["models"]["30b"]["arch"])
    assert sizes["results/30b/eval/reference-F16.gguf"] == S.gguf_bytes(arch, "F16") > 55e9
    assert sizes["results/30b/eval/base-Q8_0.gguf"] == S.gguf_bytes(arch, "Q8_0")
    logits = sizes["results/30b/eval/reference.logits"]
    assert logits == reference_logits_bytes(cfg, 151936) == Q.logits_file_bytes(256, 32, 151936)
    assert 1e9 < logits < 2e9  # bounded by quality.chunks


def test_conventions_score_counts_a_pair_won_only_when_the_right_answer_is_likelier_per_token():
    """Four hand-made items with a known answer: (right log-lik, tokens, wrong log-lik, tokens)."""
    logliks = [
        (-10.0, 10, -40.0, 20),  # per token -1 vs -2: won; summed -10 > -40: won
        (-40.0, 20, -30.0, 10),  # -2 vs -3: won; summed -40 < -30: lost (the longer answer)
        (-10.0, 2, -40.0, 20),   # -5 vs -2: lost (margin -3); summed: won
        (-60.0, 30, -50.0, 10),  # -2 vs -5: won; summed: lost
    ]
    result = C.tally(logliks)
    assert result == {"pairs": 4, "score_pct": 75.0, "score_sum_pct": 50.0, "mean_margin": 0.5}
    assert C.tally([(-1.0, 1, -1.0, 1)])["score_pct"] == 0.0  # a tie is no win
    assert C.tally([])["pairs"] == 0


def _kld_output(kld, ppl_q: float, ppl_base: float, same_top: float) -> str:
    """What llama-perplexity --kl-divergence prints for per-token KL divergences `kld` (its layout:
    the PPL block, then the KL divergence statistics with mainline's percentiles)."""
    import numpy as np

    pct = lambda q: float(np.percentile(kld, q))  # noqa: E731
    rows = [("Mean    KLD", f"{np.mean(kld):10.6f} ± {np.std(kld) / np.sqrt(len(kld)):10.6f}"),
            ("Maximum KLD", f"{np.max(kld):10.6f}"), ("99.9%   KLD", f"{pct(99.9):10.6f}"),
            ("99.0%   KLD", f"{pct(99):10.6f}"), ("95.0%   KLD", f"{pct(95):10.6f}"),
            ("90.0%   KLD", f"{pct(90):10.6f}"), ("Median  KLD", f"{np.median(kld):10.6f}"),
            ("10.0%   KLD", f"{pct(10):10.6f}"), ("Minimum KLD", f"{np.min(kld):10.6f}")]
    return "\n".join([
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {ppl_q:10.6f} ± {0.1:10.6f}",
        f"Mean PPL(base)                : {ppl_base:10.6f} ± {0.1:10.6f}",
        "", "====== KL divergence statistics ======", *(f"{k}: {v}" for k, v in rows),
        "", "====== Token probability statistics ======", f"Same top p: {same_top:6.3f} ± {0.1:6.3f} %", ""])


def test_kld_statistics_reach_quality_tsv_in_their_columns(tmp_path):
    """A skewed per-token KLD distribution with a known mean, median and 99th percentile (mean far above
    the median, as quantization error is), through the parser, the row and the TSV."""
    import numpy as np
    from gguf import GGUFWriter

    kld = np.array([0.001] * 97 + [0.3, 0.5, 2.0])
    mean, median, p99 = float(np.mean(kld)), float(np.median(kld)), float(np.percentile(kld, 99))
    assert mean > 20 * median and p99 > mean  # the known answer tells the three apart
    gguf = tmp_path / "Q4_K_M.gguf"
    writer = GGUFWriter(str(gguf), "llama")
    writer.add_tensor("w", np.zeros((4, 32), dtype=np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    parsed = Q.parse_kld(_kld_output(kld, 10.5, 10.0, 97.5), tmp_path / "evaluate.log")
    assert parsed == pytest.approx({"ppl": 10.5, "ppl_base": 10.0, "kld_mean": mean, "kld_median": median,
                                    "kld_p99": p99, "same_top_pct": 97.5}, abs=1e-6)
    out = tmp_path / "quality.tsv"
    out.write_text(Q.format_quality([Q.quality_row("Q4_K_M", gguf, parsed, reference_ppl=10.0)]))
    [row] = _tsv(out)
    assert float(row["kld_mean"]) == pytest.approx(mean, abs=1e-6)
    assert float(row["kld_median"]) == pytest.approx(median, abs=1e-6)
    assert float(row["kld_p99"]) == pytest.approx(p99, abs=1e-6)
    assert float(row["ppl_change_pct"]) == pytest.approx(5.0) and float(row["same_top_pct"]) == 97.5
    assert float(row["bits_per_weight"]) == 32.0


# ----------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_quality_table_of_the_pipeline(pipeline, model):
    rows = _tsv(pipeline / "results" / model / "quality.tsv")
    assert list(rows[0]) == Q.QUALITY_COLUMNS
    by = {r["quant"]: r for r in rows}
    assert set(by) == {"F16", "Q4_K_M", "Q5_K_M"}  # the kept quants (not the temp Q8_0 intermediate)
    for q in ("Q4_K_M", "Q5_K_M"):
        r = by[q]
        assert int(r["size_bytes"]) == os.path.getsize(pipeline / "results" / model / f"{q}.gguf")
        assert 0 <= float(r["kld_median"]) <= float(r["kld_p99"])
        assert 0 < float(r["same_top_pct"]) <= 100
    # fewer bits, more divergence: llama.cpp's ordering holds on the tiny models too
    kld = {q: float(by[q]["kld_mean"]) for q in ("F16", "Q5_K_M", "Q4_K_M")}
    assert kld["F16"] == 0 < kld["Q5_K_M"] < kld["Q4_K_M"]
    bpw = {q: float(by[q]["bits_per_weight"]) for q in by}
    assert bpw["F16"] > bpw["Q5_K_M"] > bpw["Q4_K_M"]
    # the temp files are gone, the summary says how big the logits file was (the size model's)
    eval_dir = pipeline / "results" / model / "eval"
    assert not (eval_dir / "reference.logits").exists() and not (eval_dir / "reference-F16.gguf").exists()
    summary = json.loads((eval_dir / "reference.json").read_text())
    from loraforge.gguf import gguf_metadata

    vocab = gguf_metadata(pipeline / "results" / model / "Q5_K_M.gguf", tensors=False)["n_tokens"]
    assert summary["chunks"] >= 3
    assert summary["logits_bytes"] == Q.logits_file_bytes(summary["ctx"], summary["chunks"], vocab)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_conventions_table_of_the_pipeline(pipeline, model):
    rows = _tsv(pipeline / "results" / model / "conventions.tsv")
    assert list(rows[0]) == C.CONVENTIONS_COLUMNS
    assert [r["model"] for r in rows] == ["base", "Q4_K_M", "Q5_K_M"]
    items, _ = C.load_items(pipeline / "results" / model / "data" / "validation.jsonl")
    for r in rows:
        assert int(r["pairs"]) == len(items) > 0
        assert 0 <= float(r["score_pct"]) <= 100
        assert float(r["val_ppl"]) > 1


@pytest.mark.slow
def test_a_truncated_kld_output_is_an_error_naming_the_log(pipeline, tmp_path):
    """The real tool, a real failure: a logits file cut short."""
    src = pipeline / "results" / "tiny" / "Q5_K_M.gguf"
    text = tmp_path / "val.txt"
    Q.validation_text(pipeline / "results" / "tiny" / "data" / "validation.jsonl", text)
    base = tmp_path / "ref.logits"
    Q.run_perplexity(Q.perplexity_command(src, ctx=64, chunks=4, text=text, kld_base=base), tmp_path / "a.log")
    from loraforge.gguf import gguf_metadata

    assert base.stat().st_size == Q.logits_file_bytes(64, 4, gguf_metadata(src, tensors=False)["n_tokens"])
    kld = Q.kld_against(base, src, ctx=64, chunks=4, threads=None, log=tmp_path / "b.log")
    assert kld["kld_mean"] < 1e-4 and kld["same_top_pct"] > 99  # the model against itself
    with open(base, "r+b") as f:
        f.truncate(base.stat().st_size // 2)
    with pytest.raises(Q.QualityError, match=str(tmp_path / "c.log")):
        Q.kld_against(base, src, ctx=64, chunks=4, threads=None, log=tmp_path / "c.log")


def test_plan_says_whether_quantizing_from_16_bit_would_fit(tmp_path):
    from loraforge.plan.model import Step
    from loraforge.plan.sizing import plan_steps

    from conftest import small_config

    cfg = small_config()
    cfg["models"]["30b"]["base"] = {"hub": "unsloth/qwen3-coder-30b-a3b-instruct"}
    steps = [
        Step("merge_adapter", "30b", outputs=["results/30b/merged"], inputs=["results/30b/base", "results/30b/adapter"],
             temp_outputs={"results/30b/merged"}),
        Step("convert_gguf", "30b", outputs=["results/30b/Q8_0.gguf"], inputs=["results/30b/merged"],
             temp_outputs={"results/30b/Q8_0.gguf"}),
        Step("quantize_gguf", "30b", outputs=["results/30b/Q4_K_M.gguf"], inputs=["results/30b/Q8_0.gguf"]),
    ]
    notes = {q: " ".join(plan_steps(steps, cfg, workdir=tmp_path, quota=q, free=10**15, merge_mode="link").notes)
             for q in ("1000GB", "100GB")}
    for note in notes.values():
        assert "requantized from Q8_0" in note and "requantized/direct" in note
    assert notes["1000GB"].endswith("it fits") and notes["100GB"].endswith("it does not fit")
