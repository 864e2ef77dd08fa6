"""Chat-dataset preparation: load and validate JSONL samples, cap over-represented sources,
split train/validation, up-weight contrastive pairs and summarise what changed.

Pure logic (no Snakemake); `scripts/prepare_data.py` is the thin rule adapter.

A sample is one JSON object per line::

    {"id": "gl-0001", "source": "gitlab",
     "messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}],
     "pair": "cp-03", "kind": "contrastive"}          # both optional

Pipeline order (see `prepare`): load -> cap_sources -> split -> upweight_contrastive
(train only). Splitting before up-weighting means a repeated contrastive sample can never
sit on both sides of the split.
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
from loraforge.errors import UserError

from loraforge.fileio import write_text_atomic

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
CONTRASTIVE = "contrastive"
SUMMARY_COLUMNS = [
    "source",
    "samples_before",
    "tokens_before",
    "share_before",
    "samples_after",
    "tokens_after",
    "share_after",
]


class DataError(UserError, ValueError):
    """A dataset problem. `path`, `line` (1-based) and `field` are set when known."""

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field


def _field_error(path, line: int, field: str, problem: str) -> DataError:
    return DataError(f"{path}:{line}: field '{field}': {problem}", path=path, line=line, field=field)


# ----------------------------------------------------------------------------- loading


def _validate_record(obj, path, line: int) -> None:
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}:{line}: a sample must be a JSON object, got {type(obj).__name__}", path=path, line=line
        )
    if "id" in obj and obj["id"] is not None:
        if not isinstance(obj["id"], str) or not obj["id"].strip():
            raise _field_error(path, line, "id", f"{obj['id']!r} is not a non-empty string")
    source = obj.get("source")
    if source is None:
        raise _field_error(path, line, "source", "missing")
    if not isinstance(source, str) or not source.strip():
        raise _field_error(path, line, "source", f"{source!r} is not a non-empty string")
    for key in ("pair", "kind"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _field_error(path, line, key, f"{value!r} is not a non-empty string")

    messages = obj.get("messages")
    if messages is None:
        raise _field_error(path, line, "messages", "missing")
    if not isinstance(messages, list) or not messages:
        raise _field_error(path, line, "messages", "must be a non-empty list of {role, content} objects")
    has_assistant = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _field_error(path, line, where, f"must be an object, got {type(message).__name__}")
        if "role" not in message:
            raise _field_error(path, line, f"{where}.role", "missing")
        role = message["role"]
        if role not in ROLES:
            raise _field_error(path, line, f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}")
        if "content" not in message:
            raise _field_error(path, line, f"{where}.content", "missing")
        content = message["content"]
        if not isinstance(content, str):
            raise _field_error(path, line, f"{where}.content", f"must be a string, got {type(content).__name__}")
        if role == "assistant":
            if not content.strip():
                raise _field_error(path, line, f"{where}.content", "assistant content is empty")
            has_assistant = True
    if not has_assistant:
        raise _field_error(path, line, "messages", "no assistant turn (nothing to learn from)")


def load_samples(path) -> list[dict]:
    """Read and validate a chat JSONL file; blank lines are skipped.

    Raises `DataError` naming the file, the 1-based line and the field for: invalid JSON, a
    line that is not an object, a missing/empty `source`, missing/empty/non-list `messages`,
    a message that is not an object, a role outside system/user/assistant, non-string
    content, an empty assistant reply, no assistant turn at all, a non-string `id`/`pair`/
    `kind`, a duplicate `id`, and a `pair` id that is not shared by exactly two samples of
    the same source. A sample without `id` gets `"<file stem>:<line>"`.
    """
    path_str = str(path)
    samples: list[dict] = []
    seen_ids: dict[str, int] = {}
    pair_lines: dict[str, list[int]] = defaultdict(list)
    pair_source: dict[str, str] = {}
    stem = Path(path_str).stem
    try:
        handle = open(path_str, "rb")
    except OSError as exc:
        raise DataError(f"{path_str}: cannot read the dataset: {exc.strerror or exc}", path=path_str) from None
    with handle:
        for line_no, raw_bytes in enumerate(handle, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path_str}:{line_no}: not valid UTF-8 (byte 0x{raw_bytes[exc.start]:02x} at column "
                    f"{exc.start + 1}); save the file as UTF-8",
                    path=path_str, line=line_no,
                ) from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path_str}:{line_no}: invalid JSON: {exc.msg} (column {exc.colno})", path=path_str, line=line_no
                ) from None
            _validate_record(obj, path_str, line_no)
            if obj.get("id") is None:
                obj["id"] = f"{stem}:{line_no}"
            sample_id = obj["id"]
            if sample_id in seen_ids:
                raise _field_error(
                    path_str, line_no, "id", f"duplicate id {sample_id!r} (first used on line {seen_ids[sample_id]})"
                )
            seen_ids[sample_id] = line_no
            pair = obj.get("pair")
            if pair is not None:
                pair_lines[pair].append(line_no)
                if len(pair_lines[pair]) > 2:
                    raise _field_error(
                        path_str, line_no, "pair",
                        f"pair {pair!r} already has two samples (lines {pair_lines[pair][0]} and "
                        f"{pair_lines[pair][1]}); a pair has exactly two",
                    )
                if pair in pair_source and pair_source[pair] != obj["source"]:
                    raise _field_error(
                        path_str, line_no, "pair",
                        f"pair {pair!r} mixes sources {pair_source[pair]!r} and {obj['source']!r}; "
                        "both samples of a pair must share a source",
                    )
                pair_source[pair] = obj["source"]
            samples.append(obj)
    for pair, lines in pair_lines.items():
        if len(lines) != 2:
            raise _field_error(
                path_str, lines[0], "pair", f"pair {pair!r} has only one sample; a pair has exactly two"
            )
    return samples


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
    so a cap needs ``k >= ceil(1 / max_share)`` sources (5 for 0.2). With fewer the function
    raises `DataError` naming that minimum (it also raises if pair granularity leaves no
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
    needed = -(-share.denominator // share.numerator)  # ceil(1 / share)
    if k < needed:
        raise DataError(
            f"cannot cap sources at {float(share):g}: {k} source(s) ({', '.join(sorted(by_source))}) can at best be "
            f"1/{k} = {1 / k:.3g} each; a cap of {float(share):g} needs at least {needed} sources "
            f"(add sources or raise max_source_share)"
        )

    # per-source preference order: priority units (pairs / contrastive) first, each group
    # shuffled deterministically by seed and source name
    order: dict[str, list[list[int]]] = {}
    for src, src_units in by_source.items():
        rng = random.Random(f"{seed}:{src}")
        prio = [u for u in src_units if _is_priority(samples, u)]
        rest = [u for u in src_units if not _is_priority(samples, u)]
        rng.shuffle(prio)
        rng.shuffle(rest)
        order[src] = prio + rest

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


def summarize(before: Sequence[dict], after: Sequence[dict], count_tokens=None) -> pd.DataFrame:
    """One row per source (sorted by samples_before, descending) plus a TOTAL row. Shares are
    sample shares in [0, 1]; `after` counts every row written (up-weighted copies included)."""
    rows: dict[str, dict] = {}

    def tally(samples, prefix):
        for sample in samples:
            row = rows.setdefault(sample["source"], {c: 0 for c in SUMMARY_COLUMNS[1:]})
            row[f"samples_{prefix}"] += 1
            row[f"tokens_{prefix}"] += sample_tokens(sample, count_tokens)

    tally(before, "before")
    tally(after, "after")
    n_before, n_after = len(before), len(after)
    records = []
    for src, row in rows.items():
        row["share_before"] = row["samples_before"] / n_before if n_before else 0.0
        row["share_after"] = row["samples_after"] / n_after if n_after else 0.0
        records.append({"source": src, **row})
    records.sort(key=lambda r: (-r["samples_before"], r["source"]))
    total = {"source": "TOTAL"}
    for column in ("samples_before", "tokens_before", "samples_after", "tokens_after"):
        total[column] = sum(r[column] for r in records)
    total["share_before"] = 1.0 if n_before else 0.0
    total["share_after"] = 1.0 if n_after else 0.0
    records.append(total)
    df = pd.DataFrame.from_records(records, columns=SUMMARY_COLUMNS)
    for column in SUMMARY_COLUMNS[1:]:
        if not column.startswith("share"):
            df[column] = df[column].astype("int64")
    return df


# ----------------------------------------------------------------------------- writing


def _jsonl(samples: Iterable[dict]) -> str:
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def prepare(
    path,
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
) -> pd.DataFrame:
    """The whole pipeline: load -> cap_sources -> split -> upweight_contrastive(train only).

    Writes train and validation JSONL and a summary TSV (`SUMMARY_COLUMNS`, one row per
    source plus TOTAL; "after" = the final train + validation rows, up-weighted copies
    included, so with ``contrastive_weight > 1`` a source rich in contrastive pairs can show a
    share_after above `max_source_share`: the cap is applied before up-weighting, on
    distinct samples). Each file is written atomically (`loraforge.fileio`), so a half-written
    file never carries the final name; the summary is written last. Returns the summary DataFrame.
    """
    samples = load_samples(path)
    if not samples:
        raise DataError(f"{path}: no samples", path=path)
    capped = cap_sources(samples, max_source_share, seed)
    train, validation = split(capped, validation_fraction, seed, contrastive_pairs=validation_pairs)
    train = drop_leaked_prompts(train, validation)
    train = upweight_contrastive(train, contrastive_weight)
    summary = summarize(samples, train + validation, count_tokens)
    write_text_atomic(out_train, _jsonl(train), fsync=True)
    write_text_atomic(out_validation, _jsonl(validation), fsync=True)
    write_text_atomic(out_summary, summary.to_csv(sep="\t", index=False, float_format="%.4f", lineterminator="\n"),
                      fsync=True)
    log.info("prepare: %d samples -> %d after cap -> %d train (+%d up-weighted copies) / %d validation",
             len(samples), len(capped), len(train), len(train) + len(validation) - len(capped), len(validation))
    return summary
