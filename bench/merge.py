"""Benchmark: loraforge's streaming merge against PEFT's merge_and_unload and a plain copy.

Generates a random ~1.1 GB bf16 Qwen3-MoE checkpoint (per-expert 2-D tensors, several shards,
written tensor by tensor with safetensors, never built as a torch model) and two random
PEFT-layout adapters: one on q/k/v/o and the experts ("all"), one on q/k/v/o only ("attention";
every shard still holds attention weights, so every shard is rewritten, the experts as raw
copies). Then runs, each in a fresh subprocess, in interleaved rounds:

    ours         loraforge.merge.merge(base, adapter, out)                   (mode link)
    peft         from_pretrained -> PeftModel.from_pretrained -> merge_and_unload -> save_pretrained
    copy         shutil.copyfile of every shard: no compute, and not durable (the data may still
                 be only in the page cache when it returns)
    copy+fsync   the same, plus fsync of every file and of the folder: as durable as our merge,
                 which fsyncs every shard it writes before recording it. This is the disk's real
                 bound for an output that must survive a crash.

and prints wall time (median of --repeat interleaved rounds) and peak RSS (the child's ru_maxrss)
with the ratios against the goals. Every contender starts with the base in the page cache and
no dirty pages pending (`sync` before each). The machine may be shared: compare medians.
The script itself imports no torch: a child's ru_maxrss starts at its parent's RSS (vfork+exec
carries the high-water mark over), so generating and comparing run in children too.

    .venv/bin/python bench/merge.py [--out-dir /tmp/loraforge-bench-merge] [--size-gb 1.1] [--repeat 3]
                                    [--targets both|all|attention] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HIDDEN, MOE_INTERMEDIATE, EXPERTS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 512, 32, 16, 4, 64, 32000
RANK = 16
SHARD_BYTES = 300 * 2**20

# Each child prints one JSON line: the seconds its work took, imports excluded.
CHILDREN = {
    "ours": """
        import json, sys, time
        from loraforge.merge import merge
        start = time.perf_counter()
        merge(sys.argv[1], sys.argv[2], sys.argv[3], mode="link", progress=False)
        print(json.dumps(time.perf_counter() - start))
    """,
    "peft": """
        import json, sys, time
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
        model.save_pretrained(sys.argv[3])
        print(json.dumps(time.perf_counter() - start))
    """,
    "copy": """
        import json, os, shutil, sys, time
        start = time.perf_counter()
        os.makedirs(sys.argv[3])
        for name in sorted(os.listdir(sys.argv[1])):
            if name.endswith(".safetensors"):
                shutil.copyfile(os.path.join(sys.argv[1], name), os.path.join(sys.argv[3], name))
        print(json.dumps(time.perf_counter() - start))
    """,
    "copy+fsync": """
        import json, os, shutil, sys, time
        start = time.perf_counter()
        os.makedirs(sys.argv[3])
        for name in sorted(os.listdir(sys.argv[1])):
            if name.endswith(".safetensors"):
                shutil.copyfile(os.path.join(sys.argv[1], name), os.path.join(sys.argv[3], name))
                with open(os.path.join(sys.argv[3], name), "rb+") as f:
                    os.fsync(f.fileno())
        folder = os.open(sys.argv[3], os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(folder)
        os.close(folder)
        print(json.dumps(time.perf_counter() - start))
    """,
}


def layer_tensors(layer: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{layer}"
    names = [
        (f"{p}.input_layernorm.weight", (HIDDEN,)),
        (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
        (f"{p}.self_attn.q_norm.weight", (HEAD_DIM,)),
        (f"{p}.self_attn.k_norm.weight", (HEAD_DIM,)),
        (f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN)),
    ]
    for e in range(EXPERTS):
        names += [
            (f"{p}.mlp.experts.{e}.gate_proj.weight", (MOE_INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.experts.{e}.up_proj.weight", (MOE_INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.experts.{e}.down_proj.weight", (HIDDEN, MOE_INTERMEDIATE)),
        ]
    return names


def model_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(layers):
        names += layer_tensors(layer)
    return names + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def nbytes(shape: tuple[int, ...]) -> int:
    n = 2  # bf16
    for d in shape:
        n *= d
    return n


def layers_for(size_bytes: float) -> int:
    fixed = sum(nbytes(s) for _, s in model_tensors(0))
    per_layer = sum(nbytes(s) for _, s in layer_tensors(0))
    return max(1, round((size_bytes - fixed) / per_layer))


def write_base(path: str, layers: int, generator) -> None:
    from transformers import Qwen3MoeConfig

    os.makedirs(path)
    Qwen3MoeConfig(
        hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, moe_intermediate_size=MOE_INTERMEDIATE,
        num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        vocab_size=VOCAB, num_experts=EXPERTS, num_experts_per_tok=4, tie_word_embeddings=False, dtype="bfloat16",
    ).save_pretrained(path)  # fmt: skip
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in model_tensors(layers):
        if size + nbytes(shape) > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    from loraforge.synthetic import write_random_shards

    write_random_shards(path, shards, generator)


def write_adapter(path: str, layers: int, generator, experts: bool = True) -> None:
    """The files PEFT's get_peft_model + save_pretrained would write for this model with
    target_modules q/k/v/o/gate/up/down (gate/up/down become ParamWrapper target_parameters;
    gate_up gets r and alpha doubled; gate_up is the inner wrapper, down_proj the outer), or
    with q/k/v/o only (experts=False)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    os.makedirs(path)
    expert_settings = dict(
        target_parameters=["gate_up_proj", "down_proj"],
        rank_pattern={r".*\.gate_up_proj": 2 * RANK}, alpha_pattern={r".*\.gate_up_proj": 4 * RANK},
    )  # fmt: skip
    LoraConfig(
        r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **(expert_settings if experts else {}),
    ).save_pretrained(path)  # fmt: skip

    def factors(key: str, r: int, in_features: int, out_features: int) -> dict:
        return {
            f"base_model.model.{key}.lora_A.weight": torch.randn(r, in_features, generator=generator) * 0.02,
            f"base_model.model.{key}.lora_B.weight": torch.randn(out_features, r, generator=generator) * 0.02,
        }

    tensors = {}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        tensors |= factors(f"{p}.self_attn.q_proj", RANK, HIDDEN, HEADS * HEAD_DIM)
        tensors |= factors(f"{p}.self_attn.k_proj", RANK, HIDDEN, KV_HEADS * HEAD_DIM)
        tensors |= factors(f"{p}.self_attn.v_proj", RANK, HIDDEN, KV_HEADS * HEAD_DIM)
        tensors |= factors(f"{p}.self_attn.o_proj", RANK, HEADS * HEAD_DIM, HIDDEN)
        if experts:
            tensors |= factors(f"{p}.mlp.experts.base_layer", EXPERTS * 2 * RANK, HIDDEN, 2 * MOE_INTERMEDIATE)
            tensors |= factors(f"{p}.mlp.experts", EXPERTS * RANK, MOE_INTERMEDIATE, HIDDEN)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def run_child(name: str, base: str, adapter: str, out: str) -> dict[str, float]:
    """Run one contender in a fresh interpreter; its own timing and its peak RSS (wait4)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["sync"], check=True)  # start each contender with no dirty pages pending
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CHILDREN[name]), base, adapter, out],
            cwd=repo, stdout=stdout, stderr=stderr, text=True,
        )  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"{name} failed ({child.returncode}):\n{stderr.read()[-4000:]}")
        work = json.loads(stdout.read().strip().splitlines()[-1])
    return {"work_s": work, "process_s": wall, "peak_rss": usage.ru_maxrss * 1024}


def compare_outputs(ours: str, peft: str) -> tuple[float, float]:
    """Max |ours - PEFT| over all tensors, and the fraction of elements that differ at all (PEFT
    rounds the delta to bf16 before adding it; we round once, so some elements differ by an ulp)."""
    from safetensors import safe_open

    def open_all(folder):
        names = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        files = [safe_open(os.path.join(folder, name), "pt") for name in names]
        return {key: f for f in files for key in f.keys()}

    ours_files, peft_files = open_all(ours), open_all(peft)
    assert ours_files.keys() == peft_files.keys()
    max_diff, differ, total = 0.0, 0, 0
    for key, f in ours_files.items():
        a, b = f.get_tensor(key).float(), peft_files[key].get_tensor(key).float()
        max_diff = max(max_diff, (a - b).abs().max().item())
        differ += (a != b).sum().item()
        total += a.numel()
    return max_diff, differ / total


TARGETS = {"all": "q/k/v/o + experts", "attention": "q/k/v/o only"}
# contenders that take an adapter run once per adapter; the copies do not depend on it
PER_ADAPTER = ("ours", "peft")
COPIES = ("copy", "copy+fsync")


def generate(out_dir: str, size_gb: float, targets: list[str]) -> None:
    import torch

    layers = layers_for(size_gb * 1e9)
    generator = torch.Generator().manual_seed(0)
    write_base(os.path.join(out_dir, "base"), layers, generator)
    for target in targets:
        write_adapter(os.path.join(out_dir, f"adapter-{target}"), layers, generator, experts=target == "all")
    print(json.dumps({"layers": layers}))


def run_helper(*args: str) -> str:
    """Run this script's --generate / --compare step in a child, so this process stays small."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-4000:])
    return result.stdout.strip().splitlines()[-1]


def goal_line(label: str, ratio: float, goal: float, note: str = "") -> str:
    verdict = "met" if ratio <= goal else "MISSED"
    return f"{label:>34}: {ratio:5.2f}x  (goal <= {goal}x: {verdict}){note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="/tmp/loraforge-bench-merge")
    parser.add_argument("--size-gb", type=float, default=1.1, help="base model size, bf16 (default 1.1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; medians are shown")
    parser.add_argument("--targets", choices=("both", *TARGETS), default="both",
                        help="adapter on q/k/v/o and the experts, on q/k/v/o only, or both cases (default)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)  # internal steps
    parser.add_argument("--compare", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    targets = list(TARGETS) if args.targets == "both" else [args.targets]
    base = os.path.join(args.out_dir, "base")
    if args.generate:
        return generate(args.out_dir, args.size_gb, targets)
    if args.compare:
        ours, peft = (os.path.join(args.out_dir, f"{name}-{args.compare}") for name in PER_ADAPTER)
        return print(json.dumps(compare_outputs(ours, peft)))

    # This process imports no torch: a child's ru_maxrss counts the parent's resident pages at fork.
    if os.path.exists(args.out_dir):
        shutil.rmtree(args.out_dir)
    os.makedirs(args.out_dir)
    try:
        started = time.perf_counter()
        generated = run_helper(
            "--generate", "--out-dir", args.out_dir, "--size-gb", str(args.size_gb), "--targets", args.targets
        )
        layers = json.loads(generated)["layers"]
        base_bytes = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
        n_shards = sum(f.endswith(".safetensors") for f in os.listdir(base))
        adapters = {t: os.path.join(args.out_dir, f"adapter-{t}") for t in targets}
        sizes = ", ".join(
            f"{t} ({TARGETS[t]}) {os.path.getsize(os.path.join(a, 'adapter_model.safetensors')) / 1e6:.1f} MB"
            for t, a in adapters.items()
        )
        print(f"generated in {time.perf_counter() - started:.1f}s: Qwen3-MoE bf16, {layers} layers x {EXPERTS} "
              f"experts, {base_bytes / 1e9:.2f} GB in {n_shards} shards; adapters r={RANK}: {sizes}")

        # interleaved rounds, medians: the machine may be shared, and page-cache state drifts
        contenders = [(f"{name}-{t}", name, adapters[t]) for t in targets for name in PER_ADAPTER]
        contenders += [(name, name, next(iter(adapters.values()))) for name in COPIES]
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in contenders}
        for _ in range(args.repeat):
            for label, name, adapter in contenders:
                out = os.path.join(args.out_dir, label)
                shutil.rmtree(out, ignore_errors=True)
                runs[label].append(run_child(name, base, adapter, out))
        results = {}
        print(f"{'':>16}  {'work':>8}  {'process':>8}  {'peak RSS':>9}   work per run")
        for label, samples in runs.items():
            results[label] = r = {
                "work_s": statistics.median(x["work_s"] for x in samples),
                "process_s": statistics.median(x["process_s"] for x in samples),
                "peak_rss": max(x["peak_rss"] for x in samples),
            }
            spread = ", ".join(f"{x['work_s']:.2f}" for x in samples)
            print(f"{label:>16}  {r['work_s']:6.2f} s  {r['process_s']:6.2f} s  {r['peak_rss'] / 2**20:5.0f} MiB   "
                  f"{spread}")

        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} cores")

        copy, copy_sync = results["copy"], results["copy+fsync"]
        for t in targets:
            max_diff, differ = json.loads(run_helper("--compare", t, "--out-dir", args.out_dir))
            ours, peft = results[f"ours-{t}"], results[f"peft-{t}"]
            print(f"\n[{t}: adapter on {TARGETS[t]}]")
            print(f"ours vs PEFT output: max |diff| {max_diff:.3g}, {differ:.4%} of elements differ "
                  "(PEFT rounds expert deltas to bf16 before adding; we round once)")
            print(goal_line("time ours/PEFT", ours["work_s"] / peft["work_s"], 0.4))
            print(goal_line("time ours/PEFT (whole process)", ours["process_s"] / peft["process_s"], 0.4))
            print(goal_line("peak RSS ours/PEFT", ours["peak_rss"] / peft["peak_rss"], 0.2))
            print(goal_line("time ours/plain copy", ours["work_s"] / copy["work_s"], 2.0,
                            "  (copy: no compute, not durable)"))
            print(goal_line("time ours/copy+fsync", ours["work_s"] / copy_sync["work_s"], 2.0,
                            "  (as durable as ours)"))
    finally:
        if not args.keep:
            shutil.rmtree(args.out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
