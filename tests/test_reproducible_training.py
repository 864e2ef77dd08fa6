"""Two trainings with the same settings give the same adapter, byte for byte: the basis for
comparing a cluster run's GGUF with a local run's (tests/test_slurm.py)."""

from __future__ import annotations

import pytest

from conftest import REPO, small_config
from loraforge import config as lfconfig
from loraforge.data import prepare


@pytest.mark.slow
def test_same_settings_train_the_same_adapter(tiny_bases, tmp_path):
    from loraforge.train import train

    settings = lfconfig.model_settings(lfconfig.validate(small_config()), "tiny")
    train_params = {**settings["train"], "max_steps": 1}
    data = tmp_path / "data"
    data.mkdir()
    prepare(REPO / "data" / "rails_chat.jsonl", data / "train.jsonl", data / "validation.jsonl", data / "summary.tsv")
    adapters = []
    for run in ("first", "second"):
        out = tmp_path / run
        train(tiny_bases["qwen3"], data / "train.jsonl", data / "validation.jsonl", adapter_dir=out / "adapter",
              out_dir=out, lora=dict(settings["lora"]), train_params=train_params)
        adapters.append((out / "adapter" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]
