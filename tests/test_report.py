"""`snakemake --report`: the HTML report of a finished pipeline holds every item (loss curves,
data summary, quality and conventions tables, memory table, cost table, disk timeline), each
with its caption; and the cost table's numbers come from the run's own records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import REPO, clone_pipeline, run_snakemake

ITEMS = {  # file in the report -> the caption's first words (report/*.rst)
    "loss.png": "Loss per optimizer step",
    "summary.tsv": "Samples and tokens per source",
    "quality.tsv": "Quality of each quant",
    "conventions.tsv": "Did the fine-tune work",
    "memory.tsv": "RAM each quant needs",
    "cost.tsv": "What each model cost",
    "disk-timeline.png": "Disk used by",
}


@pytest.mark.slow
def test_report_holds_every_item_with_its_caption(pipeline, tmp_path):
    work = clone_pipeline(pipeline, tmp_path / "work")
    run_snakemake(work, "results/cost.tsv")
    run_snakemake(work, "--report", "results/report.html", "all", "results/cost.tsv")
    html = (work / "results" / "report.html").read_text(errors="replace")
    for name, caption in ITEMS.items():
        assert name in html, f"{name} is not in the report"
        assert caption in html, f"the caption of {name} is not in the report"
    # both models' tables are in it
    assert html.count("quality.tsv") >= 2 and "tiny-moe" in html

    with open(work / "results" / "cost.tsv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert set(rows) == {"tiny", "tiny-moe"}
    for model, row in rows.items():
        metrics = json.loads((work / "results" / model / "train" / "metrics.json").read_text())
        assert float(row["train_hours"]) == pytest.approx(metrics["seconds"] / 3600, rel=1e-3)
        assert row["device"] == "cpu" and float(row["cost_usd"]) == 0  # no GPU-hours on a CPU
        # merge, convert and two quantize jobs, timed by their benchmark: files
        assert int(row["export_jobs"]) == 4 and float(row["export_minutes"]) > 0
    assert (work / "results" / "disk-timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_cost_row_prices_gpu_hours(tmp_path):
    from loraforge.run_summary import cost_row

    (tmp_path / "metrics.json").write_text(json.dumps({"device": "cuda:0", "seconds": 7200, "steps": 10}))
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "merge_adapter.tsv").write_text("s\th:m:s\tmax_rss\n60.0\t0:01:00\t100\n")
    (bench / "quantize_gguf_Q4_K_M.tsv").write_text("s\th:m:s\tmax_rss\n30.0\t0:00:30\t100\n")
    (bench / "train_adapter.tsv").write_text("s\th:m:s\tmax_rss\n999.0\t0:16:39\t100\n")  # not export
    row = cost_row("30b", tmp_path / "metrics.json", bench, gpu_hour_usd=2.5, gpus=2)
    assert row["gpu_hours"] == 4.0 and row["cost_usd"] == 10.0
    assert row["export_minutes"] == 1.5 and row["export_jobs"] == 2



def _screenshot_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lf_screenshot", REPO / "docs" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# what the landing page must show as tables (header cells), per model and for the run
SUMMARY_HEADERS = ["kld_mean", "same_top_pct", "score_pct", "mean_margin", "min_ram_gib", "gpu_hours", "export_minutes"]


@pytest.mark.slow
def test_summary_page_is_written_and_is_the_reports_landing_page(pipeline, tmp_path):
    """Any target of a model gives a report whose landing page holds the run's summary: the loss
    verdict and curve, quality, conventions, memory and cost tables, the disk timeline."""
    summary = (pipeline / "results" / "summary.html").read_text()
    for model in ("tiny", "tiny-moe"):
        assert f"id='model-{model}'" in summary
    for header in SUMMARY_HEADERS:
        assert f"<th>{header}</th>" in summary, header
    assert "Loss verdict: <b" in summary and summary.count("data:image/png;base64,") >= 3  # 2 curves + disk

    work = clone_pipeline(pipeline, tmp_path / "work")
    run_snakemake(work, "--report", "r.html", "results/tiny/Q5_K_M.gguf")
    html = (work / "r.html").read_text(errors="replace")
    assert "lora-forge run summary" in html and "kld_mean" in html and "score_pct" in html


@pytest.mark.slow
def test_report_tables_are_visible_in_a_real_browser(pipeline, tmp_path):
    """Headless Chromium opens the report (a React page) and the landing page shows the summary's
    tables: rendered, non-empty boxes holding the quality and conventions numbers."""
    shot = _screenshot_module()
    if shot.chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; setup.sh does as root)")
    work = clone_pipeline(pipeline, tmp_path / "work")
    run_snakemake(work, "--report", "r.html", "results/tiny/Q5_K_M.gguf")
    with shot.Browser() as browser:
        browser.open(work / "r.html", settle_s=4)
        tables = browser.evaluate("""(() => [...document.querySelectorAll('.lf-summary table')].map(t => {
            const box = t.getBoundingClientRect(), style = getComputedStyle(t);
            return {text: t.innerText, width: box.width, height: box.height,
                    visible: style.display !== 'none' && style.visibility !== 'hidden' && t.offsetParent !== null}; }))()""")
        png = browser.screenshot(tmp_path / "report.png")
    assert tables, "the landing page shows no summary table"
    assert all(t["visible"] and t["width"] > 200 and t["height"] > 30 for t in tables), tables
    text = "\n".join(t["text"] for t in tables)
    assert "kld_mean" in text and "Q5_K_M" in text and "score_pct" in text and "base" in text
    quality = csv.DictReader((work / "results" / "tiny" / "quality.tsv").open(), delimiter="\t")
    ppl = f"{float(next(quality)['ppl']):.4g}"
    assert ppl in text, (ppl, text[:2000])  # the numbers themselves, not only the headers
    assert png.read_bytes()[:4] == b"\x89PNG"
