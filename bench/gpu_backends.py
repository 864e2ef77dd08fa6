"""H200 benchmark of loraforge.train.train with both backends (Unsloth, TRL+PEFT) at the article's
real model shapes (random weights, vocab 151936), plus the Unsloth-adapter merge check.

One command runs a grid of runs, most important first; each run is a fresh subprocess (so peak
memory and CUDA/Unsloth patch state do not leak) that calls `loraforge.train.train(...)` exactly
as scripts/train_adapter.py does, with config.yaml's settings for the shape's model (r, alpha,
targets, lr, batch 2 x accumulation 8, packing) and the run's backend / load_in_4bit / seq.
Results are appended to OUT/gpu_backends.jsonl as each run finishes (a run killed at the time
limit keeps the earlier ones) and summarised in OUT/gpu_backends.md.

Per run: s/step over the steps after `--warmup` (CUDA-synchronised step timestamps), tokens/step
(counted by train(): real tokens of the packed batches), tokens/s, MFU = 6 x active params x
tokens/s / 790e12 (bf16 dense peak of the H200), peak GPU memory overall and during the steady
steps (a transient peak shows as overall > steady), the VRAM plan of loraforge.vram, and the
loss per step (loss agreement between backends: same weights, data, seed).

    # on the device machine (bundle unpacked on PYTHONPATH), shapes built under /dev/shm:
    python3 bench/gpu_backends.py --out $OUT --runs 30b:unsloth:q4:8192,30b:trl:q4:8192
    # kernel profile (torch.profiler, CPU + CUDA) of the last step of a run: `profile` flag or --profile;
    # the run's JSON gets wall / kernel time, GPU-busy fraction, top kernels, categories, the full
    # key_averages tables land in OUT/profile-<tag>.txt; the profiled step is left out of s/step
    python3 bench/gpu_backends.py --out $OUT --runs 30b:unsloth:q4:8192:2x8:profile --steps 3 --warmup 1
    # merge check: Unsloth trains a 4-layer 30B-A3B-shaped MoE (bf16), loraforge.merge merges the
    # adapter, and the merged model's logits are compared with the Unsloth model that trained it
    python3 bench/gpu_backends.py --out $OUT --merge-check
    # CPU: the same logic on tiny shapes, TRL only
    .venv/bin/python bench/gpu_backends.py --cpu-smoke --out /tmp/gpu_backends_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEAK_FLOPS = 790e12
VOCAB = 151936

# The article's three shapes (config.yaml's `arch:` of 3b/8b/30b); `layers` may be cut for smoke runs.
SHAPES = {
    "3b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "30b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, tie_word_embeddings=False, decoder_sparse_step=1,
                norm_topk_prob=True),
    "tiny": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, tie_word_embeddings=False, decoder_sparse_step=1,
                 norm_topk_prob=True),
}
SETTINGS_KEY = {"3b": "3b", "8b": "8b", "30b": "30b", "tiny": "tiny-moe"}
# The article's runs: optimizer steps and its A100 wall time (for the projection).
ARTICLE = {"30b": {"hours_a100": 26}, "8b": {"hours_a100": 17}, "3b": {"hours_a100": 14}}


def shape_config(shape: str, layers: int | None, vocab: int):
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    mt = spec.pop("model_type")
    return AutoConfig.for_model(mt, vocab_size=vocab, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                rope_theta=1_000_000.0, eos_token_id=2, pad_token_id=0, bos_token_id=None, **spec)


def active_params(cfg) -> int:
    """Parameters one token passes through (MoE: top-k experts of each layer), excluding the input
    embedding (a lookup, no FLOPs); the LM head counts."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        n = p.numel()
        if ".experts." in name and getattr(cfg, "num_experts", None):
            n = n * cfg.num_experts_per_tok // cfg.num_experts
        total += n
    if getattr(cfg, "tie_word_embeddings", False):
        total += cfg.vocab_size * cfg.hidden_size
    return total


# ---------------------------------------------------------------------------------------------
# inputs: a tokenizer (byte-level BPE trained here: no hub) and a long chat dataset


def make_inputs(work: Path) -> tuple[Path, Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from loraforge.base import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
    from loraforge.constants import CHATML_JINJA_TEMPLATE

    tok_dir, data = work / "tokenizer", work / "data"
    if (data / "validation.jsonl").exists():
        return tok_dir, data / "train.jsonl", data / "validation.jsonl"
    samples = [json.loads(line) for line in (ROOT / "data/rails_chat.jsonl").read_text().splitlines() if line.strip()]
    texts = [m["content"] for s in samples for m in s["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tok.chat_template = CHATML_JINJA_TEMPLATE
    tok.save_pretrained(tok_dir)
    data.mkdir(parents=True, exist_ok=True)
    # 12 passes over the shipped samples, each message tagged with its pass so no two are equal
    with open(data / "train.jsonl", "w") as f:
        for rep in range(12):
            for s in samples[36:]:
                msgs = [{**m, "content": f"[{rep}] {m['content']}"} for m in s["messages"]]
                f.write(json.dumps({"messages": msgs}) + "\n")
    with open(data / "validation.jsonl", "w") as f:
        for s in samples[:36]:
            f.write(json.dumps({"messages": s["messages"]}) + "\n")
    return tok_dir, data / "train.jsonl", data / "validation.jsonl"


def child_build(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    tok_dir, _, _ = make_inputs(Path(args.work))
    d = Path(args.models) / f"{args.shape}-{args.layers or 'all'}"
    if (d / "config.json").exists():
        return {"dir": str(d), "reused": True}
    cfg = shape_config(args.shape, args.layers, args.vocab)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cpu" if args.cpu_smoke else "cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    # saving straight from an 80 GB GPU runs out of memory inside save_pretrained (transformers 5
    # splits the fused experts on the GPU): save from CPU memory
    model = model.to("cpu")
    if not args.cpu_smoke:
        torch.cuda.empty_cache()
    built = time.time() - t0
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    for f in tok_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    os.replace(tmp, d)
    return {"dir": str(d), "params": n, "build_s": round(built, 1), "save_s": round(time.time() - t0 - built, 1),
            "bytes": sum(p.stat().st_size for p in d.iterdir())}


class StepTimer:
    """Trainer callback: synchronised step timestamps, the peak during steady steps, the model."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self
        self.warmup, self.times, self.steady_peak, self.model = warmup, [], None, None

        class _CB(TrainerCallback):
            def on_train_begin(self, a, state, control, model=None, **kw):
                timer._sync()
                timer.times = [time.perf_counter()]
                timer.model = model

            def on_step_end(self, a, state, control, **kw):
                import torch

                timer._sync()
                timer.times.append(time.perf_counter())
                if torch.cuda.is_available() and len(timer.times) - 1 == timer.warmup:
                    torch.cuda.reset_peak_memory_stats()  # from here on: the steady-state peak

            def on_train_end(self, a, state, control, **kw):
                import torch

                if torch.cuda.is_available() and len(timer.times) - 1 > timer.warmup:
                    timer.steady_peak = torch.cuda.max_memory_allocated() / 2**30

        self.callback = _CB()

    @staticmethod
    def _sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def dynamo_counters() -> dict:
    """How much torch.compile did: graphs compiled, recompiles, graph breaks (a recompile per new
    sequence length would show here)."""
    try:
        from torch._dynamo.utils import counters

        return {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "frames") and v} or None
    except Exception:
        return None


class MemoryHistory:
    """torch.cuda.memory._record_memory_history over the first optimizer step; at its end (or at an
    exception such as out of memory) the allocation trace is replayed to the moment of the highest
    allocated total, and the blocks live then are grouped by the code that allocated them
    (innermost frames outside torch). Summary in the run's JSON, the full grouping in folder."""

    def __init__(self, folder: Path, max_entries: int = 3_000_000):
        import torch
        from transformers import TrainerCallback

        self.folder, self.summary, self.done = folder, None, False
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=max_entries)
        hist = self

        class _CB(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                if state.global_step == 1:
                    hist.finish("end of step 1")

        self.callback = _CB()

    @staticmethod
    def _key(frames: list) -> str:
        outside = [f for f in frames if "/torch/" not in f["filename"] and not f["filename"].startswith("<")]
        pick = (outside or frames)[:3]
        return " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in pick) or "?"

    def finish(self, when: str) -> None:
        import torch

        if self.done:
            return
        self.done = True
        t = time.time()
        try:
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            trace = snap["device_traces"][torch.cuda.current_device()]
            live, total, peak, peak_at = {}, 0, 0, -1
            for i, e in enumerate(trace):
                if e["action"] == "alloc":
                    live[e["addr"]] = e["size"]
                    total += e["size"]
                    if total > peak:
                        peak, peak_at = total, i
                elif e["action"] == "free_completed" and e["addr"] in live:
                    total -= live.pop(e["addr"])
            blocks = {}
            for e in trace[:peak_at + 1]:
                if e["action"] == "alloc":
                    blocks[e["addr"]] = e
                elif e["action"] == "free_completed":
                    blocks.pop(e["addr"], None)
            groups: dict[str, list] = {}
            for e in blocks.values():
                g = groups.setdefault(self._key(e.get("frames", [])), [0, 0, 0])
                g[0] += e["size"]
                g[1] += 1
                g[2] = max(g[2], e["size"])
            # what was live at the end of the trace too (the steady part), for comparison
            top = sorted(groups.items(), key=lambda kv: -kv[1][0])
            self.folder.mkdir(parents=True, exist_ok=True)
            lines = [f"{v[0] / 2**30:8.2f} GiB {v[1]:7d} blocks (largest {v[2] / 2**20:8.1f} MiB)  {k}" for k, v in top]
            (self.folder / "memhist.txt").write_text(f"{when}; trace events {len(trace)}; peak allocated "
                                                      f"{peak / 2**30:.2f} GiB at event {peak_at}\n" + "\n".join(lines))
            self.summary = {"when": when, "events": len(trace), "peak_at_event": peak_at,
                            "peak_traced_gib": round(peak / 2**30, 2), "still_live_at_end_gib": round(total / 2**30, 2),
                            "top": [{"gib": round(v[0] / 2**30, 2), "blocks": v[1], "largest_mib": round(v[2] / 2**20, 1),
                                     "where": k} for k, v in top[:25]],
                            "analysis_s": round(time.time() - t, 1)}
        except Exception as e:  # never lose the run to its diagnosis
            self.summary = {"when": when, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
        print("memhist", json.dumps(self.summary), flush=True)


# Kernel categories for the profile, first match wins (lower-cased kernel name).
KERNEL_CATEGORIES = [
    ("memcpy HtoD", ("memcpy htod",)),
    ("memcpy DtoH", ("memcpy dtoh",)),
    ("memcpy DtoD / memset", ("memcpy", "memset")),
    ("attention (flash / sdpa)", ("flash", "fmha", "attention", "attn", "sdpa", "mem_efficient")),
    ("4-bit dequantize (bitsandbytes)", ("dequant", "kquant", "nf4", "4bit", "bnb")),
    ("grouped GEMM (MoE experts)", ("grouped", "groupproblem", "group_gemm", "ptrarray", "ptr_array", "moe")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "matmul", "gemv", "splitk",
                                 "sm90_", "sm80_", "wgmma")),
    ("optimizer (adam, multi-tensor)", ("adam", "multi_tensor", "foreach", "fused_opt")),
    ("loss (cross-entropy)", ("cross_entropy", "crossentropy", "_ce_", "logsumexp", "log_softmax")),
    ("triton (inductor / Unsloth)", ("triton", "_rms_", "rope", "swiglu", "_fg_", "geglu", "layernorm")),
    ("elementwise / reduce / index (aten)", ("elementwise", "vectorized", "reduce", "index", "scatter", "gather",
                                             "sort", "cat", "copy", "fill", "where", "softmax", "topk",
                                             "histc", "cumsum", "arange", "bincount", "masked")),
]


def kernel_category(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):  # inductor-generated (fused elementwise), even when named after a GEMM's op
        return "triton (inductor / Unsloth)"
    for cat, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


class StepProfiler:
    """Trainer callback: torch.profiler (CPU + CUDA) around one optimizer step (`step`, 0-based;
    started at the end of the previous step, after a synchronise, stopped at the step's end after
    another), then `summary()`: wall time, kernel time, GPU-busy fraction, top kernels, categories."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        prof = self
        self.step, self.prof, self.wall_s, self.error = step, None, None, None

        class _CB(TrainerCallback):
            def on_train_begin(self, a, state, control, **kw):
                if prof.step == 0:
                    prof._start()

            def on_step_end(self, a, state, control, **kw):
                # global_step == number of optimizer steps done
                if state.global_step == prof.step + 1 and prof.prof is not None:
                    prof._stop()
                elif state.global_step == prof.step:
                    prof._start()

        self.callback = _CB()

    def _start(self):
        import torch
        from torch.profiler import ProfilerActivity, profile

        try:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            StepTimer._sync()
            self.prof = profile(activities=acts, record_shapes=False, with_stack=False, profile_memory=False)
            self.prof.start()
            StepTimer._sync()
            self.t0 = time.perf_counter()
        except Exception as e:  # a profiler failure must not break the run
            self.prof, self.error = None, f"start: {type(e).__name__}: {e}"

    def _stop(self):
        try:
            StepTimer._sync()
            self.wall_s = time.perf_counter() - self.t0
            t = time.perf_counter()
            self.prof.stop()
            self.stop_s = time.perf_counter() - t
        except Exception as e:
            self.prof, self.error = None, f"stop: {type(e).__name__}: {e}"

    def summary(self, folder: Path, top: int = 25) -> dict:
        """The compact profile for the run's JSON; the full key_averages tables as text in `folder`."""
        from torch.autograd import DeviceType

        if self.prof is None:
            return {"error": self.error or "the profiled step was not reached", "step": self.step}
        t = time.perf_counter()
        avgs = self.prof.key_averages()

        def dev_us(e, self_time=True):
            for attr in (("self_device_time_total", "self_cuda_time_total") if self_time
                         else ("device_time_total", "cuda_time_total")):
                if hasattr(e, attr):
                    return getattr(e, attr)
            return 0

        kernels = [e for e in avgs if e.device_type == DeviceType.CUDA]
        kernel_us = sum(dev_us(e) for e in kernels)
        wall_us = self.wall_s * 1e6
        # the union of the kernels' intervals: time the GPU ran at least one kernel (streams overlap)
        spans = sorted((e.time_range.start, e.time_range.end) for e in self.prof.events()
                       if e.device_type == DeviceType.CUDA)
        busy, cur_s, cur_e = 0, None, None
        for s0, e0 in spans:
            if cur_e is None or s0 > cur_e:
                if cur_e is not None:
                    busy += cur_e - cur_s
                cur_s, cur_e = s0, e0
            else:
                cur_e = max(cur_e, e0)
        if cur_e is not None:
            busy += cur_e - cur_s
        cats: dict[str, list] = {}
        for e in kernels:
            c = cats.setdefault(kernel_category(e.key), [0, 0])
            c[0] += dev_us(e)
            c[1] += e.count
        pct = (lambda us: round(100 * us / wall_us, 2)) if wall_us else (lambda us: None)
        top_k = sorted(kernels, key=dev_us, reverse=True)[:top]
        cpu_top = sorted((e for e in avgs if e.device_type == DeviceType.CPU),
                         key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        folder.mkdir(parents=True, exist_ok=True)
        sort_dev = "self_device_time_total" if hasattr(avgs[0], "self_device_time_total") else "self_cuda_time_total"
        text = (f"profiled optimizer step {self.step} (0-based); wall {self.wall_s:.3f} s\n\n"
                f"== sorted by {sort_dev} ==\n"
                + avgs.table(sort_by=sort_dev, row_limit=80, max_name_column_width=90)
                + "\n\n== sorted by self_cpu_time_total ==\n"
                + avgs.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
        (folder / "profile_key_averages.txt").write_text(text)
        return {
            "step": self.step, "wall_s": round(self.wall_s, 3), "stop_s": round(getattr(self, "stop_s", 0), 1),
            "kernel_ms": round(kernel_us / 1e3, 1), "gpu_busy_ms": round(busy / 1e3, 1),
            "kernel_sum_over_wall": round(kernel_us / wall_us, 4) if wall_us else None,
            "gpu_busy_fraction": round(busy / wall_us, 4) if wall_us else None,
            "kernel_launches": sum(e.count for e in kernels),
            "categories": [{"category": k, "ms": round(v[0] / 1e3, 1), "pct_of_step": pct(v[0]),
                            "pct_of_kernels": round(100 * v[0] / kernel_us, 2) if kernel_us else None,
                            "calls": v[1]}
                           for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])],
            "top_kernels": [{"name": e.key[:120], "category": kernel_category(e.key), "calls": e.count,
                             "ms": round(dev_us(e) / 1e3, 1), "pct_of_step": pct(dev_us(e))} for e in top_k],
            "top_cpu_ops": [{"name": e.key[:80], "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1)}
                            for e in cpu_top],
            "table_file": str(folder / "profile_key_averages.txt"), "summary_s": round(time.perf_counter() - t, 1),
        }


def probe_ids(tok_dir: Path, n: int = 256):
    import torch

    from loraforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    text = json.loads((ROOT / "data/rails_chat.jsonl").read_text().splitlines()[0])["messages"]
    ids = tok.apply_chat_template(text, tokenize=True, return_tensors="pt", return_dict=True)["input_ids"][:, :n]
    return ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)


def settings_for(key: str) -> tuple[dict, dict]:
    """(lora, train) of config.yaml's model `key`; where jsonschema is missing (the GPU image), the
    same overlay of defaults read with yaml, with the schema defaults of the newer fields."""
    try:
        from loraforge import config as lfconfig

        s = lfconfig.model_settings(lfconfig.load(ROOT / "config.yaml"), key)
        return dict(s["lora"]), dict(s["train"])
    except ImportError:
        import yaml

        cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
        model = cfg["models"][key]
        return ({**cfg["defaults"]["lora"], **model.get("lora", {})},
                {"save_steps": 0, "eval_steps": 0, **cfg["defaults"]["train"], **model.get("train", {})})


def child_train(args) -> dict:
    if args.backend == "unsloth":
        from loraforge.train_backends import import_unsloth_first

        import_unsloth_first()
    import torch
    import transformers.trainer as ttrainer

    from loraforge.train import train

    work = Path(args.work)
    tok_dir, train_jsonl, val_jsonl = make_inputs(work)
    base_dir = Path(args.models) / f"{args.shape}-{args.layers or 'all'}"
    lora, tp = settings_for(SETTINGS_KEY[args.shape])
    tp.update(backend=args.backend, load_in_4bit=bool(args.q4), max_seq_length=args.seq, max_steps=args.steps,
              compile_warmup=not args.no_compile_warmup,
              save_steps=0, eval_steps=0, per_device_batch_size=args.batch, gradient_accumulation_steps=args.accum,
              gradient_checkpointing=args.checkpointing)
    if args.cpu_smoke:
        tp.update(backend="trl", load_in_4bit=False)
    if args.probe:  # the merge check needs a LoRA effect well above bf16 noise after a few steps
        tp.update(learning_rate=3e-3, warmup_ratio=0.0, lr_scheduler="constant")
    tag = run_tag(args)
    timer = StepTimer(args.warmup)
    ttrainer.DEFAULT_CALLBACKS.append(timer.callback)
    profiler = None
    if args.profile:  # the last step (after the warm-up): the steps before it stay unprofiled
        profiler = StepProfiler(max(args.steps - 1, args.warmup))
        ttrainer.DEFAULT_CALLBACKS.append(profiler.callback)
    history = MemoryHistory(work / tag) if args.memhist and torch.cuda.is_available() else None
    if history is not None:
        ttrainer.DEFAULT_CALLBACKS.append(history.callback)
    t0 = time.time()
    # nothing here resets the allocator's peak before train(): train() records the run's own
    # (RunPeak), which a reset by StepTimer cannot hide, and the driver-level peak beside it
    try:
        metrics = train(str(base_dir), str(train_jsonl), None, adapter_dir=str(work / tag / "adapter"),
                        out_dir=str(work / tag / "train"), lora=lora, train_params=tp)
    except Exception:
        if history is not None:
            history.finish("exception (e.g. out of memory) in the first step")
        raise
    wall = time.time() - t0
    dts = [b - a for a, b in zip(timer.times, timer.times[1:])]
    steady = dts[args.warmup:] or dts
    if profiler is not None and profiler.step < len(dts) and len(dts[args.warmup:]) > 1:
        steady = [x for i, x in enumerate(dts) if i >= args.warmup and i != profiler.step]  # unprofiled steps only
    s_per_step = sum(steady) / len(steady)
    tokens_per_step = metrics["train_tokens"] / max(metrics["steps"], 1)
    cfg = shape_config(args.shape, args.layers, args.vocab)
    active = active_params(cfg)
    tps = tokens_per_step / s_per_step
    out = {
        "tag": tag, "shape": args.shape, "layers": cfg.num_hidden_layers, "backend": metrics["backend"],
        "load_in_4bit": tp["load_in_4bit"], "seq": args.seq,
        "batch": metrics["train"]["per_device_batch_size"], "accum": metrics["train"]["gradient_accumulation_steps"],
        "checkpointing": metrics.get("gradient_checkpointing", args.checkpointing),
        "checkpointing_requested": args.checkpointing, "auto_choice": metrics.get("auto_choice"),
        "compile_warmup_s": metrics.get("compile_warmup_seconds"), "profiled": bool(args.profile),
        "assistant_only_loss": bool(tp.get("assistant_only_loss", True)),
        "loss_token_share": round(metrics["train_loss_tokens"] / metrics["train_tokens"], 4) if metrics.get("train_tokens") else None,
        "steps": metrics["steps"], "step_times_s": [round(x, 2) for x in dts], "s_per_step": round(s_per_step, 3),
        "tokens_per_step": round(tokens_per_step), "tokens_per_s": round(tps), "active_params": active,
        "mfu": round(6 * active * tps / PEAK_FLOPS, 4), "peak_gib": metrics["peak_gpu_memory_gib"],
        # the run's true peaks (train()'s RunPeak: nothing resets them), step 1 included
        **{k: metrics.get(k) for k in ("peak_gpu_reserved_gib", "peak_gpu_driver_gib", "gpu_driver_baseline_gib",
                                       "peak_gpu_driver_step1_gib", "peak_gpu_driver_after_step1_gib")},
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "memhist": history.summary if history is not None else None,
        "dynamo": dynamo_counters(),
        "steady_peak_gib": round(timer.steady_peak, 3) if timer.steady_peak else None,
        "losses": [float(x) for x in _losses(work / tag / "train" / "loss.csv")],
        "trainable": metrics["trainable_parameters"], "versions": metrics["versions"], "wall_s": round(wall, 1),
        "env": {k: os.environ.get(k) for k in ("UNSLOTH_MOE_BACKEND",) if os.environ.get(k)},
    }
    if profiler is not None:
        try:
            out["profile"] = profiler.summary(work / tag)
            out["profiled_step_s"] = round(dts[profiler.step], 3) if profiler.step < len(dts) else None
        except Exception as e:  # never lose the run's timings to the profile
            out["profile"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    try:
        from loraforge.vram import estimate

        plan = estimate(cfg.to_dict(), lora, metrics["train"], backend=metrics["backend"])
        out["planned_gib"] = round(plan.total_gib, 2)
        out["plan"] = plan.as_dict()
    except ImportError:
        pass
    if args.probe and timer.model is not None:  # logits of the model that trained, for the merge check
        model = timer.model
        model.eval()
        ids = probe_ids(tok_dir).to(next(model.parameters()).device)
        with torch.no_grad():
            lora_logits = model(input_ids=ids).logits.float().cpu()
            with model.disable_adapter():
                base_logits = model(input_ids=ids).logits.float().cpu()
        torch.save({"ids": ids.cpu(), "lora": lora_logits, "base": base_logits}, work / tag / "probe.pt")
    return out


def _losses(path: Path) -> list[float]:
    import csv

    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def child_merge_check(args) -> dict:
    """Merge the Unsloth adapter with loraforge.merge and compare the merged model's logits with
    the logits of the Unsloth model that trained it (probe.pt): relative L2 of the LoRA effect."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.merge import merge

    work = Path(args.work)
    base_dir = Path(args.models) / f"{args.shape}-{args.layers or 'all'}"
    tag = run_tag(args)
    adapter = work / tag / "adapter"
    merged_dir = Path(args.models) / f"{tag}-merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    t0 = time.time()
    report = merge(str(base_dir), str(adapter), str(merged_dir), mode="copy", progress=False)
    merge_s = time.time() - t0
    probe = torch.load(work / tag / "probe.pt")

    def logits(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():
            return model(input_ids=probe["ids"].cuda()).logits.float().cpu()

    merged, base = logits(merged_dir), logits(base_dir)
    effect = probe["lora"] - probe["base"]
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    shutil.rmtree(merged_dir, ignore_errors=True)
    return {
        "tag": tag, "merge_s": round(merge_s, 1), "report": {k: v for k, v in report.as_dict().items() if k != "shards"},
        "lora_effect_rel_l2_of_logits": float(effect.norm() / probe["base"].norm()),
        "merged_vs_unsloth_rel_l2_of_effect": float((merged - probe["lora"]).norm() / effect.norm()),
        "merged_vs_base_rel_l2_of_effect": float((merged - probe["base"]).norm() / effect.norm()),
        # noise floor: the same base weights through transformers vs through Unsloth's kernels
        "transformers_base_vs_unsloth_base_rel_l2_of_effect": float((base - probe["base"]).norm() / effect.norm()),
        "argmax_agree_merged_vs_unsloth": float((merged.argmax(-1) == probe["lora"].argmax(-1)).float().mean()),
        "unsloth_fused_expert_lora": acfg.get("unsloth_fused_expert_lora"),
        "target_parameters": acfg.get("target_parameters"), "rank_pattern": acfg.get("rank_pattern"),
    }


# ---------------------------------------------------------------------------------------------
# orchestration


def run_tag(args) -> str:
    ckpt = "" if args.checkpointing == "offload" else f"-ckpt{args.checkpointing}"
    moe = f"-moe_{os.environ['UNSLOTH_MOE_BACKEND']}" if os.environ.get("UNSLOTH_MOE_BACKEND") else ""
    prof = "-prof" if getattr(args, "profile", 0) else ""
    prof += "-memhist" if getattr(args, "memhist", 0) else ""
    prof += "-nowarmup" if getattr(args, "no_compile_warmup", 0) else ""
    prof += os.environ.get("LF_RUN_TAG_EXTRA", "")  # env=NAME=VALUE flags of the run
    return (f"{args.shape}-{args.layers or 'all'}-{args.backend}-{'q4' if args.q4 else 'bf16'}-{args.seq}"
            f"-b{args.batch}x{args.accum}{ckpt}{moe}{prof}")


def run_child(argv: list[str], log, timeout: int, script: str | Path = __file__, env: dict | None = None) -> dict:
    """`script` with `argv` as a fresh process (so peak memory and patch state do not leak), its
    output appended to `log`; its --result JSON, else the error (out of GPU memory, timeout, rc)."""
    res = Path(argv[argv.index("--result") + 1])
    res.unlink(missing_ok=True)
    t0 = time.time()
    sampler = DriverSampler().start()
    try:
        p = subprocess.run([sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout, env={**os.environ, **(env or {})})
        output, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout) or "", "timeout"
    sampled = sampler.stop()
    log.write(f"\n===== {' '.join(f'{k}={v}' for k, v in (env or {}).items())} {' '.join(argv)} rc={rc} "
              f"{time.time() - t0:.1f}s =====\n{output[-20000:]}\n")
    log.flush()
    if res.exists():
        out = json.loads(res.read_text())
    else:
        oom = "OutOfMemoryError" in output or "CUDA out of memory" in output
        out = {"error": "out of GPU memory" if oom else f"rc={rc}", "tail": output[-3000:]}
    if sampled is not None:  # the device's used memory over the child's life, seen from outside it
        out["sampled_driver_peak_gib"] = round(sampled / 2**30, 2)
    return out


class DriverSampler:
    """The GPU's used memory (NVML, device 0) sampled every 0.2 s in a thread of the parent, over a
    child's whole life: a peak no code in the child can reset, out-of-memory runs included."""

    def __init__(self, interval_s: float = 0.2):
        import threading

        self.interval_s, self.peak, self.read = interval_s, None, None
        self._stop, self._thread = threading.Event(), None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:
            pass

    def start(self):
        import threading

        if self.read is not None:
            self.peak = 0
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self.read()))
            self._stop.wait(self.interval_s)

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
        return self.peak


def parse_run(spec: str) -> dict:
    """shape[/layers]:backend:q4|bf16:seq[:batch x accum[:flag...]], e.g. 30b:unsloth:q4:8192 or
    30b/4:trl:bf16:2048:2x8 or 30b:unsloth:q4:8192:2x8:on. Flags: offload|on|off (train.gradient_checkpointing),
    profile (torch.profiler over the last step, see StepProfiler), moe=<UNSLOTH_MOE_BACKEND> (grouped_mm,
    unsloth_triton, native_torch: set in the child's environment)."""
    parts = spec.split(":")
    shape, _, layers = parts[0].partition("/")
    batch, accum = (parts[4].split("x") if len(parts) > 4 else ("2", "8"))
    run = {"shape": shape, "layers": int(layers) if layers else None, "backend": parts[1],
           "q4": parts[2] == "q4", "seq": int(parts[3]), "batch": int(batch), "accum": int(accum),
           "checkpointing": "offload", "profile": 0, "memhist": 0, "env": {}}
    for flag in parts[5:]:
        if flag in ("offload", "on", "off", "auto"):
            run["checkpointing"] = flag
        elif flag == "profile":
            run["profile"] = 1
        elif flag == "memhist":
            run["memhist"] = 1
        elif flag == "nowarmup":
            run["nowarmup"] = 1
        elif flag.startswith("env="):  # env=NAME=VALUE: any environment variable for the child
            name, _, value = flag[4:].partition("=")
            run["env"][name] = value
        elif flag.startswith("moe="):
            run["env"]["UNSLOTH_MOE_BACKEND"] = flag[4:]
        else:
            raise SystemExit(f"unknown flag {flag!r} in run spec {spec!r}")
    return run


def add_plan(r: dict) -> dict:
    """The run's VRAM plan by today's loraforge.vram (the one recorded at run time, planned_gib,
    may come from an earlier fit)."""
    if "peak_gib" not in r:
        return r
    from loraforge.vram import estimate

    full = SHAPES[r["shape"]]["num_hidden_layers"]
    cfg = shape_config(r["shape"], None if r["layers"] == full else r["layers"], VOCAB).to_dict()
    lora, tp = settings_for(SETTINGS_KEY[r["shape"]])
    tp.update(load_in_4bit=r["load_in_4bit"], max_seq_length=r["seq"], per_device_batch_size=r["batch"],
              gradient_checkpointing=r.get("checkpointing", "offload"))
    return {**r, "planned_gib": round(estimate(cfg, lora, tp, r["backend"]).total_gib, 2)}


def gib(x) -> str:
    return "-" if x is None else f"{x:.1f}"


CHECKPOINTING_LABEL = {"on": " ckpt on GPU", "off": " no ckpt"}


def table(rows: list[dict]) -> str:
    head = ("| run | backend | 4-bit | seq | batch | s/step | tokens/s | MFU | peak GiB (torch, whole run) | steady GiB | "
            "driver peak GiB | step 1 / later (driver) | sampled outside | plan GiB | plan err (driver) | losses |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            err = "out of GPU memory" if "out of memory" in r["error"] else r["error"][:40]
            lines.append(f"| {r.get('tag', '?')} | {r.get('backend', '')} | | | | {err} | | | | | | | "
                         f"{gib(r.get('sampled_driver_peak_gib'))} | | | |")
            continue
        if "s_per_step" not in r:
            continue
        plan = r.get("planned_gib")
        truth = r.get("peak_gpu_driver_gib") or r.get("peak_gib")
        err = f"{(plan - truth) / truth:+.0%}" if plan and truth else ""
        lines.append(
            f"| {r['shape']}-{r['layers']}L | {r['backend']} | {r['load_in_4bit']} | {r['seq']} | {r['batch']}x{r['accum']}"
            f"{CHECKPOINTING_LABEL.get(r.get('checkpointing'), '')}"
            f"{' moe ' + r['env']['UNSLOTH_MOE_BACKEND'] if r.get('env', {}).get('UNSLOTH_MOE_BACKEND') else ''}"
            f"{' (+1 profiled step)' if r.get('profiled') else ''} | "
            f"{r['s_per_step']:.2f} | {r['tokens_per_s']:,} | {r['mfu']:.1%} | {gib(r['peak_gib'])} | "
            f"{gib(r['steady_peak_gib'])} | {gib(r.get('peak_gpu_driver_gib'))} | "
            f"{gib(r.get('peak_gpu_driver_step1_gib'))} / {gib(r.get('peak_gpu_driver_after_step1_gib'))} | "
            f"{gib(r.get('sampled_driver_peak_gib'))} | {gib(plan)} | {err} | {' '.join(f'{x:.3f}' for x in r['losses'][:6])} |")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """The kernel-time breakdown of the profiled runs: one column per run, one line per category."""
    prof = [r for r in rows if isinstance(r.get("profile"), dict) and "categories" in r["profile"]]
    if not prof:
        return ""
    names = [f"{r['shape']}-{r['layers']}L {r['backend']} {'q4' if r['load_in_4bit'] else 'bf16'} {r['seq']} "
             f"{r['batch']}x{r['accum']}{CHECKPOINTING_LABEL.get(r.get('checkpointing'), '')}" for r in prof]
    # categories as stored, with the top kernels moved where the current rules (kernel_category) put
    # them: profiles written before a rule changed are corrected for their top kernels
    per_run, moved = [], []
    for r in prof:
        cats = {c["category"]: c["ms"] for c in r["profile"]["categories"]}
        m = 0.0
        for k in r["profile"].get("top_kernels", []):
            new = kernel_category(k["name"])
            if new != k["category"]:
                cats[k["category"]] = cats.get(k["category"], 0) - k["ms"]
                cats[new] = cats.get(new, 0) + k["ms"]
                m += k["ms"]
        per_run.append(cats)
        moved.append(m)
    order = sorted({c for cats in per_run for c in cats}, key=lambda c: -max(cats.get(c, 0) for cats in per_run))
    lines = ["| kernel category (ms, % of the profiled step) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(prof)]
    for cat in order:
        cells = []
        for r, cats in zip(prof, per_run):
            ms = cats.get(cat)
            cells.append(f"{ms:,.0f} ({100 * ms / (1e3 * r['profile']['wall_s']):.1f}%)" if ms is not None else "-")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    for label, fmt in (("all kernels (sum)", lambda p: f"{p['kernel_ms']:,.0f} ({p['kernel_sum_over_wall']:.1%})"),
                       ("GPU busy (union of kernel intervals)", lambda p: f"{p['gpu_busy_ms']:,.0f} ({p['gpu_busy_fraction']:.1%})"),
                       ("profiled step wall (ms)", lambda p: f"{1e3 * p['wall_s']:,.0f}"),
                       ("kernel launches", lambda p: f"{p['kernel_launches']:,}")):
        lines.append(f"| {label} | " + " | ".join(fmt(r["profile"]) for r in prof) + " |")
    if any(moved):
        lines.append(f"| (top kernels re-categorised by the current rules, ms) | "
                     + " | ".join(f"{m:,.0f}" for m in moved) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--work", default="/tmp/gpu_backends")
    ap.add_argument("--models", default="/dev/shm/lf-models")
    ap.add_argument("--runs", default="", help="comma-separated run specs (see parse_run)")
    ap.add_argument("--merge-check", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--timeout", type=int, default=580)
    ap.add_argument("--cpu-smoke", action="store_true")
    # child-only
    ap.add_argument("--child")
    ap.add_argument("--result")
    ap.add_argument("--shape")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--backend")
    ap.add_argument("--q4", type=int, default=0)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--checkpointing", default="offload", choices=["offload", "on", "off", "auto"])
    ap.add_argument("--probe", type=int, default=0)
    ap.add_argument("--profile", type=int, nargs="?", const=1, default=0,
                    help="torch.profiler over each train run's last step (also the run flag `profile`)")
    ap.add_argument("--no-compile-warmup", type=int, default=0, help="(also the run flag `nowarmup`)")
    ap.add_argument("--memhist", type=int, default=0,
                    help="memory history over step 1, grouped at its peak (also the run flag `memhist`)")
    ap.add_argument("--report", metavar="JSONL", help="only print the table of an earlier run's results")
    args = ap.parse_args()

    if args.report:
        rows = [add_plan(json.loads(line)) for line in Path(args.report).read_text().splitlines()
                if line.strip() and "merge_check" not in line]
        print(table(rows))
        pt = profile_table(rows)
        if pt:
            print("\n" + pt)
        return
    if args.child:
        try:
            out = {"build": child_build, "train": child_train, "merge": child_merge_check}[args.child](args)
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:],
                   "tag": run_tag(args) if args.backend else args.shape}
        Path(args.result).write_text(json.dumps(out, indent=1, default=str))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results_file, log = out / "gpu_backends.jsonl", open(out / "gpu_backends.log", "a")
    res = str(Path(args.work) / "result.json")
    common = ["--work", args.work, "--models", args.models, "--vocab", str(args.vocab), "--result", res]
    if args.cpu_smoke:
        common.append("--cpu-smoke")
    runs = [parse_run(r) for r in args.runs.split(",") if r]
    if args.merge_check:
        runs.insert(0, {"shape": "30b", "layers": 4, "backend": "unsloth", "q4": False, "seq": 2048, "batch": 2,
                        "accum": 4, "probe": 1, "checkpointing": "offload", "profile": 0, "memhist": 0, "env": {}})
    rows, built = [], set()
    for run in runs:
        key = (run["shape"], run["layers"])
        layers = ["--layers", str(run["layers"])] if run["layers"] else []
        if key not in built:
            r = run_child(["--child", "build", "--shape", run["shape"], *layers, *common], log, args.timeout)
            print("build", json.dumps(r), flush=True)
            built.add(key)
            if "error" in r:
                continue
        argv = ["--child", "train", "--shape", run["shape"], *layers, "--backend", run["backend"],
                "--q4", str(int(run["q4"])), "--seq", str(run["seq"]), "--batch", str(run["batch"]),
                "--accum", str(run["accum"]), "--checkpointing", run["checkpointing"], "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--probe", str(run.get("probe", 0)), "--profile", str(int(run["profile"] or args.profile)),
                "--memhist", str(int(run["memhist"] or args.memhist)),
                "--no-compile-warmup", str(int(run.get("nowarmup", 0))), *common]
        extra = "".join(f"-{k}={v}" for k, v in run["env"].items() if k != "UNSLOTH_MOE_BACKEND")
        r = run_child(argv, log, args.timeout, env={**run["env"], "LF_RUN_TAG_EXTRA": extra})
        if "tag" not in r:
            r["tag"] = str(run)
        if r.get("env") is None and run["env"]:
            r["env"] = run["env"]
        rows.append(r)
        prof = r.get("profile")
        if isinstance(prof, dict) and prof.get("table_file") and Path(prof["table_file"]).exists():
            shutil.copy2(prof["table_file"], out / f"profile-{r['tag']}.txt")  # small text: comes back with OUT
        print("train", json.dumps({k: v for k, v in r.items() if k not in ("plan", "traceback", "profile", "memhist")}),
              flush=True)
        mh = Path(args.work) / r.get("tag", "?") / "memhist.txt"
        if mh.exists():
            shutil.copy2(mh, out / f"memhist-{r['tag']}.txt")
        if isinstance(prof, dict):
            print("profile", json.dumps({k: v for k, v in prof.items() if k not in ("top_kernels", "top_cpu_ops")}),
                  flush=True)
        with open(results_file, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        if run.get("probe") and "error" not in r:
            m = run_child([a if a != "train" else "merge" for a in argv], log, args.timeout, env=run["env"])
            print("merge", json.dumps(m), flush=True)
            with open(results_file, "a") as f:
                f.write(json.dumps({"merge_check": m}, default=str) + "\n")
        (out / "gpu_backends.md").write_text(table(rows) + "\n\n" + profile_table(rows) + "\n")
    print(table(rows))
    print(profile_table(rows))


if __name__ == "__main__":
    main()
