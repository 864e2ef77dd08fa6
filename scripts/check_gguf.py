"""Snakemake `script:` for check_gguf: metadata checks plus a real llama.cpp generation from a
ChatML prompt; writes the report as JSON, fails the job (report not written) on any problem.

input.gguf, output.report, params.quant (the expected general.file_type), log[0].
"""

import json
import os

from loraforge.gguf import check_gguf
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 (injected by Snakemake's script directive)
with rule_logging(smk):
    report = check_gguf(smk.input.gguf, expect_ftype=smk.params.quant, threads=smk.threads)
    print(json.dumps(report, indent=2, default=str))
    tmp = smk.output.report + ".partial"
    with open(tmp, "w") as f:
        f.write(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, smk.output.report)
