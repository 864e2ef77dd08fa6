"""The joint disk decision of the auto settings (export.intermediate, export.merge_mode,
train.keep_checkpoints), planned from config.yaml alone: F16 (quantize from 16-bit) before Q8_0,
link before consume, two training checkpoints before one; the first combination whose chain fits
disk_quota. Also what the DAG and `loraforge plan` make of it. The real runs with each
intermediate are in test_workflow.py."""

from __future__ import annotations

import copy
import os

import pytest

from conftest import REPO, small_config, write_config
from loraforge.plan import plan_steps
from loraforge.plan import intermediate as I
from loraforge.plan.intermediate import (
    candidate_intermediates,
    export_chain_steps,
    fixed_intermediate,
    resolve_intermediate,
)
from loraforge.sizes import human


def _config(**overrides):
    from loraforge.config import validate

    return validate(small_config(**overrides))


def _chain_peak(cfg, model, intermediate, merge_mode, keep):
    c = I._with_settings(cfg, model, intermediate, merge_mode, keep)
    return plan_steps(I.model_chain_steps(c, model, intermediate), c, quota=cfg["disk_quota"], free=None,
                      merge_mode=merge_mode, measure=False).peak


def _peaks(cfg, model):
    """Every candidate's planned peak, in the order the decision tries them."""
    return {c: _chain_peak(cfg, model, *c) for c in I._candidates(cfg, model)}


def test_auto_is_the_default_and_decides_each_model_by_the_quota():
    cfg = _config()
    assert cfg["export"]["intermediate"] == "auto" and cfg["defaults"]["train"]["keep_checkpoints"] == "auto"
    tiny, big = resolve_intermediate(cfg, "tiny"), resolve_intermediate(cfg, "30b")
    assert tiny.ftype == "F16" and "link merge, 2 training checkpoints" in tiny.reason and "within disk_quota" in tiny.reason
    # the article's 30B under its 95 GB quota: F16 fits once the base is consumed and one training
    # checkpoint is kept, under the article's measured 88 GB; the evaluation fits with nothing
    big_choice = I.resolve_disk_settings(cfg, "30b")
    assert (big_choice.intermediate, big_choice.merge_mode, big_choice.keep_checkpoints) == ("F16", "consume", 1)
    assert big.ftype == "F16" and big.peak_16bit <= 88e9
    assert "with the evaluation no combination fits" in big.reason
    assert "F16 intermediate, consume merge, 2 training checkpoints" in big.reason  # tried, over the quota
    assert I.resolve_keep_checkpoints(cfg, "30b") == 1 and I.resolve_keep_checkpoints(cfg, "tiny") == 2
    assert candidate_intermediates(cfg) == ("F16", "Q8_0") and fixed_intermediate(cfg) is None
    # a quota that holds everything: the first candidate
    roomy = I.resolve_disk_settings(_config(disk_quota="2TB"), "30b")
    assert (roomy.intermediate, roomy.merge_mode, roomy.keep_checkpoints) == ("F16", "link", 2)
    # settings that are not auto are kept as they are
    fixed = I.resolve_disk_settings(_config(export={"merge_mode": "link"}, defaults={"train": {"keep_checkpoints": 3}}), "30b")
    assert (fixed.merge_mode, fixed.keep_checkpoints, fixed.fits) == ("link", 3, False)


def test_the_boundary_is_the_first_candidate_that_fits():
    """The decision takes the first candidate (in the order of what each costs) whose planned peak
    fits: at each candidate's own peak as the quota, that candidate or an earlier one."""
    cfg = _config()
    peaks = _peaks(cfg, "tiny")
    order = list(peaks)
    assert order[0] == ("F16", "link", 2) and order[-1] == ("Q8_0", "consume", 1)
    assert 10e6 < min(peaks.values()) < max(peaks.values()) < 200e6  # a ~20 MB model
    for c, peak in peaks.items():
        chosen = I.resolve_disk_settings(_config(disk_quota=peak), "tiny")
        first = next(o for o in order if peaks[o] <= peak)
        assert (chosen.intermediate, chosen.merge_mode, chosen.keep_checkpoints) == first
    # under every candidate's peak, the export alone (the evaluation's own run is then refused)
    tight = min(peaks.values()) - 1
    alone = I.resolve_disk_settings(_config(disk_quota=tight), "tiny")
    assert alone.fits and alone.peak <= tight and "with the evaluation no combination fits" in alone.reason


def test_a_setting_or_a_kept_type_is_used_as_it_is():
    assert resolve_intermediate(_config(export={"intermediate": "Q8_0"}), "tiny").ftype == "Q8_0"
    assert resolve_intermediate(_config(export={"intermediate": "BF16"}), "30b").ftype == "BF16"
    kept = _config(export={"quants": ["Q8_0", "Q4_K_M"], "modelfile_quant": "Q4_K_M"})
    choice = resolve_intermediate(kept, "tiny")
    assert choice.ftype == "Q8_0" and "one of export.quants" in choice.reason
    assert candidate_intermediates(kept) == ("Q8_0",)


def test_a_hub_model_without_arch_takes_q8_0():
    cfg = small_config()
    cfg["models"]["fetched"] = {"base": {"hub": "Qwen/Qwen3-8B"}}
    from loraforge.config import validate

    choice = resolve_intermediate(validate(cfg), "fetched")
    assert choice.ftype == "Q8_0" and "arch" in choice.reason


def test_the_decision_ignores_what_is_on_disk(tmp_path, monkeypatch):
    """Cluster jobs read the Snakefile again mid-run (after a consume-mode merge used the base
    up, with results/ full of files): the intermediate must not change under them."""
    cfg = _config()
    edge = _config(disk_quota=min(p for c, p in _peaks(cfg, "tiny").items() if c[0] == "F16"))
    monkeypatch.chdir(tmp_path)
    before = resolve_intermediate(edge, "tiny")
    from loraforge.plan import intermediate as I

    I._resolve.cache_clear()
    (tmp_path / "results/tiny").mkdir(parents=True)
    with open(tmp_path / "results/tiny/Q8_0.gguf", "wb") as f:
        f.write(os.urandom(4_000_000))  # a leftover from another run, far over the 0-byte margin
    (tmp_path / "results/tiny/base").mkdir()
    (tmp_path / "results/tiny/base/config.json").write_text('{"model_type": "llama", "hidden_size": 99999}')
    after = resolve_intermediate(edge, "tiny")
    assert before == after and after.ftype == "F16"


@pytest.mark.parametrize("setting", ["auto", "Q8_0"])
def test_the_export_chain_is_the_one_snakemake_builds(tmp_path, setting):
    """export_chain_steps (what auto plans) against the DAG of the real Snakefile: the same jobs,
    big files and temp files, and the same planned peak."""
    from loraforge.snakemake_bridge import build_dag, steps_from_dag

    cfg = small_config(export={"intermediate": setting})
    write_config(tmp_path, cfg)
    wf = build_dag(REPO / "Snakefile", ["results/tiny/quality.tsv", "results/tiny/conventions.tsv",
                                        "results/tiny/Q4_K_M.gguf", "results/tiny/Q5_K_M.gguf"], workdir=tmp_path)
    dag = steps_from_dag(wf.dag)
    validated = wf.config
    inter = resolve_intermediate(validated, "tiny").ftype
    assert inter == ("F16" if setting == "auto" else "Q8_0")
    chain = export_chain_steps(validated, "tiny", inter)
    by_job = {(s.rule, s.wildcards.get("quant")): s for s in dag}
    for s in chain:
        d = by_job[(s.rule, s.wildcards.get("quant"))]
        assert set(s.outputs) <= set(d.outputs), s.rule
        assert s.temp_outputs == d.temp_outputs, s.rule
        big_inputs = {p for p in d.inputs if p.endswith((".gguf", ".logits", "merged", "base", "adapter"))}
        assert big_inputs <= set(s.inputs), s.rule
    export_rules = {s.rule for s in chain}
    assert export_rules == {s.rule for s in dag if s.rule in export_rules}
    assert ("reference_gguf" in export_rules) == (inter == "Q8_0")  # a 16-bit intermediate is the reference
    assert any(s.rule == "convert_gguf" and s.outputs == [f"results/tiny/{inter}.gguf"] for s in dag)
    # the same plan: the DAG's export jobs (from the adapter on) against the chain
    from_dag = [copy.copy(s) for s in dag if s.rule in export_rules]
    for s in from_dag:
        s.deps = None
    peaks = [plan_steps(steps, validated, quota=validated["disk_quota"], free=None, measure=False).peak
             for steps in (from_dag, chain)]
    assert abs(peaks[0] - peaks[1]) <= 0.02 * peaks[1], peaks  # reports and logs: small files


def test_loraforge_plan_says_what_auto_chose(tmp_path):
    from loraforge.snakemake_bridge import plan_for_targets

    write_config(tmp_path, small_config())
    plan = plan_for_targets(REPO / "Snakefile", ["results/tiny/Q5_K_M.gguf"], workdir=tmp_path)
    note = next(n for n in plan.notes if n.startswith("export.intermediate, export.merge_mode, train.keep_checkpoints auto"))
    assert "tiny: F16 intermediate, link merge, 2 training checkpoints" in note and "within disk_quota" in note
    assert not any("requantized from Q8_0" in n for n in plan.notes)
