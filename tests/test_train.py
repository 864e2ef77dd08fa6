"""Training: backend selection, config -> trainer mapping, checkpoints and resume after a SIGKILL,
eval loss during training and its verdict. Real TRL/PEFT training of a tiny local model on CPU."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraforge.train_backends import BackendError, resolve_backend
from loraforge.train_monitor import (
    FINGERPRINT_FILE, TokenCounter, complete_checkpoints, eval_trend, loss_rows, prepare_checkpoints,
)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# backend selection


@pytest.mark.parametrize(
    "requested, cuda, unsloth, expected",
    [
        ("auto", False, False, "trl"),
        ("auto", True, False, "trl"),
        ("auto", False, True, "trl"),
        ("auto", True, True, "unsloth"),
        ("trl", True, True, "trl"),
        ("unsloth", True, True, "unsloth"),
    ],
)
def test_backend_selection(requested, cuda, unsloth, expected):
    assert resolve_backend(requested, cuda=cuda, unsloth=unsloth) == expected


def test_unsloth_without_gpu_or_package_is_refused_naming_what_is_missing():
    with pytest.raises(BackendError, match=r"train.backend: unsloth needs a CUDA GPU and the unsloth package"):
        resolve_backend("unsloth", cuda=False, unsloth=False)
    with pytest.raises(BackendError, match=r"needs the unsloth package"):
        resolve_backend("unsloth", cuda=True, unsloth=False)
    with pytest.raises(BackendError, match=r"'deepspeed' is not one of auto, unsloth, trl"):
        resolve_backend("deepspeed")


def test_auto_on_this_machine_is_trl():
    """The CPU install has no CUDA and no unsloth: auto must train with TRL+PEFT."""
    assert resolve_backend("auto") == "trl"


def test_config_defaults_and_backend_field():
    from loraforge import config as lfconfig

    cfg = lfconfig.load(REPO / "config.yaml")
    train = lfconfig.model_settings(cfg, "tiny")["train"]
    assert train["backend"] == "auto"
    assert train["save_steps"] == 100 and train["eval_steps"] == 100
    with pytest.raises(lfconfig.ConfigError, match=r"backend"):
        lfconfig.load(REPO / "config.yaml", {"defaults": {"train": {"backend": "deepspeed"}}})
    with pytest.raises(lfconfig.ConfigError, match=r"save_steps"):
        lfconfig.load(REPO / "config.yaml", {"defaults": {"train": {"save_steps": -1}}})
    assert lfconfig.load(REPO / "config.yaml", {"gpu_memory": "80GB"})["gpu_memory"] == "80GB"


@pytest.mark.parametrize("checkpointing, unsloth_value", [(None, "unsloth"), ("offload", "unsloth"), ("on", True), ("off", False)])
def test_unsloth_path_maps_the_config(monkeypatch, checkpointing, unsloth_value):
    """Unsloth cannot run here (CUDA only): a stand-in FastLanguageModel records what
    load_unsloth asks of it, to pin the config -> Unsloth mapping."""
    import types

    calls = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            calls["from_pretrained"] = kw
            return "model", "tokenizer"

        @staticmethod
        def get_peft_model(model, **kw):
            calls["get_peft_model"] = (model, kw)
            return "peft-model"

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    from loraforge.train_backends import load_unsloth

    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "gate_proj"], "use_rslora": True}
    train = {"max_seq_length": 8192, "load_in_4bit": True, "seed": 3407}
    if checkpointing:
        train["gradient_checkpointing"] = checkpointing
    assert load_unsloth("/models/base", lora, train) == "peft-model"
    fp = calls["from_pretrained"]
    assert (fp["model_name"], fp["max_seq_length"], fp["load_in_4bit"], str(fp["dtype"])) == (
        "/models/base", 8192, True, "torch.bfloat16")
    model, kw = calls["get_peft_model"]
    assert model == "model"
    assert kw == {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "gate_proj"],
                  "bias": "none", "use_gradient_checkpointing": unsloth_value, "random_state": 3407,
                  "use_rslora": True, "max_seq_length": 8192}


# ---------------------------------------------------------------------------------------------
# eval loss and the verdict


def _history(train: list[float], evals: dict[int, float]) -> list[dict]:
    h = [{"step": i + 1, "loss": v, "learning_rate": 1e-3} for i, v in enumerate(train)]
    h += [{"step": s, "eval_loss": v} for s, v in evals.items()]
    return h


def test_eval_rising_while_train_falls_is_flagged():
    history = _history([2.0, 1.5, 1.0, 0.7, 0.5, 0.4], {2: 1.6, 4: 1.4, 6: 1.7})
    status, message = eval_trend(history)
    assert status == "overfitting"
    assert "rose from 1.400 (step 4) to 1.700 (step 6)" in message and "fell from 0.700 to 0.400" in message


@pytest.mark.parametrize(
    "train, evals",
    [
        ([2.0, 1.5, 1.0, 0.7], {2: 1.6, 4: 1.4}),  # both falling
        ([2.0, 1.5, 1.6, 1.8], {2: 1.5, 4: 1.9}),  # both rising: not memorising, diverging
        ([2.0, 1.5, 1.0, 0.7], {4: 1.4}),  # a single eval: no trend
        ([2.0, 1.5, 1.0, 0.7], {2: 1.40, 4: 1.41}),  # within the 2% noise band
    ],
)
def test_eval_trend_not_flagged(train, evals):
    assert eval_trend(_history(train, evals)) is None


def test_loss_rows_merge_train_and_eval_by_step():
    rows = loss_rows(_history([2.0, 1.5], {2: 1.7}) + [{"train_runtime": 3.0, "step": 2}])
    assert rows == [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-3},
        {"step": 2, "loss": 1.5, "learning_rate": 1e-3, "eval_loss": 1.7},
    ]


def test_token_counter_counts_unpadded_training_tokens():
    import torch

    class Model:
        training = True

        is_gradient_checkpointing = True

    model = Model()
    counter = TokenCounter(lambda f: {"input_ids": torch.zeros(2, 5), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]),
                                      "labels": torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, -100, -100, -100]])}, model)
    counter([{}])
    model.training = False  # eval batches do not count
    counter([{}])
    assert (counter.tokens, counter.loss_tokens, counter.checkpointing) == (7, 4, True)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _fake_checkpoint(d: Path, complete: bool = True) -> None:
    """Small but well-formed checkpoint files (a resume checks them: loraforge.train_monitor)."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    torch.save({"state": {}}, d / "optimizer.pt")
    torch.save({"last_epoch": 1}, d / "scheduler.pt")
    save_file({"lora_A": torch.zeros(2, 2)}, str(d / "adapter_model.safetensors"))
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": int(d.name.split("-")[1])}))


def test_prepare_checkpoints_resumes_newest_complete_and_drops_others(tmp_path):
    ck = tmp_path / "checkpoints"
    fp = {"lora": {"r": 8}, "train": {"learning_rate": 1e-3}}
    assert prepare_checkpoints(ck, fp) is None  # fresh: folder + fingerprint written
    _fake_checkpoint(ck / "checkpoint-2")
    _fake_checkpoint(ck / "checkpoint-10")
    _fake_checkpoint(ck / "checkpoint-12", complete=False)  # killed while saving
    assert prepare_checkpoints(ck, fp) == ck / "checkpoint-10"
    assert not (ck / "checkpoint-12").exists()
    assert complete_checkpoints(ck) == [ck / "checkpoint-2", ck / "checkpoint-10"]


def test_checkpoints_of_other_settings_are_discarded(tmp_path, caplog):
    ck = tmp_path / "checkpoints"
    prepare_checkpoints(ck, {"lora": {"r": 8}, "train": {"learning_rate": 1e-3}})
    _fake_checkpoint(ck / "checkpoint-4")
    with caplog.at_level("WARNING"):
        assert prepare_checkpoints(ck, {"lora": {"r": 8}, "train": {"learning_rate": 2e-3}}) is None
    assert "made with other train" in caplog.text
    assert not (ck / "checkpoint-4").exists()
    assert json.loads((ck / FINGERPRINT_FILE).read_text())["train"]["learning_rate"] == 2e-3


# ---------------------------------------------------------------------------------------------
# real training: SIGKILL mid-run, rerun, compare with an uninterrupted run

TRAIN_CHILD = """
import json, sys, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from loraforge.train import train
a = json.loads(sys.argv[1])
m = train(a["base"], a["train"], a["validation"], adapter_dir=a["adapter"], out_dir=a["out"], lora=a["lora"],
          train_params=a["train_params"])
print("METRICS", json.dumps({k: m[k] for k in ("steps", "resumed_from_step", "eval_losses", "verdict", "backend")}))
"""


def _train_args(tiny_bases, tmp: Path, data: tuple[Path, Path], **train_over) -> dict:
    train_params = {
        "backend": "auto", "load_in_4bit": False, "max_seq_length": 64, "per_device_batch_size": 2,
        "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
        "packing": True, "seed": 3407, "epochs": 1, "max_steps": 4, "save_steps": 1, "eval_steps": 2,
        **train_over,
    }
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "gate_proj"], "use_rslora": False}
    return {"base": str(tiny_bases["qwen3"]), "train": str(data[0]), "validation": str(data[1]),
            "adapter": str(tmp / "adapter"), "out": str(tmp / "train"), "lora": lora, "train_params": train_params}


def _spawn(args: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    line = next(line for line in out.splitlines() if line.startswith("METRICS "))
    return json.loads(line[len("METRICS "):]), out


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> tuple[Path, Path]:
    lines = (REPO / "data" / "rails_chat.jsonl").read_text().splitlines()
    d = tmp_path_factory.mktemp("chat")
    (d / "train.jsonl").write_text("\n".join(lines[:120]) + "\n")
    (d / "validation.jsonl").write_text("\n".join(lines[120:132]) + "\n")
    return d / "train.jsonl", d / "validation.jsonl"


def _adapter_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def _loss_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes_and_matches_an_uninterrupted_run(tiny_bases, chat_data, tmp_path):
    # the reference: one uninterrupted run
    ref_args = _train_args(tiny_bases, tmp_path / "ref", chat_data)
    ref_metrics, _ = _finish(_spawn(ref_args))
    assert ref_metrics["steps"] == 4 and ref_metrics["resumed_from_step"] is None
    assert ref_metrics["backend"] == "trl"
    assert not (tmp_path / "ref" / "train" / "checkpoints").exists()  # removed once the adapter is in place

    # the same run, SIGKILLed once checkpoint-1 is complete
    args = _train_args(tiny_bases, tmp_path / "run", chat_data)
    checkpoints = tmp_path / "run" / "train" / "checkpoints"
    proc = _spawn(args)
    deadline = time.time() + 600
    while not (checkpoints / "checkpoint-1" / "trainer_state.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "adapter").exists()  # nothing looks like a finished adapter
    assert complete_checkpoints(checkpoints)[-1].name in ("checkpoint-1", "checkpoint-2", "checkpoint-3")
    assert len(complete_checkpoints(checkpoints)) <= 2  # the last 2 are kept
    # the disk plan's size of one checkpoint (fp32 adapter + Adam's two moments + small files)
    from loraforge import sizes as S
    from loraforge.fileio import read_hf_config

    newest = complete_checkpoints(checkpoints)[-1]
    measured = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    lora = args["lora"]
    planned = S.training_checkpoint_bytes(S.lora_adapter_bytes(read_hf_config(args["base"]), lora["r"], lora["target_modules"]))
    assert 0.8 < measured / planned < 1.2, (measured, planned, sorted(f.name for f in newest.rglob("*")))

    metrics, log = _finish(_spawn(args))
    resumed = metrics["resumed_from_step"]
    assert resumed in (1, 2, 3), log[-3000:]
    assert "resuming from" in log
    assert metrics["steps"] == 4

    # Same schedule, same data order (the sampler's seed and the skipped batches), same RNG state,
    # same LoRA init (seeded): on CPU the resumed adapter is bit-identical to the uninterrupted one.
    import torch

    ref, got = _adapter_tensors(tmp_path / "ref" / "adapter"), _adapter_tensors(tmp_path / "run" / "adapter")
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert any(float(t.abs().max()) > 0 for k, t in ref.items() if "lora_B" in k)  # it really trained

    # loss.csv continues: every step once, the steps before the checkpoint as first logged
    ref_rows, rows = _loss_csv(tmp_path / "ref" / "train" / "loss.csv"), _loss_csv(tmp_path / "run" / "train" / "loss.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 5)]
    assert rows == ref_rows
    # eval loss every eval_steps (2, 4), in loss.csv and in metrics
    assert [r["step"] for r in rows if r["eval_loss"]] == ["2", "4"]
    assert [e["step"] for e in metrics["eval_losses"]] == [2, 4]
    assert "step 4/4" in log and "s/step" in log and "ETA" in log
    # the terminal's line (the process's stderr: Snakemake shows it) and the file `loraforge status` reads
    console = [line for line in log.splitlines() if line.startswith("[lora-forge] run: step ")]
    assert console and re.fullmatch(r"\[lora-forge\] run: step 4/4 \(100%\), loss [0-9.]+, [0-9,]+ tokens/s, ETA 0m00s",
                                    console[-1]), console
    progress = json.loads((tmp_path / "run" / "train" / "progress.json").read_text())
    assert (progress["step"], progress["total"]) == (4, 4) and progress["tokens_per_s"] > 0


# ---------------------------------------------------------------------------------------------
# in the workflow


@pytest.mark.slow
def test_workflow_training_outputs_and_what_makes_an_adapter_stale(pipeline, tmp_path):
    """The real pipeline's training: metrics name the backend, loss.csv has the eval column, the
    log shows progress, no checkpoints are left. Changing when checkpoints and evals happen does
    not retrain; changing the backend does."""
    from conftest import clone_pipeline, run_snakemake, small_config, write_config

    metrics = json.loads((pipeline / "results/tiny-moe/train/metrics.json").read_text())
    assert metrics["backend"] == "trl" and metrics["versions"]["peft"] and metrics["train_tokens"] > 0
    assert metrics["eval_loss"] is not None
    assert _loss_csv(pipeline / "results/tiny-moe/train/loss.csv")[-1]["eval_loss"]
    assert not (pipeline / "results/tiny-moe/train/checkpoints").exists()
    log = (pipeline / "logs/tiny-moe/train_adapter.log").read_text()
    assert "training backend: trl (train.backend: auto)" in log and "ETA" in log

    work = clone_pipeline(pipeline, tmp_path / "work")
    write_config(work, small_config(defaults={"train": {"save_steps": 1, "eval_steps": 1}}))
    assert "train_adapter" not in run_snakemake(work, "-n").stdout
    write_config(work, small_config(defaults={"train": {"backend": "trl"}}))
    assert "train_adapter" in run_snakemake(work, "-n").stdout


# ----------------------------------------------------------------------------- assistant-only loss


@pytest.mark.slow
def test_the_training_template_renders_the_same_text_and_masks_only_the_assistant(tiny_bases):
    from loraforge.constants import CHATML_JINJA_TEMPLATE
    from loraforge.tokenizer import load_tokenizer
    from loraforge.train import training_chat_template

    tok = load_tokenizer(tiny_bases["qwen3"])
    assert tok.chat_template == CHATML_JINJA_TEMPLATE
    training = training_chat_template(tok.chat_template)
    assert training != CHATML_JINJA_TEMPLATE and training_chat_template("{{ other }}") == "{{ other }}"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "gem devise?"},
            {"role": "assistant", "content": "No: the Rails 8 generator."}, {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "Good."}]
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template=training) == \
        tok.apply_chat_template(msgs, tokenize=False)
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, chat_template=training,
                                  return_assistant_tokens_mask=True)
    kept = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    # both answers and the end-of-turn token the model must learn to stop with; no user text
    assert kept == "No: the Rails 8 generator.<|im_end|>Good.<|im_end|>"


@pytest.mark.slow
def test_assistant_only_loss_trains_and_keeps_the_base_template(tiny_bases, chat_data, tmp_path):
    """A real TRL run with the default (assistant-only loss) and one on every token: different
    adapters, the saved tokenizer keeps the base's own template; a template TRL cannot mark is
    refused naming the setting."""
    import json as _json

    from loraforge.train import TrainConfigError, train

    adapters = {}
    for only in (True, False):
        a = _train_args(tiny_bases, tmp_path / str(only), chat_data, assistant_only_loss=only, max_steps=2,
                        save_steps=0, eval_steps=0)
        train(a["base"], a["train"], None, adapter_dir=a["adapter"], out_dir=a["out"], lora=a["lora"],
              train_params=a["train_params"])
        adapters[only] = _adapter_tensors(Path(a["adapter"]))
        saved = _json.loads((Path(a["adapter"]) / "tokenizer_config.json").read_text()).get("chat_template")
        saved = saved or (Path(a["adapter"]) / "chat_template.jinja").read_text()
        base = _json.loads((tiny_bases["qwen3"] / "tokenizer_config.json").read_text()).get("chat_template")
        base = base or (tiny_bases["qwen3"] / "chat_template.jinja").read_text()
        assert saved == base and "{% generation %}" not in saved
    assert any(not adapters[True][k].equal(adapters[False][k]) for k in adapters[True])

    odd = tmp_path / "odd-base"
    shutil.copytree(tiny_bases["qwen3"], odd)
    for name in ("tokenizer_config.json",):
        cfg = _json.loads((odd / name).read_text())
        if "chat_template" in cfg:
            cfg["chat_template"] = "{# house template #}" + cfg["chat_template"]
            (odd / name).write_text(_json.dumps(cfg))
    if (odd / "chat_template.jinja").exists():
        (odd / "chat_template.jinja").write_text("{# house template #}" + (odd / "chat_template.jinja").read_text())
    a = _train_args(tiny_bases, tmp_path / "odd", chat_data, max_steps=1, save_steps=0, eval_steps=0)
    with pytest.raises(TrainConfigError, match="train.assistant_only_loss"):
        train(str(odd), a["train"], None, adapter_dir=a["adapter"], out_dir=a["out"], lora=a["lora"],
              train_params=a["train_params"])
    assert not Path(a["adapter"]).exists()

    # a base without any chat template (found in a new-user walk-through: a TypeError deep in TRL)
    bare = tmp_path / "bare-base"
    shutil.copytree(tiny_bases["qwen3"], bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = _json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(_json.dumps(cfg))
    with pytest.raises(TrainConfigError, match="the base's tokenizer has no chat template"):
        train(str(bare), a["train"], None, adapter_dir=a["adapter"], out_dir=a["out"], lora=a["lora"],
              train_params=a["train_params"])


@pytest.mark.slow
def test_gradient_checkpointing_off_trains_without_it_to_the_same_adapter(tiny_bases, chat_data, tmp_path):
    """train.gradient_checkpointing: off reaches the Trainer (TRL checkpoints by default, and
    prepare_model_for_kbit_training would switch it on again for 4-bit): the metrics record it as
    off while training, and the adapter equals the checkpointed run's (recomputing the forward
    pass changes memory and time, not the numbers)."""
    import torch

    from loraforge.train import train

    adapters, metrics = {}, {}
    for mode in ("offload", "off"):
        a = _train_args(tiny_bases, tmp_path / mode, chat_data, gradient_checkpointing=mode, max_steps=2,
                        save_steps=0, eval_steps=0)
        metrics[mode] = train(a["base"], a["train"], None, adapter_dir=a["adapter"], out_dir=a["out"], lora=a["lora"],
                              train_params=a["train_params"])
        adapters[mode] = _adapter_tensors(Path(a["adapter"]))
    assert (metrics["offload"]["checkpointing_active"], metrics["off"]["checkpointing_active"]) == (True, False)
    assert metrics["off"]["gradient_checkpointing"] == "off"
    assert 0 < metrics["off"]["train_loss_tokens"] < metrics["off"]["train_tokens"]  # answers only, by default
    assert adapters["off"].keys() == adapters["offload"].keys()
    for k in adapters["off"]:
        assert torch.allclose(adapters["off"][k], adapters["offload"][k], rtol=0, atol=1e-6), k
