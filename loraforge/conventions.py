"""Did the fine-tune work: a conventions score on the held-out contrastive pairs, computed by
llama.cpp on the GGUFs themselves.

The dataset's contrastive pairs (data/README.md) are a `...-wrong` sample, whose user shows
code written the wrong way (a service object, a Sidekiq worker, Devise, ...), and a `...-right`
sample, a neutral question answered the right way. A scoring item is the right sample's
prompt (system + user, rendered with the model's chat template) with two candidate answers:
the right-way code block (the right sample's answer) and the wrong-way code block (from the
wrong sample's question). The score is the share of items where the model gives the right-way
answer the higher log-likelihood.

Log-likelihood per token (mean), not summed: the two code blocks differ in length, and a sum
mostly rewards the shorter block whatever its style (each extra token costs log-probability).
The summed score is reported too (`score_sum_pct`), for comparison.

Only pairs held out of training count (`prepare_data` keeps `data.validation_pairs` pairs in
validation, and drops from train any sample whose user turn is a held-out pair's)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from loraforge.data import is_contrastive
from loraforge.fileio import write_text_atomic

CONVENTIONS_COLUMNS = ["model", "pairs", "score_pct", "score_sum_pct", "mean_margin", "val_ppl"]
_CODE_BLOCK = re.compile(r"```([\w+-]*)\n(.*?)```", re.S)


@dataclass
class Item:
    pair: str
    prompt: list[dict]  # system (when the right sample has one) and user messages
    right: str
    wrong: str


def _first(sample: dict, role: str) -> str:
    return next((m["content"] for m in sample["messages"] if m["role"] == role), "")


def _code_block(text: str) -> str | None:
    m = _CODE_BLOCK.search(text)
    return f"```{m.group(1)}\n{m.group(2)}```" if m else None


def contrastive_items(samples: list[dict]) -> tuple[list[Item], list[str]]:
    """Scoring items of the complete contrastive pairs among `samples` (the validation split),
    and the pairs skipped (no code block on one side)."""
    by_pair: dict[str, dict[str, dict]] = {}
    for s in samples:
        if is_contrastive(s) and s.get("pair") and s.get("id"):
            side = "right" if s["id"].endswith("right") else "wrong" if s["id"].endswith("wrong") else None
            if side:
                by_pair.setdefault(s["pair"], {})[side] = s
    items, skipped = [], []
    for pair, sides in sorted(by_pair.items()):
        if set(sides) != {"right", "wrong"}:
            continue
        right = _code_block(_first(sides["right"], "assistant"))
        wrong = _code_block(_first(sides["wrong"], "user"))
        if right is None or wrong is None:
            skipped.append(pair)
            continue
        prompt = [m for m in sides["right"]["messages"] if m["role"] in ("system", "user")]
        prompt = prompt[: next(i for i, m in enumerate(prompt) if m["role"] == "user") + 1]
        items.append(Item(pair, prompt, right, wrong))
    return items, skipped


def load_items(validation_jsonl) -> tuple[list[Item], list[str]]:
    with open(validation_jsonl, encoding="utf-8") as f:
        return contrastive_items([json.loads(line) for line in f if line.strip()])


class Scorer:
    """Log-likelihoods of answers after a prompt, by llama.cpp on one GGUF (llama_cpp.Llama with
    logits for every position). The prompt is rendered with the chat template of `tokenizer`
    (the adapter's: the base's, unchanged) and tokenized by the GGUF's own tokenizer."""

    def __init__(self, gguf, tokenizer, n_ctx: int = 2048, threads: int | None = None):
        import llama_cpp

        self.tokenizer = tokenizer
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                                   n_threads=threads or None, verbose=False)

    def loglik(self, prompt: list[dict], answer: str) -> tuple[float, int]:
        """(summed log-probability, tokens) of `answer` as the assistant's reply to `prompt`."""
        import numpy as np

        text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        p = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        a = self.llm.tokenize(answer.encode("utf-8"), add_bos=False, special=False)
        tokens = p + a
        if len(tokens) > self.llm.n_ctx():
            raise ValueError(f"prompt + answer is {len(tokens)} tokens, more than n_ctx {self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval(tokens)
        logits = np.asarray(self.llm.scores[len(p) - 1 : len(tokens) - 1], dtype=np.float64)
        logz = np.logaddexp.reduce(logits, axis=1)
        picked = logits[np.arange(len(a)), a]
        return float((picked - logz).sum()), len(a)

    def close(self) -> None:
        self.llm.close()


def tally(logliks: list[tuple[float, int, float, int]]) -> dict:
    """The conventions score of (right log-likelihood, right tokens, wrong log-likelihood, wrong
    tokens) per item: an item is won when the right-way answer has the higher log-likelihood per
    token (margin > 0); score_sum_pct compares the sums instead."""
    margins = [lr / nr - lw / nw for lr, nr, lw, nw in logliks]
    n = len(logliks)
    return {"pairs": n,
            "score_pct": 100.0 * sum(m > 0 for m in margins) / n if n else math.nan,
            "score_sum_pct": 100.0 * sum(lr > lw for lr, _, lw, _ in logliks) / n if n else math.nan,
            "mean_margin": sum(margins) / n if n else math.nan}


def score(gguf, tokenizer, items: list[Item], threads: int | None = None) -> dict:
    """The conventions score of one GGUF over `items`."""
    scorer = Scorer(gguf, tokenizer, threads=threads)
    try:
        return tally([(*scorer.loglik(it.prompt, it.right), *scorer.loglik(it.prompt, it.wrong)) for it in items])
    finally:
        scorer.close()


def format_conventions(rows: list[dict]) -> str:
    df = pd.DataFrame.from_records(rows, columns=CONVENTIONS_COLUMNS)
    return df.to_csv(sep="\t", index=False, float_format="%.6g", lineterminator="\n")


def write_conventions(rows: list[dict], out_tsv) -> Path:
    return write_text_atomic(out_tsv, format_conventions(rows))


def conventions_table(ggufs: dict[str, str], *, validation_jsonl, text, tokenizer_dir, out_tsv, ctx: int,
                      chunks: int, threads: int | None, log) -> pd.DataFrame:
    """conventions.tsv: per GGUF (the base first), the conventions score over the held-out pairs
    and the validation perplexity (llama-perplexity on `text`, as quality.tsv)."""
    from loraforge.quality import QualityError, parse_ppl, perplexity_command, run_and_parse
    from loraforge.tokenizer import load_tokenizer

    items, skipped = load_items(validation_jsonl)
    if not items:
        raise QualityError(f"{validation_jsonl}: no complete contrastive pair with code on both sides is held out; "
                           "set data.validation_pairs > 0")
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = []
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"{len(items)} held-out pairs ({', '.join(i.pair for i in items)}); skipped (no code block): "
                f"{', '.join(skipped) or 'none'}\n")
    for name, gguf in ggufs.items():
        result = score(gguf, tokenizer, items, threads=threads)
        ppl = run_and_parse(perplexity_command(gguf, ctx=ctx, chunks=chunks, threads=threads, text=text), log,
                            parse_ppl)["ppl"]
        rows.append({"model": name, **result, "val_ppl": ppl})
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{name}: score {result['score_pct']:.1f}% (sum {result['score_sum_pct']:.1f}%), "
                    f"mean margin {result['mean_margin']:+.4f} nats/token, validation PPL {ppl:.4g}\n")
    write_conventions(rows, out_tsv)
    return pd.DataFrame.from_records(rows, columns=CONVENTIONS_COLUMNS)
