"""The merge reads Unsloth's fused-expert layout fields (adapter_config.json
`unsloth_fused_expert_lora`: lora_A_layout, lora_B_layout per parameter) and refuses layouts it
does not know. Synthetic adapters: a PEFT adapter (rank_major) and the same adapter with its
lora_B columns rearranged into Unsloth's older grouped_by_expert order must merge identically."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.expert_lora_layout import ExpertLoraLayouts, LayoutError, expert_B_blocks
from loraforge.merge import MergeError, merge
from merge_helpers import build_adapter, build_base, load_shards, logits_of, moe_config, peft_merged_logits

EXPERTS = 4
UNSLOTH_TARGETS = dict(
    target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj)",
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    rank_pattern={},
)


def marker(b_layout: str, a_layout: str = "grouped_by_expert", experts: int = EXPERTS) -> dict:
    """adapter_config.json fields as unsloth_zoo writes them."""
    return {
        "lora_B_layout": b_layout,
        "unsloth_fused_expert_lora": {
            "lora_A_layout": a_layout,
            "lora_B_layout": b_layout,
            "parameters": {p: {"lora_B_layout": b_layout, "num_experts": experts} for p in ("gate_up_proj", "down_proj")},
        },
    }


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    base = build_base(str(root / "base"), moe_config(experts=EXPERTS))
    adapter = build_adapter(base, str(root / "adapter"), **UNSLOTH_TARGETS)
    return {"root": root, "base": base, "adapter": adapter}


def copy_adapter(src: str, dst: str, config_changes: dict, regroup: bool = False) -> str:
    """A copy of the adapter with adapter_config.json changed and, with regroup, every fused
    expert lora_B rearranged from rank_major into grouped_by_expert column order."""
    os.makedirs(dst)
    with open(os.path.join(src, "adapter_config.json")) as f:
        config = json.load(f)
    config.update(config_changes)
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    weights = load_file(os.path.join(src, "adapter_model.safetensors"))
    if regroup:
        for key, b in weights.items():
            if ".experts." in key and "lora_B" in key:
                r = b.shape[1] // EXPERTS
                # rank_major column j*E + e -> grouped column e*r + j
                weights[key] = b.reshape(b.shape[0], r, EXPERTS).transpose(1, 2).reshape(b.shape).contiguous()
    save_file(weights, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def test_layout_blocks_pick_each_experts_columns():
    r, out = 3, 5
    b = torch.arange(out * EXPERTS * r, dtype=torch.float32).reshape(out, EXPERTS * r)
    rank_major = expert_B_blocks(b, EXPERTS, r, "rank_major")
    grouped = expert_B_blocks(b, EXPERTS, r, "grouped_by_expert")
    for e in range(EXPERTS):
        assert torch.equal(rank_major[e], b[:, e::EXPERTS])
        assert torch.equal(grouped[e], b[:, e * r : (e + 1) * r])


def test_rank_major_marker_merges_like_peft(moe, tmp_path):
    adapter = copy_adapter(moe["adapter"], str(tmp_path / "adapter"), marker("rank_major"))
    out = str(tmp_path / "out")
    merge(moe["base"], adapter, out, progress=False)
    assert (logits_of(out) - peft_merged_logits(moe["base"], moe["adapter"])).abs().max().item() <= 1e-4


def test_grouped_by_expert_adapter_merges_to_the_same_model(moe, tmp_path):
    """The same trained factors saved in the older Unsloth order, declared as such: the merged
    tensors are bit-identical to the rank_major merge."""
    plain = str(tmp_path / "plain")
    merge(moe["base"], moe["adapter"], plain, progress=False)
    grouped = copy_adapter(moe["adapter"], str(tmp_path / "grouped"), marker("grouped_by_expert"), regroup=True)
    out = str(tmp_path / "out")
    merge(moe["base"], grouped, out, progress=False)
    ours, ref, base = load_shards(out), load_shards(plain), load_shards(moe["base"])
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ours)
    assert any(".experts." in k and not torch.equal(ours[k], base[k]) for k in ours)


def test_the_marker_decides_not_a_guess(moe, tmp_path):
    """grouped columns read as rank_major pair each expert's A with other experts' B: the
    merge differs, which is why the field has to be read."""
    wrong = copy_adapter(moe["adapter"], str(tmp_path / "wrong"), marker("rank_major"), regroup=True)
    plain, out = str(tmp_path / "plain"), str(tmp_path / "out")
    merge(moe["base"], moe["adapter"], plain, progress=False)
    merge(moe["base"], wrong, out, progress=False)
    ours, ref = load_shards(out), load_shards(plain)
    assert any(not torch.equal(ours[k], ref[k]) for k in ours if ".experts." in k)


def test_marker_under_auto_mapping_and_top_level_only(moe, tmp_path):
    with open(os.path.join(moe["adapter"], "adapter_config.json")) as f:
        auto_mapping = json.load(f).get("auto_mapping") or {}
    fields = marker("grouped_by_expert")
    nested = {"auto_mapping": {**auto_mapping, "unsloth_fused_expert_lora": fields["unsloth_fused_expert_lora"]}}
    a = copy_adapter(moe["adapter"], str(tmp_path / "a"), nested, regroup=True)
    b = copy_adapter(moe["adapter"], str(tmp_path / "b"), {"lora_B_layout": "grouped_by_expert"}, regroup=True)
    plain = str(tmp_path / "plain")
    merge(moe["base"], moe["adapter"], plain, progress=False)
    ref = load_shards(plain)
    for adapter in (a, b):
        out = adapter + "-out"
        merge(moe["base"], adapter, out, progress=False)
        assert all(torch.equal(v, ref[k]) for k, v in load_shards(out).items())


@pytest.mark.parametrize(
    "changes, message",
    [
        (marker("mixed"), r"lora_B_layout is 'mixed', a fused-expert LoRA layout lora-forge does not know"),
        (marker("rank_major", a_layout="rank_major"), r"lora_A_layout is 'rank_major'"),
        ({**marker("rank_major"), "lora_B_layout": "grouped_by_expert"}, r"refusing to guess"),
        (marker("rank_major", experts=8), r"num_experts is 8, the base has 4 experts"),
        ({"lora_B_layout": "expert_major_v2"}, r"'expert_major_v2'"),
    ],
)
def test_unknown_or_inconsistent_layouts_are_refused_by_name(moe, tmp_path, changes, message):
    adapter = copy_adapter(moe["adapter"], str(tmp_path / "adapter"), changes)
    out = str(tmp_path / "out")
    with pytest.raises(MergeError, match=message):
        merge(moe["base"], adapter, out, progress=False)
    assert not os.path.exists(out)


def test_parse_per_parameter_layouts():
    cfg = marker("rank_major")
    cfg["unsloth_fused_expert_lora"]["parameters"]["down_proj"]["lora_B_layout"] = "grouped_by_expert"
    layouts = ExpertLoraLayouts.from_config(cfg)
    assert layouts.lora_B_layout_of("gate_up_proj", EXPERTS) == "rank_major"
    assert layouts.lora_B_layout_of("down_proj", EXPERTS) == "grouped_by_expert"
    assert ExpertLoraLayouts.from_config({}).lora_B_layout_of("gate_up_proj", 128) == "rank_major"  # PEFT
    with pytest.raises(LayoutError, match="not an object"):
        ExpertLoraLayouts.from_config({"unsloth_fused_expert_lora": "rank_major"})
