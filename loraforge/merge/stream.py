"""The merge itself: shard by shard, matrix by matrix on worker threads, each shard fsynced
and journaled on the side, the output published by one rename when complete."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from loraforge.constants import INDEX_NAME, MERGE_MODES
from loraforge.fileio import PARTIAL_SUFFIX, sha256_file
from loraforge.merge.arithmetic import Workspace, _merge_matrix
from loraforge.merge.common import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, COPY_TASK_BYTES, JOURNAL_FORMAT, JOURNAL_NAME, MARKER_NAME, MAX_WORKERS, MergeError, MergeReport, TMP_SUFFIX, WEIGHT_SUFFIXES, recovery_hint
from loraforge.merge.journal import Journal, _discard_stale_partial, _fsync_dir, _open_journal, _place_untouched_shard, _remove_base_shard
from loraforge.merge.planning import BaseModel, LoraSettings, MatrixUpdate, TensorUpdate, _drop_untrained, load_adapter, open_base, plan_updates
from loraforge.safetensors_io import TORCH_FLOAT_DTYPES, ShardHeader, ShardWriter, TensorInfo, copy_file, read_header

log = logging.getLogger(__name__)

def merge(base_dir: str, adapter_dir: str, out_dir: str, mode: str = "link", progress: bool = True,
          base_is_users: bool = False) -> MergeReport:
    """Merge the PEFT adapter in `adapter_dir` into the model in `base_dir`, writing `out_dir`.

    mode: "link" hard-links shards without targeted tensors (the base stays intact and they take
    no space), "consume" moves them and removes each base shard once its merged replacement is
    durable (peak disk: base plus one shard), "copy" copies them. Links and moves fall back to a
    copy across filesystems. Do not edit linked output shards in place: they are the base's files.

    base_is_users: the base is a folder the user gave (`base: {path: ...}`), not one the workflow
    built or fetched: consume mode is refused for it, since it would use up the user's only copy.

    Raises MergeError, before writing anything, for adapters it cannot merge exactly. If the run is
    interrupted, `<out_dir>.partial` holds the finished shards; running the same merge again resumes.
    """
    started = time.monotonic()
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, not {mode!r}")
    if mode == "consume" and base_is_users:
        raise MergeError(
            f"{base_dir}: refusing to consume your own base folder (consume mode moves its shards into the "
            "merged model, which is deleted after the export); use merge mode link or copy for it"
        )
    with _single_threaded_torch(), _no_cyclic_gc():
        return _merge(base_dir, adapter_dir, out_dir, mode, progress, started)


def _merge(base_dir: str, adapter_dir: str, out_dir: str, mode: str, progress: bool, started: float) -> MergeReport:
    base_dir, adapter_dir, out_dir = (os.path.abspath(p) for p in (base_dir, adapter_dir, out_dir))
    partial_dir = out_dir + PARTIAL_SUFFIX
    journal_path = os.path.join(partial_dir, JOURNAL_NAME)
    if out_dir in (base_dir, adapter_dir):
        raise MergeError(f"output folder {out_dir} must differ from the base and adapter folders")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise MergeError(f"output {out_dir} already exists; remove it first")

    # --- validate everything before writing anything
    # The adapter's digest (for the journal) is computed on the side, while this thread plans:
    # hashing ~100 MB costs as much as the planning, and the second core is idle meanwhile.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraforge-sha256") as hasher:
        adapter_sha256 = hasher.submit(sha256_file, os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME))
        adapter_config, adapter = load_adapter(adapter_dir)
        settings = LoraSettings.from_config(adapter_config)
        base = open_base(base_dir, partial_dir)
        updates = plan_updates(base, settings, adapter.tensors, adapter_config, release=adapter.release)
        untrained = _drop_untrained(updates)
        fingerprint = {
            "format": JOURNAL_FORMAT,
            "base_dir": os.path.realpath(base_dir),
            "adapter_sha256": adapter_sha256.result(),
            "adapter_config_sha256": sha256_file(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)),
            "mode": mode,
            # tensor bytes, not file sizes: a merged shard's header may be formatted differently
            "shards": {shard: base.headers[shard].data_bytes for shard in base.shards},
        }

    marker_path = os.path.join(partial_dir, MARKER_NAME)
    if os.path.exists(marker_path) and not os.path.exists(journal_path):
        with open(marker_path) as f:
            marker = json.load(f)
        if marker.get("fingerprint") == fingerprint:
            _publish(partial_dir, out_dir)  # an earlier run did everything but this final rename
            return MergeReport(**marker["report"])
        _discard_stale_partial(partial_dir, marker.get("fingerprint") or {}, fingerprint)

    journal = _open_journal(partial_dir, journal_path, fingerprint)

    report = MergeReport(mode=mode, out_dir=out_dir, shards=len(base.shards), matrices_untrained=len(untrained))
    workspaces = [Workspace() for _ in range(_worker_count())]
    finisher, error = _Finisher(), None
    try:
        for shard in base.shards:
            entry = _process_shard(shard, base, updates, partial_dir, journal, mode, progress, workspaces, finisher)
            report.add_shard(entry)
            if entry.get("resumed"):
                report.shards_resumed += 1
    except BaseException as e:
        error = e
        raise
    finally:
        finisher.shutdown(error)

    _finish(base, partial_dir, journal_path, report, fingerprint, started)
    _publish(partial_dir, out_dir)
    log.info("merged %s into %s: %s", adapter_dir, out_dir, report.as_dict())
    return report


def _worker_count() -> int:
    """Threads that merge a shard at once: one per usable core, at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector. The merge's many small allocations (a few Python
    objects per torch op) trigger full collections, each walking every object that torch & co
    created: one took 62 ms of a 0.8 s merge, holding the GIL, so stopping every worker. The merge
    makes no reference cycles worth collecting early; reference counting still frees every tensor."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Run torch on one thread per op: the cores are used by merging several matrices at once
    instead (_run_tasks). The per-matrix work is small and memory-bound; OpenMP's barriers cost
    more than they save, and on a busy 2-core machine 2 threads made the elementwise ops 5-300x
    slower (spinning threads fighting for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)






def _process_shard(shard: str, base: BaseModel, updates: dict[str, TensorUpdate], partial_dir: str,
                   journal: Journal, mode: str, progress: bool, workspaces: list[Workspace],
                   finisher: _Finisher) -> dict[str, Any]:
    base_path = os.path.join(base.directory, shard)
    final = os.path.join(partial_dir, shard)
    header = base.headers[shard]
    src = os.path.realpath(base_path)
    tmp = final + TMP_SUFFIX
    shard_updates = {name: updates[name] for name in header.tensors if name in updates}
    started = time.monotonic()

    def finish(entry: dict[str, Any]) -> None:
        _fsync_dir(partial_dir)
        journal.record(entry)
        if mode == "consume":
            _remove_base_shard(base_path)  # only now: the output shard is durable and recorded
        log.info("%s %s in %.1fs", entry["action"], shard, time.monotonic() - started)

    if shard_updates and shard not in journal.entries and os.path.exists(base_path):
        # a shard to merge: written to `tmp` while the previous one is still being finished (only
        # tmp files are written; the resume removes them), then finished on the finisher's thread
        with tqdm(total=header.data_bytes, unit="B", unit_scale=True, desc=shard, disable=not progress,
                  mininterval=1.0, file=sys.stderr) as bar:
            counts, writer = _merge_shard(src, header, shard_updates, tmp, bar, workspaces)
        entry = {"shard": shard, "action": "merged", **counts}

        def durable() -> None:
            writer.close()  # fsync
            if os.path.exists(final):
                os.remove(final)  # unrecorded leftover of an interrupted attempt; the base is intact
            os.rename(tmp, final)
            finish(entry)

        try:
            finisher.submit(durable)
        except BaseException:
            writer.abort()
            raise
        return entry

    finisher.wait()  # the rest renames, moves or records: only once the shards before are recorded
    in_base = os.path.exists(base_path)  # follows cache symlinks: a dangling one means moved away
    if shard in journal.entries:
        if mode == "consume" and in_base:
            _remove_base_shard(base_path)  # interrupted between the journal entry and the removal
        return {**journal.entries[shard], "resumed": True}
    if os.path.exists(final):
        if in_base:
            os.remove(final)  # unrecorded leftover of an interrupted attempt; the base is intact, redo it
        elif mode == "consume":
            # moved by os.rename just before an interrupt; the move itself is atomic
            entry = {"shard": shard, "action": "moved", "tensors_moved": len(header.tensors)}
            journal.record(entry)
            _remove_base_shard(base_path)
            return {**entry, "resumed": True}
    if not in_base:
        raise MergeError(
            f"base shard {base_path} is missing (used up by an earlier consume-mode merge, or deleted): "
            f"{recovery_hint(partial_dir, base.directory)}"
        )

    with tqdm(total=header.data_bytes, unit="B", unit_scale=True, desc=shard, disable=not progress,
              mininterval=1.0, file=sys.stderr) as bar:
        action, written = _place_untouched_shard(src, final, tmp, mode)
        bar.update(header.data_bytes)
    entry = {"shard": shard, "action": action, f"tensors_{action}": len(header.tensors), "bytes_written": written}
    finish(entry)
    return entry


def _finish(base: BaseModel, partial_dir: str, journal_path: str, report: MergeReport, fingerprint: dict[str, Any],
            started: float) -> None:
    """Carry over config and tokenizer files, write the index and the completion marker."""
    for name in _carried_files(base.directory):
        copy_file(os.path.realpath(os.path.join(base.directory, name)), os.path.join(partial_dir, name))
    if base.index_metadata is not None:
        # rewritten from the output shards' own headers, so it describes exactly what is there
        weight_map, total = {}, 0
        for shard in base.shards:
            header = read_header(os.path.join(partial_dir, shard))
            weight_map.update(dict.fromkeys(header.tensors, shard))
            total += header.data_bytes
        metadata = {**base.index_metadata, "total_size": total}
        _write_json(os.path.join(partial_dir, INDEX_NAME), {"metadata": metadata, "weight_map": weight_map})
    report.seconds = round(time.monotonic() - started, 3)
    _write_json(os.path.join(partial_dir, MARKER_NAME), {"report": report.as_dict(), "fingerprint": fingerprint})
    os.remove(journal_path)
    _fsync_dir(partial_dir)


def _publish(partial_dir: str, out_dir: str) -> None:
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked at the start); e.g. created by a workflow manager
    os.rename(partial_dir, out_dir)
    _fsync_dir(os.path.dirname(out_dir))


@dataclass(frozen=True)
class _Task:
    """One piece of a merged shard: a matrix to merge (a whole 2-D tensor, or one expert of a fused
    3-D one: bytes [start, start+nbytes) of `info`), or bytes to copy as they are: `copies`, runs
    of (tensor, first byte, bytes) that follow each other in the base shard and in the output."""

    nbytes: int
    copies: tuple[tuple[TensorInfo, int, int], ...] = ()
    info: TensorInfo | None = None
    start: int = 0
    update: TensorUpdate | None = None
    matrix: MatrixUpdate | None = None


def _shard_tasks(header: ShardHeader, updates: dict[str, TensorUpdate]) -> tuple[list[_Task], dict[str, int]]:
    """The shard's work in file order, and the report's counts for it. Untouched bytes that follow
    each other are copied together, in runs of at most COPY_TASK_BYTES (a huge tensor in several,
    so that it does not leave the other workers idle)."""
    tasks: list[_Task] = []
    counts = {"tensors_merged": 0, "matrices_merged": 0, "tensors_copied": 0}
    run: list[tuple[TensorInfo, int, int]] = []
    run_bytes = 0

    def end_run() -> None:
        nonlocal run_bytes
        if run:
            tasks.append(_Task(run_bytes, copies=tuple(run)))
            run.clear()
            run_bytes = 0

    def copy(info: TensorInfo, start: int, nbytes: int) -> None:
        nonlocal run_bytes
        while nbytes > 0:
            if run:
                last, last_start, last_n = run[-1]
                if last.offset + last_start + last_n != info.offset + start or run_bytes >= COPY_TASK_BYTES:
                    end_run()
            n = min(nbytes, COPY_TASK_BYTES - run_bytes)
            run.append((info, start, n))
            run_bytes += n
            start, nbytes = start + n, nbytes - n

    for info in header.tensors.values():
        update = updates.get(info.name)
        if update is None:
            counts["tensors_copied"] += 1
            copy(info, 0, info.nbytes)
            continue
        counts["tensors_merged"] += 1
        counts["matrices_merged"] += len(update.matrices)
        by_expert = {m.expert: m for m in update.matrices}
        if None in by_expert:
            end_run()
            tasks.append(_Task(info.nbytes, info=info, update=update, matrix=by_expert[None]))
            continue
        matrix_bytes = info.nbytes // info.shape[0]
        for e in range(info.shape[0]):
            if e in by_expert:
                end_run()
                tasks.append(_Task(matrix_bytes, info=info, start=e * matrix_bytes, update=update, matrix=by_expert[e]))
            else:
                copy(info, e * matrix_bytes, matrix_bytes)
    end_run()
    return tasks, counts


def _merge_task(task: _Task, src_fd: int, writer: ShardWriter, workspace: Workspace) -> None:
    if task.copies:
        first, start, _ = task.copies[0]
        writer.copy(src_fd, first.offset + start, [(info.name, start, n) for info, start, n in task.copies])
        return
    info, m = task.info, task.matrix
    dtype = TORCH_FLOAT_DTYPES[info.dtype]
    shape = info.shape[-2:]
    row_bytes = shape[1] * dtype.itemsize

    def read_block(start: int, n: int) -> torch.Tensor:
        at = info.offset + task.start + start * row_bytes
        return workspace.read(src_fd, at, dtype, (n, shape[1]), f"tensor {info.name!r}")

    def write_block(start: int, merged: torch.Tensor) -> None:
        writer.write(info.name, merged, task.start + start * row_bytes)

    _merge_matrix(task.update, m, shape, read_block, write_block, workspace)


def _run_tasks(tasks: list[_Task], work: Callable[[_Task, Workspace], None], workspaces: list[Workspace]) -> None:
    """Run `work` on every task, in order, on one thread per workspace (this one included).

    Torch ops and file IO release the GIL, so the workers really do run at once: one merges a
    matrix while another reads or writes. On failure no new task is started, and the error of
    the first failing task in file order is raised, as a sequential run would have."""
    lock = threading.Lock()
    threads = torch.get_num_threads()
    pending = iter(enumerate(tasks))
    failures: list[tuple[int, BaseException]] = []
    stop = threading.Event()

    def loop(workspace: Workspace) -> None:
        # OpenMP's thread count is per thread: a new thread would start MKL with one OpenMP thread
        # per core, spinning against the other workers (20x slower matmuls, measured). torch only
        # applies its own setting to a thread lazily, and not before a matmul: apply it now.
        torch.set_num_threads(threads)
        while not stop.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                work(item[1], workspace)
            except BaseException as e:  # KeyboardInterrupt too: stop the others, then re-raise
                failures.append((item[0], e))
                stop.set()
                return

    helpers = [threading.Thread(target=loop, args=(w,), name="loraforge-merge", daemon=True) for w in workspaces[1:]]
    for thread in helpers:
        thread.start()
    try:
        loop(workspaces[0])
    finally:
        stop.set()  # after a normal return every task is taken: this only stops them after an error
        interrupted = None
        for thread in helpers:  # always wait: the shard's file must not be closed under a worker
            while thread.is_alive():
                try:
                    thread.join()
                except BaseException as e:
                    interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted
    if failures:
        raise min(failures, key=lambda failure: failure[0])[1]


def _merge_shard(src: str, header: ShardHeader, updates: dict[str, TensorUpdate], tmp: str, bar: tqdm,
                 workspaces: list[Workspace]) -> tuple[dict[str, int], ShardWriter]:
    """Write the merged shard to `tmp`: targeted tensors get their delta, the rest are byte copies.
    Returns the counts and the writer, still to be closed (which fsyncs the file)."""
    tasks, counts = _shard_tasks(header, updates)
    writer = ShardWriter(tmp, [(t.name, t.dtype, t.shape) for t in header.tensors.values()], header.metadata)
    src_fd = os.open(src, os.O_RDONLY)
    bar_lock = threading.Lock()

    def work(task: _Task, workspace: Workspace) -> None:
        _merge_task(task, src_fd, writer, workspace)
        with bar_lock:
            bar.update(task.nbytes)

    try:
        _run_tasks(tasks, work, workspaces)
    except BaseException:
        writer.abort()
        raise
    finally:
        os.close(src_fd)
    counts["bytes_written"] = writer.bytes_written
    return counts, writer


class _Finisher:
    """Makes merged shards durable and records them (fsync, rename, directory fsync, journal entry,
    in consume mode the base shard's removal) on a thread of its own, so that the next shard is
    merged meanwhile instead of waiting for the disk. One shard at a time, in order: `submit`
    and `wait` first wait for the previous one, raising its error."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraforge-finish")
        self._pending: Future | None = None

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def submit(self, finish: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._thread.submit(finish)

    def shutdown(self, error: BaseException | None) -> None:
        """Wait for the last shard; after `error`, only report a failure of its own, not raise it."""
        try:
            self.wait()
        except Exception as e:
            if error is None:
                raise
            log.error("also, finishing the previous shard failed: %s", e)
        finally:
            self._thread.shutdown()


def _carried_files(base_dir: str) -> Iterator[str]:
    """Config, generation config, tokenizer, chat template, README...: every top-level file but weights."""
    for entry in sorted(os.scandir(base_dir), key=lambda e: e.name):
        # indexes are rewritten (ours) or would point at weights that are not carried over
        if entry.name.startswith(".") or not entry.is_file() or entry.name.endswith(".index.json"):
            continue
        if entry.name.endswith(WEIGHT_SUFFIXES):
            continue
        yield entry.name


def _write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
