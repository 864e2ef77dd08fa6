"""What the model trains on, in fast tests: lora-forge's SFTTrainer (loraforge.train) with
`packing: true` and the default assistant-only loss, on tiny randomly initialised Qwen3 and
Qwen3-MoE models (the tiny bases' shapes) and the tiny bases' tokenizer: the labels of a packed
micro-batch are the answers (and their end-of-turn token) only, and packed samples do not see each
other (loraforge.packing; bench/packing.py measures the same on the GPU backends)."""

from __future__ import annotations

import pytest

from loraforge.packing import TRAINING_ATTENTION, contamination, packed_row, split_row, trainer_forward

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "gem devise?"},
     {"role": "assistant", "content": "No: the Rails 8 generator."}, {"role": "user", "content": "ok"},
     {"role": "assistant", "content": "Good."}],
    [{"role": "user", "content": "Where does a service object go?"},
     {"role": "assistant", "content": "Nowhere: a concern on the model."}],
    [{"role": "user", "content": "Sidekiq?"}, {"role": "assistant", "content": "Solid Queue, with Active Job."}],
]
ANSWERS = "No: the Rails 8 generator.<|im_end|>Good.<|im_end|>Nowhere: a concern on the model.<|im_end|>" \
          "Solid Queue, with Active Job.<|im_end|>"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "use_rslora": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    from loraforge.tokenizer import load_tokenizer
    from loraforge.train import training_chat_template

    tok = load_tokenizer(tiny_tokenizer)
    tok.chat_template = training_chat_template(tok.chat_template)  # as train() does for assistant-only loss
    return tok


def lora_model(arch: str, tok):
    """A tiny base of `arch` (random weights) loaded as loraforge.train.load_model does, with LoRA."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.base import tiny_config
    from loraforge.train import lora_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tok), dtype=torch.float32,
                                             attn_implementation=TRAINING_ATTENTION)
    # the MoE's expert LoRA (PEFT's ParamWrapper) is slow on the CPU and beside the point: attention only
    targets = LORA["target_modules"] if arch == "qwen3" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    return get_peft_model(model, lora_config({**LORA, "target_modules": targets}))


def sft_trainer(model, tok, tmp_path, assistant_only_loss: bool = True):
    from datasets import Dataset
    from trl import SFTConfig

    from loraforge.train import _trainer_class

    args = SFTConfig(output_dir=str(tmp_path / "out"), packing=True, max_length=256, per_device_train_batch_size=3,
                     assistant_only_loss=assistant_only_loss, bf16=False, report_to="none", dataloader_num_workers=0,
                     seed=3407, data_seed=3407)
    return _trainer_class()(model=model, args=args, train_dataset=Dataset.from_list([{"messages": c} for c in CHATS]),
                            processing_class=tok)


def packed_batch(trainer) -> dict:
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free: one row
    return batch


def test_a_packed_micro_batch_is_labelled_on_the_answers_only(tokenizer, tmp_path):
    trainer = sft_trainer(lora_model("qwen3", tokenizer), tokenizer, tmp_path)
    batch = packed_batch(trainer)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert len(split_row(batch["position_ids"][0])) == len(CHATS)  # all three in one row
    kept = [t for t, label in zip(ids, labels) if label != -100]
    assert [label for label in labels if label != -100] == kept  # labels are the tokens themselves
    # bfd packs the longest first: compare as a multiset of answers, in text
    assert sorted(tokenizer.decode(kept).split("<|im_end|>")) == sorted(ANSWERS.split("<|im_end|>"))
    assert tokenizer.decode(kept).count("<|im_end|>") == 4  # each answer's end of turn: the model learns to stop
    everything = sft_trainer(lora_model("qwen3", tokenizer), tokenizer, tmp_path / "all", assistant_only_loss=False)
    all_labels = packed_batch(everything)["labels"][0]
    assert int((all_labels != -100).sum()) > 2 * len(kept)  # the contrast: prompts too


@pytest.mark.parametrize("arch", ["qwen3", pytest.param("qwen3_moe", marks=pytest.mark.slow)])  # MoE: ~10 s on CPU
def test_packed_samples_do_not_see_each_other(tokenizer, tmp_path, arch):
    """Each sample's logits in the packed row equal its logits alone (float32 rounding), with the
    trainer's own collator and loss computation; under one causal mask over the row (the boundaries
    ignored) they would not."""
    trainer = sft_trainer(lora_model(arch, tokenizer), tokenizer, tmp_path)
    batch = packed_batch(trainer)
    ids = batch["input_ids"][0].tolist()
    samples = [ids[a:b] for a, b in split_row(batch["position_ids"][0])]
    assert len(samples) == 3 and trainer.data_collator([packed_row(samples)])["input_ids"][0].tolist() == ids
    forward, collator = trainer_forward(trainer), trainer.data_collator  # a training step's own forward
    assert contamination(forward, collator, samples, model=trainer.model) < 1e-4
    assert contamination(forward, collator, samples, ignore_boundaries=True, model=trainer.model) > 1e-2
