"""How a fused-expert LoRA adapter lays out its experts, read from adapter_config.json.

PEFT's ParamWrapper stores the LoRA of a 3-D expert parameter [E, out, in] as two 2-D factors,
lora_A [E*r, in] and lora_B [out, E*r], flattened differently:
  lora_A: grouped_by_expert, A.reshape(E, r, in): expert e owns rows e*r .. e*r+r-1;
  lora_B: rank_major, B.reshape(out, r, E): expert e owns columns e, e+E, e+2E, ...
Unsloth's MoE path trained lora_B grouped_by_expert (B.reshape(out, E, r): a contiguous block of
r columns per expert) before unsloth_zoo#1269; since then it trains rank_major like PEFT, and it
records which one an adapter has in adapter_config.json (unsloth_zoo saving_utils / moe_utils):

    "lora_B_layout": "rank_major",                      # top level (the first parameter's)
    "unsloth_fused_expert_lora": {
        "lora_A_layout": "grouped_by_expert",
        "lora_B_layout": "rank_major",
        "parameters": {"gate_up_proj": {"lora_B_layout": "rank_major", "num_experts": 128}, ...}}

(the marker is also found under auto_mapping). The merge reads the layout per parameter, most
specific first; an adapter without any marker is PEFT's own layout. A value lora-forge does not
know (a future layout, or "mixed") is refused by name instead of guessed: a wrong guess pairs
each expert's A with another expert's B and still produces a plausible-looking model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GROUPED_BY_EXPERT = "grouped_by_expert"
RANK_MAJOR = "rank_major"
LORA_A_LAYOUTS = (GROUPED_BY_EXPERT,)
LORA_B_LAYOUTS = (RANK_MAJOR, GROUPED_BY_EXPERT)
MARKER = "unsloth_fused_expert_lora"


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class ExpertLoraLayouts:
    """The fused-expert layout fields of one adapter_config.json."""

    lora_A_layout: str = GROUPED_BY_EXPERT
    lora_B_layout: str = RANK_MAJOR  # for parameters the marker does not list
    per_parameter: dict[str, dict[str, Any]] = field(default_factory=dict)
    marked: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ExpertLoraLayouts:
        marker = config.get(MARKER)
        if marker is None:
            marker = (config.get("auto_mapping") or {}).get(MARKER)
        top_b = config.get("lora_B_layout")
        if marker is None:
            if top_b is not None:
                _check(top_b, LORA_B_LAYOUTS, "lora_B_layout")
            return cls(lora_B_layout=top_b or RANK_MAJOR, marked=top_b is not None)
        if not isinstance(marker, dict):
            raise LayoutError(f"adapter_config.json: {MARKER} is {marker!r}, not an object")
        a_layout = marker.get("lora_A_layout", GROUPED_BY_EXPERT)
        _check(a_layout, LORA_A_LAYOUTS, f"{MARKER}.lora_A_layout")
        b_layout = marker.get("lora_B_layout", top_b or RANK_MAJOR)
        _check(b_layout, LORA_B_LAYOUTS, f"{MARKER}.lora_B_layout")
        if top_b is not None and top_b != b_layout:
            raise LayoutError(
                f"adapter_config.json says lora_B_layout={top_b!r} at the top level but {b_layout!r} in {MARKER}: "
                "refusing to guess which one the adapter was trained with"
            )
        parameters = marker.get("parameters") or {}
        for name, entry in parameters.items():
            if "lora_B_layout" in entry:
                _check(entry["lora_B_layout"], LORA_B_LAYOUTS, f"{MARKER}.parameters.{name}.lora_B_layout")
            if "lora_A_layout" in entry:
                _check(entry["lora_A_layout"], LORA_A_LAYOUTS, f"{MARKER}.parameters.{name}.lora_A_layout")
        return cls(a_layout, b_layout, dict(parameters), marked=True)

    def lora_B_layout_of(self, parameter: str, num_experts: int) -> str:
        """lora_B's layout for the fused parameter `parameter` (e.g. gate_up_proj); checks the
        marker's expert count against the base's."""
        entry = self.per_parameter.get(parameter) or {}
        recorded = entry.get("num_experts")
        if recorded is not None and int(recorded) != num_experts:
            raise LayoutError(
                f"adapter_config.json: {MARKER}.parameters.{parameter}.num_experts is {recorded}, the base has "
                f"{num_experts} experts: was the adapter trained on another model?"
            )
        return entry.get("lora_B_layout", self.lora_B_layout)


def _check(value: Any, known: tuple[str, ...], where: str) -> None:
    if value not in known:
        raise LayoutError(
            f"adapter_config.json: {where} is {value!r}, a fused-expert LoRA layout lora-forge does not know "
            f"(known: {', '.join(known)}); refusing to guess how each expert's factors pair up"
        )


def expert_B_blocks(lora_B, num_experts: int, r: int, layout: str):
    """lora_B [out, E*r] as [E, out, r], expert e's block contiguous, for either layout."""
    out_features = lora_B.shape[0]
    if layout == RANK_MAJOR:  # column j*E + e belongs to expert e
        return lora_B.reshape(out_features * r, num_experts).t().contiguous().view(num_experts, out_features, r)
    if layout == GROUPED_BY_EXPERT:  # columns e*r .. e*r+r-1 belong to expert e
        return lora_B.reshape(out_features, num_experts, r).transpose(0, 1).contiguous()
    raise LayoutError(f"unknown lora_B layout {layout!r}")
