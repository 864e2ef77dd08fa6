"""Do packed samples see each other? Measured on lora-forge's training path, TRL (CPU or GPU)
or Unsloth (GPU).

Builds its own tiny models (loraforge.base's tiny Qwen3 and Qwen3-MoE shapes, random weights, a
byte-level BPE tokenizer trained here on the shipped samples: no downloads), loads them as
loraforge.train does (TRL: transformers with loraforge.packing.TRAINING_ATTENTION + PEFT LoRA;
Unsloth: FastLanguageModel + its LoRA), builds lora-forge's SFTTrainer with `packing: true`, takes
the first packed row of its own train dataloader, and compares each sample's logits in the row
with its logits run alone (loraforge.packing.contamination), with the trainer's own collator and, on the CPU, its own loss
computation's forward (on the GPU the model's forward as the trainers call it: TRL's fused loss
returns no logits).

Printed per model: the samples and tokens of the row, the largest absolute logit difference
as lora-forge trains ("lora-forge"), and the same row under one causal mask over the whole row
("boundaries ignored": an attention mask of ones, no packing metadata, i.e. packing with no
protection), and the largest |logit| for scale. With TRL the other attention of transformers
(eager vs sdpa) is measured too.

    .venv/bin/python bench/packing.py                          # CPU, TRL
    python3 bench/packing.py --backend unsloth                 # GPU machine, bundle on PYTHONPATH
    python3 bench/packing.py --backend trl                     # GPU machine, TRL in bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "use_rslora": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def make_tokenizer(out: Path):
    """A byte-level BPE tokenizer trained on the shipped samples, with the tiny bases' special
    tokens and ChatML template (sentencepiece is not on the GPU machine)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from loraforge.base import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
    from loraforge.constants import CHATML_JINJA_TEMPLATE

    texts = [m["content"] for s in load_samples() for m in s["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tok.chat_template = CHATML_JINJA_TEMPLATE
    tok.save_pretrained(out)
    return tok


def load_samples() -> list[dict]:
    lines = (ROOT / "data" / "rails_chat.jsonl").read_text(encoding="utf-8").splitlines()
    return [{"messages": json.loads(line)["messages"]} for line in lines if line.strip()]


def build_base(arch: str, out: Path, on_gpu: bool) -> Path:
    """A tiny base folder of `arch` (loraforge.base.TINY_ARCHS), random weights, seed 0."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.base import tiny_config

    tok = make_tokenizer(out)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tok), dtype=torch.float32)
    model.to(torch.bfloat16 if on_gpu else torch.float32).save_pretrained(out)
    return out


def load(backend: str, base: Path, max_len: int):
    from peft import get_peft_model

    from loraforge.train import load_model, lora_config
    from loraforge.train_backends import load_unsloth

    if backend == "unsloth":
        return load_unsloth(base, LORA, {"max_seq_length": max_len, "load_in_4bit": False, "seed": 3407,
                                         "gradient_checkpointing": "on"})
    return get_peft_model(load_model(base, load_in_4bit=False), lora_config(LORA))


def trainer_for(model, base: Path, work: Path, max_len: int, batch: int, on_gpu: bool):
    """lora-forge's SFTTrainer (loraforge.train), packing on, as train() sets it up."""
    from datasets import Dataset
    from trl import SFTConfig

    from loraforge.tokenizer import load_tokenizer
    from loraforge.train import _trainer_class, training_chat_template

    tok = load_tokenizer(base)
    tok.chat_template = training_chat_template(tok.chat_template)
    args = SFTConfig(output_dir=str(work / "out"), packing=True, max_length=max_len, assistant_only_loss=True,
                     per_device_train_batch_size=batch, bf16=on_gpu, report_to="none", seed=3407,
                     dataloader_num_workers=0, max_steps=1)
    return _trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(load_samples()),
                            processing_class=tok)


def first_row_samples(trainer) -> list[list[int]]:
    """The samples of the first packed row of the trainer's own train dataloader."""
    from loraforge.packing import split_row

    row = next(iter(trainer.get_train_dataloader()))
    ids, positions = row["input_ids"][0].tolist(), row["position_ids"][0].tolist()
    return [ids[a:b] for a, b in split_row(positions)]


def measure(backend: str, arch: str, work: Path, max_len: int, batch: int) -> list[dict]:
    import torch

    from loraforge.packing import TRAINING_ATTENTION, contamination, model_forward, trainer_forward

    on_gpu = torch.cuda.is_available()
    base = build_base(arch, work / arch, on_gpu)
    model = load(backend, base, max_len)
    trainer = trainer_for(model, base, work / f"{arch}-run", max_len, batch, on_gpu)
    samples = first_row_samples(trainer)
    attentions = [TRAINING_ATTENTION, "eager"] if backend == "trl" else ["unsloth"]
    rows = []
    # the training step's own forward where it returns the logits (the CPU trainer), else the model's
    forward = trainer_forward(trainer) if not on_gpu else model_forward(trainer.model)
    for attention in attentions:
        if backend == "trl":
            trainer.model.get_base_model().set_attn_implementation(attention)
        with torch.no_grad():
            scale = float(trainer.model(input_ids=torch.tensor([samples[0]], device=trainer.model.device),
                                        use_cache=False).logits.float().abs().max())
        rows.append({
            "backend": backend, "arch": arch, "device": "cuda" if on_gpu else "cpu", "attention": attention,
            "samples": len(samples), "tokens": sum(map(len, samples)),
            "lora_forge": contamination(forward, trainer.data_collator, samples, model=trainer.model),
            "boundaries_ignored": contamination(forward, trainer.data_collator, samples, ignore_boundaries=True,
                                                model=trainer.model),
            "max_abs_logit": scale,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["trl", "unsloth"], default="trl")
    parser.add_argument("--archs", default="qwen3,qwen3_moe")
    parser.add_argument("--max-len", type=int, default=512, help="packed row length (max_seq_length)")
    parser.add_argument("--batch", type=int, default=4, help="samples per packed row at most (per_device_batch_size)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.backend == "unsloth":
        from loraforge.train_backends import import_unsloth_first

        os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")  # full logits from its forward
        import_unsloth_first()  # before trl/transformers: it patches them
    rows = []
    with tempfile.TemporaryDirectory(prefix="packing-") as tmp:
        for arch in args.archs.split(","):
            rows += measure(args.backend, arch, Path(tmp), args.max_len, args.batch)
    print(f"\n{'backend':8} {'device':6} {'arch':10} {'attention':9} {'samples':>7} {'tokens':>6} "
          f"{'lora-forge':>11} {'boundaries ignored':>18} {'max |logit|':>11}")
    for r in rows:
        print(f"{r['backend']:8} {r['device']:6} {r['arch']:10} {r['attention']:9} {r['samples']:7d} {r['tokens']:6d} "
              f"{r['lora_forge']:11.3g} {r['boundaries_ignored']:18.3g} {r['max_abs_logit']:11.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
