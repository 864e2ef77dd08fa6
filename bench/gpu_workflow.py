"""End to end on a GPU machine: the workflow itself trains with Unsloth, merges, converts and
quantizes a random-weight Qwen3-Coder-30B-A3B-shaped model given as a `path:` base, and the time
of each job is read from Snakemake's own log.

    # on the device machine: bundles unpacked on PYTHONPATH (bench/make_workflow_bundle.sh)
    python3 bench/gpu_workflow.py --out $OUT --layers 8 --seq 4096 --steps 6

The model (all 128 experts, top-8, vocab 151936; `--layers` of the 48 so the export fits the
command's time) is built on the GPU with random weights and saved under /dev/shm, with a
byte-level BPE tokenizer trained on the shipped samples (bench/gpu_backends.py). The workdir
holds a config.yaml made from the repository's: one model `e2e` with `base: {path: ...}`,
`train.backend: unsloth`, 4-bit, the article's batch 2 x 8, `max_steps` from `--steps`. Then
`snakemake --cores N results/e2e/Q4_K_M.gguf` runs exactly as a user would run it. The
result: OUT/gpu_workflow.md (a table of jobs and their wall times), the Snakemake log, the rule
logs and metrics.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_RULE = re.compile(r"^(?:local)?rule (\w+):$")
_FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")


def job_times(snakemake_log: str) -> list[dict]:
    """(rule, start, end, seconds) of every job, from the timestamps Snakemake prints before
    each 'rule X:' block and each 'Finished jobid: N (Rule: X)' line."""
    started, done, stamp, pending_rule = {}, [], None, None
    for line in snakemake_log.splitlines():
        if m := _STAMP.match(line.strip()):
            stamp = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
        elif m := _RULE.match(line.strip()):
            pending_rule = (m.group(1), stamp)
        elif (m := _JOBID.match(line)) and pending_rule:
            started[m.group(1)] = pending_rule
            pending_rule = None
        elif m := _FINISHED.match(line.strip()):
            rule, t0 = started.get(m.group(1), (m.group(2), None))
            done.append({"rule": rule, "start": str(t0), "end": str(stamp),
                         "seconds": (stamp - t0).total_seconds() if t0 and stamp else None})
    return done


def build_model(layers: int, models: Path, work: Path) -> Path:
    from gpu_backends import child_build

    args = argparse.Namespace(work=str(work), models=str(models), shape="30b", layers=layers,
                              vocab=151936, cpu_smoke=False)
    info = child_build(args)
    print("model", json.dumps(info), flush=True)
    model = Path(info["dir"])
    # The export needs a tokenizer llama.cpp's converter knows: the tiny models' SentencePiece
    # tokenizer (the converter hooks handle it); a freshly trained byte-level BPE has a
    # pre-tokenizer hash the converter refuses ("BPE pre-tokenizer was not recognized").
    if not (model / "tokenizer.model").exists():
        from loraforge.base import read_corpus, train_tokenizer

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "vocab.json", "merges.txt"):
            (model / name).unlink(missing_ok=True)
        train_tokenizer(read_corpus([ROOT / "data" / "corpus"]), model, vocab_size=2048)
    return model


def write_config(workdir: Path, base: Path, seq: int, steps: int, backend: str) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    e2e = copy.deepcopy(cfg["models"]["30b"])
    e2e.pop("arch", None)  # a local folder: the shape comes from its config.json
    e2e["base"] = {"path": str(base)}
    e2e["train"] = {"backend": backend, "load_in_4bit": True, "max_seq_length": seq, "max_steps": steps,
                    "save_steps": max(steps // 2, 1), "eval_steps": max(steps // 2, 1)}
    e2e["ollama"] = {"name": "rails-coder-30b-e2e"}
    cfg["models"] = {"e2e": e2e}
    cfg.pop("continue", None)  # it names the shipped 30b and 3b
    cfg["targets"] = ["e2e"]
    cfg["data"]["samples"] = str(ROOT / "data" / "rails_chat.jsonl")
    cfg.pop("tiny_base", None)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--backend", default="unsloth")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--models", default="/dev/shm/lf-models")
    ap.add_argument("--workdir", default="/dev/shm/lf-e2e")
    ap.add_argument("--target", default="results/e2e/Q4_K_M.gguf")
    args = ap.parse_args()

    out, workdir = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t0 = time.time()
    base = build_model(args.layers, Path(args.models), Path("/tmp/gpu_workflow"))
    build_s = time.time() - t0
    write_config(workdir, base, args.seq, args.steps, args.backend)

    # the export rules ask for 2 threads (config resources); give them the machine's cores
    threads = [f"{rule}={args.cores}" for rule in ("convert_gguf", "quantize_gguf")]
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--workflow-profile", str(ROOT / "profiles" / "default"), "--cores", str(args.cores),
           "--set-threads", *threads, "--", args.target]
    print("$", " ".join(cmd), flush=True)
    t1 = time.time()
    with open(out / "snakemake.log", "w") as log:  # streamed: a run cut off by a time limit keeps its log
        run = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t1
    run.stdout = (out / "snakemake.log").read_text()
    print(run.stdout[-6000:], flush=True)
    for log in (workdir / "logs").rglob("*.log"):
        dest = out / "logs" / log.relative_to(workdir / "logs")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, dest)
    for name in ("train/metrics.json", "train/loss.csv", "reports/merge.json"):
        src = workdir / "results" / "e2e" / name
        if src.exists():
            shutil.copy2(src, out / name.replace("/", "-"))

    jobs = job_times(run.stdout)
    sizes = {p.name: p.stat().st_size for p in (workdir / "results" / "e2e").glob("*.gguf")}
    lines = [f"# End to end on the GPU machine ({datetime.now():%Y-%m-%d})", "",
             f"`{' '.join(['snakemake', '--cores', str(args.cores), args.target])}` on a random-weight "
             f"Qwen3-Coder-30B-A3B shape cut to {args.layers} of 48 layers (128 experts, vocab 151936), "
             f"base given as `path:`; train: {args.backend}, 4-bit, seq {args.seq}, batch 2 x 8, "
             f"{args.steps} steps. Model built and saved in {build_s:.0f} s (not part of the run). "
             f"Snakemake exit code {run.returncode}, wall {wall:.0f} s.", "",
             "| job | wall s |", "|---|---|"]
    lines += [f"| {j['rule']} | {j['seconds']:.0f} |" if j["seconds"] is not None else f"| {j['rule']} | ? |"
              for j in jobs]
    lines += ["", "| GGUF | bytes |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in sorted(sizes.items())]
    metrics = workdir / "results" / "e2e" / "train" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        keep = ("backend", "versions", "first_loss", "final_loss", "tokens_per_s", "peak_gpu_memory_gib",
                "train_runtime_s", "steps")
        lines += ["", "metrics.json: `" + json.dumps({k: m[k] for k in keep if k in m}) + "`"]
    (out / "gpu_workflow.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
