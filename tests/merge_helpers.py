"""Tiny real models and adapters for the merge tests, built with transformers and PEFT."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

VOCAB = 512
DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Stand-ins for the files a real model folder carries next to its weights; the merge must copy them.
SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0"}\n',
    "tokenizer_config.json": '{"model_max_length": 512}\n',
    "special_tokens_map.json": '{"eos_token": "<|im_end|>"}\n',
    "tokenizer.model": "not really sentencepiece\n",
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}\n",
}


def dense_config(layers: int = 2, hidden: int = 256) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, tie_word_embeddings=False,
    )  # fmt: skip


def moe_config(layers: int = 2, experts: int = 4) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, num_experts=experts,
        num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip


def build_base(path: str, config, dtype=torch.float32, max_shard_size="1MB", seed: int = 0) -> str:
    """save_pretrained a randomly initialised model in several shards, plus tokenizer-like files."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    for name, text in SIDE_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path


def build_adapter(base_dir: str, path: str, seed: int = 1, randomize: bool = True, **lora_kwargs) -> str:
    """get_peft_model on the base, lora_B randomised (PEFT starts it at zero, which would make a
    merge a no-op and every check toothless), save_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora_kwargs.setdefault("target_modules", DENSE_TARGETS)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if randomize and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(path)
    return path


def edit_adapter_config(adapter_dir: str, **changes) -> None:
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model_dir: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model(input_ids()).logits


@torch.no_grad()
def peft_merged(base_dir: str, adapter_dir: str):
    """PEFT's own path: load base, load adapter, merge_and_unload."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


@torch.no_grad()
def peft_merged_logits(base_dir: str, adapter_dir: str) -> torch.Tensor:
    return peft_merged(base_dir, adapter_dir)(input_ids()).logits


def load_shards(model_dir: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model_dir, name)))
    return tensors


def shard_names(model_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))


def file_digests(model_dir: str) -> dict[str, str]:
    digests = {}
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digests[name] = hashlib.sha256(f.read()).hexdigest()
    return digests


def fuse_experts(per_expert_dir: str, fused_dir: str, num_experts: int) -> str:
    """Rewrite a per-expert checkpoint with fused 3-D experts, as transformers holds them in memory:
    gate_up_proj [E, 2I, H] = cat(gate, up) per expert, down_proj [E, H, I]."""
    tensors = load_shards(per_expert_dir)
    fused, layers = {}, set()
    for name, tensor in tensors.items():
        match = re.match(r"(.*\.mlp\.experts)\.\d+\.(gate|up|down)_proj\.weight$", name)
        if match:
            layers.add(match.group(1))
        else:
            fused[name] = tensor
    for prefix in sorted(layers):
        experts = range(num_experts)
        gate_up = [torch.cat([tensors[f"{prefix}.{e}.{p}_proj.weight"] for p in ("gate", "up")]) for e in experts]
        fused[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    os.makedirs(fused_dir)
    # two shards: the experts of each layer, and everything else
    expert_names = [n for n in fused if ".mlp.experts." in n]
    other_names = [n for n in fused if n not in expert_names]
    weight_map = {}
    shards = {"model-00001-of-00002.safetensors": other_names, "model-00002-of-00002.safetensors": expert_names}
    for shard, names in shards.items():
        save_file({n: fused[n].contiguous() for n in names}, os.path.join(fused_dir, shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    total = sum(t.numel() * t.element_size() for t in fused.values())
    with open(os.path.join(fused_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    for name in os.listdir(per_expert_dir):
        if not name.endswith((".safetensors", ".index.json")):
            shutil.copyfile(os.path.join(per_expert_dir, name), os.path.join(fused_dir, name))
    return fused_dir
