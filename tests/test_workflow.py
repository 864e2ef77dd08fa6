"""A real Snakemake run of the whole chain on tiny and tiny-moe (the `pipeline` fixture)."""

import csv
import json

import pytest
import torch

pytestmark = pytest.mark.slow  # reads the `pipeline` fixture: one full Snakemake run

MODELS = ["tiny", "tiny-moe"]


@pytest.mark.parametrize("model", MODELS)
def test_tiny_base_was_pretrained_below_chance(pipeline, model):
    report = json.loads((pipeline / "results" / model / "reports" / "base.json").read_text())
    assert report["shards"] >= 2, "several shards so shard handling is exercised"
    # ln(vocab) is the loss of a uniform guess; pre-training must get well below it
    assert report["loss_final"] < report["ln_vocab"] - 1.0, report


@pytest.mark.parametrize("model", MODELS)
def test_training_outputs(pipeline, model):
    train_dir = pipeline / "results" / model / "train"
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3
    # 3 steps from a tiny base pre-trained for 30 steps: the loss is still far above 1.0,
    # which the article's rule calls a smoke run ('not-learning' needs many steps)
    from loraforge.train import NOT_LEARNING_ABOVE, verdict

    assert metrics["final_loss"] > NOT_LEARNING_ABOVE and metrics["first_loss"] > NOT_LEARNING_ABOVE
    assert metrics["verdict"] == "too-short"
    assert (metrics["verdict"], metrics["verdict_message"]) == verdict(metrics["final_loss"], metrics["steps"])
    rows = list(csv.DictReader((train_dir / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["loss"]) == pytest.approx(metrics["final_loss"])
    assert (train_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["lora"]["r"] == 8 and metrics["train"]["max_steps"] == 3


@pytest.mark.parametrize("model", MODELS)
def test_adapter_loads_with_peft_and_changes_logits(pipeline, model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = pipeline / "results" / model
    tokenizer = AutoTokenizer.from_pretrained(results / "adapter")
    base = AutoModelForCausalLM.from_pretrained(results / "base", dtype=torch.float32)
    ids = tokenizer("class PostsController < ApplicationController", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, results / "adapter")
    with torch.no_grad():
        after = peft_model(ids).logits
    assert not torch.allclose(before, after, atol=1e-5), "the trained adapter must change the logits"
    lora_keys = [n for n, _ in peft_model.named_parameters() if "lora_B" in n]
    if model == "tiny-moe":
        # the expert path: PEFT's ParamWrapper adapters on the fused expert parameters
        assert any("experts" in n for n in lora_keys), lora_keys


def test_data_summary_caps_sources(pipeline):
    import pandas as pd

    summary = pd.read_csv(pipeline / "results" / "tiny" / "data" / "summary.tsv", sep="\t")
    per_source = summary[summary["source"] != "TOTAL"]
    assert per_source["share_after"].max() <= 0.2 + 1e-9
    assert per_source["share_before"].max() > 0.4  # the shipped data is GitLab-heavy on purpose
