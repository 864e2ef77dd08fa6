"""Consume mode's last quantization frees its input as it reads it (loraforge.gguf.quantize with
release_input): same output, the input's blocks freed tensor by tensor and the file gone at the
end; a failure never leaves a half-released file that looks complete; and it never happens
while another consumer is pending or another process holds the file. Also the consumers file
the onstart hook writes, from a real Snakemake DAG.

A tiny Qwen3 Q8_0 (about 3 MB, 46 tensors) is converted once for the module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraforge.gguf import convert_to_gguf, quantize, release_decision, releasing_path

pytestmark = pytest.mark.slow  # GGUFs of the tiny bases, quantized for real

THREADS = 1
QUANT = "Q5_K_M"


@pytest.fixture(scope="module")
def q8(tiny_bases, tmp_path_factory):
    """A Q8_0 GGUF of the tiny Qwen3 and its Q5_K_M made the normal way."""
    d = tmp_path_factory.mktemp("release")
    src = convert_to_gguf(tiny_bases["qwen3"], d / "Q8_0.gguf", "q8_0", threads=THREADS, log=d / "convert.log")
    ref = quantize(src, d / f"{QUANT}.gguf", QUANT, THREADS, log=d / "quantize.log")
    return {"q8": src, "ref": ref.read_bytes()}


def private_copy(q8, tmp_path) -> Path:
    model = tmp_path / "results" / "m"
    model.mkdir(parents=True)
    return Path(shutil.copy(q8["q8"], model / "Q8_0.gguf"))


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class BlockLog:
    """A log file for quantize() that also samples the input's allocated bytes at each write
    (the input is renamed <name>.releasing while it is released)."""

    def __init__(self, src: Path):
        self.src, self.text, self.blocks = src, [], []

    def write(self, text):
        self.text.append(text)
        for p in (self.src, releasing_path(self.src)):
            try:
                self.blocks.append(allocated(p))
                break
            except FileNotFoundError:
                continue

    def flush(self):
        pass

    def __str__(self):
        return "".join(self.text)


def manifest(src: Path, consumers: list[Path], pid: int | None = None, started: float | None = None) -> Path:
    """A consumers file as the onstart hook writes it."""
    path = src.parent.parent.parent / "logs" / "m" / "release" / (src.name + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "intermediate": str(src.absolute()), "consumers": [str(c.absolute()) for c in consumers],
        "pid": os.getpid() if pid is None else pid, "started": time.time() if started is None else started}))
    return path


def test_release_gives_the_same_quant_and_frees_the_input_as_it_goes(q8, tmp_path):
    src = private_copy(q8, tmp_path)
    out = src.with_name(f"{QUANT}.gguf")
    size = src.stat().st_size
    log = BlockLog(src)
    quantize(src, out, QUANT, THREADS, log=log, release_input=manifest(src, [out]))
    assert out.read_bytes() == q8["ref"], "releasing the input must not change the output"
    assert not src.exists() and not releasing_path(src).exists(), "the input is gone at the end"
    text = str(log)
    assert "release input: yes" in text and f"released {src} while quantizing" in text
    blocks = log.blocks
    assert blocks[0] >= 0.95 * size
    # freed while llama.cpp was still working on it (every log line comes from inside the run)
    assert min(blocks) < 0.25 * size, blocks
    # the input only ever shrinks (give or take an extent-tree block of the filesystem)
    assert all(b2 <= b1 + 4096 for b1, b2 in zip(blocks, blocks[1:])), blocks


def test_no_release_leaves_the_input_alone(q8, tmp_path):
    src = private_copy(q8, tmp_path)
    out = src.with_name(f"{QUANT}.gguf")
    log = BlockLog(src)
    quantize(src, out, QUANT, THREADS, log=log)  # release_input=False: the normal path
    assert src.read_bytes() == q8["q8"].read_bytes() and out.read_bytes() == q8["ref"]
    assert "release input" not in str(log)


def test_a_failure_midway_deletes_the_half_released_input(q8, tmp_path):
    """The output cannot grow past half its size (RLIMIT_FSIZE: what a full disk does): llama.cpp
    fails after some tensors were released, so the input is deleted and the error says so."""
    src = private_copy(q8, tmp_path)
    out = src.with_name(f"{QUANT}.gguf")
    limit = len(q8["ref"]) // 2
    code = textwrap.dedent(f"""
        import json, resource, signal, sys
        from pathlib import Path
        from loraforge.gguf import quantize
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            quantize({str(src)!r}, {str(out)!r}, {QUANT!r}, 1, log={str(tmp_path / 'q.log')!r}, release_input=True)
        except RuntimeError as e:
            print(json.dumps({{"error": str(e)}}))
        else:
            print(json.dumps({{"error": None}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    error = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert error and "failed" in error
    assert "was being released" in error and "deleted" in error, error
    assert not src.exists() and not releasing_path(src).exists()
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    log = (tmp_path / "q.log").read_text()
    assert "release input: yes" in log and "FAILED" in log


def test_a_failure_before_any_release_keeps_the_input(q8, tmp_path):
    """A type llama.cpp refuses (no importance matrix for IQ2_XS) fails at its first tensor,
    before anything was freed; an unknown type fails before llama.cpp starts: the input is
    intact and keeps its name."""
    src = private_copy(q8, tmp_path)
    data = src.read_bytes()
    with pytest.raises(ValueError, match="Q9_Z"):
        quantize(src, src.with_name("Q9_Z.gguf"), "Q9_Z", THREADS, release_input=True)
    assert src.read_bytes() == data
    with pytest.raises(RuntimeError, match="importance matrix") as err:
        quantize(src, src.with_name("IQ2_XS.gguf"), "IQ2_XS", THREADS, release_input=True)
    assert "is intact" in str(err.value)
    assert src.read_bytes() == data and not releasing_path(src).exists()


def test_a_pending_consumer_or_a_stale_manifest_prevents_the_release(q8, tmp_path):
    src = private_copy(q8, tmp_path)
    out, other = src.with_name(f"{QUANT}.gguf"), src.with_name("Q4_K_M.gguf")
    size = src.stat().st_size
    m = manifest(src, [out, other])
    log = BlockLog(src)
    quantize(src, out, QUANT, THREADS, log=log, release_input=m)
    assert "release input: no" in str(log) and "has not finished yet" in str(log)
    assert src.exists() and allocated(src) >= 0.95 * size and out.read_bytes() == q8["ref"]
    # the other consumer's output is from before this run: it still has to be rebuilt
    other.write_bytes(b"old")
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    ok, why = release_decision(src, out, m)
    assert not ok and "not been rebuilt in this run" in why
    # a consumers file of another run (a pid that is not this process or its ancestor)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ok, why = release_decision(src, out, manifest(src, [out], pid=int(done.stdout)))
    assert not ok and "another run" in why
    # no consumers file at all, or one not naming this output
    ok, why = release_decision(src, out, tmp_path / "missing.json")
    assert not ok and "no consumers file" in why
    ok, why = release_decision(src, out, manifest(src, [other]))
    assert not ok and "not a consumer" in why
    # once the other consumer is done in this run, the last one releases
    m = manifest(src, [out, other], started=time.time() - 1)
    other.write_bytes(b"new")
    assert release_decision(src, out, m)[0]
    quantize(src, out, QUANT, THREADS, release_input=m)
    assert not src.exists() and out.read_bytes() == q8["ref"]


def test_another_process_holding_the_input_prevents_the_release(q8, tmp_path):
    src = private_copy(q8, tmp_path)
    out = src.with_name(f"{QUANT}.gguf")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'rb'); print('open', flush=True); time.sleep(120)",
         str(src)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        log = BlockLog(src)
        quantize(src, out, QUANT, THREADS, log=log, release_input=manifest(src, [out]))
        assert "release input: no" in str(log) and f"pid {holder.pid}" in str(log)
        assert src.exists() and allocated(src) >= 0.95 * src.stat().st_size
        assert out.read_bytes() == q8["ref"]
    finally:
        holder.kill()
        holder.wait()


TOY = """
rule all:
    input: expand("results/m/{q}.gguf", q=["Q4_K_M", "Q5_K_M"])

rule convert_gguf:
    output: gguf=temp("results/m/Q8_0.gguf")
    shell: "touch {output}"

rule quantize_gguf:
    input: gguf="results/m/Q8_0.gguf"
    output: gguf="results/m/{quant}.gguf"
    shell: "touch {output}"
"""


class _Pending:
    """The DAG as onstart sees it (after a dry run every job is marked finished)."""

    def __init__(self, workflow):
        self._dag = workflow.dag
        self.dag = self
        self.storage_settings = workflow.storage_settings

    def needrun_jobs(self, exclude_finished=True):
        return self._dag.needrun_jobs(exclude_finished=False)

    def __getattr__(self, name):
        return getattr(self._dag, name)


def test_onstart_writes_the_consumers_file_in_consume_mode_only(tmp_path, monkeypatch):
    from loraforge import workflow_hooks
    from loraforge.snakemake_bridge import build_dag

    (tmp_path / "Snakefile").write_text(TOY)
    monkeypatch.chdir(tmp_path)
    stale = releasing_path("results/m/Q8_0.gguf")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed run")
    wf = _Pending(build_dag(tmp_path / "Snakefile", ["all"], workdir=tmp_path))
    assert workflow_hooks.write_release_manifests(wf, {"export": {"merge_mode": "link"}}) == []
    (path,) = workflow_hooks.write_release_manifests(wf, {"export": {"merge_mode": "consume"}})
    assert path == workflow_hooks.release_manifest_path("m", "results/m/Q8_0.gguf")
    assert path == Path("logs/m/release/Q8_0.gguf.json")
    info = json.loads(path.read_text())
    assert info["intermediate"] == str(tmp_path / "results/m/Q8_0.gguf")
    assert info["consumers"] == [str(tmp_path / f"results/m/{q}.gguf") for q in ("Q4_K_M", "Q5_K_M")]
    assert info["pid"] == os.getpid() and info["started"] <= time.time()
    assert not stale.exists()
    # the intermediate asked for as a target is kept: no consumers file
    path.unlink()
    wf = _Pending(build_dag(tmp_path / "Snakefile", ["all", "results/m/Q8_0.gguf"], workdir=tmp_path))
    assert workflow_hooks.write_release_manifests(wf, {"export": {"merge_mode": "consume"}}) == []
