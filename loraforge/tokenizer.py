"""The one tokenizer loader, for data preparation (token counts) and training alike.

AutoTokenizer first; for SentencePiece models (a `tokenizer.model`, as the tiny bases have)
LlamaTokenizer as the fallback. A qwen `config.json` can make AutoTokenizer build a
Qwen2Tokenizer from the SentencePiece vocabulary that silently drops spaces, so a candidate is
only accepted if it round-trips a probe string; data preparation and training must get the
same tokenizer, or the token counts of the summary are not those training sees.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger("loraforge.tokenizer")

# Plain ASCII text any usable tokenizer must round-trip (decode(encode(x)) == x).
PROBE = "class Issue < ApplicationRecord\n  has_many :notes, dependent: :destroy\nend\n"


def round_trips(tokenizer) -> bool:
    ids = tokenizer.encode(PROBE, add_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=True) == PROBE


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a model folder: the first loader whose tokenizer round-trips plain
    text (see the module docstring); RuntimeError naming the folder and every loader's error
    when none loads."""
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = Path(model_dir)
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
        if round_trips(tokenizer):
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


def token_counter(model_dir) -> Callable[[str], int]:
    """A function counting the tokens of a text (no special tokens added) with the model's
    tokenizer (`model_dir`: a model folder, or a tokenizer already loaded)."""
    tokenizer = load_tokenizer(model_dir) if isinstance(model_dir, (str, os.PathLike)) else model_dir

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count_tokens


def chat_length_counter(tokenizer) -> Callable[[dict], int]:
    """A function giving the tokens of a chat sample as training sees it: its `messages`
    rendered by the tokenizer's chat template (the length training cuts at max_seq_length); a
    tokenizer without a template counts the contents' tokens (a lower bound)."""
    count_tokens = token_counter(tokenizer)

    def chat_length(sample: dict) -> int:
        if not tokenizer.chat_template:
            return sum(count_tokens(m["content"]) for m in sample["messages"])
        ids = tokenizer.apply_chat_template(sample["messages"], tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return chat_length
