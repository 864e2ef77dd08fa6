"""Chat-dataset preparation: load samples from one or more files (any format of
`loraforge.data_formats`; entries of `loraforge.data_sources`), remove content duplicates, cap
over-represented sources, split train/validation, weight entries and contrastive pairs, and
summarise what changed (with the samples training cuts at max_seq_length).

Pure logic (no Snakemake); `scripts/prepare_data.py` is the thin rule adapter.

A sample, once converted, is::

    {"id": "gl-0001", "source": "gitlab",
     "messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}],
     "pair": "cp-03", "kind": "contrastive"}          # both optional

Pipeline order (see `prepare`): load -> dedupe -> limit_entry (cap, weight < 1) -> cap_sources
-> split -> drop_leaked_prompts -> repeat_weighted (weight > 1) and upweight_contrastive (train
only). Removing duplicates before the split, and repeating only after it, means a sample can
never sit on both sides of the split.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import pandas as pd

from loraforge.data_formats import ROLES, DataError, field_error, read_chat_samples  # noqa: F401 - ROLES, DataError: used as loraforge.data.X
from loraforge.fileio import write_text_atomic

log = logging.getLogger(__name__)

CONTRASTIVE = "contrastive"
SUMMARY_COLUMNS = [
    "source",
    "samples_before",
    "tokens_before",
    "share_before",
    "samples_after",
    "tokens_after",
    "share_after",
    "duplicates",  # samples removed before the split: their messages repeat an earlier sample's
    "truncated",  # rows written (train + validation) longer than max_seq_length: training cuts them
]


# ----------------------------------------------------------------------------- loading


def load_samples(path, default_source: str | None = None) -> list[dict]:
    """Read, convert and validate one sample file (`loraforge.data_formats`: OpenAI/ChatML,
    ShareGPT or Alpaca, JSON lines or a JSON array); blank lines are skipped.

    Raises `DataError` naming the file, the 1-based line and the field for: invalid JSON or
    UTF-8, a sample in no known format or in another format than the file's first, a missing or
    malformed message or turn, a role outside system/user/assistant, an empty answer, no answer
    at all, a non-string `id`/`source`/`pair`/`kind`, a duplicate `id`, and a `pair` id that is
    not shared by exactly two samples of the same source. A sample without `source` gets
    `default_source` (default: the file's stem), one without `id` gets `"<file stem>:<line>"`
    (`.2`, `.3`, ... appended for further samples that start on the same line of a JSON array).
    """
    path_str = str(path)
    samples: list[dict] = []
    seen_ids: dict[str, int] = {}
    pair_lines: dict[str, list[int]] = defaultdict(list)
    pair_source: dict[str, str] = {}
    stem = Path(path_str).stem
    for line_no, obj in read_chat_samples(path_str, default_source):
        if obj.get("id") is None:  # <stem>:<line>, and .2, .3, ... for more samples on one line (a JSON array)
            obj["id"] = next(i for k in range(1, len(seen_ids) + 2)
                             if (i := f"{stem}:{line_no}" + (f".{k}" if k > 1 else "")) not in seen_ids)
        sample_id = obj["id"]
        if sample_id in seen_ids:
            raise field_error(
                path_str, line_no, "id", f"duplicate id {sample_id!r} (first used on line {seen_ids[sample_id]})"
            )
        seen_ids[sample_id] = line_no
        pair = obj.get("pair")
        if pair is not None:
            _check_pair(pair, obj["source"], line_no, path_str, pair_lines, pair_source)
        samples.append(obj)
    for pair, lines in pair_lines.items():
        if len(lines) != 2:
            raise field_error(
                path_str, lines[0], "pair", f"pair {pair!r} has only one sample; a pair has exactly two"
            )
    return samples


def _check_pair(pair: str, source: str, line_no: int, path: str, pair_lines: dict, pair_source: dict) -> None:
    pair_lines[pair].append(line_no)
    if len(pair_lines[pair]) > 2:
        raise field_error(
            path, line_no, "pair",
            f"pair {pair!r} already has two samples (lines {pair_lines[pair][0]} and "
            f"{pair_lines[pair][1]}); a pair has exactly two",
        )
    if pair in pair_source and pair_source[pair] != source:
        raise field_error(
            path, line_no, "pair",
            f"pair {pair!r} mixes sources {pair_source[pair]!r} and {source!r}; "
            "both samples of a pair must share a source",
        )
    pair_source[pair] = source


def file_entry(path) -> dict:
    """A single sample file as a `loraforge.data_sources` entry (no options)."""
    return {"kind": "file", "file": str(path), "label": str(path), "default_source": Path(str(path)).stem,
            "source": None, "weight": 1, "cap": None}


def load_entries(entries: Sequence[dict]) -> list[list[dict]]:
    """The samples of each entry (`loraforge.data_sources.entries`), in order. An id or pair id
    that an earlier entry already uses is prefixed with the entry's label, so ids stay unique
    and pairs never join across files."""
    groups: list[list[dict]] = []
    ids: set[str] = set()
    pairs: set[str] = set()
    for entry in entries:
        group = load_samples(entry["file"], entry.get("source") or entry["default_source"])
        own_pairs = {s["pair"] for s in group if s.get("pair")}
        renamed_pairs = {p: f"{entry['label']}:{p}" for p in own_pairs & pairs}
        for sample in group:
            while sample["id"] in ids:
                sample["id"] = f"{entry['label']}:{sample['id']}"
            ids.add(sample["id"])
            if sample.get("pair") in renamed_pairs:
                sample["pair"] = renamed_pairs[sample["pair"]]
        pairs |= {s["pair"] for s in group if s.get("pair")}
        groups.append(group)
    return groups


# ----------------------------------------------------------------------------- duplicates


def content_key(sample: dict) -> tuple:
    """What makes two samples the same: their messages, roles and whitespace-collapsed text."""
    return tuple((m["role"], " ".join(m["content"].split())) for m in sample["messages"])


def dedupe(samples: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, removed): every sample whose content (`content_key`) an earlier one already has is
    removed, before the split, so that no validation sample is also trained on. Pairs are kept
    whole and win: they are taken first (a pair goes if either member repeats a kept sample),
    then single samples; both in input order. `kept` keeps the input order."""
    seen: set[tuple] = set()
    keep: set[int] = set()
    units = _units(samples)
    for unit in [u for u in units if len(u) > 1] + [u for u in units if len(u) == 1]:
        keys = [content_key(samples[i]) for i in unit]
        if any(k in seen for k in keys):
            continue
        seen.update(keys)
        keep.update(unit)
    kept = [s for i, s in enumerate(samples) if i in keep]
    removed = [s for i, s in enumerate(samples) if i not in keep]
    if removed:
        log.info("prepare: removed %d samples whose messages repeat an earlier sample's", len(removed))
    return kept, removed


def is_contrastive(sample: dict) -> bool:
    return sample.get("kind") == CONTRASTIVE


# ----------------------------------------------------------------------------- units


def _units(samples: Sequence[dict]) -> list[list[int]]:
    """Indices grouped into indivisible units: the members of one `pair`, or one sample.
    Units are ordered by their first member's position."""
    by_pair: dict[str, list[int]] = {}
    units: list[list[int]] = []
    for i, sample in enumerate(samples):
        pair = sample.get("pair")
        if pair is None:
            units.append([i])
        elif pair in by_pair:
            by_pair[pair].append(i)
        else:
            by_pair[pair] = [i]
            units.append(by_pair[pair])
    return units


def _unit_source(samples: Sequence[dict], unit: list[int]) -> str:
    sources = {samples[i]["source"] for i in unit}
    if len(sources) != 1:
        pair = samples[unit[0]].get("pair")
        raise DataError(f"pair {pair!r} mixes sources {sorted(sources)}; both samples of a pair must share a source")
    return sources.pop()


def _is_priority(samples: Sequence[dict], unit: list[int]) -> bool:
    return len(unit) > 1 or any(is_contrastive(samples[i]) for i in unit)


def _share(max_share) -> Fraction:
    try:
        share = Fraction(str(max_share)).limit_denominator(1_000_000)
    except (TypeError, ValueError):
        raise DataError(f"max_source_share must be a number in (0, 1], got {max_share!r}") from None
    if not 0 < share <= 1:
        raise DataError(f"max_source_share must be in (0, 1], got {max_share!r}")
    return share


def _preference(samples: Sequence[dict], units: list[list[int]], key: str) -> list[list[int]]:
    """The order units are kept in when some must go: priority units (pairs, contrastive)
    first, each group shuffled by `random.Random(key)`."""
    rng = random.Random(key)
    prio = [u for u in units if _is_priority(samples, u)]
    rest = [u for u in units if not _is_priority(samples, u)]
    rng.shuffle(prio)
    rng.shuffle(rest)
    return prio + rest


def _fill(order: list[list[int]], quota: int) -> list[list[int]]:
    """First-fit: walk units in `order`, keep each one that still fits under `quota` samples."""
    kept, size = [], 0
    for unit in order:
        if size + len(unit) <= quota:
            kept.append(unit)
            size += len(unit)
            if size == quota:
                break
    return kept


# ----------------------------------------------------------------------------- capping


def cap_sources(samples: Sequence[dict], max_share: float = 0.2, seed: int = 0) -> list[dict]:
    """Subsample over-represented sources so that no source exceeds `max_share` of the result.

    Semantics (the guarantee is on the *returned* list, counted in samples, not tokens):
    for every source s, ``count(s) <= max_share * len(result)``. Because removing samples shrinks the total, the
    cap is solved, not applied once: every source is limited to the same per-source quota
    ``q`` (sources smaller than ``q`` keep everything), and ``q`` is the largest integer for
    which the kept counts satisfy the inequality against their own total (water-filling).
    So the result keeps as much data as a single common quota allows, and sources already
    under the cap are never touched. If nothing needs capping, the input is returned as is.

    Feasibility: with k non-empty sources each source can be at most ``1/k`` of anything,
    so a cap needs ``k >= ceil(1 / max_share)`` sources (5 for 0.2). One source (a user's own
    file) is kept whole, with a warning: there is nothing to balance it against. With 2 to
    ``k - 1`` sources the function raises `DataError` naming that minimum (it also raises if pair granularity leaves no
    non-empty solution). ``max_share >= 1`` disables the cap.

    Pairs and contrastive samples: the members of a `pair` are one indivisible unit, kept or
    dropped together, and never split. They are NOT exempt from the cap (so the guarantee
    above holds unconditionally, also for a source named "contrastive"), but they are
    *preferred*: inside a capped source, pairs and ``kind == "contrastive"`` samples fill the
    quota first (the article's lesson: a few dozen contrastive pairs mattered more than
    thousands of generic samples), then ordinary samples. A pair that would overshoot the
    quota by one is skipped in favour of a single sample.

    Determinism: which units a capped source keeps is a pure function of `seed`, the source
    name and the input order (``random.Random(f"{seed}:{source}")`` shuffles, then a prefix
    is kept, so a larger quota keeps a superset). The kept samples keep their input order.
    """
    share = _share(max_share)
    if not samples:
        return []
    units = _units(samples)
    by_source: dict[str, list[list[int]]] = defaultdict(list)
    for unit in units:
        by_source[_unit_source(samples, unit)].append(unit)
    sizes = {src: sum(len(u) for u in us) for src, us in by_source.items()}
    total = sum(sizes.values())
    if share >= 1 or all(n <= share * total for n in sizes.values()):
        return list(samples)

    k = len(by_source)
    if k == 1:
        # one source (a user's own file): there is nothing to balance it against
        log.warning("max_source_share %g: the data has one source (%s): nothing to cap", float(share), next(iter(by_source)))
        return list(samples)
    needed = -(-share.denominator // share.numerator)  # ceil(1 / share)
    if k < needed:
        raise DataError(
            f"cannot cap sources at {float(share):g}: {k} source(s) ({', '.join(sorted(by_source))}) can at best be "
            f"1/{k} = {1 / k:.3g} each; a cap of {float(share):g} needs at least {needed} sources "
            f"(add sources, or set max_source_share: 1 to keep every source whole)"
        )

    # per-source preference order: priority units (pairs / contrastive) first, each group
    # shuffled deterministically by seed and source name
    order = {src: _preference(samples, src_units, f"{seed}:{src}") for src, src_units in by_source.items()}

    def attempt(quota: int):
        kept = {src: (us if sizes[src] <= quota else _fill(order[src], quota)) for src, us in by_source.items()}
        counts = {src: sum(len(u) for u in us) for src, us in kept.items()}
        kept_total = sum(counts.values())
        ok = kept_total > 0 and all(c <= share * kept_total for c in counts.values())
        return ok, kept, counts, kept_total

    for quota in range(max(sizes.values()), 0, -1):
        ok, kept, counts, kept_total = attempt(quota)
        if ok:
            break
    else:
        raise DataError(
            f"cannot cap sources at {float(share):g}: no per-source quota satisfies the cap with pairs kept whole "
            f"(source sizes: {dict(sorted(sizes.items()))})"
        )
    for src in sorted(sizes):
        if counts[src] < sizes[src]:
            log.info("cap: source %s %d -> %d samples (quota %d, %.1f%% of %d)",
                     src, sizes[src], counts[src], quota, 100 * counts[src] / kept_total, kept_total)
    keep = sorted(i for us in kept.values() for u in us for i in u)
    return [samples[i] for i in keep]


# ----------------------------------------------------------------------------- weighting


def upweight_contrastive(samples: Iterable[dict], weight: int) -> list[dict]:
    """Repeat every ``kind == "contrastive"`` sample `weight` times in place (copies next to
    the original); other samples appear once. ``weight == 1`` returns an unchanged copy.
    Apply it to the training split only (see `prepare`)."""
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise DataError(f"contrastive_weight must be an integer >= 1, got {weight!r}")
    out: list[dict] = []
    for sample in samples:
        if is_contrastive(sample):
            out.extend(dict(sample) for _ in range(weight))
        else:
            out.append(sample)
    return out


def limit_entry(samples: Sequence[dict], entry: dict, seed: int = 0) -> list[dict]:
    """An entry's samples under its `cap` (at most that many) and a `weight` below 1 (that
    fraction, at least one sample): which ones is decided by `seed` and the entry's label,
    pairs and contrastive samples first, pairs whole; the kept ones keep their order."""
    quota = len(samples)
    if entry.get("cap") is not None:
        quota = min(quota, int(entry["cap"]))
    weight = float(entry.get("weight", 1))
    if weight < 1:
        quota = min(quota, max(1, round(weight * len(samples))))
    if quota >= len(samples):
        return list(samples)
    units = _units(samples)
    kept = _fill(_preference(samples, units, f"{seed}:{entry['label']}"), quota)
    keep = sorted(i for u in kept for i in u)
    log.info("prepare: %s: %d of %d samples kept (cap %s, weight %g)", entry["label"], len(keep), len(samples),
             entry.get("cap"), weight)
    return [samples[i] for i in keep]


def repeat_weighted(samples: Iterable[dict], weights: dict[str, float], seed: int = 0) -> list[dict]:
    """Each sample `weights[id]` times (copies next to the original; a fractional part is one
    more copy for that share of the samples, chosen by `seed`); others once. Train only."""
    rng = random.Random(f"{seed}:weight")
    out: list[dict] = []
    for sample in samples:
        weight = weights.get(sample["id"], 1)
        times = int(weight) + (1 if weight != int(weight) and rng.random() < weight - int(weight) else 0)
        out.append(sample)
        out.extend(dict(sample) for _ in range(times - 1))
    return out


# ----------------------------------------------------------------------------- splitting


def split(samples: Sequence[dict], validation_fraction: float = 0.1, seed: int = 0,
          contrastive_pairs: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministically split into (train, validation), keeping each pair on one side.

    Units (a pair, or a single sample) are shuffled with ``random.Random(seed)`` and moved
    to validation until it holds ``max(1, round(fraction * n))`` samples (a pair may
    overshoot by one). Validation is non-empty whenever ``fraction > 0`` and there are at
    least 2 samples, and train is never emptied by the split; ``fraction == 0`` puts
    everything in train. Both lists keep the input order. Raises `DataError` for a fraction
    outside [0, 1) or when the samples are a single pair that cannot be split.

    contrastive_pairs: that many contrastive pairs (chosen with the same seed) go to validation
    first, for the conventions score (loraforge.conventions); they count towards the target.
    """
    try:
        fraction = float(validation_fraction)
    except (TypeError, ValueError):
        raise DataError(f"validation_fraction must be a number in [0, 1), got {validation_fraction!r}") from None
    if not 0 <= fraction < 1:
        raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    n = len(samples)
    if fraction == 0 or n < 2:
        return list(samples), []
    units = _units(samples)
    if len(units) < 2:
        raise DataError(
            f"cannot split {n} samples that form a single pair into non-empty train and validation sets"
        )
    target = max(1, round(fraction * n))
    rng = random.Random(seed)
    order = list(range(len(units)))
    rng.shuffle(order)
    if contrastive_pairs:
        pairs = [u for u in order if len(units[u]) > 1 and all(is_contrastive(samples[i]) for i in units[u])]
        first = pairs[: int(contrastive_pairs)]
        order = first + [u for u in order if u not in set(first)]
    val_units: set[int] = set()
    val_size = 0
    forced = len(first) if contrastive_pairs else 0
    for k, position in enumerate(order):
        if (val_size >= target and k >= forced) or len(val_units) == len(units) - 1:
            break
        val_units.add(position)
        val_size += len(units[position])
    in_val = {i for position in val_units for i in units[position]}
    train = [s for i, s in enumerate(samples) if i not in in_val]
    validation = [s for i, s in enumerate(samples) if i in in_val]
    return train, validation


def _user_turns(sample: dict) -> set[str]:
    return {m["content"].strip() for m in sample["messages"] if m["role"] == "user"}


def drop_leaked_prompts(train: Sequence[dict], validation: Sequence[dict]) -> list[dict]:
    """Train without the samples that ask a held-out contrastive pair's question (same user
    turn): the conventions score must measure held-out prompts only."""
    held_out = set().union(*(_user_turns(s) for s in validation if is_contrastive(s))) if validation else set()
    kept = [s for s in train if not (_user_turns(s) & held_out)]
    if len(kept) < len(train):
        log.info("prepare: dropped %d train samples that repeat a held-out contrastive prompt", len(train) - len(kept))
    return kept


# ----------------------------------------------------------------------------- summary


def _word_count(text: str) -> int:
    return len(text.split())


def sample_tokens(sample: dict, count_tokens: Callable[[str], int] | None = None) -> int:
    """Tokens of a sample: `count_tokens` summed over all message contents (default:
    whitespace-separated words)."""
    count = count_tokens or _word_count
    return sum(int(count(m["content"])) for m in sample["messages"])


def summarize(before: Sequence[dict], after: Sequence[dict], count_tokens=None, *,
              duplicates: Sequence[dict] = (), truncated: Sequence[dict] = ()) -> pd.DataFrame:
    """One row per source (sorted by samples_before, descending) plus a TOTAL row. Shares are
    sample shares in [0, 1]; `after` counts every row written (up-weighted copies included);
    `duplicates` (removed before the split) and `truncated` (rows of `after` training cuts) are
    counted per source."""
    rows: dict[str, dict] = {}

    def row_of(sample):
        return rows.setdefault(sample["source"], {c: 0 for c in SUMMARY_COLUMNS[1:]})

    for prefix, samples in (("before", before), ("after", after)):
        for sample in samples:
            row_of(sample)[f"samples_{prefix}"] += 1
            row_of(sample)[f"tokens_{prefix}"] += sample_tokens(sample, count_tokens)
    for column, samples in (("duplicates", duplicates), ("truncated", truncated)):
        for sample in samples:
            row_of(sample)[column] += 1
    n_before, n_after = len(before), len(after)
    records = []
    for src, row in rows.items():
        row["share_before"] = row["samples_before"] / n_before if n_before else 0.0
        row["share_after"] = row["samples_after"] / n_after if n_after else 0.0
        records.append({"source": src, **row})
    records.sort(key=lambda r: (-r["samples_before"], r["source"]))
    total = {"source": "TOTAL"}
    for column in SUMMARY_COLUMNS[1:]:
        if not column.startswith("share"):
            total[column] = sum(r[column] for r in records)
    total["share_before"] = 1.0 if n_before else 0.0
    total["share_after"] = 1.0 if n_after else 0.0
    records.append(total)
    df = pd.DataFrame.from_records(records, columns=SUMMARY_COLUMNS)
    for column in SUMMARY_COLUMNS[1:]:
        if not column.startswith("share"):
            df[column] = df[column].astype("int64")
    return df


def too_long(samples: Sequence[dict], max_seq_length: int | None,
             count_length: Callable[[dict], int]) -> tuple[list[dict], dict | None]:
    """(the samples longer than `max_seq_length` tokens, {id, tokens} of the longest of them or
    None). `count_length` is measured once per id (up-weighted copies share it)."""
    if not max_seq_length:
        return [], None
    lengths: dict[str, int] = {}
    cut = []
    for sample in samples:
        if sample["id"] not in lengths:
            lengths[sample["id"]] = int(count_length(sample))
        if lengths[sample["id"]] > max_seq_length:
            cut.append(sample)
    if not cut:
        return [], None
    longest = max(cut, key=lambda s: lengths[s["id"]])
    return cut, {"id": longest["id"], "tokens": lengths[longest["id"]]}


def truncation_warning(summary: pd.DataFrame) -> str | None:
    """The one line saying how many samples training cuts and the longest (from `prepare`'s
    summary), or None."""
    info = summary.attrs.get("truncation")
    if not info:
        return None
    return (f"{info['count']} of {info['rows']} samples are longer than max_seq_length ({info['max_seq_length']} "
            f"tokens) and are cut in training; the longest, {info['longest']['id']}, has {info['longest']['tokens']} "
            "tokens (raise train.max_seq_length or shorten them)")


# ----------------------------------------------------------------------------- writing


def _jsonl(samples: Iterable[dict]) -> str:
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def prepare(
    sources,
    out_train,
    out_validation,
    out_summary,
    *,
    max_source_share: float = 0.2,
    contrastive_weight: int = 1,
    validation_fraction: float = 0.1,
    seed: int = 0,
    validation_pairs: int = 0,
    count_tokens: Callable[[str], int] | None = None,
    max_seq_length: int | None = None,
    count_length: Callable[[dict], int] | None = None,
) -> pd.DataFrame:
    """The whole pipeline (module docstring). `sources`: one file's path, or entries of
    `loraforge.data_sources.entries`.

    Writes train and validation JSONL and a summary TSV (`SUMMARY_COLUMNS`, one row per
    source plus TOTAL; "after" = the final train + validation rows, up-weighted copies
    included, so with weights a source can show a share_after above `max_source_share`: the cap
    is applied before repeating, on distinct samples). A row longer than `max_seq_length`
    (`count_length`: tokens as training renders the sample; default: `count_tokens` of the
    contents) is counted and warned about (`truncation_warning`). Each file is written
    atomically (`loraforge.fileio`), the summary last. Returns the summary DataFrame.
    """
    entries = [file_entry(sources)] if isinstance(sources, (str, Path)) else list(sources)
    groups = load_entries(entries)
    samples = [s for group in groups for s in group]
    if not samples:
        raise DataError(f"{', '.join(e['label'] for e in entries)}: no samples", path=entries[0]["file"])
    distinct, duplicates = dedupe(samples)
    kept_ids = {s["id"] for s in distinct}
    limited, weights = [], {}
    for entry, group in zip(entries, groups):
        group = limit_entry([s for s in group if s["id"] in kept_ids], entry, seed)
        limited += group
        weights.update({s["id"]: float(entry["weight"]) for s in group if float(entry.get("weight", 1)) > 1})
    capped = cap_sources(limited, max_source_share, seed)
    train, validation = split(capped, validation_fraction, seed, contrastive_pairs=validation_pairs)
    train = drop_leaked_prompts(train, validation)
    train = upweight_contrastive(repeat_weighted(train, weights, seed), contrastive_weight)
    written = train + validation
    cut, longest = too_long(written, max_seq_length, count_length or (lambda s: sample_tokens(s, count_tokens)))
    summary = summarize(samples, written, count_tokens, duplicates=duplicates, truncated=cut)
    if cut:
        summary.attrs["truncation"] = {"count": len(cut), "rows": len(written), "longest": longest,
                                       "max_seq_length": max_seq_length}
        log.warning("prepare: %s", truncation_warning(summary))
    write_text_atomic(out_train, _jsonl(train), fsync=True)
    write_text_atomic(out_validation, _jsonl(validation), fsync=True)
    write_text_atomic(out_summary, summary.to_csv(sep="\t", index=False, float_format="%.4f", lineterminator="\n"),
                      fsync=True)
    log.info("prepare: %d samples -> %d distinct -> %d after cap -> %d train rows (weights and contrastive "
             "repeats included) / %d validation", len(samples), len(distinct), len(capped), len(train),
             len(validation))
    return summary
