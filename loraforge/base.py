"""Tiny base models built locally and deterministically, so every stage of the pipeline runs
here with no hub access: a SentencePiece BPE tokenizer (llama.cpp converts it without a
pre-tokenizer hash), a ChatML chat template, a small Qwen3 or Qwen3-MoE config whose matrix
widths are multiples of 256 (so K-quants apply to real tensors), several safetensors shards,
and a brief pre-training on the shipped corpus so outputs are not noise.

Hub models are fetched instead (`fetch_hub_base`, `loraforge.hub.download`)."""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

from loraforge.constants import CHATML_JINJA_TEMPLATE, ENDOFTEXT, FIM_TOKENS, IM_END, IM_START
from loraforge.fileio import atomic_output, partial_path, write_json_atomic
from loraforge.tokenizer import load_tokenizer

# ChatML, as Qwen uses it. <|im_end|> ends a turn (EOS for chat), <|endoftext|> ends a document.
# Qwen's fill-in-the-middle tokens too, so the FIM template (tab completion in an IDE) and
# llama.cpp's /infill are tested on the tiny models: special here, CONTROL in the GGUF.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, *FIM_TOKENS]
EOS_TOKEN = IM_END
PAD_TOKEN = ENDOFTEXT

# Shapes: every input width (hidden 256, intermediate 512, heads*head_dim 256, expert 256)
# is a multiple of 256, the K-quant super-block, so Q4_K/Q5_K/Q6_K really apply.
TINY_ARCHS = {
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    ),
}


def read_corpus(paths: list[str | os.PathLike]) -> list[str]:
    """Non-empty lines of the given text files (directories are read recursively, *.txt)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.rglob("*.txt")) if p.is_dir() else [p])
    if not files:
        raise FileNotFoundError(f"no corpus files found in {', '.join(map(str, paths))}")
    lines = []
    for f in files:
        lines.extend(line for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    return lines


def train_tokenizer(lines: list[str], out_dir: str | os.PathLike, vocab_size: int = 2048) -> None:
    """Train a SentencePiece BPE tokenizer and save it as a Hugging Face tokenizer folder
    (tokenizer.model + tokenizer.json + tokenizer_config.json + chat_template.jinja)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        # byte_fallback + identity normalization + no dummy prefix: llama.cpp's SPM path and
        # transformers then tokenize identically.
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=SPECIAL_TOKENS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,  # determinism
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    (out / "sp.vocab").unlink()
    os.replace(f"{prefix}.model", out / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    # Listing the chat tokens as special makes llama.cpp's converter type them CONTROL (so
    # "<|im_end|>" in text is one token there too); add_prefix_space false keeps transformers
    # from prepending "▁" where SentencePiece and llama.cpp do not.
    added_tokens_decoder = {
        str(sp.piece_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                 "normalized": False, "single_word": False}
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": "<unk>",
        "model_max_length": 8192,
        "chat_template": CHATML_JINJA_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    tok = AutoTokenizer.from_pretrained(out)
    tok.save_pretrained(out)  # adds tokenizer.json (fast) next to tokenizer.model
    # save_pretrained may rewrite the config; restore ours so the class and tokens are explicit
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "chat_template.jinja").write_text(CHATML_JINJA_TEMPLATE)


def tiny_config(arch: str, tokenizer, max_position_embeddings: int = 8192):
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(TINY_ARCHS)}")
    spec = dict(TINY_ARCHS[arch])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        bos_token_id=None,
        **spec,
    )


def pretrain(model, tokenizer, lines: list[str], steps: int, seq_len: int, batch_size: int, lr: float, seed: int):
    """A brief causal-LM pre-training on packed corpus text; returns the per-step losses."""
    import torch

    ids: list[int] = []
    for line in lines:
        ids.extend(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
    data = torch.tensor(ids, dtype=torch.long)
    if len(data) < seq_len + 1:
        raise ValueError(f"corpus too small: {len(data)} tokens for sequences of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    return losses


def build_tiny_base(
    out_dir: str | os.PathLike,
    arch: str,
    corpus: list[str | os.PathLike],
    *,
    vocab_size: int = 2048,
    pretrain_steps: int = 150,
    seq_len: int = 128,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
    max_shard_size: str = "1MB",
    dtype: str = "bfloat16",
    report: str | os.PathLike | None = None,
) -> dict:
    """Build a tiny base model folder; returns metrics (loss before/after vs ln(vocab)), also
    written as JSON to `report` when given.

    Written to `out_dir.partial` and renamed at the end (`loraforge.fileio.atomic_output`),
    so an interrupted build never leaves a folder that looks finished."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    started = time.time()
    with atomic_output(out_dir) as partial:
        lines = read_corpus(corpus)
        train_tokenizer(lines, partial, vocab_size=vocab_size)
        tokenizer = load_tokenizer(partial)

        random.seed(seed)
        torch.manual_seed(seed)
        config = tiny_config(arch, tokenizer)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        losses = pretrain(model, tokenizer, lines, pretrain_steps, seq_len, batch_size, learning_rate, seed) if pretrain_steps else []

        model.to(getattr(torch, dtype))
        model.config.dtype = dtype
        model.save_pretrained(partial, max_shard_size=max_shard_size)
        GenerationConfig(
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False
        ).save_pretrained(partial)

        metrics = {
            "arch": arch,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "ln_vocab": math.log(len(tokenizer)),
            "pretrain_steps": pretrain_steps,
            "loss_first": losses[0] if losses else None,
            "loss_final": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "shards": len(list(partial.glob("*.safetensors"))),
            "seconds": round(time.time() - started, 2),
        }
    print(json.dumps(metrics, indent=2))
    if report is not None:
        write_json_atomic(report, metrics)
    return metrics


def fetch_hub_base(repo_id: str, out_dir: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """Download a hub model's weights, config and tokenizer into a plain local folder
    (`loraforge.hub.download.fetch_base`: commit pinned, every file checked against the
    hub's listing before the folder gets its final name)."""
    from loraforge.hub.download import fetch_base

    return fetch_base(repo_id, out_dir, revision=revision, token=token)
