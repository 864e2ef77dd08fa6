"""The disk sampler: what it counts (hard links and cache symlinks once), what it survives
(files vanishing mid-walk), and what it writes (TSV, PNG)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from loraforge import diskmon
from loraforge.diskmon import DiskSampler
from loraforge.sizes import measure


def _write(path, n):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * n)
    return path


def test_hard_links_and_symlinked_blobs_count_once(tmp_path):
    base = tmp_path / "results" / "m" / "base"
    merged = tmp_path / "results" / "m" / "merged"
    shard = _write(base / "model-00001.safetensors", 10_000)
    _write(base / "model-00002.safetensors", 3_000)
    merged.mkdir(parents=True)
    os.link(shard, merged / "model-00001.safetensors")  # an untargeted shard, link mode
    _write(merged / "model-00002.safetensors", 3_000)  # a rewritten one
    total, per = measure([str(base), str(merged)])
    assert total == 16_000
    assert per == {str(base): 13_000, str(merged): 3_000}
    # an HF cache: snapshot files are symlinks to blobs; both trees measured, blobs once
    blobs = tmp_path / "hf" / "blobs"
    snap = tmp_path / "hf" / "snapshots" / "abc"
    blob = _write(blobs / "sha256-1", 7_000)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(os.path.relpath(blob, snap))
    total, per = measure([str(snap), str(tmp_path / "hf")])
    assert total == 7_000 and per[str(snap)] == 7_000
    assert measure([str(tmp_path / "missing")]) == (0, {str(tmp_path / "missing"): 0})


def test_vanished_files_are_tolerated(tmp_path):
    root = tmp_path / "results"
    _write(root / "kept.bin", 1_000)
    (root / "dangling").symlink_to(root / "gone.bin")  # what a file deleted mid-walk looks like
    assert measure([str(root)])[0] == 1_000

    stop = threading.Event()

    def churn():  # files and folders appearing and disappearing while the sampler walks
        i = 0
        while not stop.is_set():
            d = root / f"d{i % 5}"
            d.mkdir(exist_ok=True)
            f = _write(d / f"f{i}.bin", 100)
            f.unlink()
            if i % 7 == 0:
                try:
                    d.rmdir()
                except OSError:
                    pass
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        with DiskSampler([root], tmp_path / "disk.tsv", interval=0.001) as sampler:
            time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert len(sampler.samples) > 5
    assert all(total >= 1_000 for _, total, _ in sampler.samples)


def test_tsv_peak_and_plot(tmp_path):
    results = tmp_path / "results"
    other = tmp_path / "hfcache"
    _write(other / "x.bin", 2_000)
    tsv = tmp_path / "logs" / "disk.tsv"
    sampler = DiskSampler([results, other], tsv, interval=0.01)
    sampler.start()
    time.sleep(0.05)
    big = _write(results / "m" / "Q8_0.gguf", 500_000)
    time.sleep(0.2)
    big.unlink()
    time.sleep(0.05)
    assert sampler.stop() == tsv
    header = tsv.read_text().splitlines()[0].split("\t")
    assert header == ["t_seconds", "bytes", str(results), str(other)]
    paths, times, totals, per = diskmon.read_tsv(tsv)
    assert times == sorted(times) and len(times) >= 5
    assert diskmon.peak(tsv) == 502_000 == sampler.peak
    assert totals[-1] == 2_000 and per[str(other)][-1] == 2_000
    png = diskmon.plot_timeline(tsv, tmp_path / "disk.png", planned_peak=600_000, quota=1_000_000)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_sampler_needs_paths_and_starts_once(tmp_path):
    with pytest.raises(ValueError):
        DiskSampler([], tmp_path / "x.tsv")
    s = DiskSampler([tmp_path], None, interval=0.01).start()
    with pytest.raises(RuntimeError):
        s.start()
    assert s.stop() is None and s.samples


def test_sparse_files_count_their_allocated_blocks_only(tmp_path):
    """Holes take no space: a file truncated up (never written) or one whose middle was punched
    out (what a consume-mode quantization does to its input) counts its blocks; small files
    still count their apparent size, not a whole block."""
    from loraforge.gguf import punch_hole

    small = _write(tmp_path / "small.bin", 100)
    assert measure([str(small)])[0] == 100
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(10_000_000)
    assert measure([str(sparse)])[0] == 0
    dense = _write(tmp_path / "dense.bin", 4 * 1024 * 1024)
    fd = os.open(dense, os.O_RDWR)
    try:
        punch_hole(fd, 1024 * 1024, 2 * 1024 * 1024)
    finally:
        os.close(fd)
    assert dense.stat().st_size == 4 * 1024 * 1024
    assert measure([str(dense)])[0] == 2 * 1024 * 1024


def test_peaks_of_milliseconds_are_caught_and_the_record_stays_small(tmp_path):
    """A file that exists for 10 ms (like two merged shards next to their base shards while one
    is fsynced) shows in the peak; still about one row per interval is kept."""
    root = tmp_path / "results"
    _write(root / "kept.bin", 1_000)
    with DiskSampler([root], tmp_path / "disk.tsv") as sampler:  # the workflow's settings
        time.sleep(0.1)
        for _ in range(5):
            blip = _write(root / "blip.bin", 300_000)
            time.sleep(0.01)
            blip.unlink()
            time.sleep(0.1)
    assert sampler.peak == 301_000
    times = [t for t, _, _ in sampler.samples]
    assert times == sorted(times)
    assert len(times) <= times[-1] / sampler.interval + 3
    assert sampler.samples[-1][1] == 1_000
