"""Snakemake rule script: cap sources, split train/validation and summarise the chat dataset.

An adapter only: reads the rule's input/params/output/log and calls `loraforge.data.prepare`.
Tokens in the summary are counted with the base model's tokenizer (input.tokenizer_dir).

    input:  samples (JSONL), tokenizer_dir (a Hugging Face model folder)
    params: max_source_share, contrastive_weight, validation_fraction, seed
    output: train, validation (JSONL), summary (TSV)
    log:    one file
"""


import logging
from pathlib import Path

from loraforge.data import prepare
from loraforge.rulelog import rule_logging

log = logging.getLogger("prepare_data")

# Plain ASCII text any usable tokenizer must round-trip (decode(encode(x)) == x).
PROBE = "class Issue < ApplicationRecord\n  has_many :notes, dependent: :destroy\nend\n"


def _round_trips(tokenizer) -> bool:
    ids = tokenizer.encode(PROBE, add_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=True) == PROBE


def load_tokenizer(tokenizer_dir):
    """AutoTokenizer first; for locally built SentencePiece models (a `tokenizer.model`),
    LlamaTokenizer as the fallback. A qwen `config.json` can make AutoTokenizer build a
    Qwen2Tokenizer from the SentencePiece vocabulary that silently drops spaces, so a
    candidate is only accepted if it round-trips a probe string."""
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = Path(tokenizer_dir)
    loaders = [("AutoTokenizer", AutoTokenizer.from_pretrained)]
    if (folder / "tokenizer.model").exists():
        loaders.append(("LlamaTokenizer", LlamaTokenizer.from_pretrained))
    loaded, errors = [], []
    for name, load in loaders:
        try:
            tokenizer = load(str(folder))
        except Exception as exc:  # noqa: BLE001 - try the next loader, report all at the end
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            log.info("tokenizer: %s failed on %s: %s", name, folder, exc)
            continue
        if _round_trips(tokenizer):
            log.info("tokenizer: %s (%s) from %s", name, type(tokenizer).__name__, folder)
            return tokenizer
        log.warning("tokenizer: %s (%s) does not round-trip plain text; trying the next loader",
                    name, type(tokenizer).__name__)
        loaded.append((name, tokenizer))
    if loaded:
        name, tokenizer = loaded[0]
        log.warning("tokenizer: no loader round-trips; using %s (%s) anyway", name, type(tokenizer).__name__)
        return tokenizer
    raise RuntimeError(f"could not load a tokenizer from {folder}: " + "; ".join(errors))


def main(smk) -> None:
    with rule_logging(smk):
        tokenizer = load_tokenizer(smk.input.tokenizer_dir)

        def count_tokens(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        summary = prepare(
            smk.input.samples,
            smk.output.train,
            smk.output.validation,
            smk.output.summary,
            max_source_share=float(smk.params.max_source_share),
            contrastive_weight=int(smk.params.contrastive_weight),
            validation_fraction=float(smk.params.validation_fraction),
            seed=int(smk.params.seed),
            count_tokens=count_tokens,
        )
        log.info("summary:\n%s", summary.to_string(index=False))


if "snakemake" in globals():
    main(snakemake)  # noqa: F821 - injected by Snakemake's script: directive
