"""Snakemake rule script for write_modelfile: the Ollama Modelfile of a model, validated with
Ollama's parser rules (FROM must exist next to it) before it is moved into place
(loraforge.modelfile.write_model_modelfile).

    input:  gguf (the quant FROM points to, written relative to the Modelfile: ./Q5_K_M.gguf),
            base_dir (HF folder with the tokenizer and chat template: stop tokens, ChatML check)
    input (optional): adapter_gguf (the adapter-only variant: FROM the base's GGUF + ADAPTER)
    params: name (optional, for the header comment), system, temperature, top_p, num_ctx,
            fim (optional: the fill-in-the-middle TEMPLATE, for tab completion)
    output: modelfile
    log:    one file
"""

from loraforge.modelfile import write_model_modelfile
from loraforge.rulelog import rule_logging

with rule_logging(snakemake):  # noqa: F821 - injected by Snakemake's script: directive
    write_model_modelfile(
        snakemake.output.modelfile,  # noqa: F821
        snakemake.input.gguf,  # noqa: F821
        snakemake.input.base_dir,  # noqa: F821
        name=snakemake.params.get("name"),  # noqa: F821
        system=snakemake.params.system,  # noqa: F821
        temperature=float(snakemake.params.temperature),  # noqa: F821
        top_p=float(snakemake.params.top_p),  # noqa: F821
        num_ctx=int(snakemake.params.num_ctx),  # noqa: F821
        fim=bool(snakemake.params.get("fim", False)),  # noqa: F821
        adapter_path=snakemake.input.get("adapter_gguf"),  # noqa: F821
    )
