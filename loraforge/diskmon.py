"""Measure the disk a run really uses, to set beside the plan.

`DiskSampler(paths, tsv)` walks the given trees from a background thread and records the
bytes under them (`loraforge.sizes.measure`: apparent sizes, but a sparse file counts its
allocated blocks only, so the holes a releasing quantization punches into its input show;
every inode counted once across all paths, so a merged shard that is a hard link to its base
shard costs nothing; files vanishing mid-walk are skipped). It walks as often as the walk's
cost allows (every `min_interval` s at best, at most 10% of a core, at least every
`interval` s), because some peaks last milliseconds (a consume-mode merge holds two rewritten
shards next to their base shards only while the earlier one is fsynced), and keeps the
highest sample of each `interval` (so the record stays small and no peak is lost). On stop
it writes a TSV: `t_seconds`, `bytes`, then one column per path.

    with DiskSampler(["results/tiny"], "results/tiny/disk.tsv"):
        ...  # run the export
    plot_timeline("results/tiny/disk.tsv", "results/tiny/disk.png", planned_peak=plan.peak)
"""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path
from typing import Iterable

from loraforge.fileio import atomic_output
from loraforge.sizes import human, measure


class DiskSampler:
    """Background sampling of the bytes under `paths` (start()/stop(), or a context manager)."""

    # the thread spends at most 1/WALK_SHARE of its time walking
    WALK_SHARE = 10

    def __init__(self, paths: Iterable[str | os.PathLike], tsv_path: str | os.PathLike | None = None,
                 interval: float = 0.05, min_interval: float = 0.005, clock=time.monotonic):
        # once each: two models may share one base folder (one TSV column per path)
        self.paths = list(dict.fromkeys(str(p) for p in paths))
        if not self.paths:
            raise ValueError("DiskSampler needs at least one path")
        self.tsv_path = Path(tsv_path) if tsv_path is not None else None
        self.interval = float(interval)
        self.min_interval = min(float(min_interval), self.interval)
        self.samples: list[tuple[float, int, list[int]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._bucket = None  # start time of the interval the last kept sample stands for
        self._lock = threading.Lock()
        self._clock = clock  # time.monotonic; tests pass a fake one

    def sample(self, keep_highest: bool = False) -> tuple[float, int, list[int]]:
        """Take one sample now (also usable without the thread). keep_highest: within one
        `interval` of the last kept sample, keep only the higher of the two."""
        total, per = measure(self.paths)
        row = (self._clock() - self._t0, total, [per.get(p, 0) for p in self.paths])
        with self._lock:
            if keep_highest and self.samples and self._bucket is not None and row[0] - self._bucket < self.interval:
                if total > self.samples[-1][1]:
                    self.samples[-1] = row
            else:
                self.samples.append(row)
                self._bucket = row[0] if keep_highest else None
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                self.sample(keep_highest=True)
            except OSError:  # a tree changing under the walk: try again next tick
                pass
            walk = self._clock() - started
            self._stop.wait(min(self.interval, max(self.min_interval, self.WALK_SHARE * walk)))

    def start(self) -> "DiskSampler":
        if self._thread is not None:
            raise RuntimeError("DiskSampler already started")
        self._t0 = self._clock()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loraforge-diskmon", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Path | None:
        """Stop sampling (one last sample is taken) and write the TSV; returns its path."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        if self.tsv_path is not None:
            self.write_tsv(self.tsv_path)
        return self.tsv_path

    def __enter__(self) -> "DiskSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def peak(self) -> int:
        with self._lock:
            return max((s[1] for s in self.samples), default=0)

    def write_tsv(self, path: str | os.PathLike) -> Path:
        with self._lock:
            rows = list(self.samples)
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t", lineterminator="\n")
            w.writerow(["t_seconds", "bytes", *self.paths])
            for t, total, per in rows:
                w.writerow([f"{t:.3f}", total, *per])
        return Path(path)


def read_tsv(tsv: str | os.PathLike) -> tuple[list[str], list[float], list[int], dict[str, list[int]]]:
    """(path columns, times, totals, {path: bytes per sample}) of a DiskSampler TSV."""
    with open(tsv, newline="") as fh:
        r = csv.reader(fh, delimiter="\t")
        header = next(r)
        paths = header[2:]
        times, totals = [], []
        per: dict[str, list[int]] = {p: [] for p in paths}
        for row in r:
            if not row:
                continue
            times.append(float(row[0]))
            totals.append(int(row[1]))
            for p, v in zip(paths, row[2:]):
                per[p].append(int(v))
    return paths, times, totals, per


def peak(tsv: str | os.PathLike) -> int:
    """The highest total of a DiskSampler TSV (0 when it has no samples)."""
    return max(read_tsv(tsv)[2], default=0)


def plot_timeline(tsv: str | os.PathLike, png: str | os.PathLike, planned_peak: int | None = None,
                  title: str | None = None, quota: int | None = None) -> Path:
    """Plot the measured bytes over time (total and per path), the planned peak as a dashed
    line (and the quota, dotted), to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths, times, totals, per = read_tsv(tsv)
    scale, unit = _unit(max([*totals, planned_peak or 0, quota or 0, 1]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(paths) > 1:
        for p in paths:
            ax.plot(times, [v / scale for v in per[p]], lw=1, alpha=0.7, label=p)
    ax.plot(times, [v / scale for v in totals], lw=2, color="black", label="total (measured)")
    if totals:
        ax.axhline(max(totals) / scale, color="black", lw=0.8, alpha=0.4)
    if planned_peak is not None:
        ax.axhline(planned_peak / scale, color="tab:red", ls="--", lw=1.5,
                   label=f"planned peak {human(planned_peak)}")
    if quota is not None:
        ax.axhline(quota / scale, color="tab:purple", ls=":", lw=1.5, label=f"quota {human(quota)}")
    ax.set_xlabel("seconds")
    ax.set_ylabel(f"disk used ({unit})")
    ax.set_ylim(bottom=0)
    ax.set_title(title or f"disk use, measured peak {human(max(totals, default=0))}")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _unit(n: float) -> tuple[float, str]:
    for scale, unit in ((1024**4, "TiB"), (1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return scale, unit
    return 1, "B"
