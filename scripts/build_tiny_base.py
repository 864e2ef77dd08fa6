import json

from loraforge.base import build_tiny_base
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):
    metrics = build_tiny_base(
        snakemake.output.base,
        snakemake.params.arch,
        list(snakemake.input.corpus),
        vocab_size=snakemake.params.vocab_size,
        pretrain_steps=snakemake.params.pretrain_steps,
        seed=snakemake.params.seed,
    )
    print(json.dumps(metrics, indent=2))
    with open(snakemake.output.report, "w") as f:
        json.dump(metrics, f, indent=2)
