"""The disk sampler: what it counts (hard links and cache symlinks once), what it survives
(files vanishing mid-walk), and what it writes (TSV, PNG)."""

from __future__ import annotations

import os
import threading

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


class FakeClock:
    """time.monotonic for a sampler driven by hand: each test says when each sample is taken."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Listing:
    """What os.scandir returns, but over a listing taken before `vanish` ran."""

    def __init__(self, entries):
        self.entries = entries

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        return iter(self.entries)


def test_vanished_files_are_tolerated(tmp_path, monkeypatch):
    """Files and folders deleted between the directory listing and their stat (or the walk
    entering them) are skipped, deterministically: the deletion happens inside the walk."""
    from loraforge.sizes import on_disk  # the module whose os.scandir walks

    root = tmp_path / "results"
    _write(root / "kept.bin", 1_000)
    (root / "dangling").symlink_to(root / "gone.bin")  # what a file deleted mid-walk looks like
    assert measure([str(root)])[0] == 1_000

    _write(root / "gone-file.bin", 500)
    _write(root / "gone-dir" / "inner.bin", 700)
    real_scandir = os.scandir

    def scandir_then_delete(d):
        entries = list(real_scandir(d))
        if d == str(root):  # listed, then deleted before the walk stats or enters them
            os.unlink(root / "gone-file.bin")
            os.unlink(root / "gone-dir" / "inner.bin")
            os.rmdir(root / "gone-dir")
        return _Listing(entries)

    monkeypatch.setattr(on_disk.os, "scandir", scandir_then_delete)
    sampler = DiskSampler([root], None)
    assert sampler.sample()[1] == 1_000
    assert len({e.name for e in real_scandir(root)}) == 2  # kept.bin, dangling: the others went mid-walk


def test_tsv_peak_and_plot(tmp_path):
    results = tmp_path / "results"
    other = tmp_path / "hfcache"
    _write(other / "x.bin", 2_000)
    tsv = tmp_path / "logs" / "disk.tsv"
    clock = FakeClock()
    sampler = DiskSampler([results, other], tsv, interval=0.01, clock=clock)
    for t in (0.0, 0.02, 0.04):
        clock.now = t
        sampler.sample(keep_highest=True)
    big = _write(results / "m" / "Q8_0.gguf", 500_000)
    for t in (0.06, 0.08, 0.10):
        clock.now = t
        sampler.sample(keep_highest=True)
    big.unlink()
    clock.now = 0.12
    assert sampler.stop() == tsv  # never started: writes what was sampled
    header = tsv.read_text().splitlines()[0].split("\t")
    assert header == ["t_seconds", "bytes", str(results), str(other)]
    paths, times, totals, per = diskmon.read_tsv(tsv)
    assert times == [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]
    assert totals == [2_000] * 3 + [502_000] * 3
    assert diskmon.peak(tsv) == 502_000 == sampler.peak
    assert per[str(other)][-1] == 2_000 and per[str(results)][3] == 500_000
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
    """Within one interval the highest sample is kept: a file that exists for one walk of a
    few ms (like two merged shards next to their base shards while one is fsynced) shows in
    the peak, and the record keeps about one row per interval (fake clock: deterministic)."""
    root = tmp_path / "results"
    _write(root / "kept.bin", 1_000)
    clock = FakeClock()
    sampler = DiskSampler([root], None, interval=0.05, clock=clock)
    blip = None
    for k in range(100):  # a walk every 5 ms for 0.5 s; the blip is seen by one walk only
        clock.now = k * 0.005
        if k == 37:
            blip = _write(root / "blip.bin", 300_000)
        sampler.sample(keep_highest=True)
        if k == 37:
            blip.unlink()
    assert sampler.peak == 301_000
    times = [t for t, _, _ in sampler.samples]
    assert times == sorted(times) and len(times) == 10  # one per 50 ms interval
    assert [b for _, b, _ in sampler.samples].count(301_000) == 1
    assert sampler.samples[-1][1] == 1_000


def test_sampler_thread_samples_while_a_file_exists(tmp_path):
    """The background thread really samples: a file that exists only until the thread has
    completed two walks after its creation shows in the peak (no sleeps to tune)."""
    root = tmp_path / "results"
    _write(root / "kept.bin", 1_000)
    sampler = DiskSampler([root], tmp_path / "disk.tsv")  # the workflow's settings
    walks = threading.Condition()
    done = [0]
    real_sample = sampler.sample

    def counted_sample(*args, **kwargs):
        row = real_sample(*args, **kwargs)
        with walks:
            done[0] += 1
            walks.notify_all()
        return row

    sampler.sample = counted_sample
    with sampler:
        blip = _write(root / "blip.bin", 300_000)
        with walks:  # two more walks: the first may have listed the folder before the write
            target = done[0] + 2
            assert walks.wait_for(lambda: done[0] >= target, timeout=60), "the sampler thread stopped sampling"
        blip.unlink()
    assert sampler.peak == 301_000
    assert sampler.samples[-1][1] == 1_000  # stop() takes a last sample
