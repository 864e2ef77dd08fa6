"""Data-parallel scaling of training (`train.gpus`): the same training at 1 and N GPUs of one host,
for the Qwen3-8B and Qwen3-Coder-30B-A3B shapes (random weights, vocab 151936; the model building,
tokenizer and data of bench/gpu_backends.py), through the real code path: each run is a fresh
subprocess calling loraforge.train_launch.run_training, as scripts/train_adapter.py does, which
runs one process or starts N with torchrun.

Every run keeps the configured effective batch (config.yaml's 2 x 8 = 16 packed sequences per
optimizer step): per-process accumulation = 8 / N. So tokens per optimizer step are the same at
every N, and the speed-up is s/step(1) / s/step(N).

Per run: steady s/step (metrics.json's seconds_per_step_steady: after the first 2 steps, GPU
synchronised), tokens/s (tokens per optimizer step / steady s/step; tokens per step from the
training's token count, less the one batch each process's data loader fetches ahead: an average,
within about 1% for packed batches), speed-up
and scaling efficiency (tokens/s(N) / (N x tokens/s(1)); the issue's goal: >= 1.8x on 2 GPUs,
i.e. >= 90%), peak GPU memory of each GPU, and the VRAM plan per GPU (loraforge.vram).
Results are appended to OUT/gpu_scaling.jsonl as runs finish, the table goes to OUT/gpu_scaling.md.

    # on a machine with 2 GPUs (the GPU bundle on PYTHONPATH, see shared/gpu/README.md):
    python3 bench/gpu_scaling.py --out $OUT --shapes 8b --gpus 1,2
    python3 bench/gpu_scaling.py --out $OUT --shapes 30b --gpus 1,2 --backend unsloth --q4 1
    # CPU: the same logic on a tiny MoE shape, 1 vs 2 gloo processes (LORAFORGE_DDP_ON_CPU=1), TRL.
    # Checks the code path and that both runs end at the same loss; its timings mean nothing.
    .venv/bin/python bench/gpu_scaling.py --cpu-smoke --out /tmp/gpu_scaling_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_backends as GB  # noqa: E402  (the shapes, the model builder, the inputs)

ROOT = GB.ROOT
CPU_VOCAB = 8192  # the bench tokenizer's 8000 tokens, rounded up; the real vocabulary on GPUs


def run_tag(args) -> str:
    return (f"{args.shape}-{args.layers or 'all'}-{args.backend}-{'q4' if args.q4 else 'bf16'}-{args.seq}"
            f"-b{args.batch}x{args.accum}-gpus{args.gpus}")


def child_train(args) -> dict:
    """One run: train.gpus = args.gpus, effective batch args.batch x args.accum."""
    args.gpus = int(args.gpus)
    if args.cpu_smoke:
        os.environ["LORAFORGE_DDP_ON_CPU"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from loraforge.train_launch import run_training

    work = Path(args.work)
    _, train_jsonl, _ = GB.make_inputs(work)
    base_dir = Path(args.models) / f"{args.shape}-{args.layers or 'all'}"
    lora, tp = GB.settings_for(GB.SETTINGS_KEY[args.shape])
    tp.update(backend=args.backend, load_in_4bit=bool(args.q4), max_seq_length=args.seq, max_steps=args.steps,
              save_steps=0, eval_steps=0, per_device_batch_size=args.batch, gradient_accumulation_steps=args.accum,
              gpus=args.gpus)
    tag = run_tag(args)
    t0 = time.time()
    metrics = run_training(str(base_dir), str(train_jsonl), None, adapter_dir=str(work / tag / "adapter"),
                           out_dir=str(work / tag / "train"), lora=lora, train_params=tp,
                           threads=os.cpu_count() or 1)
    wall = time.time() - t0
    steps, per_process = metrics["steps"], metrics["gradient_accumulation_steps_per_process"]
    # every process collates one batch ahead of the one it trains on (accelerate's data loader)
    tokens_per_step = metrics["train_tokens"] * per_process / (steps * per_process + 1)
    s_per_step = metrics["seconds_per_step_steady"] or metrics["seconds_per_step"]
    out = {
        "tag": tag, "shape": args.shape, "layers": GB.shape_config(args.shape, args.layers, args.vocab).num_hidden_layers,
        "backend": metrics["backend"], "load_in_4bit": tp["load_in_4bit"], "seq": args.seq, "batch": args.batch,
        "accum": args.accum, "gpus": args.gpus, "accum_per_process": per_process, "steps": steps,
        "s_per_step": round(s_per_step, 3), "steady": metrics["seconds_per_step_steady"] is not None,
        "tokens_per_step": round(tokens_per_step), "tokens_per_s": round(tokens_per_step / s_per_step),
        "peak_gib_per_gpu": metrics["peak_gpu_memory_gib_per_gpu"], "device": metrics["device"],
        "final_loss": metrics["final_loss"], "versions": metrics["versions"], "wall_s": round(wall, 1),
    }
    try:
        from loraforge.vram import estimate

        cfg = GB.shape_config(args.shape, args.layers, args.vocab).to_dict()
        out["planned_gib_per_gpu"] = round(estimate(cfg, lora, tp, metrics["backend"]).total_gib, 2)
    except ImportError:  # the GPU image may lack the planner's dependencies
        pass
    return out


def with_scaling(rows: list[dict]) -> list[dict]:
    """Speed-up and efficiency of each run against the 1-GPU run of the same shape and settings."""
    def key(r):
        return (r["shape"], r["layers"], r["backend"], r["load_in_4bit"], r["seq"], r["batch"], r["accum"])

    single = {key(r): r for r in rows if "error" not in r and r["gpus"] == 1}
    out = []
    for r in rows:
        base = single.get(key(r)) if "error" not in r else None
        if base:
            speedup = r["tokens_per_s"] / base["tokens_per_s"]
            r = {**r, "speedup": round(speedup, 3), "efficiency": round(speedup / r["gpus"], 3)}
        out.append(r)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| shape | backend | 4-bit | seq | GPUs | batch x accum/process x GPUs | s/step | tokens/s | speed-up | "
             "efficiency | peak GiB per GPU | plan GiB per GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in with_scaling(rows):
        if "error" in r:
            lines.append(f"| {r.get('tag', '?')} | | | | | | {r['error'][:60]} | | | | | |")
            continue
        peaks = " / ".join(f"{p:.1f}" for p in r["peak_gib_per_gpu"]) if r.get("peak_gib_per_gpu") else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        eff = f"{r['efficiency']:.0%}" if "efficiency" in r else "-"
        plan = r.get("planned_gib_per_gpu")
        lines.append(
            f"| {r['shape']}-{r['layers']}L | {r['backend']} | {r['load_in_4bit']} | {r['seq']} | {r['gpus']} | "
            f"{r['batch']} x {r['accum_per_process']} x {r['gpus']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:,} | "
            f"{speed} | {eff} | {peaks} | {'-' if plan is None else f'{plan:.1f}'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--work", default="/tmp/gpu_scaling")
    ap.add_argument("--models", default="/dev/shm/lf-models")
    ap.add_argument("--shapes", default="8b,30b", help="comma-separated: 8b, 30b (or 3b); tiny with --cpu-smoke")
    ap.add_argument("--gpus", default="1,2", help="comma-separated GPU counts; 1 is the reference")
    ap.add_argument("--backend", default="unsloth", choices=["unsloth", "trl"])
    ap.add_argument("--q4", type=int, default=1, help="load_in_4bit (QLoRA), 1 or 0")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2, help="per-device micro-batch")
    ap.add_argument("--accum", type=int, default=8, help="accumulation at 1 GPU (effective batch = batch x accum)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps; the first 2 are left out of s/step")
    ap.add_argument("--vocab", type=int, default=None, help=f"default {GB.VOCAB} ({CPU_VOCAB} with --cpu-smoke)")
    ap.add_argument("--timeout", type=int, default=580, help="seconds per run")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape, 1 vs 2 gloo processes on the CPU")
    ap.add_argument("--report", metavar="JSONL", help="only print the table of earlier results")
    # child-only
    ap.add_argument("--child", choices=["build", "train"])
    ap.add_argument("--result")
    ap.add_argument("--shape")
    ap.add_argument("--layers", type=int)
    args = ap.parse_args(argv)
    if args.vocab is None:
        args.vocab = CPU_VOCAB if args.cpu_smoke else GB.VOCAB
    if args.cpu_smoke:
        if args.shapes == "8b,30b":
            args.shapes = "tiny"
        args.seq = min(args.seq, 256)
        args.backend, args.q4 = "trl", 0  # no Unsloth, no bitsandbytes on the CPU
        args.steps = min(args.steps, 4)
        args.accum = 2 if args.accum == 8 else args.accum
        args.models = args.models if args.models != "/dev/shm/lf-models" else str(Path(args.work) / "models")
    for n in map(int, args.gpus.split(",")):
        if n < 1 or args.accum % n:
            ap.error(f"--gpus {n}: the accumulation {args.accum} must be a multiple of every GPU count "
                     "(the effective batch stays batch x accum)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        print(table([json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]))
        return
    if args.child:
        try:
            out = {"build": GB.child_build, "train": child_train}[args.child](args)
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:],
                   "tag": run_tag(args) if args.child == "train" else args.shape}
        Path(args.result).write_text(json.dumps(out, indent=1, default=str))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results_file, log = out / "gpu_scaling.jsonl", open(out / "gpu_scaling.log", "a")
    res = str(Path(args.work) / "result.json")
    common = ["--work", args.work, "--models", args.models, "--vocab", str(args.vocab), "--result", res,
              "--backend", args.backend, "--q4", str(args.q4), "--seq", str(args.seq), "--batch", str(args.batch),
              "--accum", str(args.accum), "--steps", str(args.steps), "--gpus", "1"]
    if args.cpu_smoke:
        common.append("--cpu-smoke")
    rows = []
    for shape in args.shapes.split(","):
        r = run_child(["--child", "build", "--shape", shape, *common], log, args.timeout)
        print("build", json.dumps(r), flush=True)
        if "error" in r:
            continue
        for n in map(int, args.gpus.split(",")):
            argv = ["--child", "train", "--shape", shape, *common]
            argv[argv.index("--gpus") + 1] = str(n)
            r = run_child(argv, log, args.timeout)
            r.setdefault("tag", f"{shape} gpus={n}")
            rows.append(r)
            print("train", json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
            with open(results_file, "a") as f:
                f.write(json.dumps(r, default=str) + "\n")
            (out / "gpu_scaling.md").write_text(table(rows) + "\n")
    print(table(rows))


def run_child(argv: list[str], log, timeout: int) -> dict:
    """This script as a child (a fresh process per run), with gpu_backends' result handling."""
    return GB.run_child(argv, log, timeout, script=__file__)


if __name__ == "__main__":
    main()
