"""Rename-merge: stream a PEFT LoRA adapter into a base model's safetensors shards.

The output folder has the base's Hugging Face layout (same shard names, same tensors in each
shard, config and tokenizer files, index) with every targeted weight replaced by

    W_final = round_to_base_dtype(W_base (fp32) + scale * B @ A (fp32)),   scale = alpha/r or alpha/sqrt(r)

Shards are handled one at a time: a shard with no targeted tensor is hard-linked (mode "link",
the default), moved (mode "consume") or copied (mode "copy"); a shard with targeted tensors is
rewritten matrix by matrix (a 2-D tensor, or one expert), untouched bytes being copied by the
kernel. One worker thread per core (this one included) takes the next matrix, reads it, merges
it and writes it at its place in the output, while the previous shard is fsynced and recorded on
another thread. So memory stays near the adapter plus a few matrices per worker, and in consume
mode the disk peak stays near the base plus a shard.

Adapters: dense LoRA on nn.Linear (q/k/v/o/gate/up/down), and Qwen3-MoE expert adapters made by
PEFT's ParamWrapper on the fused 3-D expert parameters (as `get_peft_model` writes them, or as
Unsloth writes them with explicit target_parameters). The base may store experts per expert in
2-D (`mlp.experts.E.gate_proj.weight`, the usual layout) or fused in 3-D
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]).

Everything is validated before the first byte is written. The output is assembled in
`<out>.partial` with a journal and renamed to `<out>` only when complete; an interrupted run is
resumed by running the same merge again (in consume mode that is how the base shards already
moved or merged into the partial output are recovered).

The package: `planning` (what to merge, validated before anything is written), `arithmetic`
(W + scale * B @ A, rounded once), `journal` (resumable output), `stream` (the merge itself,
shard by shard on worker threads), `cli` (`loraforge merge`), `common` (names, the error, the
report).
"""

from loraforge.merge.common import JOURNAL_NAME, MARKER_NAME, MergeError, MergeReport, recovery_hint
from loraforge.merge.journal import Journal
from loraforge.merge.planning import LoraSettings, plan_updates
from loraforge.merge.stream import merge

__all__ = ["JOURNAL_NAME", "MARKER_NAME", "Journal", "LoraSettings", "MergeError", "MergeReport", "merge",
           "plan_updates", "recovery_hint"]
