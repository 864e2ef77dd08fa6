"""Snakemake `script:` for check_gguf: metadata checks plus a real llama.cpp generation from a
ChatML prompt; writes the report as JSON, fails the job (report not written) on any problem.

input.gguf, output.report, params.quant (the expected general.file_type), log[0].
"""

import json
import os
import traceback

from loraforge.gguf import GGUFCheckError, check_gguf

# `snakemake` is injected by Snakemake's script directive
gguf_path = snakemake.input.gguf  # noqa: F821
report_path = snakemake.output.report  # noqa: F821
with open(snakemake.log[0], "w") as log:  # noqa: F821
    try:
        report = check_gguf(gguf_path, expect_ftype=snakemake.params.quant,  # noqa: F821
                            threads=snakemake.threads)  # noqa: F821
    except GGUFCheckError as e:
        log.write(f"CHECK FAILED: {e}\n")
        raise
    except Exception:
        log.write(traceback.format_exc())
        raise
    log.write(json.dumps(report, indent=2, default=str) + "\n")
tmp = report_path + ".partial"
with open(tmp, "w") as f:
    json.dump(report, f, indent=2, default=str)
    f.write("\n")
os.replace(tmp, report_path)
