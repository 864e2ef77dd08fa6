"""Packing without cross-contamination, and the measurement that shows it.

TRL 1.15's `packing=True` (strategy bfd) is padding-free: the samples of a micro-batch are
concatenated into one row, `position_ids` restart at 0 at each sample, and the batch has no
attention mask (trl's DataCollatorForLanguageModeling, padding_free). Whether a sample then
attends to the samples before it in the row is up to the attention:

- transformers 5.17's `sdpa` and `eager` build a block-diagonal causal mask from the restarting
  position_ids (masking_utils.find_packed_sequence_indices), but only when the batch has no
  attention mask and the forward keeps no KV cache: both trainers pass `use_cache=False`
  (trl SFTTrainer.compute_loss, loraforge.train's CPU trainer);
- flash attention reads the sample boundaries (cu_seq_lens) from the same position_ids;
- Unsloth wraps TRL's collator to add `packed_seq_lengths` for its own varlen attention.

lora-forge loads the base with TRAINING_ATTENTION, measured here to keep samples apart.
`contamination()` measures it for a forward (the model's, or the trainer's loss computation) and
a collator: the largest absolute difference between a sample's logits inside the packed row and
its logits run alone (bench/packing.py, tests/test_packing.py)."""

from __future__ import annotations

# transformers' attention for training (load_model): measured to honour packed position_ids
TRAINING_ATTENTION = "sdpa"


def packed_row(samples: list[list[int]]) -> dict:
    """The samples as TRL's bfd packing stores one packed row: the ids end to end, and each
    sample's length (`seq_lengths`, from which the collator makes the position_ids)."""
    return {"input_ids": [t for s in samples for t in s], "seq_lengths": [len(s) for s in samples]}


def split_row(position_ids) -> list[tuple[int, int]]:
    """(start, end) of each sample of a packed row: a sample starts where position_ids restart at 0."""
    ids = [int(p) for p in position_ids]
    starts = [i for i, p in enumerate(ids) if p == 0] or [0]
    return list(zip(starts, starts[1:] + [len(ids)]))


def _on_device(model, batch: dict) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def model_forward(model):
    """The model's logits for a collated batch, called as the trainers call it (no labels, use_cache=False)."""
    def forward(batch: dict):
        inputs = {k: v for k, v in _on_device(model, batch).items() if k != "labels"}
        return model(**inputs, use_cache=False).logits[0].float()

    return forward


def trainer_forward(trainer):
    """The logits of the trainer's own loss computation (`compute_loss`) for a collated batch: the
    exact forward of a training step (on the CPU, where the loss comes from the full logits)."""
    def forward(batch: dict):
        _, outputs = trainer.compute_loss(trainer.model, _on_device(trainer.model, batch), return_outputs=True)
        return outputs.logits[0].float()

    return forward


def contamination(forward, collator, samples: list[list[int]], ignore_boundaries: bool = False,
                  model=None) -> float:
    """Max |logit(sample in the packed row) - logit(sample alone)| over all samples and positions,
    `collator` making both batches as training does and `forward` (model_forward, trainer_forward)
    running them, with `model` in eval mode (no dropout: the two forwards must differ only by what
    each token attends to). 0 up to float rounding: the samples do not see each other.

    ignore_boundaries: the packed row under one causal mask (an attention mask of ones, no packing
    metadata), i.e. what packing costs when the attention ignores the sample boundaries."""
    import torch

    was_training = model.training if model is not None else None
    if model is not None:
        model.eval()
    try:
        with torch.no_grad():
            batch = collator([packed_row(samples)])
            if ignore_boundaries:
                batch = {k: v for k, v in batch.items() if k not in ("packed_seq_lengths", "position_ids")}
                batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            packed, worst, start = forward(batch), 0.0, 0
            for sample in samples:
                alone = forward(collator([{"input_ids": sample}]))
                worst = max(worst, float((packed[start:start + len(sample)] - alone[: len(sample)]).abs().max()))
                start += len(sample)
        return worst
    finally:
        if model is not None:
            model.train(was_training)
