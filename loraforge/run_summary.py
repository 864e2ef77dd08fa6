"""The run-level tables of the report: what each model cost (the article's table: training
time, GPU-hours x `cost.gpu_hour_usd`, export time) and the latest disk timeline.

Training time comes from train/metrics.json; export time from the Snakemake `benchmark:` files
of the export rules (logs/{model}/benchmarks/*.tsv, column `s`): merge, convert and each quantize.
Pure logic; `scripts/run_summary.py` is the rule adapter."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas as pd

from loraforge.fileio import write_text_atomic

COST_COLUMNS = ["model", "device", "steps", "train_hours", "gpus", "gpu_hours", "cost_usd", "export_minutes",
                "export_jobs"]
EXPORT_RULES = ("merge_adapter", "convert_gguf", "quantize_gguf")


def benchmark_seconds(path) -> float | None:
    """Wall seconds of a Snakemake benchmark file (its `s` column; the mean over repeats)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError:
        return None
    values = [float(r["s"]) for r in rows if r.get("s") not in (None, "", "NA")]
    return sum(values) / len(values) if values else None


def cost_row(model: str, metrics_json, benchmark_dir, gpu_hour_usd: float, gpus: int | None = None) -> dict:
    metrics = json.loads(Path(metrics_json).read_text())
    device = str(metrics.get("device", "cpu"))
    hours = float(metrics.get("seconds", 0.0)) / 3600
    n_gpus = (gpus or 1) if device.startswith("cuda") else 0
    export = [s for p in sorted(Path(benchmark_dir).glob("*.tsv")) if p.name.startswith(EXPORT_RULES)
              and (s := benchmark_seconds(p)) is not None]
    return {
        "model": model,
        "device": device,
        "steps": metrics.get("steps"),
        "train_hours": hours,
        "gpus": n_gpus,
        "gpu_hours": hours * n_gpus,
        "cost_usd": hours * n_gpus * gpu_hour_usd,
        "export_minutes": sum(export) / 60 if export else float("nan"),
        "export_jobs": len(export),
    }


def write_cost_table(rows: list[dict], out_tsv) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows, columns=COST_COLUMNS)
    write_text_atomic(out_tsv, df.to_csv(sep="\t", index=False, float_format="%.4g", lineterminator="\n"))
    return df


def latest_disk_timeline(disk_dir, out_png) -> Path:
    """Copy the newest disk timeline plot of a finished run (logs/disk/<UTC time>.png) to
    `out_png`; without one, a plot that says so (the report must not lack the item silently)."""
    pngs = sorted(Path(disk_dir).glob("[0-9]*T[0-9]*.png"))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if pngs:
        shutil.copyfile(pngs[-1], tmp)
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no finished run has recorded a disk timeline in {disk_dir} yet", ha="center", va="center")
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
    tmp.replace(out)
    return out
