"""Benchmark: peak disk of the export (merge -> Q8_0 -> Q4_K_M, Q5_K_M) through the real workflow.

The article's export peaked at 88 GB for a 57 GB base (1.54x) under a 95 GB quota. This runs the
repository's Snakefile (real Snakemake, real merge, llama.cpp's converter and quantizer) on a
scaled 30B-shaped Qwen3-MoE and reports, for each merge mode:

    measured peak / base    the workflow's own disk sampler (logs/disk/<time>.json: results/ plus
                            the base folder outside it, hard links once, holes of sparse files
                            not counted, every 5-50 ms) over the base's shard bytes; goal <= 1.2x
                            in consume mode
    plan error              planned peak (the onstart plan of that run) vs the measured peak;
                            goal within 5%
    `loraforge plan` peak   the CLI's plan of the same targets, run just before

The base (generated once, copied into each run's workdir): random bf16 Qwen3-MoE with the 30B's
structure (per-expert 2-D tensors, 128 experts, top-8, untied embeddings, 16 shards + index in
save_pretrained's order, layer by layer) at hidden 256 / expert 256 / 4x64 heads / 2 KV heads,
24 layers (~1.2 GB), a SentencePiece tokenizer (loraforge.base.train_tokenizer on data/corpus,
vocab 1024). The adapter: PEFT layout on q/k/v/o and the experts, rank picked so it is ~3% of
the base like the 30B's r=16 adapter. Training does not run: the adapter and the data/train
outputs are put in place and marked up to date with `snakemake --touch`; the dry run must show
exactly merge_adapter, convert_gguf and 2 x quantize_gguf.

Besides the workflow's sampler, the benchmark samples the same folders itself (every 50 ms) to
place the peak (which step, which files) and to count deleted files still held open or mapped
by the workflow's processes (space that the visible files do not show).

    .venv/bin/python bench/disk.py [--out-dir /tmp/loraforge-bench-disk] [--layers 24] [--shards 16]
                                   [--rank N] [--modes link consume] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loraforge.sizes import file_bytes  # noqa: E402  (after the path: the repository's package)

MODEL = "bench"
QUANTS = ("Q4_K_M", "Q5_K_M")
TARGETS = [f"results/{MODEL}/{q}.gguf" for q in QUANTS]
EXPECTED_JOBS = {"merge_adapter": 1, "convert_gguf": 1, "quantize_gguf": 2}
ADAPTER_SHARE = 0.03  # the 30B's r=16 adapter is ~3% of its base (bf16)
ARTICLE = {"base_gb": 57, "peak_gb": 88}
GOAL_CONSUME_RATIO = 1.2
GOAL_PLAN_ERROR = 5.0  # percent
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------
# generating the base and the adapter


def generate(gen: Path, layers: int, shards: int, rank: int | None) -> dict:
    from loraforge import synthetic
    from loraforge.base import load_tokenizer, read_corpus, train_tokenizer

    tok = gen / "tokenizer"
    train_tokenizer(read_corpus([REPO / "data" / "corpus"]), tok, vocab_size=1024)
    shape = synthetic.MoeShape(num_hidden_layers=layers, vocab_size=len(load_tokenizer(tok)))
    base_bytes = synthetic.write_base(gen / "base", shape, tok, n_shards=shards)
    if rank is None:  # the rank whose adapter is closest to ADAPTER_SHARE of the base
        rank = min(range(1, 65), key=lambda r: abs(synthetic.adapter_bytes(shape, r) / base_bytes - ADAPTER_SHARE))
    adapter_bytes = synthetic.write_adapter(gen / "adapter", shape, rank, tokenizer_dir=tok)
    return {"shape": shape, "base_bytes": base_bytes, "rank": rank, "adapter_bytes": adapter_bytes}


# ---------------------------------------------------------------------------------------------
# one workflow run


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--workflow-profile", str(REPO / "profiles" / "default"), "--cores", "2", *args]


def plan_cmd(workdir: Path, tsv: Path) -> list[str]:
    return [str(BIN / "loraforge"), "plan", "-d", str(workdir), "-s", str(REPO / "Snakefile"), "--tsv", str(tsv), *TARGETS]


def run(cmd: list[str], log: Path, env: dict | None = None) -> str:
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {})}, cwd=REPO)
        f.write(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}\n{done.stdout[-6000:]}")
    return done.stdout


def setup_workdir(wd: Path, gen: Path, mode: str) -> None:
    """A workdir whose results/bench holds everything upstream of the merge, and a private copy
    of the base outside results/ (a consume-mode merge uses it up)."""
    import yaml

    wd.mkdir(parents=True)
    shutil.copytree(gen / "base", wd / "base")  # real copies: the base must cost its full size
    res = wd / "results" / MODEL
    shutil.copytree(gen / "adapter", res / "adapter")
    (res / "data").mkdir(parents=True)
    samples = (REPO / "data" / "rails_chat.jsonl").read_text().splitlines(keepends=True)
    (res / "data" / "train.jsonl").write_text("".join(samples[:-5]))
    (res / "data" / "validation.jsonl").write_text("".join(samples[-5:]))
    (res / "data" / "summary.tsv").write_text("source\tsamples_before\tsamples_after\nTOTAL\t0\t0\n")
    (res / "train").mkdir()
    (res / "train" / "metrics.json").write_text(json.dumps({"note": "placeholder: not trained (bench/disk.py)"}))
    (res / "train" / "loss.csv").write_text("step,loss\n")
    (res / "train" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    config = {
        "targets": [MODEL],
        "models": {MODEL: {"base": {"path": str(wd / "base")}}},
        "tiny_base": {"corpus": [str(REPO / "data" / "corpus")]},
        "data": {"samples": str(REPO / "data" / "rails_chat.jsonl")},
        "export": {"quants": list(QUANTS), "intermediate": "Q8_0", "merge_mode": mode},
        "disk_quota": "10TB",
    }
    (wd / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The job table of `snakemake -n` ({rule: count}, total excluded)."""
    counts, table = {}, False
    for line in dry_run_output.splitlines():
        if line.startswith("Job stats:"):
            table = True
            continue
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip()) if table else None
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
        elif m:
            break
    return counts


# ---------------------------------------------------------------------------------------------
# our own sampler: which step is running, which files are there, deleted files still held


class Watcher:
    """Every `interval` s: the bytes of the files under `paths` (apparent size, allocated
    blocks for a sparse file, each inode once, as loraforge.diskmon counts them), the step running (from the .partial outputs present), and
    deleted files under `root` still open or mapped by `pid`'s process tree."""

    def __init__(self, paths: list[Path], root: Path, interval: float = 0.05):
        self.paths, self.root, self.interval = [str(p) for p in paths], str(root), interval
        self.pid: int | None = None
        self.size_of: dict[tuple[int, int], int] = {}  # inode -> last size seen
        self.phase = "start"
        self.phases: dict[str, dict] = {}  # phase -> {"peak":, "held_peak":, "files": at peak}
        self.order: list[str] = []
        self.max_held = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _walk(self) -> tuple[int, dict[str, int], set]:
        seen, files, total = set(), {}, 0
        for top in self.paths:
            for d, dirs, names in os.walk(top):
                for n in names:
                    p = os.path.join(d, n)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    key = (st.st_dev, st.st_ino)
                    nbytes = file_bytes(st)
                    self.size_of[key] = nbytes
                    if key in seen:
                        continue
                    seen.add(key)
                    total += nbytes
                    files[os.path.relpath(p, self.root)] = nbytes
        return total, files, seen

    def _tree(self) -> list[int]:
        pids, stack = [], [self.pid] if self.pid else []
        while stack:
            pid = stack.pop()
            pids.append(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        stack.extend(int(c) for c in f.read().split())
            except OSError:
                continue
        return pids

    def _held(self, visible: set) -> tuple[int, list[str]]:
        """Bytes of deleted files under root still open/mapped (not also visible)."""
        held: dict[tuple[int, int], str] = {}
        for pid in self._tree():
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if target.endswith(" (deleted)") and target.startswith(self.root):
                            st = os.stat(f"/proc/{pid}/fd/{fd}")
                            held[(st.st_dev, st.st_ino)] = target
                            self.size_of[(st.st_dev, st.st_ino)] = file_bytes(st)
                    except OSError:
                        continue
                with open(f"/proc/{pid}/maps") as f:
                    for line in f:
                        parts = line.split(None, 5)
                        if len(parts) == 6 and parts[5].rstrip().endswith(" (deleted)") and parts[5].startswith(self.root):
                            major, minor = (int(x, 16) for x in parts[3].split(":"))
                            held[(os.makedev(major, minor), int(parts[4]))] = parts[5].rstrip()
            except OSError:
                continue
        keys = [k for k in held if k not in visible]
        return sum(self.size_of.get(k, 0) for k in keys), sorted({held[k] for k in keys})

    def _phase(self, files: dict[str, int]) -> str:
        partial = [f for f in files if ".partial" in f]
        if any("merged.partial" in f for f in partial):
            return "merge_adapter"
        for f in partial:
            m = re.search(r"(\w+)\.gguf\.partial$", f)
            if m:
                return "convert_gguf" if m.group(1) == "Q8_0" else f"quantize_gguf[{m.group(1)}]"
        return self.phase  # between jobs: the state the last job left

    def sample(self) -> None:
        total, files, visible = self._walk()
        held, held_names = self._held(visible)
        self.phase = self._phase(files)
        if self.phase not in self.phases:
            self.order.append(self.phase)
            self.phases[self.phase] = {"peak": -1, "held_peak": 0}
        ph = self.phases[self.phase]
        if total > ph["peak"]:
            ph.update(peak=total, held_at_peak=held, files=files)
        if total + held > ph.get("real_peak", -1):
            ph.update(real_peak=total + held, held_names=held_names)
        ph["held_peak"] = max(ph["held_peak"], held)
        self.max_held = max(self.max_held, held)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except OSError:
                pass
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak(self) -> int:
        return max((p["peak"] for p in self.phases.values()), default=0)

    @property
    def real_peak(self) -> int:
        return max((p.get("real_peak", 0) for p in self.phases.values()), default=0)

    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k]["peak"])


def planned_steps(tsv: Path) -> dict[str, int]:
    """{step label: highest planned bytes during it} from `loraforge plan --tsv`; label
    'start' for what is on disk before the run."""
    out: dict[str, int] = {}
    labels: dict[str, str] = {}
    with open(tsv) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        if r["rule"] == "quantize_gguf" and r["path"].endswith(".gguf") and r["event"].startswith("write"):
            labels[r["step"]] = f"quantize_gguf[{os.path.basename(r['path'])[:-5]}]"
    for r in rows:
        label = "start" if r["step"] in ("0", "-", "") else labels.get(r["step"], r["rule"])
        out[label] = max(out.get(label, 0), int(r["used"]))
    return out


def run_mode(mode: str, wd: Path, gen: Path, base_bytes: int) -> dict:
    log = wd.parent / f"{mode}.log"
    setup_workdir(wd, gen, mode)
    quiet = {"LORAFORGE_NO_DISK_SAMPLER": "1"}
    # mark what training would have made up to date (records Snakemake's metadata too). --no-hooks:
    # the onstart hook would plan the touch and its adapter guard refuses it (a train job in needrun)
    run(snakemake_cmd(wd, "--touch", "--no-hooks", f"results/{MODEL}/train/metrics.json",
                      f"results/{MODEL}/data/summary.tsv"), log, quiet)
    jobs = job_counts(run(snakemake_cmd(wd, "-n", *TARGETS), log, quiet))
    if jobs != EXPECTED_JOBS:
        raise SystemExit(f"{mode}: the dry run would run {jobs}, expected {EXPECTED_JOBS} (see {log})")
    plan_tsv = wd.parent / f"{mode}-plan.tsv"
    run(plan_cmd(wd, plan_tsv), log)
    cli_steps = planned_steps(plan_tsv)

    watcher = Watcher([wd / "results", wd / "base"], wd)
    cmd = snakemake_cmd(wd, *TARGETS)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        watcher.start()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        watcher.pid = proc.pid
        rc = proc.wait()
        seconds = time.perf_counter() - started
        watcher.stop()
    if rc != 0:
        raise SystemExit(f"{mode}: the workflow failed ({rc}):\n{log.read_text()[-6000:]}")
    for q in QUANTS:
        if not (wd / "results" / MODEL / f"{q}.gguf").is_file():
            raise SystemExit(f"{mode}: results/{MODEL}/{q}.gguf was not built")
    leftovers = [p for p in ("merged", "Q8_0.gguf") if (wd / "results" / MODEL / p).exists()]
    disk = sorted((wd / "logs" / "disk").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not disk:
        raise SystemExit(f"{mode}: the workflow wrote no logs/disk/*.json")
    measured = json.loads(disk[-1].read_text())
    return {
        "mode": mode,
        "jobs": jobs,
        "seconds": seconds,
        "measured": measured["measured_peak_bytes"],
        "planned": measured["planned_peak_bytes"],
        "cli_planned": max(cli_steps.values()),
        "cli_steps": cli_steps,
        "watcher": watcher,
        "leftovers": leftovers,
        "base_left": sum(p.stat().st_size for p in (wd / "base").glob("*.safetensors")),
        "disk_json": disk[-1],
        "gguf": {q: (wd / "results" / MODEL / f"{q}.gguf").stat().st_size for q in QUANTS},
        "merge_report": json.loads((wd / "results" / MODEL / "reports" / "merge.json").read_text()),
        "convert_log": (wd / "logs" / MODEL / "convert_gguf_Q8_0.log").read_text(errors="replace"),
    }


def plan_real_30b(wd: Path, log: Path) -> dict:
    """`loraforge plan` of the article's 30B (config.yaml's `30b`, sized from its `arch:`, nothing
    fetched) in both modes: {mode: (peak bytes, base bytes, step at the peak)}."""
    import yaml

    wd.mkdir(parents=True)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["data"]["samples"] = str(REPO / "data" / "rails_chat.jsonl")
    config["tiny_base"]["corpus"] = [str(REPO / "data" / "corpus")]
    (wd / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = {}
    for mode in ("link", "consume"):
        tsv = wd / f"{mode}.tsv"
        run([str(BIN / "loraforge"), "plan", "-d", str(wd), "-s", str(REPO / "Snakefile"), "--quota", "1000TB",
             "--free", "1000TB", "--tsv", str(tsv), "results/30b/Q4_K_M.gguf", "results/30b/Q5_K_M.gguf",
             "--config", f"export.merge_mode={mode}"], log)  # --config takes every word after it
        with open(tsv) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        base = sum(int(r["delta"]) for r in rows if r["path"] == "results/30b/base" and r["event"] == "write")
        top = max(rows, key=lambda r: int(r["used"]))
        out[mode] = (int(top["used"]), base, top["rule"])
    return out


# ---------------------------------------------------------------------------------------------
# the report


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="/tmp/loraforge-bench-disk")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: ~1.2 GB)")
    parser.add_argument("--shards", type=int, default=16, help="safetensors shards (the 30B has 16)")
    parser.add_argument("--rank", type=int, help=f"LoRA rank (default: the adapter is ~{ADAPTER_SHARE:.0%} of the base)")
    parser.add_argument("--modes", nargs="+", choices=("link", "consume", "copy"), default=["link", "consume"])
    parser.add_argument("--keep", action="store_true", help="keep the generated model and the workdirs")
    args = parser.parse_args()

    out = Path(args.out_dir).absolute()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    command = shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable,
                          os.path.relpath(__file__, REPO), *sys.argv[1:]])
    try:
        t0 = time.perf_counter()
        g = generate(out / "gen", args.layers, args.shards, args.rank)
        shape, base_bytes = g["shape"], g["base_bytes"]
        print(f"generated in {time.perf_counter() - t0:.0f}s: Qwen3-MoE bf16, {shape.num_hidden_layers} layers x "
              f"{shape.num_experts} experts (top-{shape.num_experts_per_tok}), hidden {shape.hidden_size}, vocab "
              f"{shape.vocab_size}, untied; {gb(base_bytes)} in {args.shards} shards; adapter r={g['rank']} "
              f"({g['adapter_bytes'] / 1e6:.1f} MB = {g['adapter_bytes'] / base_bytes:.1%} of the base)", flush=True)

        results = []
        for mode in args.modes:
            r = run_mode(mode, out / mode, out / "gen", base_bytes)
            results.append(r)
            w = r["watcher"]
            print(f"\n[{mode}] workflow {r['seconds']:.0f}s; disk log {r['disk_json']}; GGUFs "
                  + ", ".join(f"{q} {gb(b)}" for q, b in r["gguf"].items())
                  + (f"; LEFT OVER: {r['leftovers']}" if r["leftovers"] else "")
                  + f"; base shards left {gb(r['base_left'])}")
            print("  dry run after --touch: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["jobs"].items())))
            mr = r["merge_report"]
            print(f"  merge: {mr['shards_merged']} merged, {mr['shards_linked']} linked, {mr['shards_moved']} moved, "
                  f"{mr['shards_copied']} copied of {mr['shards']} shards")
            mapped = r["convert_log"].count("still memory-mapped")
            released = r["convert_log"].count("loraforge: released ")
            if mode == "consume":
                print(f"  converter: {released} shards released during the write, {mapped} still memory-mapped then")
            print(f"  {'step (run order)':<24}{'planned':>11}{'/ base':>8}{'measured':>11}{'/ base':>8}{'error':>8}"
                  f"{'deleted-but-held':>18}")
            for phase in w.order:
                planned, ph = r["cli_steps"].get(phase), w.phases[phase]
                err = f"{100 * (planned - ph['peak']) / ph['peak']:+.1f}%" if planned else "-"
                print(f"  {phase:<24}{gb(planned) if planned else '-':>11}{planned / base_bytes if planned else 0:>7.3f}x"
                      f"{gb(ph['peak']):>11}{ph['peak'] / base_bytes:>7.3f}x{err:>8}{gb(ph['held_peak']):>18}")
            plan_order = [p for p in r["cli_steps"] if p != "start"]
            run_order = [p for p in w.order if p != "start"]
            if plan_order != run_order:
                print(f"  note: the plan (a --cores 1 order, equal priorities by name) takes {', '.join(plan_order)}; the run "
                      "took the equal-priority jobs in another order, so those rows compare different states (the "
                      "run's peak does not depend on this order)")
            print(f"  sampler check: ours {gb(w.peak)}, the workflow's (logs/disk) {gb(r['measured'])}")
            top = sorted(w.phases[w.peak_phase()]["files"].items(), key=lambda kv: -kv[1])[:6]
            print(f"  measured peak during {w.peak_phase()}: " + ", ".join(f"{p} {gb(b)}" for p, b in top))

        print(f"\nbase = {gb(base_bytes)} of shards (the article: {ARTICLE['base_gb']} GB base, peak "
              f"{ARTICLE['peak_gb']} GB = {ARTICLE['peak_gb'] / ARTICLE['base_gb']:.2f}x)")
        header = (f"{'mode':<9}{'measured peak':>15}{'/ base':>8}{'goal':>9}{'planned':>13}{'plan error':>12}"
                  f"{'goal':>9}{'plan CLI':>13}{'held-open':>11}{'time':>7}")
        print(header)
        print("-" * len(header))
        print(f"{'article':<9}{ARTICLE['peak_gb']:>12} GB{ARTICLE['peak_gb'] / ARTICLE['base_gb']:>7.2f}x")
        for r in results:
            ratio = r["measured"] / base_bytes
            err = 100 * (r["planned"] - r["measured"]) / r["measured"]
            ratio_goal = (f"{'met' if ratio <= GOAL_CONSUME_RATIO else 'MISSED'}" if r["mode"] == "consume" else "-")
            err_goal = "met" if abs(err) <= GOAL_PLAN_ERROR else "MISSED"
            print(f"{r['mode']:<9}{gb(r['measured']):>15}{ratio:>7.3f}x{ratio_goal:>9}{gb(r['planned']):>13}"
                  f"{err:>+11.1f}%{err_goal:>9}{gb(r['cli_planned']):>13}{r['watcher'].max_held / 1e9:>8.3f} GB"
                  f"{r['seconds']:>6.0f}s")
        try:
            real = plan_real_30b(out / "plan-30b", out / "plan-30b.log")
            print("the same planner on the real 30B (config.yaml `30b`, sized from `arch:`, adapter estimated): "
                  + "; ".join(f"{m} {gb(p)} / base {gb(b)} = {p / b:.3f}x (at {rule})" for m, (p, b, rule) in real.items()))
        except SystemExit as e:  # context only: never fail the benchmark for it
            print(f"(planning the real 30B failed: {str(e).splitlines()[0]})")
        print(f"goals: consume mode measured peak <= {GOAL_CONSUME_RATIO}x the base; |planned - measured| <= "
              f"{GOAL_PLAN_ERROR:.0f}% of the measured peak (plan error = (planned - measured) / measured)")
        print(f"command: {command}   (total {time.perf_counter() - t0:.0f}s)")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        else:
            print(f"kept: {out}")


if __name__ == "__main__":
    main()
