"""The run's summary page, `results/summary.html`: per model the loss verdict and curve, the
quality table, the conventions score, the memory and cost tables, and the run's disk timeline,
as HTML tables and inline images (data URIs) in one self-contained file.

Written at the end of every successful run (workflow_hooks.on_finish), from whatever results
exist; `snakemake --report` puts it on the report's landing page (report/workflow-summary.rst),
whatever the report's targets, so the tables are read there rather than downloaded."""

from __future__ import annotations

import base64
import csv
import html
import json
import time
from pathlib import Path

from loraforge.fileio import write_text_atomic
from loraforge.run_summary import cost_row

SUMMARY_PAGE = Path("results") / "summary.html"
DISK_LOG_DIR = Path("logs") / "disk"
# memory.tsv's columns in GiB (the byte columns and the file's path are in the file)
MEMORY_COLUMNS = ["quant", "num_ctx", "file_gib", "kv_cache_gib", "total_gib", "min_ram_gib", "recommended_ram_gib"]

# On the report's landing page: Tailwind's `prose max-w-lg` would squeeze the tables into 32rem,
# and its content box centres what it holds, so a page taller or wider than the window would be
# cut off at the top and left (out of scroll reach).
STYLE = """<style>
.prose.max-w-lg:has(.lf-summary) { max-width: none !important; }
div.justify-center:has(.lf-summary) { justify-content: flex-start !important; align-items: flex-start !important; }
.lf-summary { font-family: system-ui, sans-serif; font-size: 14px; color: #1f2937; max-width: min(1100px, calc(100vw - 320px)); }
.lf-summary .lf-table { overflow-x: auto; max-width: 100%; }
.lf-summary table { border-collapse: collapse; margin: 0.4em 0 1em 0; font-size: 13px; width: auto; }
.lf-summary th, .lf-summary td { border: 1px solid #d1d5db; padding: 3px 8px; text-align: right; }
.lf-summary th { background: #f3f4f6; }
.lf-summary td:first-child, .lf-summary th:first-child { text-align: left; }
.lf-summary img { max-width: 640px; width: 100%; border: 1px solid #e5e7eb; }
.lf-summary .lf-caption { margin: 0.8em 0 0 0; color: #4b5563; }
.lf-summary .verdict-ok { color: #047857; } .lf-summary .verdict-warn { color: #b45309; }
</style>"""


def _cell(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return html.escape(value)
    if number.is_integer() and "." not in value and "e" not in value.lower():
        return html.escape(value)
    return f"{number:.4g}"


def table_html(rows: list[dict], caption: str, columns: list[str] | None = None) -> str:
    """An HTML table of `rows` (their `columns` where given), scrolling sideways when too wide."""
    if not rows:
        return ""
    columns = [c for c in (columns or list(rows[0])) if c in rows[0]]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(str(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows)
    return (f"<p class='lf-caption'>{html.escape(caption)}</p>"
            f"<div class='lf-table'><table><tr>{head}</tr>{body}</table></div>")


def read_tsv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def image_html(png: Path, alt: str) -> str:
    if not png.exists():
        return ""
    data = base64.b64encode(png.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def loss_html(model_dir: Path) -> str:
    try:
        m = json.loads((model_dir / "train" / "metrics.json").read_text())
    except (OSError, ValueError):
        return "<p>not trained yet</p>"
    verdict = m.get("verdict", "?")
    css = "verdict-ok" if verdict == "ok" else "verdict-warn"
    numbers = ", ".join(f"{label} {m[key]:.4f}" for key, label in
                        (("first_loss", "first loss"), ("final_loss", "final loss"), ("eval_loss", "validation loss"))
                        if isinstance(m.get(key), (int, float)))
    message = html.escape(m.get("verdict_message") or "")
    return (f"<p>Loss verdict: <b class='{css}'>{html.escape(verdict)}</b> {message}<br>"
            f"{m.get('steps')} steps on {html.escape(str(m.get('device', '?')))} in {m.get('seconds', 0):.0f} s; {numbers}</p>"
            + image_html(model_dir / "train" / "loss.png", "loss curve"))


def conventions_headline(rows: list[dict]) -> str:
    base = next((r for r in rows if r.get("model") == "base"), None)
    tuned = [r for r in rows if r.get("model") != "base"]
    if not base or not tuned:
        return ""
    best = max(tuned, key=lambda r: float(r.get("score_pct") or 0))
    return (f"<p>Conventions score (held-out contrastive pairs): base {base['score_pct']}% &rarr; "
            f"{html.escape(best['model'])} {best['score_pct']}%</p>")


def model_section(model: str, config: dict, workdir: Path) -> str:
    from loraforge import resources

    d = workdir / "results" / model
    conventions = read_tsv(d / "conventions.tsv")
    parts = [f"<h2 id='model-{html.escape(model)}'>{html.escape(model)}</h2>", loss_html(d),
             table_html(read_tsv(d / "quality.tsv"), f"Quality of each quant against 16-bit ({model}/quality.tsv)"),
             conventions_headline(conventions),
             table_html(conventions, f"Conventions score ({model}/conventions.tsv)"),
             table_html(read_tsv(d / "memory.tsv"), f"RAM each quant needs at ollama.num_ctx ({model}/memory.tsv)",
                        MEMORY_COLUMNS)]
    metrics = d / "train" / "metrics.json"
    if metrics.exists():
        gpus = resources.resource(config, "train_adapter", "gpu", model=model)
        row = cost_row(model, metrics, workdir / "logs" / model / "benchmarks", float(config["cost"]["gpu_hour_usd"]), gpus)
        parts.append(table_html([row], "What it cost (training GPU-hours x cost.gpu_hour_usd; export wall time)"))
    return "\n".join(p for p in parts if p)


def disk_section(workdir: Path) -> str:
    records = sorted((workdir / DISK_LOG_DIR).glob("[0-9]*T[0-9]*.json"))
    for record_path in reversed(records):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("running"):
            continue
        mb = lambda key: f"{record[key] / 1e6:,.1f} MB" if record.get(key) else "n/a"  # noqa: E731
        return (f"<h2>Disk</h2><p>Run {html.escape(record_path.stem)}: measured peak {mb('measured_peak_bytes')}, "
                f"planned {mb('planned_peak_bytes')}, disk_quota {mb('quota_bytes')}</p>"
                + image_html(record_path.with_suffix(".png"), "disk timeline"))
    return ""


def summary_fragment(config: dict, workdir: str | Path = ".") -> str:
    workdir = Path(workdir)
    models = [m for m in config["models"] if (workdir / "results" / m / "train" / "metrics.json").exists()]
    links = " &middot; ".join(f"<a href='#model-{html.escape(m)}'>{html.escape(m)}</a>" for m in models)
    sections = [model_section(m, config, workdir) for m in models]
    return (f"{STYLE}<div class='lf-summary'><h1>lora-forge run summary</h1>"
            f"<p>Written {time.strftime('%Y-%m-%d %H:%M:%S')} from results/ and logs/. Models: {links or 'none trained yet'}</p>"
            + "\n".join(sections) + disk_section(workdir) + "</div>")


def write_summary(config: dict, workdir: str | Path = ".") -> Path:
    """results/summary.html: a page that opens in any browser (and is the report's landing page)."""
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>lora-forge run summary</title></head><body>"
            + summary_fragment(config, workdir) + "</body></html>\n")
    out = Path(workdir) / SUMMARY_PAGE
    write_text_atomic(out, page)
    return out
