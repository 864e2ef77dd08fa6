"""Synthetic Qwen3-MoE checkpoints and PEFT expert adapters, for benchmarks.

Random bf16 weights in the on-disk layout of a real hub checkpoint such as
unsloth/qwen3-coder-30b-a3b-instruct, only smaller: per-expert 2-D tensors
(`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`), a router, q/k norms, untied
embeddings, `model-0000k-of-0000n.safetensors` shards filled in module order as
`save_pretrained` fills them (layer by layer) and `model.safetensors.index.json`. Tensors are
generated and written one shard at a time (no torch model is ever built), so a multi-GB
checkpoint needs about one shard of memory.

`write_adapter` writes what PEFT's get_peft_model + save_pretrained writes for target_modules
q/k/v/o/gate/up/down on such a model: LoRA on q/k/v/o, and ParamWrapper adapters on the fused
expert parameters (`target_parameters` gate_up_proj/down_proj, gate_up with r and alpha
doubled through rank_pattern/alpha_pattern; gate_up is the inner wrapper, hence
`experts.base_layer`). Every factor is random and non-zero, so every expert really changes
(the merge refuses all-zero expert factors).

    shape = MoeShape(num_hidden_layers=24)
    write_base("base", shape, tokenizer_dir="tok", n_shards=16)
    write_adapter("adapter", shape, rank=3)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from loraforge.constants import INDEX_NAME

# files of a tokenizer folder (loraforge.base.train_tokenizer) carried into a model folder
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class MoeShape:
    """A Qwen3-MoE architecture. Defaults: the 30B-A3B's structure (128 experts, top-8,
    untied embeddings, every layer sparse) at widths where every matrix input is a multiple
    of 256, the K-quant super-block (hidden 256, expert 256, 4 heads x 64, 2 KV heads)."""

    num_hidden_layers: int = 24
    hidden_size: int = 256
    moe_intermediate_size: int = 256
    intermediate_size: int = 768  # dense MLP width (no dense layer here; kept in the config)
    num_experts: int = 128
    num_experts_per_tok: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 1024

    def config(self, eos_token_id: int | None = None, bos_token_id: int | None = None) -> dict:
        """config.json as the hub's Qwen3-MoE checkpoints have it."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": bos_token_id,
            "decoder_sparse_step": 1,
            "eos_token_id": eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 8192,
            "max_window_layers": self.num_hidden_layers,
            "mlp_only_layers": [],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_topk_prob": True,
            "num_attention_heads": self.num_attention_heads,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "output_router_logits": False,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 10000000,
            "router_aux_loss_coef": 0.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }

    def layer_tensors(self, layer: int) -> list[tuple[str, tuple[int, ...]]]:
        """One decoder layer's tensors in module registration order (what save_pretrained follows)."""
        H, D, I = self.hidden_size, self.head_dim, self.moe_intermediate_size
        p = f"model.layers.{layer}"
        out = [
            (f"{p}.self_attn.q_proj.weight", (self.num_attention_heads * D, H)),
            (f"{p}.self_attn.k_proj.weight", (self.num_key_value_heads * D, H)),
            (f"{p}.self_attn.v_proj.weight", (self.num_key_value_heads * D, H)),
            (f"{p}.self_attn.o_proj.weight", (H, self.num_attention_heads * D)),
            (f"{p}.self_attn.q_norm.weight", (D,)),
            (f"{p}.self_attn.k_norm.weight", (D,)),
            (f"{p}.mlp.gate.weight", (self.num_experts, H)),
        ]
        for e in range(self.num_experts):
            out += [
                (f"{p}.mlp.experts.{e}.gate_proj.weight", (I, H)),
                (f"{p}.mlp.experts.{e}.up_proj.weight", (I, H)),
                (f"{p}.mlp.experts.{e}.down_proj.weight", (H, I)),
            ]
        return out + [(f"{p}.input_layernorm.weight", (H,)), (f"{p}.post_attention_layernorm.weight", (H,))]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out = [("model.embed_tokens.weight", (self.vocab_size, self.hidden_size))]
        for layer in range(self.num_hidden_layers):
            out += self.layer_tensors(layer)
        return out + [("model.norm.weight", (self.hidden_size,)), ("lm_head.weight", (self.vocab_size, self.hidden_size))]

    def weight_bytes(self) -> int:
        return sum(2 * math.prod(s) for _, s in self.tensors())


def split_shards(tensors: list[tuple[str, tuple[int, ...]]], n_shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors (in order) into exactly `n_shards` groups the way save_pretrained fills
    shards (start a new one when the next tensor would pass the maximum), with the smallest
    maximum that gives that count."""
    sizes = [2 * math.prod(s) for _, s in tensors]

    def fill(limit: int) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        size = 0
        for i, nb in enumerate(sizes):
            if groups[-1] and size + nb > limit:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nb
        return groups

    lo, hi = max(sizes), sum(sizes)  # fewest shards at hi; the count only falls as the limit grows
    if len(fill(lo)) < n_shards:
        raise ValueError(f"{len(tensors)} tensors cannot fill {n_shards} shards")
    while lo < hi:  # the smallest limit with at most n_shards shards
        mid = (lo + hi) // 2
        if len(fill(mid)) <= n_shards:
            hi = mid
        else:
            lo = mid + 1
    groups = fill(lo)
    if len(groups) != n_shards:
        raise ValueError(f"cannot split {len(tensors)} tensors into exactly {n_shards} shards")
    return [[tensors[i] for i in g] for g in groups]


def write_base(path: str | os.PathLike, shape: MoeShape, tokenizer_dir: str | os.PathLike,
               n_shards: int = 16, seed: int = 0) -> int:
    """A Hugging Face model folder of random bf16 weights (norms are ones); returns the bytes of
    its shards. The tokenizer files of `tokenizer_dir` are copied in; config.json says
    vocab_size=shape.vocab_size, which must match the tokenizer."""
    import torch

    path = Path(path)
    path.mkdir(parents=True)
    tok_cfg = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    ids = {v["content"]: int(k) for k, v in (tok_cfg.get("added_tokens_decoder") or {}).items()}
    (path / "config.json").write_text(json.dumps(
        shape.config(eos_token_id=ids.get(tok_cfg.get("eos_token")), bos_token_id=ids.get("<|endoftext|>")), indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": ids.get(tok_cfg.get("eos_token")), "do_sample": False}, indent=2))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copyfile(Path(tokenizer_dir) / name, path / name)

    groups = split_shards(shape.tensors(), n_shards)
    return write_random_shards(path, groups, torch.Generator().manual_seed(seed))


def write_random_shards(path: str | os.PathLike, groups: list[list[tuple[str, tuple[int, ...]]]], generator) -> int:
    """Write one safetensors shard per group of (name, shape), random bf16 weights (norms are
    ones), one shard in memory at a time, and the index; returns the bytes of the shards."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    weight_map, total, shard_bytes = {}, 0, 0
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, s in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(s, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += 2 * math.prod(s)
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        shard_bytes += (path / file).stat().st_size
        del tensors
    with open(path / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return shard_bytes


def adapter_bytes(shape: MoeShape, rank: int, dtype_bytes: int = 2) -> int:
    """Tensor bytes of write_adapter's adapter_model.safetensors (header excluded)."""
    H, D, I, E = shape.hidden_size, shape.head_dim, shape.moe_intermediate_size, shape.num_experts
    q, kv = shape.num_attention_heads * D, shape.num_key_value_heads * D
    attention = rank * ((H + q) + 2 * (H + kv) + (q + H))
    experts = E * 2 * rank * (H + 2 * I) + E * rank * (I + H)
    return dtype_bytes * shape.num_hidden_layers * (attention + experts)


def write_adapter(path: str | os.PathLike, shape: MoeShape, rank: int, tokenizer_dir: str | os.PathLike | None = None,
                  seed: int = 1, dtype: str = "bfloat16") -> int:
    """A PEFT LoRA adapter folder (r=rank, alpha=2r, q/k/v/o + experts) of random non-zero
    factors; returns the bytes of adapter_model.safetensors."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True)
    LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["gate_up_proj", "down_proj"],
        rank_pattern={r".*\.gate_up_proj": 2 * rank}, alpha_pattern={r".*\.gate_up_proj": 4 * rank},
    ).save_pretrained(str(path))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    H, D, I, E = shape.hidden_size, shape.head_dim, shape.moe_intermediate_size, shape.num_experts
    q, kv = shape.num_attention_heads * D, shape.num_key_value_heads * D

    def factors(key: str, r: int, in_features: int, out_features: int) -> dict:
        # |N(0, 0.02)| + 1e-3: no factor slice (and so no expert) can be all zero
        def rand(*s):
            x = torch.randn(*s, generator=generator) * 0.02
            return (x + torch.sign(x) * 1e-3).to(torch_dtype)

        return {
            f"base_model.model.{key}.lora_A.weight": rand(r, in_features),
            f"base_model.model.{key}.lora_B.weight": rand(out_features, r),
        }

    tensors = {}
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}"
        tensors |= factors(f"{p}.self_attn.q_proj", rank, H, q)
        tensors |= factors(f"{p}.self_attn.k_proj", rank, H, kv)
        tensors |= factors(f"{p}.self_attn.v_proj", rank, H, kv)
        tensors |= factors(f"{p}.self_attn.o_proj", rank, q, H)
        # PEFT's fused layout: A [E*r, in] grouped per expert, B [out, E*r] interleaved
        tensors |= factors(f"{p}.mlp.experts.base_layer", E * 2 * rank, H, 2 * I)  # gate_up
        tensors |= factors(f"{p}.mlp.experts", E * rank, I, H)  # down
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:  # training saves the tokenizer with the adapter
        for name in TOKENIZER_FILES:
            if name != "tokenizer.model" and (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, path / name)
    return (path / "adapter_model.safetensors").stat().st_size
