"""The true peak GPU memory of a training run, step 1 included.

Two figures, both over the whole run:
- the allocator's peak (torch.cuda.max_memory_allocated / max_memory_reserved), kept so that no
  `torch.cuda.reset_peak_memory_stats()` (a benchmark callback, a library) can hide it: while a
  RunPeak is active, a reset first folds the peak so far into the run's own record;
- the driver's peak: the device's used memory as NVML reports it (what the card holds: the
  allocator's reserve, the CUDA context, cuBLAS/Triton workspaces, other processes), sampled in a
  background thread. This is the figure to compare with the card, and the one the VRAM plan is
  judged against.

The driver figure is also kept per optimizer step (`mark_step`), so a transient of the first
(compiling) step shows as step-1 peak > later steps."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

GIB = 2**30


def driver_used_reader(device: int = 0):
    """A function returning the device's used memory in bytes as the driver sees it (NVML through
    nvidia-ml-py, else cudaMemGetInfo), or None where neither works."""
    try:
        import pynvml

        import torch

        pynvml.nvmlInit()
        bus_id = torch.cuda.get_device_properties(device).pci_bus_id  # CUDA and NVML number GPUs differently
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode() if isinstance(bus_id, str) else bus_id)
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception as e:  # no NVML (CPU machine, container without the library): the CUDA runtime's view
        log.debug("NVML unavailable (%s): sampling cudaMemGetInfo", e)
    try:
        import torch

        if torch.cuda.is_available():
            def used() -> int:
                free, total = torch.cuda.mem_get_info(device)
                return int(total - free)

            return used
    except ImportError:
        pass
    return None


@dataclass
class RunPeak:
    """Start before the model is loaded, stop after training. `read_allocated`/`read_reserved`
    return the allocator's current peaks, `read_driver` the device's used bytes (None: not
    sampled); defaults are torch.cuda's and `driver_used_reader()`."""

    interval_s: float = 0.05
    read_allocated: object = None
    read_reserved: object = None
    read_driver: object = None
    allocated_peak: int = 0
    reserved_peak: int = 0
    driver_peak: int = 0
    driver_baseline: int | None = None
    step_driver_peaks: list = field(default_factory=list)
    _step_peak: int = 0
    _thread: threading.Thread | None = None
    _stop: threading.Event | None = None
    _patched: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "RunPeak":
        import torch

        if self.read_allocated is None:
            self.read_allocated = torch.cuda.max_memory_allocated
            self.read_reserved = torch.cuda.max_memory_reserved
        if self.read_driver is None:
            self.read_driver = driver_used_reader(torch.cuda.current_device() if torch.cuda.is_available() else 0)
        self._patch_resets(torch)
        if self.read_driver is not None:
            self.driver_baseline = self.read_driver()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="gpu-memory-sampler", daemon=True)
            self._thread.start()
        return self

    def _patch_resets(self, torch) -> None:
        """Make every reset of the allocator's peak fold it into this run's record first."""
        import torch.cuda.memory as cuda_memory

        original = cuda_memory.reset_peak_memory_stats
        run = self

        def reset_peak_memory_stats(device=None):
            run.fold_allocator_peak()
            return original(device)

        for module in (torch.cuda, cuda_memory):
            self._patched.append((module, module.reset_peak_memory_stats))
            module.reset_peak_memory_stats = reset_peak_memory_stats

    def fold_allocator_peak(self) -> None:
        with self._lock:
            self.allocated_peak = max(self.allocated_peak, int(self.read_allocated()))
            if self.read_reserved is not None:
                self.reserved_peak = max(self.reserved_peak, int(self.read_reserved()))

    def _sample_once(self) -> None:
        used = int(self.read_driver())
        with self._lock:
            self.driver_peak = max(self.driver_peak, used)
            self._step_peak = max(self._step_peak, used)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample_once()
            except Exception as e:  # a sampler failure must never stop training
                log.warning("GPU memory sampler stopped: %s", e)
                return
            self._stop.wait(self.interval_s)

    def mark_step(self) -> None:
        """End of an optimizer step: the driver peak since the previous mark is that step's."""
        if self.read_driver is None:
            return
        self._sample_once()
        with self._lock:
            self.step_driver_peaks.append(self._step_peak)
            self._step_peak = 0

    def stop(self) -> "RunPeak":
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._sample_once()
        self.fold_allocator_peak()
        for module, original in self._patched:
            module.reset_peak_memory_stats = original
        self._patched.clear()
        return self

    def as_metrics(self) -> dict:
        """metrics.json fields (GiB)."""

        def gib(b):
            return round(b / GIB, 3) if b else None

        steps = self.step_driver_peaks
        return {
            "peak_gpu_memory_gib": gib(self.allocated_peak),
            "peak_gpu_reserved_gib": gib(self.reserved_peak),
            "peak_gpu_driver_gib": gib(self.driver_peak),
            "gpu_driver_baseline_gib": gib(self.driver_baseline),
            "peak_gpu_driver_step1_gib": gib(steps[0]) if steps else None,
            "peak_gpu_driver_after_step1_gib": gib(max(steps[1:])) if len(steps) > 1 else None,
        }


def step_marker(run: RunPeak):
    """A TrainerCallback that marks each optimizer step's end on `run`."""
    from transformers import TrainerCallback

    class _MarkSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            run.mark_step()

    return _MarkSteps()
