"""Snakemake rule script for reference_gguf and base_gguf: a model folder -> a GGUF of
params.outtype (F16: the 16-bit reference of the evaluation; Q8_0: the base, for the
conventions score) with llama.cpp's own converter (loraforge.gguf.convert_to_gguf). Never
releases the folder's shards.

    input:  merged or base (a Hugging Face model folder)
    params: outtype
    output: gguf (temp)
    log:    one file
"""

from loraforge.gguf import convert_to_gguf
from loraforge.rulelog import rule_logging

smk = snakemake  # noqa: F821 - injected by Snakemake's script: directive
with rule_logging(smk):
    convert_to_gguf(smk.input[0], smk.output.gguf, str(smk.params.outtype).lower(), threads=smk.threads, log=smk.log[0])
