"""What the user gets, measured: quant quality against the 16-bit model (llama.cpp's
llama-perplexity: perplexity and KL divergence on the validation split) and sizes.

Method (llama.cpp's own, used for its published quant tables): `llama-perplexity
--kl-divergence-base LOGITS` on the 16-bit reference GGUF saves its log-probabilities for every
scored token of the validation text; `llama-perplexity -m QUANT --kl-divergence-base LOGITS
--kl-divergence` then runs each quant over the same tokens, with the same context and batch
size, and prints its perplexity, the KL divergence from the reference per token (mean, median,
percentiles) and how often both pick the same top token.

Pure logic (no Snakemake): `scripts/reference_logits.py` and `scripts/evaluate_quality.py` are
the rule adapters. The conventions score (did the fine-tune work) is in
`loraforge.conventions`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pandas as pd

from loraforge import llamacpp
from loraforge.constants import NEEDS_IMATRIX
from loraforge.errors import UserError
from loraforge.fileio import write_text_atomic

QUALITY_COLUMNS = [
    "quant",
    "size_bytes",
    "bits_per_weight",
    "ppl",
    "ppl_change_pct",
    "kld_mean",
    "kld_median",
    "kld_p99",
    "same_top_pct",
    "imatrix",  # the quant was made with export.imatrix's importance matrix
    "kld_mean_without_imatrix",  # then: the same quant made without it, from the same intermediate
]

# The logits file starts with a magic and n_ctx, n_vocab, n_chunk (llama.cpp perplexity.cpp)
LOGITS_HEADER_BYTES = 20


class QualityError(UserError, RuntimeError):
    """An evaluation that cannot run or whose output cannot be read; names the file."""


# ----------------------------------------------------------------------------- text


def validation_text(validation_jsonl, out_txt) -> str:
    """The text perplexity is measured on: every message of the validation split, one sample
    after another, separated by blank lines. Plain text, not the chat template:
    llama-perplexity tokenizes without parsing special tokens, so `<|im_start|>` would become
    ordinary text pieces that no model ever saw."""
    parts = []
    with open(validation_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                parts.extend(m["content"] for m in json.loads(line)["messages"])
    text = "\n\n".join(p.strip() for p in parts if p.strip()) + "\n"
    if len(text) < 2:
        raise QualityError(f"{validation_jsonl}: the validation split has no text to evaluate")
    write_text_atomic(out_txt, text)
    return text


def logits_file_bytes(ctx: int, chunks: int, vocab: int) -> int:
    """Size of llama-perplexity's --kl-divergence-base file: the header, every chunk's tokens
    (int32), and for the second half of each chunk (the scored tokens) the log-probabilities as
    uint16 (vocab rounded up to even) plus two floats (scale, min). Checked against real files
    (tests/test_quality.py)."""
    first = ctx // 2
    scored = ctx - 1 - first
    per_token = (2 * ((vocab + 1) // 2) + 4) * 2
    return LOGITS_HEADER_BYTES + 4 * ctx * chunks + chunks * scored * per_token


# ----------------------------------------------------------------------------- running


def perplexity_program() -> list[str]:
    """llama-perplexity, run through loraforge.llama_tool_runner where the pinned build allows
    (it drains llama.cpp's log thread before exiting, so the summary lines are never lost)."""
    import sys

    from loraforge import llama_tool_runner

    llamacpp.llama_tool("llama-perplexity")  # the build has the tool (a clear error if not)
    if llama_tool_runner.available():
        return [sys.executable, "-m", "loraforge.llama_tool_runner"]
    return [str(llamacpp.llama_tool("llama-perplexity"))]


def perplexity_command(model, *, ctx: int, chunks: int, threads: int | None = None, text=None,
                       kld_base=None, kld: bool = False) -> list[str]:
    """llama-perplexity with a fixed context and batch (= ctx: one chunk per batch, as in
    llama.cpp's KLD tables), bounded to `chunks` chunks."""
    cmd = [*perplexity_program(), "-m", str(model), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks)]
    if threads:
        cmd += ["-t", str(threads)]
    if text is not None:
        cmd += ["-f", str(text)]
    if kld_base is not None:
        cmd += ["--kl-divergence-base", str(kld_base)]
    if kld:
        cmd.append("--kl-divergence")
    return cmd


def run_perplexity(cmd: list[str], log_path) -> str:
    """Run a llama-perplexity command; its whole output goes to `log_path` (appended) and is
    returned. A failure raises QualityError naming the log (and the cause when it is known)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # llama.cpp's own log file as well: its log thread writes (and flushes) every line there
    tool_log = log_path.with_name(log_path.name + ".llama.txt")
    tool_log.unlink(missing_ok=True)
    started = time.time()
    env = llamacpp.llama_tool_env()
    # the runner (loraforge.llama_tool_runner) imports this package: the same copy as this process's
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([*cmd, "--log-file", str(tool_log)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", env=env)
    output = proc.stdout
    try:
        logged = tool_log.read_text(errors="replace")
        tool_log.unlink()
    except OSError:
        logged = ""
    if len(logged) > len(output):
        output = logged
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n{output}\n(exit {proc.returncode} after {time.time() - started:.1f}s)\n")
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-8:])
        hint = ""
        if "you need at least" in output:
            hint = (" The validation text is shorter than two contexts: lower quality.ctx or add "
                    "validation samples (data.validation_fraction).")
        raise QualityError(f"llama-perplexity failed (exit {proc.returncode}); see {log_path}.{hint}\n{tail}")
    return output


ATTEMPTS = 5


def run_and_parse(cmd: list[str], log_path, parse):
    """run_perplexity, then `parse` its output. llama.cpp logs through a background thread, and
    on a loaded machine its last lines (the final estimate, the KLD statistics) were seen lost
    from a run that exited 0: such a run is repeated (deterministic: same numbers), up to
    ATTEMPTS times, before the parse error (naming the log) is raised."""
    for attempt in range(1, ATTEMPTS + 1):
        output = run_perplexity(cmd, log_path)
        try:
            return parse(output, log_path)
        except QualityError:
            if attempt == ATTEMPTS:
                raise
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(f"the output above ended before its summary; running it again ({attempt + 1}/{ATTEMPTS})\n")


# ----------------------------------------------------------------------------- parsing

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_KLD_FIELDS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUM}",
    "kld_mean": rf"Mean\s+KLD:\s*{_NUM}",
    "kld_median": rf"Median\s+KLD:\s*{_NUM}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "same_top_pct": rf"Same top p:\s*{_NUM}",
}


def parse_ppl(output: str, log_path) -> dict:
    """The final perplexity and the number of chunks of a plain llama-perplexity run."""
    m = re.search(rf"Final estimate: PPL = {_NUM}", output)
    if not m:
        raise QualityError(f"no 'Final estimate: PPL' line in llama-perplexity's output; see {log_path}")
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", output)
    return {"ppl": float(m.group(1)),
            "chunks": int(chunks.group(1)) if chunks else None,
            "ctx": int(chunks.group(2)) if chunks else None}


def parse_kld(output: str, log_path) -> dict:
    """PPL(Q), PPL(base), KLD mean/median/p99 and same-top-token % of a --kl-divergence run."""
    out = {}
    missing = []
    for key, pattern in _KLD_FIELDS.items():
        m = re.search(pattern, output)
        if m is None:
            missing.append(key)
        else:
            out[key] = float(m.group(1))
    if missing:
        raise QualityError(f"cannot read {', '.join(missing)} from llama-perplexity's KL-divergence output; "
                           f"see {log_path}")
    return out


# ----------------------------------------------------------------------------- sizes


def gguf_weights(path) -> tuple[int, int]:
    """(tensor bytes, parameters) of a GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return (sum(int(t.n_bytes) for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors))


def bits_per_weight(path) -> float:
    nbytes, params = gguf_weights(path)
    return 8 * nbytes / params if params else float("nan")


# ----------------------------------------------------------------------------- the evaluation


def reference_logits(reference_gguf, validation_jsonl, *, logits_out, text_out, summary_out, ctx: int,
                     chunks: int, threads: int | None, log) -> dict:
    """Save the 16-bit reference's log-probabilities over the validation text (llama-perplexity
    --kl-divergence-base) and its perplexity. The logits are written under a .partial name and
    renamed when llama-perplexity has finished."""
    validation_text(validation_jsonl, text_out)
    logits_out = Path(logits_out)
    partial = logits_out.with_name(logits_out.name + ".partial")
    partial.unlink(missing_ok=True)
    cmd = perplexity_command(reference_gguf, ctx=ctx, chunks=chunks, threads=threads, text=text_out,
                             kld_base=partial)
    try:
        result = run_and_parse(cmd, log, parse_ppl)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, logits_out)
    summary = {"reference": str(reference_gguf), "reference_bytes": os.path.getsize(reference_gguf),
               "reference_bpw": round(bits_per_weight(reference_gguf), 3), "ppl": result["ppl"],
               "chunks": result["chunks"], "ctx": ctx, "logits_bytes": logits_out.stat().st_size}
    write_text_atomic(summary_out, json.dumps(summary, indent=2) + "\n")
    return summary


def quality_row(quant: str, gguf, kld: dict, reference_ppl: float) -> dict:
    nbytes, params = gguf_weights(gguf)
    return {
        "quant": quant,
        "size_bytes": os.path.getsize(gguf),
        "bits_per_weight": round(8 * nbytes / params, 3) if params else float("nan"),
        "ppl": kld["ppl"],
        "ppl_change_pct": 100.0 * (kld["ppl"] / reference_ppl - 1.0),
        "kld_mean": kld["kld_mean"],
        "kld_median": kld["kld_median"],
        "kld_p99": kld["kld_p99"],
        "same_top_pct": kld["same_top_pct"],
        "imatrix": False,
    }


def format_quality(rows: list[dict]) -> str:
    df = pd.DataFrame.from_records(rows, columns=QUALITY_COLUMNS)
    return df.to_csv(sep="\t", index=False, float_format="%.6g", lineterminator="\n")


def kld_against(logits, gguf, *, ctx: int, chunks: int, threads: int | None, log) -> dict:
    """One quant against the saved reference logits (same ctx, batch and chunks)."""
    cmd = perplexity_command(gguf, ctx=ctx, chunks=chunks, threads=threads, kld_base=logits, kld=True)
    return run_and_parse(cmd, log, parse_kld)


def evaluate(logits, reference_summary, ggufs: dict[str, str], out_tsv, *, ctx: int, chunks: int,
             threads: int | None, log, reference_name: str = "F16", intermediate=None) -> pd.DataFrame:
    """quality.tsv: the reference's row (its size and perplexity, KLD 0) and one row per quant.

    intermediate (the quants were made with an importance matrix): each quant is also made
    without it from this intermediate, measured the same way (kld_mean_without_imatrix), and
    deleted; one such file exists at a time."""
    ref = json.loads(Path(reference_summary).read_text())
    ref_ppl = float(ref["ppl"])
    rows = []
    if ref.get("reference_bytes"):
        rows.append({"quant": reference_name, "size_bytes": ref["reference_bytes"],
                     "bits_per_weight": ref.get("reference_bpw"), "ppl": ref_ppl, "ppl_change_pct": 0.0,
                     "kld_mean": 0.0, "kld_median": 0.0, "kld_p99": 0.0, "same_top_pct": 100.0})
    for quant, gguf in ggufs.items():
        kld = kld_against(logits, gguf, ctx=ctx, chunks=chunks, threads=threads, log=log)
        rows.append(quality_row(quant, gguf, kld, ref_ppl))
        _progress(log, f"{quant}: PPL {kld['ppl']:.4g} ({rows[-1]['ppl_change_pct']:+.2f}%), "
                       f"mean KLD {kld['kld_mean']:.6f}, same top {kld['same_top_pct']:.2f}%")
        if intermediate is not None:
            rows[-1]["imatrix"] = True
            if quant.upper() in NEEDS_IMATRIX:  # no such quant without a matrix: nothing to compare
                continue
            rows[-1]["kld_mean_without_imatrix"] = _kld_without_imatrix(
                intermediate, quant, Path(out_tsv).parent, logits, ctx=ctx, chunks=chunks, threads=threads, log=log)
            _progress(log, f"{quant} without the importance matrix: mean KLD {rows[-1]['kld_mean_without_imatrix']:.6f}")
    write_text_atomic(out_tsv, format_quality(rows))
    return pd.DataFrame.from_records(rows, columns=QUALITY_COLUMNS)


def _kld_without_imatrix(intermediate, quant: str, folder: Path, logits, *, ctx: int, chunks: int,
                         threads: int | None, log) -> float:
    from loraforge.gguf import quantize_with_tool

    plain = folder / "eval" / f"{quant}-without-imatrix.gguf"
    try:
        quantize_with_tool(intermediate, plain, quant, threads, log=log)
        return kld_against(logits, plain, ctx=ctx, chunks=chunks, threads=threads, log=log)["kld_mean"]
    finally:
        plain.unlink(missing_ok=True)


def _progress(log, message: str) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write(message + "\n")
    print(message, flush=True)
