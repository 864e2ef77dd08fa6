"""Snakemake `script:` for convert_gguf: HF folder -> intermediate GGUF (Q8_0, F16 or BF16)
with llama.cpp's own converter, written directly (no F16 GGUF first).

input.merged: the merged HF folder; output.gguf; params.outtype: Q8_0 | F16 | BF16;
params.release_shards: delete each shard once its tensors are in the GGUF (consume mode);
threads; log[0]: the converter's output, progress included. All logic is in loraforge.gguf.
"""

from loraforge.gguf import convert_to_gguf

# `snakemake` is injected by Snakemake's script directive
convert_to_gguf(
    snakemake.input.merged,  # noqa: F821
    snakemake.output.gguf,  # noqa: F821
    str(snakemake.params.outtype).lower(),  # noqa: F821
    release_shards=bool(snakemake.params.get("release_shards", False)),  # noqa: F821
    threads=snakemake.threads,  # noqa: F821
    log=snakemake.log[0],  # noqa: F821
)
