"""Failures a user can cause reach the console as one line naming the file (loraforge.errors.explain,
printed by loraforge.rulelog), here for what training meets: a base shard gone, and a checkpoint
torn by a kill or a full disk, read by a real transformers Trainer resuming from it."""

from __future__ import annotations

import pytest

from loraforge.errors import explain


def test_a_file_named_only_in_the_message_is_still_one_line():
    # what transformers raises for a shard listed in the index but gone (no errno, no filename)
    exc = FileNotFoundError("No such file or directory: results/tiny/base/model-00001-of-00006.safetensors")
    assert explain(exc) == "No such file or directory: results/tiny/base/model-00001-of-00006.safetensors"
    assert explain(FileNotFoundError()) is None  # nothing to say: a bug's traceback is more use
    assert explain(RuntimeError("something else")) is None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoint-1 and checkpoint-2 of a real (tiny, random) causal LM trained by transformers' Trainer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("trainer")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    data = [{"input_ids": torch.arange(8) + i, "labels": torch.arange(8) + i} for i in range(4)]

    def trainer(steps: int) -> Trainer:
        args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=1, per_device_train_batch_size=1,
                                 report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no")
        return Trainer(model=model, args=args, train_dataset=data)

    trainer(2).train()
    return out, trainer


@pytest.mark.parametrize("torn", ["optimizer.pt", "trainer_state.json"])
def test_resuming_from_a_torn_checkpoint_names_it_and_the_way_out(checkpoints, torn):
    out, trainer = checkpoints
    checkpoint = out / "checkpoint-2"
    saved = (checkpoint / torn).read_bytes()
    (checkpoint / torn).write_bytes(saved[: len(saved) // 2])
    try:
        with pytest.raises(Exception) as failure:
            trainer(3).train(resume_from_checkpoint=str(checkpoint))
    finally:
        (checkpoint / torn).write_bytes(saved)
    message = explain(failure.value)
    named = checkpoint / torn if torn.endswith(".json") else checkpoint
    assert message is not None and message.startswith(f"{named}: cannot resume training from this checkpoint ("), message
    assert f"mv {checkpoint} {checkpoint}.bad" in message and "\n" not in message
