"""Model cards (README.md with YAML front matter) for the two repos lora-forge publishes,
built with huggingface_hub's ModelCard / ModelCardData:

- the GGUF repo: `base_model_relation: quantized`, tags gguf, llama.cpp, ollama, lora; a table
  of every quant with its size, the RAM it needs at num_ctx (results/{model}/memory.tsv) and,
  when results/{model}/quality.tsv exists, its measured quality (perplexity, KL divergence);
- the adapter repo: `library_name: peft`, `base_model_relation: adapter`.

`base_model` is the hub id of the base model; a base built locally (tiny) or a local folder
has none, so the relation is left out too (the hub would reject a relation without a base)."""

from __future__ import annotations

import os
from pathlib import Path

MEMORY_COLUMNS = ["quant", "model_file", "file_bytes", "num_ctx", "min_ram_gib", "recommended_ram_gib"]
QUALITY_COLUMNS = {  # quality.tsv column -> table header, format
    "bits_per_weight": ("bits/weight", "{:.2f}"),
    "ppl": ("perplexity", "{:.3f}"),
    "ppl_change_pct": ("ΔPPL vs 16-bit", "{:+.2f}%"),
    "kld_mean": ("KLD mean", "{:.4f}"),
    "kld_p99": ("KLD p99", "{:.4f}"),
    "same_top_pct": ("same top token", "{:.1f}%"),
}


def human_size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def read_table(path: str | os.PathLike | None):
    """A TSV as a pandas DataFrame, or None when the file is absent."""
    import pandas as pd

    if path is None or not Path(path).is_file():
        return None
    return pd.read_csv(path, sep="\t")


def quant_table(quants: list[str], memory_tsv, quality_tsv=None) -> str:
    """Markdown table: one row per quant; quality columns only where quality.tsv has them."""
    memory = read_table(memory_tsv)
    quality = read_table(quality_tsv)
    mem_rows = {r["quant"]: r for _, r in memory.iterrows()} if memory is not None else {}
    q_rows = {r["quant"]: r for _, r in quality.iterrows()} if quality is not None else {}
    q_cols = [c for c in QUALITY_COLUMNS if quality is not None and c in quality.columns]
    num_ctx = next((int(r["num_ctx"]) for r in mem_rows.values()), None)
    header = ["quant", "file", "size", f"RAM min (num_ctx {num_ctx})" if num_ctx else "RAM min", "RAM recommended"]
    header += [QUALITY_COLUMNS[c][0] for c in q_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for q in quants:
        m = mem_rows.get(q)
        row = [q, f"`{q}.gguf`"]
        row += [human_size(int(m["file_bytes"])), f"{m['min_ram_gib']} GiB", f"{m['recommended_ram_gib']} GiB"] if m is not None else ["", "", ""]
        r = q_rows.get(q)
        for c in q_cols:
            value = r[c] if r is not None else None
            row.append(QUALITY_COLUMNS[c][1].format(float(value)) if value is not None and value == value else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _card_data(*, base_model: str | None, relation: str, license: str, tags: list[str], library_name: str | None):
    from huggingface_hub import ModelCardData

    extra = {"base_model_relation": relation} if base_model else {}
    return ModelCardData(
        base_model=base_model, library_name=library_name, license=license, tags=tags, pipeline_tag="text-generation", **extra
    )


def gguf_card(
    *,
    repo_id: str,
    name: str,
    quants: list[str],
    memory_tsv,
    quality_tsv=None,
    base_model: str | None,
    adapter_repo: str | None,
    license: str,
    modelfile_quant: str | None = None,
):
    from huggingface_hub import ModelCard

    data = _card_data(base_model=base_model, relation="quantized", license=license,
                      tags=["gguf", "llama.cpp", "ollama", "lora", "lora-forge"], library_name=None)
    base_line = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a base model built locally"
    adapter_line = f" The LoRA adapter is in [{adapter_repo}](https://huggingface.co/{adapter_repo})." if adapter_repo else ""
    quality_note = (
        "Quality: perplexity and KL divergence against the 16-bit model, measured with llama.cpp's llama-perplexity."
        if read_table(quality_tsv) is not None else
        "Quality was not measured for this upload."
    )
    pick = modelfile_quant or quants[-1]
    body = f"""
# {name} (GGUF)

{name} is {base_line} fine-tuned with LoRA, merged, converted to GGUF and quantized by
lora-forge (llama.cpp's converter and quantizer).{adapter_line}

## Files

{quant_table(quants, memory_tsv, quality_tsv)}

RAM is the GGUF plus the KV cache at the context length shown, llama.cpp's compute buffer and
256 MiB of runtime; "recommended" adds 25% headroom. {quality_note}

## Use

```bash
hf download {repo_id} {pick}.gguf --local-dir .
ollama create {name} -f Modelfile      # FROM ./{pick}.gguf
llama-cli -m {pick}.gguf -cnv
```
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)


def adapter_card(*, repo_id: str, name: str, base_model: str | None, gguf_repo: str | None, license: str,
                 lora: dict | None = None):
    from huggingface_hub import ModelCard

    data = _card_data(base_model=base_model, relation="adapter", license=license,
                      tags=["lora", "peft", "lora-forge"], library_name="peft")
    lora = lora or {}
    settings = ", ".join(f"{k} {v}" for k, v in lora.items() if k in ("r", "alpha", "dropout", "target_modules"))
    gguf_line = f" Quantized GGUFs of the merged model: [{gguf_repo}](https://huggingface.co/{gguf_repo})." if gguf_repo else ""
    load = (f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model}"), "{repo_id}")
```""" if base_model else "The base model was built locally; load it from its folder, then `PeftModel.from_pretrained(model, ...)`.")
    body = f"""
# {name} (LoRA adapter)

A PEFT LoRA adapter trained by lora-forge{f' ({settings})' if settings else ''}.{gguf_line}

{load}
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)
