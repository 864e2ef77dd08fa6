"""Benchmark: does requantizing from Q8_0 cost quality? Each K-quant made two ways, from the
Q8_0 GGUF (requantize: what the export does with export.intermediate Q8_0) and from the 16-bit
GGUF, both measured against the 16-bit model with llama.cpp's own method (llama-perplexity
--kl-divergence-base on the F16 GGUF, then --kl-divergence per quant, same context, batch and
chunks; loraforge.quality).

    .venv/bin/python bench/requantize.py --model DIR [--adapter DIR] --text FILE_OR_JSONL \\
        [--quants Q3_K_M,Q4_K_M,Q5_K_M,Q6_K] [--ctx 256] [--chunks 32] [--out-dir DIR] [--keep] \\
        [--imatrix TRAIN.jsonl]

DIR is a Hugging Face folder (e.g. results/tiny/base); with --adapter the adapter is merged
into it first (loraforge.merge, link mode, in --out-dir). The text is a .txt file or a
validation .jsonl (loraforge.quality.validation_text). Prints one table row per quant and
source, and the ratio of the mean KLD to the direct (from F16) quant's. With --imatrix, also
each K-quant from F16 with an importance matrix computed over the training text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraforge import quality as Q  # noqa: E402
from loraforge.gguf import convert_to_gguf, quantize  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder (16-bit)")
    ap.add_argument("--adapter", help="a PEFT adapter to merge into --model first")
    ap.add_argument("--text", required=True, help="evaluation text (.txt) or validation split (.jsonl)")
    ap.add_argument("--quants", default="Q3_K_M,Q4_K_M,Q5_K_M,Q6_K")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out-dir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--imatrix", metavar="TRAIN", help="also: an importance matrix (llama-imatrix over this "
                    "training text, .txt or .jsonl) and each K-quant quantized from F16 with it (llama-quantize --imatrix)")
    args = ap.parse_args(argv)

    work = Path(args.out_dir or tempfile.mkdtemp(prefix="loraforge-requant-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    try:
        model = Path(args.model)
        if args.adapter:
            from loraforge.merge.stream import merge

            merged = work / "merged"
            if not merged.exists():
                merge(model, args.adapter, merged, mode="copy")
            model = merged
        text = Path(args.text)
        if text.suffix == ".jsonl":
            Q.validation_text(text, work / "text.txt")
            text = work / "text.txt"
        f16, q8 = work / "F16.gguf", work / "Q8_0.gguf"
        convert_to_gguf(model, f16, "f16", log=log)
        convert_to_gguf(model, q8, "q8_0", log=log)
        logits = work / "ref.logits"
        threads = args.threads or None
        ref = Q.run_and_parse(Q.perplexity_command(f16, ctx=args.ctx, chunks=args.chunks, threads=threads, text=text,
                                                   kld_base=logits), log, Q.parse_ppl)
        rows = [dict(Q.quality_row("Q8_0", q8, Q.kld_against(logits, q8, ctx=args.ctx, chunks=args.chunks,
                                                             threads=threads, log=log), ref["ppl"]), source="F16")]
        for quant in args.quants.split(","):
            for source, src in (("F16", f16), ("Q8_0", q8)):
                out = work / f"{quant}-from-{source}.gguf"
                quantize(src, out, quant, threads, log=log)
                kld = Q.kld_against(logits, out, ctx=args.ctx, chunks=args.chunks, threads=threads, log=log)
                rows.append(dict(Q.quality_row(quant, out, kld, ref["ppl"]), source=source))
                print(f"{quant} from {source}: mean KLD {kld['kld_mean']:.6f}", file=sys.stderr, flush=True)
        if args.imatrix:
            rows += imatrix_rows(args, work, f16, logits, ref["ppl"], threads, log)
        print(f"model {args.model}{' + ' + args.adapter if args.adapter else ''}; F16 PPL {ref['ppl']:.4f} over "
              f"{ref['chunks']} chunks of {args.ctx} tokens")
        print(format_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "adapter": args.adapter, "ref_ppl": ref["ppl"],
                                                   "chunks": ref["chunks"], "ctx": args.ctx, "rows": rows}, indent=2))
    finally:
        if not args.keep and not args.out_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def imatrix_rows(args, work: Path, f16: Path, logits: Path, ref_ppl: float, threads, log) -> list[dict]:
    """llama-imatrix over the training text (the F16 model, same ctx), then each K-quant from F16
    with it through llama-quantize; rows with source "F16+imatrix"."""
    import subprocess

    from loraforge import llamacpp

    train = Path(args.imatrix)
    if train.suffix == ".jsonl":
        Q.validation_text(train, work / "train.txt")
        train = work / "train.txt"
    imatrix = work / "imatrix.gguf"
    env = llamacpp.llama_tool_env()
    with open(log, "a") as f:
        subprocess.run([str(llamacpp.llama_tool("llama-imatrix")), "-m", str(f16), "-f", str(train), "-o", str(imatrix),
                        "-c", str(args.ctx), "-b", str(args.ctx), "--chunks", "200"],
                       stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    rows = []
    for quant in args.quants.split(","):
        out = work / f"{quant}-from-F16-imatrix.gguf"
        with open(log, "a") as f:
            subprocess.run([str(llamacpp.llama_tool("llama-quantize")), "--imatrix", str(imatrix), str(f16), str(out),
                            quant], stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
        kld = Q.kld_against(logits, out, ctx=args.ctx, chunks=args.chunks, threads=threads, log=log)
        rows.append(dict(Q.quality_row(quant, out, kld, ref_ppl), source="F16+imatrix"))
        print(f"{quant} from F16 with imatrix: mean KLD {kld['kld_mean']:.6f}", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: per quant, the direct (from F16) and the requantized (from Q8_0) row, and the
    requantized/direct ratio of the mean KLD."""

    head = "| quant | from | bits/weight | PPL change % | mean KLD | median KLD | p99 KLD | same top % | KLD ratio |"
    lines = [head, "|" + "---|" * 9]
    direct = {r["quant"]: r["kld_mean"] for r in rows if r["source"] == "F16"}
    for r in rows:
        ratio = (r["kld_mean"] / direct[r["quant"]]
                 if r["source"] != "F16" and r["quant"] != "Q8_0" and direct.get(r["quant"]) else None)
        lines.append(f"| {r['quant']} | {r['source']} | {r['bits_per_weight']:.2f} | {r['ppl_change_pct']:+.3f} | "
                     f"{r['kld_mean']:.6f} | {r['kld_median']:.6f} | {r['kld_p99']:.6f} | {r['same_top_pct']:.2f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
