"""export.imatrix: llama-imatrix over the training split, llama-quantize --imatrix for the quants,
and quality.tsv's measured gain (the same quant without the matrix, from the same intermediate)."""

from __future__ import annotations

import csv
import hashlib

import pytest

from conftest import clone_pipeline, run_snakemake, small_config, write_config


def _tsv(path):
    with open(path, newline="") as f:
        return {r["quant"]: r for r in csv.DictReader(f, delimiter="\t")}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_missing_matrix_is_named(tmp_path):
    from loraforge.gguf import quantize

    src = tmp_path / "F16.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(FileNotFoundError, match="imatrix.gguf"):
        quantize(src, tmp_path / "Q4_K_M.gguf", "Q4_K_M", imatrix=tmp_path / "imatrix.gguf")
    assert not list(tmp_path.glob("Q4_K_M*")), "nothing half-written"


def test_the_plan_keeps_the_intermediate_whole_under_an_imatrix():
    """consume mode frees the intermediate while the last quant reads it; llama-quantize --imatrix
    reads it whole, so the plan must not count that release."""
    from loraforge.config import validate
    from loraforge.plan import plan_steps
    from loraforge.plan.intermediate import export_chain_steps

    for enabled in (False, True):
        cfg = validate(small_config(export={"merge_mode": "consume", "imatrix": {"enabled": enabled}},
                                    quality={"evaluate": False}))
        plan = plan_steps(export_chain_steps(cfg, "tiny", "F16"), cfg, free=None, measure=False)
        released = [e for e in plan.events if "intermediate released" in e.event]
        assert bool(released) == (not enabled)
        deleted = [e for e in plan.events if e.event == "delete temp" and e.path.endswith("F16.gguf")]
        assert bool(deleted) == enabled  # whole, after the last quant


def test_the_plan_counts_the_evaluations_comparison_quant():
    """With export.imatrix the evaluation makes each kept quant again without the matrix, one temp
    file at a time: the plan counts the largest on top of what is on disk while it evaluates."""
    from loraforge.config import validate
    from loraforge.plan import plan_steps
    from loraforge.plan.intermediate import export_chain_steps

    plans = {}
    for enabled in (False, True):
        cfg = validate(small_config(export={"imatrix": {"enabled": enabled}}))
        plans[enabled] = plan_steps(export_chain_steps(cfg, "tiny", "F16"), cfg, free=None, measure=False)
    assert not [e for e in plans[False].events if "without the importance matrix" in e.event]
    [extra] = [e for e in plans[True].events if "without the importance matrix" in e.event]
    assert extra.rule == "evaluate"
    quants = {e.path: e.delta for e in plans[True].events if e.rule == "quantize_gguf" and e.event == "write"}
    assert quants and extra.delta == max(quants.values()) > 0
    events = plans[True].events
    assert extra.used == events[events.index(extra) - 1].used + extra.delta  # on top of what is there
    assert plans[True].peak >= extra.used


@pytest.mark.slow
def test_imatrix_quants_and_their_measured_gain(pipeline, tmp_path):
    work = clone_pipeline(pipeline, tmp_path / "work")
    tiny = work / "results" / "tiny"
    plain = {q: _sha(tiny / f"{q}.gguf") for q in ("Q4_K_M", "Q5_K_M")}
    before = _tsv(tiny / "quality.tsv")
    # IQ2_XS too: llama.cpp refuses it without an importance matrix (config check before that)
    write_config(work, small_config(export={"imatrix": {"enabled": True, "ctx": 128, "chunks": 16},
                                            "quants": ["Q4_K_M", "Q5_K_M", "IQ2_XS"]}))
    run = run_snakemake(work, "results/tiny/quality.tsv")
    log = run.stdout + run.stderr
    assert "rule imatrix" in log or "localrule imatrix" in log
    assert "train_adapter" not in log and "prepare_data" not in log, "an imatrix never retrains"
    assert (tiny / "imatrix.gguf").read_bytes()[:4] == b"GGUF"
    for q in plain:
        assert "--imatrix" in (work / "logs" / "tiny" / f"quantize_gguf_{q}.log").read_text()
        assert _sha(tiny / f"{q}.gguf") != plain[q], f"{q} is made with the matrix"
    rows = _tsv(tiny / "quality.tsv")
    for q in plain:
        assert rows[q]["imatrix"] == "True"
        # the same quant without the matrix, from the same (deterministic) merge and F16: the
        # pipeline's own file, so the pipeline's own KLD
        assert float(rows[q]["kld_mean_without_imatrix"]) == pytest.approx(float(before[q]["kld_mean"]), rel=1e-3)
        assert float(rows[q]["kld_mean"]) > 0
    assert rows["F16"]["imatrix"] == "" and before["Q4_K_M"]["imatrix"] == "False"
    iq = rows["IQ2_XS"]
    assert iq["imatrix"] == "True" and iq["kld_mean_without_imatrix"] == ""
    assert float(iq["kld_mean"]) > float(rows["Q4_K_M"]["kld_mean"]) and float(iq["bits_per_weight"]) < 4
    assert not list((tiny / "eval").glob("*-without-imatrix.gguf")), "the comparison quants are deleted"
    assert not (tiny / "F16.gguf").exists(), "the intermediate is temp"
