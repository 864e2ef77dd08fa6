"""The architecture of a model, from its HF config.json or from config.yaml's `arch:` block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class Arch:
    """The fields of a HF config that decide the tensors (see `arch_from_config`)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 0
    moe_intermediate_size: int = 0
    dtype: str = "bfloat16"
    attention_bias: bool = False  # q/k/v/o biases (llama, qwen3); qwen2 always has q/k/v bias
    mlp_bias: bool = False  # llama only
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    rope_freqs: bool = False  # llama3-style rope scaling: the converter adds rope_freqs.weight

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def sparse_layer(self, i: int) -> bool:
        """Whether layer i has MoE experts (Qwen3MoeDecoderLayer's rule)."""
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and (i + 1) % max(1, self.decoder_sparse_step) == 0
        )

    @property
    def n_gqa(self) -> int:
        return self.num_attention_heads // max(1, self.num_key_value_heads)


def arch_from_config(cfg: Mapping | Arch) -> Arch:
    """Normalize a HF `config.json` dict (or config.yaml's `arch:` block, same field names)."""
    if isinstance(cfg, Arch):
        return cfg
    cfg = dict(cfg)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k != "text_config"}}
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(
            f"unsupported model_type {cfg.get('model_type')!r}: sizes are modelled for "
            f"{', '.join(SUPPORTED_ARCHS)}"
        )
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if cfg.get(k) is None]
    if model_type != "qwen3_moe" and cfg.get("intermediate_size") is None:
        missing.append("intermediate_size")
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)} (model_type {model_type})")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if model_type == "qwen3_moe" else 0
    moe_inter = int(cfg.get("moe_intermediate_size") or 0)
    if experts and not moe_inter:
        raise ValueError("qwen3_moe config lacks moe_intermediate_size")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, Mapping) else None
    return Arch(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=experts,
        moe_intermediate_size=moe_inter,
        dtype=str(dtype).replace("torch.", ""),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
        mlp_only_layers=tuple(int(i) for i in (cfg.get("mlp_only_layers") or ())),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        rope_freqs=model_type == "llama" and rope_type == "llama3",
    )
