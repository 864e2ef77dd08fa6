"""The run's true peak (loraforge.gpu_memory.RunPeak): no reset of the allocator's statistics by a
callback or a library hides it, and the driver-level sampler keeps the first step's peak apart."""

from __future__ import annotations

import time

import torch

from loraforge.gpu_memory import RunPeak


class FakeAllocator:
    """Stands in for the CUDA allocator's peak counter on this GPU-less machine: `use(n)` allocates,
    `reset()` is what torch.cuda.reset_peak_memory_stats does to it."""

    def __init__(self):
        self.current, self.peak = 0, 0

    def use(self, n: int) -> None:
        self.current = n
        self.peak = max(self.peak, n)

    def reset(self, device=None) -> None:
        self.peak = self.current


def test_a_reset_by_a_callback_cannot_hide_the_peak(monkeypatch):
    alloc = FakeAllocator()
    monkeypatch.setattr(torch.cuda.memory, "reset_peak_memory_stats", alloc.reset)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", alloc.reset)
    run = RunPeak(read_allocated=lambda: alloc.peak, read_reserved=lambda: alloc.peak, read_driver=None).start()
    alloc.use(60 * 2**30)  # step 1: the compile-time transient
    alloc.use(25 * 2**30)
    torch.cuda.reset_peak_memory_stats()  # a benchmark's "steady state from here on"
    assert alloc.peak == 25 * 2**30  # the reset itself still happens for whoever asked
    alloc.use(26 * 2**30)
    torch.cuda.memory.reset_peak_memory_stats()  # through the other name, too
    metrics = run.stop().as_metrics()
    assert metrics["peak_gpu_memory_gib"] == 60.0 and metrics["peak_gpu_reserved_gib"] == 60.0
    # after stop() the library's own function is back
    assert torch.cuda.reset_peak_memory_stats == alloc.reset


def test_driver_samples_keep_step_1_apart():
    used = {"bytes": 1 * 2**30}
    run = RunPeak(interval_s=0.005, read_allocated=lambda: 0, read_reserved=lambda: 0,
                  read_driver=lambda: used["bytes"])
    run._patch_resets = lambda torch: None  # nothing to patch: no allocator here
    run.start()
    used["bytes"] = 63 * 2**30
    time.sleep(0.05)  # a short-lived transient inside step 1, seen only by the sampler
    used["bytes"] = 25 * 2**30
    run.mark_step()
    used["bytes"] = 27 * 2**30
    run.mark_step()
    m = run.stop().as_metrics()
    assert m["gpu_driver_baseline_gib"] == 1.0
    assert m["peak_gpu_driver_gib"] == 63.0
    assert m["peak_gpu_driver_step1_gib"] == 63.0 and m["peak_gpu_driver_after_step1_gib"] == 27.0
