"""loraforge.merge on tiny real models: exactness against PEFT's merge_and_unload, the modes,
interruption and resume, refusals, and the memory bound."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model, LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loraforge.merge import arithmetic as merge_arithmetic
from loraforge.merge import stream as merge_stream
from loraforge.cli import main as cli_main
from loraforge.merge import JOURNAL_NAME, MARKER_NAME, Journal, MergeError, merge
from merge_helpers import (
    SIDE_FILES,
    build_adapter,
    build_base,
    dense_config,
    edit_adapter_config,
    file_digests,
    fuse_experts,
    load_shards,
    logits_of,
    moe_config,
    peft_merged,
    peft_merged_logits,
    shard_names,
)

# PEFT warns that its own gate_up_proj rank/alpha patterns match no module: they match the
# ParamWrapper parameter, and are used (the saved lora_A has 2r rows per expert).
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")

TOLERANCE = 1e-6
EXPERTS = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Bases and adapters shared by tests that only read them (link mode leaves the base intact)."""
    root = tmp_path_factory.mktemp("models")
    dense = build_base(str(root / "dense"), dense_config())
    moe = build_base(str(root / "moe"), moe_config(experts=EXPERTS))
    return {
        "root": root,
        "dense": dense,
        "dense_adapter": build_adapter(dense, str(root / "dense_adapter")),
        "moe": moe,
        "moe_adapter": build_adapter(moe, str(root / "moe_adapter")),
    }


def assert_matches_peft(base, adapter, out):
    ours = logits_of(out)
    theirs = peft_merged_logits(base, adapter)
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def output_digests(model_dir):
    """Digests of a merged folder's files, less the marker (it holds this run's report)."""
    return {k: v for k, v in file_digests(model_dir).items() if k != MARKER_NAME}


def untouched_shards(base):
    """Shards holding no LoRA target: in the tiny models, the one with lm_head alone."""
    names = []
    for shard in shard_names(base):
        with safe_open(os.path.join(base, shard), "pt") as f:
            if all(not k.endswith(("_proj.weight", "gate_up_proj", "down_proj")) for k in f.keys()):
                names.append(shard)
    return names


# --------------------------------------------------------------------------------------------
# exactness


def test_dense_matches_peft_merge_and_links_untouched_shards(models, tmp_path):
    base, adapter, out = models["dense"], models["dense_adapter"], str(tmp_path / "out")
    before = file_digests(base)
    report = merge(base, adapter, out, progress=False)

    theirs = peft_merged(base, adapter).state_dict()
    ours = load_shards(out)
    assert set(ours) == set(theirs)
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert different == []  # fp32: bit-identical to PEFT, not merely close
    assert_matches_peft(base, adapter, out)

    linked = untouched_shards(base)
    assert linked, "the test model must have a shard without targeted tensors"
    for shard in linked:
        assert os.stat(os.path.join(out, shard)).st_ino == os.stat(os.path.join(base, shard)).st_ino
    assert file_digests(base) == before  # the base is intact
    assert report.shards == len(shard_names(base)) == len(shard_names(out))
    assert report.shards_linked == len(linked) and report.shards_merged == report.shards - len(linked)
    assert report.tensors_merged == 2 * 7  # layers x q/k/v/o/gate/up/down
    assert report.bytes_written > 0 and report.seconds > 0
    assert json.loads(json.dumps(report.as_dict()))["tensors_merged"] == 14

    # the folder carries everything else over
    for name in [*SIDE_FILES, "config.json", "generation_config.json"]:
        with open(os.path.join(base, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    index = "model.safetensors.index.json"
    with open(os.path.join(base, index)) as a, open(os.path.join(out, index)) as b:
        assert json.load(a)["weight_map"] == json.load(b)["weight_map"]
    assert os.path.exists(os.path.join(out, MARKER_NAME))
    assert not os.path.exists(out + ".partial")
    # shard metadata kept, and safetensors itself reads the files
    with safe_open(os.path.join(out, shard_names(out)[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_rslora(models, tmp_path):
    adapter = build_adapter(models["dense"], str(tmp_path / "adapter"), r=8, lora_alpha=4, use_rslora=True)
    merge(models["dense"], adapter, str(tmp_path / "out"), progress=False)
    assert_matches_peft(models["dense"], adapter, str(tmp_path / "out"))


def test_rank_and_alpha_patterns(models, tmp_path):
    adapter = build_adapter(
        models["dense"], str(tmp_path / "adapter"), r=4, lora_alpha=8,
        rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
        # PEFT matches whole dotted suffixes: "proj" must NOT match "q_proj"; first match wins
        alpha_pattern={"proj": 1000, r"layers\.0\..*o_proj": 3, "o_proj": 20, "v_proj": 32},
    )  # fmt: skip
    merge(models["dense"], adapter, str(tmp_path / "out"), progress=False)
    theirs = peft_merged(models["dense"], adapter).state_dict()
    ours = load_shards(str(tmp_path / "out"))
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert_matches_peft(models["dense"], adapter, str(tmp_path / "out"))


def test_bf16_base_is_rounded_once(tmp_path):
    base = build_base(str(tmp_path / "base"), dense_config(), dtype=torch.bfloat16)
    adapter = build_adapter(base, str(tmp_path / "adapter"))
    merge(base, adapter, str(tmp_path / "out"), progress=False)
    base_tensors, ours = load_shards(base), load_shards(str(tmp_path / "out"))
    lora = load_shards(adapter)
    scale = 8 / 4  # lora_alpha / r, build_adapter's defaults
    for layer in range(2):
        name = f"model.layers.{layer}.self_attn.q_proj"
        a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
        expected = (base_tensors[f"{name}.weight"].float() + (b.float() @ a.float()) * scale).to(torch.bfloat16)
        assert ours[f"{name}.weight"].dtype == torch.bfloat16
        assert torch.equal(ours[f"{name}.weight"], expected)


def test_peft_expert_layout_is_what_merge_assumes(models):
    """Pin down PEFT's ParamWrapper layout for Qwen3-MoE (the facts the merge relies on)."""
    model = AutoModelForCausalLM.from_pretrained(models["moe"], dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    config = peft_model.peft_config["default"]
    # gate/up/down were rewritten to target_parameters; gate_up got r and alpha doubled
    assert set(config.target_parameters) == {"gate_up_proj", "down_proj"}
    assert config.rank_pattern == {r".*\.gate_up_proj": 8} and config.alpha_pattern == {r".*\.gate_up_proj": 16}
    outer = peft_model.base_model.model.model.layers[0].mlp.experts
    inner = outer.base_layer  # registration order: gate_up_proj inside, down_proj outside
    assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")
    hidden, inter = 256, 256
    for wrapper, r, out_features, in_features in ((inner, 8, 2 * inter, hidden), (outer, 4, hidden, inter)):
        a = wrapper.lora_A["default"].weight
        b = wrapper.lora_B["default"].weight
        torch.nn.init.normal_(b)
        assert a.shape == (EXPERTS * r, in_features) and b.shape == (out_features, EXPERTS * r)
        delta = wrapper.get_delta_weight("default")  # [E, out, in], as the 3-D parameter
        for e in range(EXPERTS):
            ours = (b[:, e::EXPERTS] @ a.reshape(EXPERTS, r, in_features)[e]) * wrapper.scaling["default"]
            assert torch.equal(ours, delta[e])


def test_moe_peft_expert_adapter_matches_peft(models, tmp_path):
    base, adapter, out = models["moe"], models["moe_adapter"], str(tmp_path / "out")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["target_parameters"]  # PEFT's ParamWrapper adapter, not per-expert Linear
    report = merge(base, adapter, out, progress=False)
    assert_matches_peft(base, adapter, out)
    # every expert's gate, up and down changed
    before, after = load_shards(base), load_shards(out)
    expert_tensors = [n for n in before if ".mlp.experts." in n]
    assert len(expert_tensors) == 2 * EXPERTS * 3
    assert all(not torch.equal(before[n], after[n]) for n in expert_tensors)
    assert report.tensors_merged == 2 * (4 + EXPERTS * 3)


def test_unsloth_style_expert_adapter(models, tmp_path):
    """Unsloth passes target_parameters itself, keeps rank_pattern empty (gate_up at rank r, not
    2r) and writes target_modules as a regex."""
    regex = r".*\.(q_proj|k_proj|v_proj|o_proj)"
    adapter = build_adapter(
        models["moe"], str(tmp_path / "adapter"), target_modules=regex,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], rank_pattern={},
    )  # fmt: skip
    edit_adapter_config(adapter, target_modules=regex)  # PEFT saves the regex resolved to a list
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    merge(models["moe"], adapter, str(tmp_path / "out"), progress=False)
    assert_matches_peft(models["moe"], adapter, str(tmp_path / "out"))


def test_fused_3d_expert_base(models, tmp_path):
    fused = fuse_experts(models["moe"], str(tmp_path / "fused"), EXPERTS)
    assert torch.equal(logits_of(fused), logits_of(models["moe"]))  # transformers reads it the same
    out = str(tmp_path / "out")
    report = merge(fused, models["moe_adapter"], out, progress=False)
    assert_matches_peft(fused, models["moe_adapter"], out)
    assert report.tensors_merged == 2 * (4 + 2)  # per layer: q/k/v/o + gate_up_proj + down_proj
    assert report.matrices_merged == 2 * (4 + 2 * EXPERTS)
    before, after = load_shards(fused), load_shards(out)
    for name in before:
        if name.endswith(("gate_up_proj", "down_proj")):
            assert all(not torch.equal(before[name][e], after[name][e]) for e in range(EXPERTS))


def test_row_blocks_stay_within_one_ulp(models, tmp_path, monkeypatch):
    """Huge tensors are merged in row blocks to bound memory. MKL may then round a delta element
    differently than in one big matmul (PEFT's), by an ulp of the delta."""
    merge(models["dense"], models["dense_adapter"], str(tmp_path / "whole"), progress=False)
    monkeypatch.setattr(merge_arithmetic, "BLOCK_BYTES", 4096)  # 4 rows of 256 fp32 per block
    merge(models["dense"], models["dense_adapter"], str(tmp_path / "blocks"), progress=False)
    whole, blocks = load_shards(str(tmp_path / "whole")), load_shards(str(tmp_path / "blocks"))
    for name, x in whole.items():
        scale = x.abs().max().item()
        torch.testing.assert_close(blocks[name], x, rtol=0, atol=torch.finfo(torch.float32).eps * scale)
    assert_matches_peft(models["dense"], models["dense_adapter"], str(tmp_path / "blocks"))


# --------------------------------------------------------------------------------------------
# modes and filesystems


def test_link_falls_back_to_copy_on_exdev(models, tmp_path, monkeypatch):
    def cross_device_link(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src)

    monkeypatch.setattr(os, "link", cross_device_link)
    out = str(tmp_path / "out")
    report = merge(models["dense"], models["dense_adapter"], out, progress=False)
    assert report.shards_linked == 0 and report.shards_copied == len(untouched_shards(models["dense"]))
    for shard in untouched_shards(models["dense"]):
        assert os.stat(os.path.join(out, shard)).st_ino != os.stat(os.path.join(models["dense"], shard)).st_ino
    assert_matches_peft(models["dense"], models["dense_adapter"], out)


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
    reason="needs /dev/shm on another filesystem than /tmp",
)
def test_real_cross_filesystem_link_and_consume(models, tmp_path):
    shm_base = shutil.copytree(models["dense"], f"/dev/shm/loraforge-test-{os.getpid()}")
    try:
        report = merge(shm_base, models["dense_adapter"], str(tmp_path / "linked"), progress=False)
        assert report.shards_linked == 0 and report.shards_copied == 1
        report = merge(shm_base, models["dense_adapter"], str(tmp_path / "consumed"), mode="consume", progress=False)
        assert report.shards_moved == 0 and report.shards_copied == 1
        assert shard_names(shm_base) == []
        assert output_digests(str(tmp_path / "linked")) == output_digests(str(tmp_path / "consumed"))
    finally:
        shutil.rmtree(shm_base)


def make_hf_cache_copy(base: str, root: str) -> str:
    """A copy of `base` laid out like a Hugging Face cache snapshot: symlinks into blobs/."""
    blobs, snapshot = os.path.join(root, "blobs"), os.path.join(root, "snapshots", "abc123")
    os.makedirs(blobs)
    os.makedirs(snapshot)
    for i, name in enumerate(sorted(os.listdir(base))):
        shutil.copyfile(os.path.join(base, name), os.path.join(blobs, f"blob{i}"))
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), os.path.join(snapshot, name))
    return snapshot


def test_consume_mode_moves_and_removes_base_shards(models, tmp_path):
    snapshot = make_hf_cache_copy(models["dense"], str(tmp_path / "cache"))
    untouched = untouched_shards(snapshot)
    moved_inodes = {s: os.stat(os.path.realpath(os.path.join(snapshot, s))).st_ino for s in untouched}
    out = str(tmp_path / "out")
    report = merge(snapshot, models["dense_adapter"], out, mode="consume", progress=True)

    assert shard_names(snapshot) == []  # links and blobs of every shard are gone
    assert len(os.listdir(tmp_path / "cache" / "blobs")) == len(os.listdir(models["dense"])) - report.shards
    for shard, inode in moved_inodes.items():
        assert os.stat(os.path.join(out, shard)).st_ino == inode
    assert report.shards_moved == len(untouched) and report.shards_merged == report.shards - len(untouched)
    # config and tokenizer files were copied, not moved: the base folder still has them
    for name in [*SIDE_FILES, "config.json", "model.safetensors.index.json"]:
        assert os.path.exists(os.path.join(snapshot, name)) and os.path.exists(os.path.join(out, name))
    assert_matches_peft(models["dense"], models["dense_adapter"], out)


def test_consume_falls_back_to_copy_on_exdev(models, tmp_path, monkeypatch):
    base = shutil.copytree(models["dense"], str(tmp_path / "base"))
    real_rename = os.rename

    def rename_within_directories_only(src, dst, *args, **kwargs):
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src)
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename_within_directories_only)
    out = str(tmp_path / "out")
    report = merge(base, models["dense_adapter"], out, mode="consume", progress=False)
    assert report.shards_moved == 0 and report.shards_copied == len(untouched_shards(models["dense"]))
    assert shard_names(base) == []
    assert_matches_peft(models["dense"], models["dense_adapter"], out)


def test_copy_mode_copies_everything(models, tmp_path):
    out = str(tmp_path / "out")
    report = merge(models["dense"], models["dense_adapter"], out, mode="copy", progress=False)
    for shard in untouched_shards(models["dense"]):
        assert os.stat(os.path.join(out, shard)).st_ino != os.stat(os.path.join(models["dense"], shard)).st_ino
    assert report.shards_copied == 1 and report.shards_linked == 0
    assert_matches_peft(models["dense"], models["dense_adapter"], out)


# --------------------------------------------------------------------------------------------
# interruption


@pytest.fixture(scope="module")
def reference_merge(models):
    out = str(models["root"] / "reference")
    merge(models["dense"], models["dense_adapter"], out, progress=False)
    return out


def fail_on_record(monkeypatch, should_fail, before_recording=False):
    """Raise from Journal.record once `should_fail(entry, n)` says so: after a shard is durable
    (and, before_recording=True, before its journal entry is written)."""
    real_record = Journal.record
    count = {"n": 0}

    def record(self, entry):
        count["n"] += 1
        if before_recording and should_fail(entry, count["n"]):
            raise RuntimeError(f"injected failure at {entry['shard']}")
        real_record(self, entry)
        if not before_recording and should_fail(entry, count["n"]):
            raise RuntimeError(f"injected failure after {entry['shard']}")

    monkeypatch.setattr(Journal, "record", record)


def assert_nothing_lost(base, out, shards):
    assert not os.path.exists(out)  # never a finished-looking output
    partial = out + ".partial"
    assert not os.path.exists(os.path.join(partial, MARKER_NAME))
    for shard in shards:
        assert os.path.exists(os.path.join(base, shard)) or os.path.exists(os.path.join(partial, shard)), shard


@pytest.mark.parametrize("mode", ["link", "consume", "copy"])
def test_interrupted_merge_resumes(models, reference_merge, tmp_path, monkeypatch, mode):
    base = shutil.copytree(models["dense"], str(tmp_path / "base"))
    shards, out = shard_names(base), str(tmp_path / "out")
    fail_on_record(monkeypatch, lambda entry, n: n == 3)
    with pytest.raises(RuntimeError, match="injected"):
        merge(base, models["dense_adapter"], out, mode=mode, progress=False)
    monkeypatch.undo()
    assert_nothing_lost(base, out, shards)
    if mode == "consume":
        assert len(shard_names(base)) == len(shards) - 2  # shard 3 was recorded but not yet removed

    report = merge(base, models["dense_adapter"], out, mode=mode, progress=False)
    assert report.shards_resumed == 3 and report.shards == len(shards)
    assert report.tensors_merged == 14
    assert shard_names(base) == ([] if mode == "consume" else shards)
    assert output_digests(out) == output_digests(reference_merge)
    assert not os.path.exists(os.path.join(out, JOURNAL_NAME))


def test_consume_interrupted_between_move_and_journal(models, reference_merge, tmp_path, monkeypatch):
    """A shard moved by os.rename whose journal entry never got written is found and kept."""
    base = shutil.copytree(models["dense"], str(tmp_path / "base"))
    shards, out = shard_names(base), str(tmp_path / "out")
    fail_on_record(monkeypatch, lambda entry, n: entry["action"] == "moved", before_recording=True)
    with pytest.raises(RuntimeError, match="injected"):
        merge(base, models["dense_adapter"], out, mode="consume", progress=False)
    monkeypatch.undo()
    assert_nothing_lost(base, out, shards)
    report = merge(base, models["dense_adapter"], out, mode="consume", progress=False)
    assert report.shards_moved == 1 and report.shards_resumed == len(shards)
    assert file_digests(out).keys() == file_digests(reference_merge).keys()
    assert_matches_peft(models["dense"], models["dense_adapter"], out)


@pytest.mark.slow
def test_killed_consume_merge_resumes(models, reference_merge, tmp_path):
    """SIGKILL (no cleanup at all) right after the second shard is recorded, then a rerun."""
    base = shutil.copytree(models["dense"], str(tmp_path / "base"))
    shards, out = shard_names(base), str(tmp_path / "out")
    script = textwrap.dedent(f"""
        import os, signal
        from loraforge.merge import Journal, merge
        real_record, done = Journal.record, []
        def record(self, entry):
            real_record(self, entry)
            done.append(entry)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        Journal.record = record
        merge({base!r}, {models["dense_adapter"]!r}, {out!r}, mode="consume", progress=False)
    """)
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    assert_nothing_lost(base, out, shards)
    report = merge(base, models["dense_adapter"], out, mode="consume", progress=False)
    assert report.shards_resumed == 2 and shard_names(base) == []
    assert output_digests(out) == output_digests(reference_merge)


def test_interrupted_before_final_rename(models, reference_merge, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    real_publish = merge_stream._publish

    def publish_fails_once(partial_dir, out_dir):
        monkeypatch.setattr(merge_stream, "_publish", real_publish)
        raise RuntimeError("injected failure before the final rename")

    monkeypatch.setattr(merge_stream, "_publish", publish_fails_once)
    with pytest.raises(RuntimeError, match="injected"):
        merge(models["dense"], models["dense_adapter"], out, progress=False)
    assert not os.path.exists(out) and os.path.exists(os.path.join(out + ".partial", MARKER_NAME))
    report = merge(models["dense"], models["dense_adapter"], out, progress=False)
    assert report.tensors_merged == 14 and output_digests(out) == output_digests(reference_merge)


def test_partial_output_of_other_inputs(models, tmp_path, monkeypatch):
    """A retrained adapter makes a leftover link-mode partial output stale: it is discarded. A
    consume-mode one holds base shards, so it is never discarded."""
    other = build_adapter(models["dense"], str(tmp_path / "other"), seed=7)
    out = str(tmp_path / "out")
    fail_on_record(monkeypatch, lambda entry, n: n == 1)
    with pytest.raises(RuntimeError):
        merge(models["dense"], models["dense_adapter"], out, progress=False)
    monkeypatch.undo()
    report = merge(models["dense"], other, out, progress=False)
    assert report.shards_resumed == 0
    assert_matches_peft(models["dense"], other, out)

    base = shutil.copytree(models["dense"], str(tmp_path / "base"))
    out = str(tmp_path / "consumed")
    fail_on_record(monkeypatch, lambda entry, n: n == 1)
    with pytest.raises(RuntimeError):
        merge(base, models["dense_adapter"], out, mode="consume", progress=False)
    monkeypatch.undo()
    with pytest.raises(MergeError, match="consume-mode merge of other inputs .*adapter_sha256"):
        merge(base, other, out, mode="consume", progress=False)
    merge(base, models["dense_adapter"], out, mode="consume", progress=False)  # the same inputs finish it
    assert shard_names(base) == []


# --------------------------------------------------------------------------------------------
# refusals: all before anything is written


def assert_refused(base, adapter, out, match):
    with pytest.raises(MergeError, match=match):
        merge(base, adapter, out, progress=False)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's own warnings about these adapters
@pytest.mark.parametrize(
    "option, lora_kwargs",
    [
        ("use_dora", {"use_dora": True}),
        ("lora_bias", {"lora_bias": True}),
        ("modules_to_save", {"modules_to_save": ["lm_head"]}),
    ],
)
def test_refuses_unmergeable_options(models, tmp_path, option, lora_kwargs):
    adapter = build_adapter(models["dense"], str(tmp_path / "adapter"), **lora_kwargs)
    assert_refused(models["dense"], adapter, str(tmp_path / "out"), option)


def test_refuses_fan_in_fan_out(models, tmp_path):
    # PEFT resets fan_in_fan_out for nn.Linear targets (it is for GPT-2-style Conv1D), so a real
    # adapter never has it here; an edited config stands in for one made for such a model.
    adapter = shutil.copytree(models["dense_adapter"], str(tmp_path / "adapter"))
    edit_adapter_config(adapter, fan_in_fan_out=True)
    assert_refused(models["dense"], adapter, str(tmp_path / "out"), "fan_in_fan_out")


def test_refuses_shape_mismatch(models, tmp_path):
    wider = build_base(str(tmp_path / "wider"), dense_config(hidden=384))
    adapter = build_adapter(wider, str(tmp_path / "adapter"))
    assert_refused(models["dense"], adapter, str(tmp_path / "out"), "shape mismatch")


def test_refuses_adapter_for_another_architecture(models, tmp_path):
    assert_refused(models["dense"], models["moe_adapter"], str(tmp_path / "out"), "Qwen3MoeForCausalLM")
    # without PEFT's auto_mapping the keys themselves give it away
    adapter = shutil.copytree(models["moe_adapter"], str(tmp_path / "adapter"))
    edit_adapter_config(adapter, auto_mapping=None)
    assert_refused(models["dense"], adapter, str(tmp_path / "out"), "another architecture")


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_refuses_unknown_adapter_keys(models, tmp_path):
    adapter = build_adapter(models["dense"], str(tmp_path / "adapter"), target_modules=["q_proj", "embed_tokens"])
    assert_refused(models["dense"], adapter, str(tmp_path / "out"), "not LoRA A/B matrices")


def test_refuses_rank_that_disagrees_with_config(models, tmp_path):
    adapter = shutil.copytree(models["dense_adapter"], str(tmp_path / "adapter"))
    edit_adapter_config(adapter, r=8)
    assert_refused(models["dense"], adapter, str(tmp_path / "out"), "rank 4")


def test_refuses_an_adapter_that_was_never_trained(models, tmp_path):
    """All lora_B zero (PEFT's init): nothing would change; refused before anything is written."""
    adapter = build_adapter(models["moe"], str(tmp_path / "adapter"), randomize=False)
    assert_refused(models["moe"], adapter, str(tmp_path / "out"), "never trained")


def test_an_expert_the_router_never_picked_stays_unchanged(models, tmp_path):
    """In MoE training an expert that never received a token keeps PEFT's zero B columns: its
    delta is zero, so it is left unchanged and reported, while every other expert is merged
    (and still checked to have changed) exactly as PEFT merges it."""
    adapter = shutil.copytree(models["moe_adapter"], str(tmp_path / "adapter"))
    weights_path = os.path.join(adapter, "adapter_model.safetensors")
    weights = load_file(weights_path)
    down_B = next(k for k in weights if k.startswith("base_model.model.model.layers.0.") and k.endswith("experts.lora_B.weight"))
    silent = 1  # expert e owns the columns e::E of the fused B
    weights[down_B][:, silent::EXPERTS] = 0
    save_file(weights, weights_path)
    out = str(tmp_path / "out")
    report = merge(models["moe"], adapter, out, progress=False)
    assert report.matrices_untrained == 1
    assert_matches_peft(models["moe"], adapter, out)
    before, after = load_shards(models["moe"]), load_shards(out)
    untouched = f"model.layers.0.mlp.experts.{silent}.down_proj.weight"
    assert torch.equal(before[untouched], after[untouched])
    changed = [n for n in before if ".mlp.experts." in n and n != untouched and not torch.equal(before[n], after[n])]
    assert len(changed) == 2 * EXPERTS * 3 - 1


def test_fails_loudly_when_a_delta_rounds_away(tmp_path):
    """Non-zero factors whose delta is below half a bf16 ulp of every weight: the after-merge
    check names the tensor, and nothing finished-looking is left behind."""
    base = build_base(str(tmp_path / "base"), dense_config(), dtype=torch.bfloat16)
    adapter = build_adapter(base, str(tmp_path / "adapter"))
    weights_path = os.path.join(adapter, "adapter_model.safetensors")
    weights = load_file(weights_path)
    save_file({k: v * 1e-9 if "lora_B" in k else v for k, v in weights.items()}, weights_path)
    out = str(tmp_path / "out")
    with pytest.raises(MergeError, match=r"model\.layers\.0\..*unchanged after merging"):
        merge(base, adapter, out, progress=False)
    assert not os.path.exists(out)
    assert not os.path.exists(os.path.join(out + ".partial", MARKER_NAME))


def test_refuses_existing_output(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(MergeError, match="already exists"):
        merge(models["dense"], models["dense_adapter"], str(out), progress=False)


# --------------------------------------------------------------------------------------------
# memory bound, CLI


@pytest.mark.slow
def test_peak_rss_stays_within_a_shard_plus_the_adapter(tmp_path):
    """Peak RSS growth over the baseline after imports, in a fresh process. Read from the kernel's
    VmHWM, reset to the current RSS after the imports: the child's ru_maxrss would start at this
    pytest process's own RSS (vfork+exec carries the parent's high-water mark over), far above
    anything the merge adds, which would make the check pass blindly."""
    base = build_base(str(tmp_path / "base"), dense_config(layers=64), max_shard_size="8MB")
    adapter = build_adapter(base, str(tmp_path / "adapter"), r=8)
    script = textwrap.dedent("""
        import json, sys
        from loraforge.merge import merge

        def status(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        baseline = status("VmRSS")
        merge(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
        print(json.dumps([baseline, status("VmHWM")]))
    """)
    command = [PYTHON, "-c", script, base, adapter, str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    baseline, peak = json.loads(result.stdout.strip().splitlines()[-1])
    growth = peak - baseline
    shard_sizes = [os.path.getsize(os.path.join(base, s)) for s in shard_names(base)]
    adapter_size = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
    # one-time OpenMP thread pool and MKL start-up on the first matmul: about 7 MiB, measured,
    # once per merge worker thread (each runs its own; in a busy full-suite run both start)
    slack = 10 * 2**20 * merge_stream._worker_count()
    bound = 1.2 * (max(shard_sizes) + adapter_size) + slack
    assert baseline > 100 * 2**20  # torch is imported: the baseline is a real one
    assert sum(shard_sizes) > 3 * bound  # holding the whole model would fail the check
    assert growth <= bound, f"grew {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"


def test_cli(models, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    out = str(tmp_path / "out")
    rc = cli_main(["merge", "--base", models["dense"], "--adapter", models["dense_adapter"], "--out", out,
                   "--mode", "link", "--report", str(report_path), "--no-progress"])  # fmt: skip
    assert rc == 0
    assert json.loads(report_path.read_text())["tensors_merged"] == 14
    assert os.path.exists(os.path.join(out, "config.json"))
    missing = str(tmp_path / "nope")
    rc = cli_main(["merge", "--base", models["dense"], "--adapter", missing, "--out", str(tmp_path / "o2")])
    assert rc == 1 and "adapter_config.json not found" in capsys.readouterr().err


@pytest.mark.slow
def test_snakemake_rule_script(models, tmp_path):
    """scripts/merge.py run by Snakemake itself, as the workflow's merge rule runs it."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(textwrap.dedent(f"""
        rule merge:
            input:
                base={models["dense"]!r},
                adapter={models["dense_adapter"]!r},
            output:
                merged=directory("merged"),
                report="merged.report.json",
            params:
                mode="link",
                base_is_users=True,
            log:
                "logs/merge.log",
            script:
                {os.path.join(REPO, "scripts", "merge.py")!r}
    """))
    snakemake = os.path.join(os.path.dirname(PYTHON), "snakemake")
    result = subprocess.run(
        [snakemake, "-s", str(snakefile), "-d", str(tmp_path), "--cores", "1", "merged"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "merged.report.json").read_text())
    assert report["tensors_merged"] == 14 and report["shards_linked"] == 1
    assert "model-00001" in (tmp_path / "logs" / "merge.log").read_text()
    assert_matches_peft(models["dense"], models["dense_adapter"], str(tmp_path / "merged"))
