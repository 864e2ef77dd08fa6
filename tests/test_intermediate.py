"""export.intermediate auto: F16 (quantize from 16-bit) when the model's export from F16 fits
disk_quota, planned from config.yaml alone; else Q8_0 (requantize). Also what the DAG and
`loraforge plan` make of it. The real runs with each intermediate are in test_workflow.py."""

from __future__ import annotations

import copy
import os

import pytest

from conftest import REPO, small_config, write_config
from loraforge.plan import plan_steps
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


def _f16_peak(cfg, model, merge_mode=None):
    return plan_steps(export_chain_steps(cfg, model, "F16"), cfg, quota=cfg["disk_quota"], free=None,
                      merge_mode=merge_mode, measure=False).peak


def test_auto_is_the_default_and_decides_each_model_by_the_quota():
    cfg = _config()
    assert cfg["export"]["intermediate"] == "auto"
    tiny, big = resolve_intermediate(cfg, "tiny"), resolve_intermediate(cfg, "30b")
    assert tiny.ftype == "F16" and "within disk_quota" in tiny.reason
    # the article's 30B: base 57 GB + merged + a 57 GB F16 GGUF is far over its 95 GB
    assert big.ftype == "Q8_0" and "over disk_quota" in big.reason and big.peak_16bit > 95e9
    assert candidate_intermediates(cfg) == ("F16", "Q8_0") and fixed_intermediate(cfg) is None
    # a quota that holds the 30B's F16 chain: auto quantizes it from 16-bit too
    roomy = _config(disk_quota="2TB")
    assert resolve_intermediate(roomy, "30b").ftype == "F16"


def test_the_boundary_is_the_planned_peak_of_the_f16_chain():
    """Under the link peak, export.merge_mode auto consumes the built base: F16 still fits down
    to the consume peak; one byte less and auto requantizes from Q8_0."""
    cfg = _config()
    link, consume = _f16_peak(cfg, "tiny", "link"), _f16_peak(cfg, "tiny", "consume")
    assert 10e6 < consume < link < 200e6  # base + merged + F16 + quants of a ~20 MB model
    assert resolve_intermediate(_config(disk_quota=link), "tiny").ftype == "F16"
    between = resolve_intermediate(_config(disk_quota=link - 1), "tiny")
    assert between.ftype == "F16" and "consume merge" in between.reason
    assert resolve_intermediate(_config(disk_quota=consume), "tiny").ftype == "F16"
    below = resolve_intermediate(_config(disk_quota=consume - 1), "tiny")
    assert below.ftype == "Q8_0" and "over disk_quota" in below.reason


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
    edge = _config(disk_quota=_f16_peak(cfg, "tiny", "consume"))
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
    note = next(n for n in plan.notes if n.startswith("export.intermediate auto"))
    assert "tiny F16" in note and "within disk_quota" in note
    assert not any("requantized from Q8_0" in n for n in plan.notes)
