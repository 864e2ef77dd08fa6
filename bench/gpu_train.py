"""GPU check and benchmark of loraforge.train.train: QLoRA (bitsandbytes NF4) and bf16 LoRA,
for a dense Qwen3 and a Qwen3-MoE, built from configs with random weights.

Runs on the H200 device machine (which has no hub access): builds the two models with the
tokenizer of results/tiny/base (vocab = len(tokenizer)), saves them as bf16 checkpoints, then
calls `loraforge.train.train(...)` exactly as scripts/train_adapter.py does, with the lora/train
settings of loraforge.config.model_settings (the article's r=16, alpha=32, dropout 0, q/k/v/o/
gate/up/down; batch 2 x accumulation 8, lr 2e-5, cosine, warmup 0.03, packing, seed 3407), at
max_seq_length 2048 and a few optimizer steps, for load_in_4bit True and False. Every run is a
fresh subprocess, so peak memory and CUDA state do not leak between runs. Afterwards each adapter
is loaded with PEFT onto the bf16 base to check that every saved tensor loads and the logits move.

Per run: s/step after the warm-up steps (CUDA-synchronised step timestamps from a callback added
to transformers' DEFAULT_CALLBACKS, so train() itself is untouched), peak GPU memory
(max_memory_allocated), memory at train begin, first/final loss, adapter size, the dtypes of the
model's parameters, the number of bnb Linear4bit layers, and for the MoE the expert LoRA keys.

    # on the device machine, bundle unpacked on PYTHONPATH:
    python3 bench/gpu_train.py --out $OUT
    # the proposed load_model fix (MoE experts back to bf16 after prepare_model_for_kbit_training):
    python3 bench/gpu_train.py --out $OUT --steps 8 --runs dense-lora,moe-qlora,moe-qlorafix
    # on CPU, a tiny end-to-end smoke test of the same logic (fp32, a few steps):
    .venv/bin/python bench/gpu_train.py --cpu-smoke --out /tmp/gpu_train_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "results/tiny/base"
DATA_DIR = ROOT / "results/tiny/data"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"]

# Real shapes: the dense one is Qwen3-0.6B's body (28 layers, hidden 1024, 16 heads x 128, 8 kv
# heads, intermediate 3072); the MoE keeps that attention and has 64 experts of 384, top-8.
ARCHS = {
    "dense": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "moe": dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384,
                num_experts=64, num_experts_per_tok=8, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, decoder_sparse_step=1, norm_topk_prob=True),
}
SMOKE_ARCHS = {
    "dense": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    "moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, decoder_sparse_step=1, norm_topk_prob=True),
}
# The config.yaml model whose settings each bench model takes (the article's r=16/alpha=32 ones).
SETTINGS_KEY = {"dense": "8b", "moe": "30b"}


# ---------------------------------------------------------------------------------------------
# settings


def settings_for(kind: str) -> tuple[dict, dict, str]:
    """(lora, train) of config.yaml's model SETTINGS_KEY[kind] via loraforge.config.model_settings;
    where jsonschema is missing (the GPU image), the same overlay of defaults read with yaml."""
    key = SETTINGS_KEY[kind]
    try:
        from loraforge import config as lfconfig

        s = lfconfig.model_settings(lfconfig.load(ROOT / "config.yaml"), key)
        return dict(s["lora"]), dict(s["train"]), "loraforge.config.model_settings"
    except ImportError as e:  # jsonschema is not on the GPU image
        import yaml

        cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
        model = cfg["models"][key]
        lora = {**cfg["defaults"]["lora"], **model.get("lora", {})}
        train = {**cfg["defaults"]["train"], **model.get("train", {})}
        return lora, train, f"config.yaml defaults+models.{key} via yaml (loraforge.config unavailable: {e})"


# ---------------------------------------------------------------------------------------------
# children (each runs in its own process)


def child_build(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.base import EOS_TOKEN, PAD_TOKEN
    from loraforge.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    archs = SMOKE_ARCHS if args.cpu_smoke else ARCHS
    device = "cpu" if args.cpu_smoke else "cuda"
    out = {}
    for kind, spec in archs.items():
        spec = dict(spec)
        mt = spec.pop("model_type")
        cfg = AutoConfig.for_model(
            mt, vocab_size=len(tok), max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
            tie_word_embeddings=False, eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN),
            pad_token_id=tok.convert_tokens_to_ids(PAD_TOKEN), bos_token_id=None, **spec)
        torch.manual_seed(0)
        t0 = time.time()
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        d = Path(args.work) / kind / "base"
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d)
        for f in TOKENIZER_FILES:  # the base tokenizer's files, unchanged (as for a real fine-tune)
            if (TOKENIZER_DIR / f).exists():
                shutil.copy2(TOKENIZER_DIR / f, d / f)
        out[kind] = {"params": n, "seconds": round(time.time() - t0, 1), "dir": str(d),
                     "disk_bytes": sum(p.stat().st_size for p in d.iterdir()),
                     "experts_implementation": getattr(cfg, "_experts_implementation", None)}
        del model
    return out


class StepTimer:
    """Trainer callback: CUDA-synchronised timestamps per optimizer step + model facts at train begin."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, targs, state, control, model=None, **kw):
                timer.begin(model)

            def on_step_end(self, targs, state, control, **kw):
                timer.step()

            def on_train_end(self, targs, state, control, **kw):
                timer.stop()

            def on_log(self, targs, state, control, logs=None, **kw):
                if logs and "num_tokens" in logs and "loss" in logs:
                    timer.num_tokens.append((state.global_step, logs["num_tokens"]))
                timer.log_keys.update(logs or {})

        self.callback = _CB()
        self.times: list[float] = []
        self.facts: dict = {}
        self.num_tokens: list[tuple[int, float]] = []
        self.util: list[int] = []
        self.warmup_steps = 2
        import threading

        self._stop = threading.Event()
        self.log_keys: set[str] = set()

    def tokens_per_step(self):
        """Mean training tokens per optimizer step, from TRL's cumulative `num_tokens` log."""
        pts = sorted(dict(self.num_tokens).items())
        if len(pts) < 2:
            return None
        (s0, n0), (s1, n1) = pts[0], pts[-1]
        return round((n1 - n0) / (s1 - s0)) if s1 > s0 else None

    def _sync(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def begin(self, model):
        import torch

        self._sync()
        self.times = [time.perf_counter()]
        by_dtype: dict[str, int] = {}
        trainable_dtype: dict[str, int] = {}
        for name, p in model.named_parameters():
            k = f"{type(p).__name__}:{p.dtype}".replace("torch.", "")
            by_dtype[k] = by_dtype.get(k, 0) + p.numel()
            if p.requires_grad:
                t = str(p.dtype).replace("torch.", "")
                trainable_dtype[t] = trainable_dtype.get(t, 0) + p.numel()
        experts = {n: f"{str(p.dtype).replace('torch.', '')}{list(p.shape)}"
                   for n, p in model.named_parameters() if ".experts." in n and "lora" not in n}
        n4 = 0
        try:
            import bitsandbytes as bnb

            n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        except ImportError:
            pass
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.facts = {
            "linear4bit_layers": n4,
            "params_by_type_dtype": by_dtype,
            "trainable_by_dtype": trainable_dtype,
            "expert_params_layer0": {n: v for n, v in experts.items() if ".layers.0." in n},
            "gradient_checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
            "fused_lm_head_patched": getattr(getattr(getattr(vars(base).get("forward"), "__func__", None), "__code__", None),
                                             "co_name", "") == "_fused_forward",
            "mem_at_train_begin_gib": round(torch.cuda.memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
            "experts_implementation": getattr(base.config, "_experts_implementation", None),
            "attn_implementation": getattr(base.config, "_attn_implementation", None),
        }

    def step(self):
        self._sync()
        self.times.append(time.perf_counter())
        if len(self.times) - 1 == self.warmup_steps:
            self._start_util_sampler()

    def _start_util_sampler(self):
        """Polls NVML's GPU utilisation (share of time a kernel ran) every 0.1 s during the steady steps."""
        import threading

        import torch

        if not torch.cuda.is_available():
            return

        def poll():
            while not self._stop.is_set():
                try:
                    self.util.append(torch.cuda.utilization())
                except Exception:
                    return
                self._stop.wait(0.1)

        threading.Thread(target=poll, daemon=True).start()

    def stop(self):
        self._stop.set()


def child_train(args) -> dict:
    import torch
    import transformers.trainer as ttrainer

    import loraforge.train as lftrain

    kind, q4 = args.model, bool(args.q4)
    if args.fix:
        # The fix proposed for loraforge/train.py load_model: prepare_model_for_kbit_training
        # upcasts every non-4-bit parameter to fp32, and bitsandbytes leaves the fused MoE experts
        # (3-D parameters) unquantized, so they end up fp32 (2x their bf16 size, and off the bf16
        # grouped_mm path). Cast them back to bf16 after the preparation.
        import torch

        orig_load_model = lftrain.load_model

        def load_model(base_dir, load_in_4bit, **kwargs):
            model = orig_load_model(base_dir, load_in_4bit, **kwargs)
            if load_in_4bit and torch.cuda.is_available():
                for p in model.parameters():
                    if p.ndim >= 3 and p.dtype == torch.float32:
                        p.data = p.data.to(torch.bfloat16)
            return model

        lftrain.load_model = load_model
    lora, train_params, source = settings_for(kind)
    train_params.update(load_in_4bit=q4, max_steps=args.steps, max_seq_length=args.max_seq_length)
    if args.cpu_smoke:
        train_params.update(gradient_accumulation_steps=2)
    base_dir = Path(args.work) / kind / "base"
    tag = f"{kind}-{'qlora' if q4 else 'lora'}{'fix' if args.fix else ''}"
    adapter_dir = Path(args.work) / tag / "adapter"
    out_dir = Path(args.work) / tag / "train"

    timer = StepTimer()
    timer.warmup_steps = args.warmup_steps
    ttrainer.DEFAULT_CALLBACKS.append(timer.callback)  # observe only; train() is called unchanged
    trainer_cls = lftrain._trainer_class()
    t0 = time.time()
    # exactly as scripts/train_adapter.py calls it
    metrics = lftrain.train(
        str(base_dir), str(DATA_DIR / "train.jsonl"), str(DATA_DIR / "validation.jsonl"),
        adapter_dir=str(adapter_dir), out_dir=str(out_dir), lora=dict(lora), train_params=dict(train_params))
    wall = time.time() - t0
    # the run's own peaks, step 1 included (train()'s RunPeak: no reset hides them; NVML for the driver)
    peak = metrics.get("peak_gpu_memory_gib")

    dts = [b - a for a, b in zip(timer.times, timer.times[1:])]
    warm = min(args.warmup_steps, max(len(dts) - 1, 0))
    steady = dts[warm:]
    files = {p.name: p.stat().st_size for p in adapter_dir.iterdir()}
    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        keys = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        b_norm = {k: float(f.get_tensor(k).float().norm()) for k in keys if "lora_B" in k}
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    loss_rows = (out_dir / "loss.csv").read_text().splitlines()
    return {
        "tag": tag, "model": kind, "load_in_4bit": q4, "settings_source": source, "lora": lora,
        "train": train_params, "trainer_class": f"{trainer_cls.__module__}.{trainer_cls.__qualname__}",
        "metrics": metrics, "wall_s": round(wall, 1), "step_times_s": [round(x, 3) for x in dts],
        "warmup_steps_excluded": warm,
        "s_per_step_steady": round(sum(steady) / len(steady), 3) if steady else None,
        "peak_gib": peak, "peak_gpu_driver_gib": metrics.get("peak_gpu_driver_gib"),
        "peak_gpu_driver_step1_gib": metrics.get("peak_gpu_driver_step1_gib"), **timer.facts,
        "adapter_files": files, "adapter_bytes": sum(files.values()),
        "adapter_keys_n": len(keys),
        "adapter_keys_layer0": {k: v for k, v in keys.items() if ".layers.0." in k},
        "expert_keys_n": sum(".experts." in k for k in keys),
        "lora_B_zero": sum(v == 0.0 for v in b_norm.values()), "lora_B_n": len(b_norm),
        "adapter_config": {k: acfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules",
                                                     "target_parameters", "rank_pattern", "alpha_pattern")},
        "loss_csv": loss_rows[:3] + (["..."] if len(loss_rows) > 4 else []) + loss_rows[-1:],
        "tokens_per_step": timer.tokens_per_step(),
        "gpu_util_pct": round(sum(timer.util) / len(timer.util), 1) if timer.util else None,
        "gpu_util_samples": len(timer.util),
        "train_log_keys": sorted(timer.log_keys),
    }


def child_sanity(args) -> dict:
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraforge.tokenizer import load_tokenizer

    device = "cpu" if args.cpu_smoke else "cuda"
    out = {}
    text = json.loads((DATA_DIR / "validation.jsonl").read_text().splitlines()[0])["messages"]
    for tag in args.tags.split(","):
        kind = tag.split("-")[0]
        base_dir = Path(args.work) / kind / "base"
        adapter_dir = Path(args.work) / tag / "adapter"
        if not (adapter_dir / "adapter_model.safetensors").exists():
            out[tag] = {"error": "no adapter"}
            continue
        try:
            tok = load_tokenizer(base_dir)
            ids = tok.apply_chat_template(text, tokenize=True, return_tensors="pt", return_dict=True)["input_ids"][:, :512]
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device).eval()
            with torch.no_grad():
                base_logits = model(ids.to(device)).logits.float()
            pm = PeftModel.from_pretrained(model, adapter_dir).eval()
            saved = load_file(adapter_dir / "adapter_model.safetensors")
            loaded = get_peft_model_state_dict(pm)
            missing = sorted(set(saved) - set(loaded))
            extra = sorted(set(loaded) - set(saved))
            mismatched = [k for k in saved if k in loaded and not torch.equal(saved[k].to(loaded[k].device, loaded[k].dtype), loaded[k])]
            with torch.no_grad():
                lora_logits = pm(ids.to(device)).logits.float()
                with pm.disable_adapter():
                    off_logits = pm(ids.to(device)).logits.float()
            diff = (lora_logits - base_logits)
            out[tag] = {
                "tokens": ids.shape[1],
                "keys_saved": len(saved), "keys_missing_after_load": missing[:5], "n_missing": len(missing),
                "keys_extra": extra[:5], "n_extra": len(extra), "n_value_mismatch": len(mismatched),
                "max_abs_logit_diff": float(diff.abs().max()),
                "rel_l2_logit_diff": float(diff.norm() / base_logits.norm()),
                "frac_logits_changed": float((diff != 0).float().mean()),
                "argmax_changed_frac": float((lora_logits.argmax(-1) != base_logits.argmax(-1)).float().mean()),
                "disabled_equals_base": bool(torch.equal(off_logits, base_logits)),
            }
            del model, pm
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # report, go on with the next adapter
            out[tag] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    return out


# ---------------------------------------------------------------------------------------------
# orchestration


def run_child(argv: list[str], log, timeout: int) -> dict:
    """This script as a child (a fresh process per run), with gpu_backends' result handling."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_backends import run_child as run_script

    return run_script(argv, log, timeout, script=__file__)


def gib(x):
    return "-" if x is None else f"{x:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models, fp32 on CPU, a few steps")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"), help="report folder (gpu_train.txt, .json, .log)")
    ap.add_argument("--work", default=None, help="scratch folder for models and adapters (default /tmp/gpu_train_bench)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 10; smoke 3)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps left out of s/step")
    ap.add_argument("--max-seq-length", type=int, default=None, help="default 2048 (smoke 256)")
    ap.add_argument("--runs", default="dense-qlora,dense-lora,moe-lora,moe-qlora",
                    help="comma-separated MODEL-MODE, MODE lora|qlora|qlorafix (qlora + the proposed "
                         "train.py fix: fused MoE experts cast back to bf16 after prepare_model_for_kbit_training)")
    ap.add_argument("--child-timeout", type=int, default=150)
    # child mode
    ap.add_argument("--child", choices=["build", "train", "sanity"])
    ap.add_argument("--model")
    ap.add_argument("--q4", type=int)
    ap.add_argument("--fix", type=int, default=0)
    ap.add_argument("--tags")
    ap.add_argument("--result")
    args = ap.parse_args()
    args.steps = args.steps or (3 if args.cpu_smoke else 10)
    args.max_seq_length = args.max_seq_length or (256 if args.cpu_smoke else 2048)
    args.work = args.work or ("/tmp/gpu_train_smoke_work" if args.cpu_smoke else "/tmp/gpu_train_bench")

    if args.child:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        fn = {"build": child_build, "train": child_train, "sanity": child_sanity}[args.child]
        try:
            res = fn(args)
        except Exception as e:
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        Path(args.result).write_text(json.dumps(res, indent=1, default=str))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_train.log", "w")
    common = ["--work", args.work, "--steps", str(args.steps), "--max-seq-length", str(args.max_seq_length),
              "--warmup-steps", str(args.warmup_steps)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    res_dir = Path(args.work) / "results"
    res_dir.mkdir(exist_ok=True)
    lines: list[str] = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    import platform

    env = {}
    try:
        import torch

        env["torch"] = torch.__version__
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    for mod in ("transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:
            env[mod] = f"missing ({type(e).__name__})"
    say(f"# loraforge.train GPU check  ({time.strftime('%Y-%m-%d %H:%M:%S')}, python {platform.python_version()})")
    say(", ".join(f"{k} {v}" for k, v in env.items()))

    t0 = time.time()
    built = run_child(["--child", "build", "--result", str(res_dir / "build.json"), *common], log, args.child_timeout)
    say(f"\nbuilt in {time.time() - t0:.0f}s: " + json.dumps(built))
    results = []
    for tag in args.runs.split(","):
        kind, mode = tag.split("-")
        t0 = time.time()
        r = run_child(["--child", "train", "--model", kind, "--q4", str(int(mode.startswith("qlora"))),
                       "--fix", str(int(mode.endswith("fix"))),
                       "--result", str(res_dir / f"{tag}.json"), *common], log, args.child_timeout)
        r.setdefault("tag", tag)
        say(f"{tag}: {'FAILED ' + r['error'] if 'error' in r else 'ok'} ({time.time() - t0:.0f}s incl. process start)")
        results.append(r)
    ok_tags = [r["tag"] for r in results if "error" not in r]
    sanity = run_child(["--child", "sanity", "--tags", ",".join(ok_tags) or "none",
                        "--result", str(res_dir / "sanity.json"), *common], log, args.child_timeout) if ok_tags else {}

    # ---- report
    first_ok = next((r for r in results if "error" not in r), None)
    if first_ok:
        say(f"\nsettings ({first_ok['settings_source']}): lora {json.dumps(first_ok['lora'])}")
        say(f"train {json.dumps(first_ok['train'])}; trainer class on this machine: {first_ok['trainer_class']}")
    say(f"\nmodels: " + ", ".join(f"{k} {v['params'] / 1e9:.3f}B params ({v['disk_bytes'] / 2**30:.2f} GiB bf16)"
                                  for k, v in built.items() if isinstance(v, dict)))
    say("")
    say("| run | 4-bit | Linear4bit layers | s/step (steady) | step 1 s | tokens/step | peak GiB | GiB at train begin | "
        "first loss | final loss | eval loss | adapter MiB | trainable | expert LoRA keys | GPU util % (steady) |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            say(f"| {r['tag']} | FAILED: {r['error'][:150]} |")
            continue
        m = r["metrics"]
        tokens = "-"
        say(f"| {r['tag']} | {r['load_in_4bit']} | {r['linear4bit_layers']} | {r['s_per_step_steady']} "
            f"(steps {r['warmup_steps_excluded'] + 1}-{len(r['step_times_s'])}) | {r['step_times_s'][0] if r['step_times_s'] else '-'} | "
            f"{r.get('tokens_per_step', tokens)} | {gib(r['peak_gib'])} | {gib(r['mem_at_train_begin_gib'])} | "
            f"{m['first_loss']:.4f} | {m['final_loss']:.4f} | {m['eval_loss'] if m['eval_loss'] is None else round(m['eval_loss'], 4)} | "
            f"{r['adapter_bytes'] / 2**20:.1f} | {m['trainable_parameters']:,} | {r['expert_keys_n']} | {r.get('gpu_util_pct')} |")
    say("\n(s/step: CUDA-synchronised optimizer-step times after the first warm-up steps; metrics.json's own "
        "seconds_per_step, which includes warm-up and the trainer's start, is in the details.)")

    say("\n## details per run")
    for r in results:
        say(f"\n### {r['tag']}")
        if "error" in r:
            say(f"ERROR {r['error']}\n{r.get('traceback') or r.get('tail', '')}")
            continue
        m = r["metrics"]
        say(f"metrics.json: steps {m['steps']}, seconds {m['seconds']}, seconds_per_step {m['seconds_per_step']}, "
            f"verdict {m['verdict']}, device {m['device']}, total params {m['total_parameters']:,}")
        say(f"step times s: {r['step_times_s']}")
        say(f"params by type:dtype at train begin: {r['params_by_type_dtype']}")
        say(f"trainable by dtype: {r['trainable_by_dtype']}; gradient checkpointing {r['gradient_checkpointing']}; "
            f"fused LM head patched {r['fused_lm_head_patched']}; attn {r['attn_implementation']}; "
            f"experts impl {r['experts_implementation']}")
        if r["expert_params_layer0"]:
            say(f"expert params (layer 0) during training: {r['expert_params_layer0']}")
        say(f"adapter files: {r['adapter_files']}")
        say(f"adapter config: {json.dumps(r['adapter_config'])}")
        say(f"adapter keys: {r['adapter_keys_n']} ({r['expert_keys_n']} expert); lora_B all-zero tensors: "
            f"{r['lora_B_zero']}/{r['lora_B_n']}")
        say("layer-0 keys: " + "; ".join(f"{k.split('layers.0.')[1]} {v}" for k, v in r["adapter_keys_layer0"].items()))
        say("loss.csv: " + " | ".join(r["loss_csv"]))

    say("\n## PEFT load on the bf16 base (sanity)")
    say("| adapter | tokens | keys saved | missing | extra | value mismatch | max abs logit diff | rel L2 diff | "
        "logits changed | argmax changed | adapter disabled == base |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    for tag, s in (sanity or {}).items():
        if "error" in s:
            say(f"| {tag} | ERROR {s['error'][:200]} |")
            continue
        say(f"| {tag} | {s['tokens']} | {s['keys_saved']} | {s['n_missing']} | {s['n_extra']} | {s['n_value_mismatch']} | "
            f"{s['max_abs_logit_diff']:.4g} | {s['rel_l2_logit_diff']:.3g} | {s['frac_logits_changed']:.3f} | "
            f"{s['argmax_changed_frac']:.3f} | {s['disabled_equals_base']} |")
    for tag, s in (sanity or {}).items():
        if "traceback" in s:
            say(f"\n{tag} traceback:\n{s['traceback']}")

    (out / "gpu_train.txt").write_text("\n".join(lines) + "\n")
    (out / "gpu_train.json").write_text(json.dumps({"env": env, "built": built, "runs": results, "sanity": sanity},
                                                   indent=1, default=str))
    log.close()


if __name__ == "__main__":
    main()
