"""Tests for loraforge.data (loading, source cap, split, up-weighting, summary) and the
shipped dataset, plus the prepare_data rule script with a locally built tokenizer."""

from __future__ import annotations

import json
import random
import runpy
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from loraforge import data
from loraforge.data import DataError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "rails_chat.jsonl"
CORPUS = REPO / "data" / "corpus"


# ----------------------------------------------------------------------------- helpers


def msgs(user="How?", assistant="Like this."):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def rec(id, source, pair=None, kind=None, **extra):
    out = {"id": id, "source": source, "messages": msgs(f"question {id}", f"answer {id} in a few words")}
    if pair is not None:
        out["pair"] = pair
    if kind is not None:
        out["kind"] = kind
    out.update(extra)
    return out


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def synthetic(sizes: dict[str, int], pairs: dict[str, int] | None = None) -> list[dict]:
    """`sizes[source]` single samples plus `pairs[source]` contrastive pairs per source."""
    out = []
    for source, n in sizes.items():
        out += [rec(f"{source}-{i}", source) for i in range(n)]
        for p in range((pairs or {}).get(source, 0)):
            pid = f"{source}-pair-{p}"
            out += [rec(f"{pid}-w", source, pid, "contrastive"), rec(f"{pid}-r", source, pid, "contrastive")]
    random.Random(0).shuffle(out)
    return out


def assert_cap_holds(samples, share):
    counts = Counter(s["source"] for s in samples)
    total = sum(counts.values())
    assert total > 0
    for source, n in counts.items():
        assert n <= share * total + 1e-9, f"{source}: {n}/{total} > {share}"


def assert_pairs_whole(samples):
    per_pair = Counter(s["pair"] for s in samples if s.get("pair"))
    assert all(n == 2 for n in per_pair.values()), per_pair


def read_jsonl(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def shipped():
    return data.load_samples(SHIPPED)


# ----------------------------------------------------------------------------- load_samples errors

GOOD = {"id": "ok", "source": "gitlab", "messages": msgs()}

BAD_LINES = [
    # (bad line, expected field or None, expected fragment)
    ('{"source": "gitlab", "messages": [', None, "invalid JSON"),
    ('["not", "an", "object"]', None, "must be a JSON object"),
    ({"id": "b", "source": "  ", "messages": msgs()}, "source", "not a non-empty string"),
    ({"id": "b", "source": 7, "messages": msgs()}, "source", "not a non-empty string"),
    ({"id": "b", "source": "gitlab"}, "messages", "missing"),
    ({"id": "b", "source": "gitlab", "messages": "hello"}, "messages", "non-empty list"),
    ({"id": "b", "source": "gitlab", "messages": []}, "messages", "non-empty list"),
    ({"id": "b", "source": "gitlab", "messages": ["hi"]}, "messages[0]", "must be an object"),
    ({"id": "b", "source": "gitlab", "messages": [{"content": "x"}]}, "messages[0].role", "missing"),
    ({"id": "b", "source": "gitlab", "messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     "messages[1].role", "'bot' is not one of system, user, assistant"),
    ({"id": "b", "source": "gitlab", "messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"id": "b", "source": "gitlab", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]},
     "messages[1].content", "must be a string, got int"),
    ({"id": "b", "source": "gitlab", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "messages[1].content", "assistant content is empty"),
    ({"id": "b", "source": "gitlab", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
     "messages", "no assistant turn"),
    ({"id": 5, "source": "gitlab", "messages": msgs()}, "id", "not a non-empty string"),
    ({"id": "ok", "source": "gitlab", "messages": msgs()}, "id", "duplicate id 'ok' (first used on line 1)"),
    ({"id": "b", "source": "gitlab", "messages": msgs(), "pair": 3}, "pair", "not a non-empty string"),
]


@pytest.mark.parametrize("bad, field, fragment", BAD_LINES)
def test_malformed_line_names_file_line_and_field(tmp_path, bad, field, fragment):
    # the bad sample sits on line 3, after a good line and a blank line (blank lines count)
    path = write_lines(tmp_path / "x.jsonl", [GOOD, "", bad])
    with pytest.raises(DataError) as info:
        data.load_samples(path)
    err = info.value
    message = str(err)
    assert message.startswith(f"{path}:3: "), message
    assert fragment in message
    assert err.line == 3 and err.path == str(path)
    if field is not None:
        assert f"field '{field}'" in message
        assert err.field == field
    assert isinstance(err, ValueError)


def test_exact_message_for_bad_role(tmp_path):
    lines = [dict(GOOD, id=f"s{i}") for i in range(16)]
    lines.append({"id": "s16", "source": "gitlab", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]})
    path = write_lines(tmp_path / "x.jsonl", lines)
    with pytest.raises(DataError, match=r"x\.jsonl:17: field 'messages\[2\]\.role': 'bot' is not one of "
                                        r"system, user, assistant$"):
        data.load_samples(path)


@pytest.mark.parametrize("lines, line, fragment", [
    ([rec("a", "s", "p1"), rec("b", "s", "p1"), rec("c", "s", "p1")], 3, "already has two samples"),
    ([rec("a", "s", "p1"), rec("b", "t", "p1")], 2, "mixes sources 's' and 't'"),
    ([rec("a", "s"), rec("b", "s", "p1"), rec("c", "s")], 2, "has only one sample"),
])
def test_bad_pairs_are_reported(tmp_path, lines, line, fragment):
    path = write_lines(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError) as info:
        data.load_samples(path)
    assert str(info.value).startswith(f"{path}:{line}: field 'pair': ")
    assert fragment in str(info.value)


def test_blank_lines_skipped_and_missing_id_synthesised(tmp_path):
    lines = ["", {"source": "a", "messages": msgs()}, "   ", rec("x", "b", "p", "contrastive"),
             rec("y", "b", "p", "contrastive"), {"source": "a", "messages": msgs(), "pair": None}]
    samples = data.load_samples(write_lines(tmp_path / "ok.jsonl", lines))
    assert [s["id"] for s in samples] == ["ok:2", "x", "y", "ok:6"]


# ----------------------------------------------------------------------------- cap_sources


def test_cap_on_synthetic_data_solves_the_share():
    sizes = {"big": 100, "b": 30, "c": 20, "d": 10, "e": 10, "f": 5}
    capped = data.cap_sources(synthetic(sizes), 0.2, seed=0)
    counts = Counter(s["source"] for s in capped)
    assert_cap_holds(capped, 0.2)
    # water-filling: big, b and c are cut to one quota q with q <= 0.2 * (3q + 25), i.e.
    # q = 12 (12/61 = 0.197; q = 13 would give 13/64 = 0.203); smaller sources are untouched
    assert counts == {"big": 12, "b": 12, "c": 12, "d": 10, "e": 10, "f": 5}


def test_cap_removing_samples_does_not_push_others_over():
    # cutting "big" alone to 20% of the original total would leave "b" at 30/... > 20%
    sizes = {"big": 500, "b": 60, "c": 40, "d": 40, "e": 40}
    capped = data.cap_sources(synthetic(sizes), 0.2, seed=1)
    assert_cap_holds(capped, 0.2)
    assert Counter(s["source"] for s in capped) == {"big": 40, "b": 40, "c": 40, "d": 40, "e": 40}


def test_cap_is_noop_when_every_source_is_under_the_share():
    samples = synthetic({"a": 10, "b": 10, "c": 10, "d": 10, "e": 10})
    assert data.cap_sources(samples, 0.2, seed=0) == samples
    uneven = synthetic({"a": 30, "b": 5})
    assert data.cap_sources(uneven, 1.0, seed=0) == uneven


def test_cap_infeasible_with_too_few_sources():
    with pytest.raises(DataError, match=r"needs at least 5 sources"):
        data.cap_sources(synthetic({"a": 50, "b": 20, "c": 10}), 0.2, seed=0)
    with pytest.raises(DataError, match=r"needs at least 4 sources"):
        data.cap_sources(synthetic({"a": 50, "b": 20, "c": 10}), 0.25, seed=0)
    # three sources are enough for a cap of 1/3
    assert_cap_holds(data.cap_sources(synthetic({"a": 50, "b": 20, "c": 10}), 1 / 3, seed=0), 1 / 3)


@pytest.mark.parametrize("share", [0, -0.1, 1.5, "lots", None])
def test_cap_rejects_bad_share(share):
    with pytest.raises(DataError, match="max_source_share"):
        data.cap_sources(synthetic({"a": 3}), share, seed=0)


def test_cap_is_deterministic_by_seed():
    samples = synthetic({"big": 200, "b": 20, "c": 20, "d": 20, "e": 20}, pairs={"big": 3})
    ids = lambda xs: [s["id"] for s in xs]  # noqa: E731
    first = data.cap_sources(samples, 0.2, seed=7)
    assert ids(first) == ids(data.cap_sources(samples, 0.2, seed=7))
    assert ids(first) != ids(data.cap_sources(samples, 0.2, seed=8))
    # kept samples keep their input order
    position = {s["id"]: i for i, s in enumerate(samples)}
    assert [position[i] for i in ids(first)] == sorted(position[i] for i in ids(first))


def test_cap_keeps_pairs_whole_and_prefers_them():
    samples = synthetic({"big": 200, "b": 20, "c": 20, "d": 20, "e": 20}, pairs={"big": 5, "b": 1})
    capped = data.cap_sources(samples, 0.2, seed=3)
    assert_cap_holds(capped, 0.2)
    assert_pairs_whole(capped)
    kept_pairs = {s["pair"] for s in capped if s.get("pair")}
    assert len(kept_pairs) == 6  # all pairs of the capped source survive (preferred)


def test_cap_drops_whole_pairs_when_a_source_is_only_pairs():
    samples = synthetic({"a": 6, "b": 6, "c": 6, "d": 6, "p": 0}, pairs={"p": 20})
    capped = data.cap_sources(samples, 0.2, seed=0)
    assert_cap_holds(capped, 0.2)
    assert_pairs_whole(capped)
    assert 0 < sum(1 for s in capped if s["source"] == "p") < 40


@pytest.mark.parametrize("seed", range(25))
def test_cap_holds_on_random_datasets(seed):
    rng = random.Random(seed)
    n_sources = rng.randint(5, 9)
    sizes = {f"s{i}": rng.choice([1, 2, 5, 20, 80, 300]) for i in range(n_sources)}
    pairs = {f"s{i}": rng.choice([0, 0, 1, 4]) for i in range(n_sources)}
    share = rng.choice([0.2, 0.25, 0.3, 0.5])
    capped = data.cap_sources(synthetic(sizes, pairs), share, seed=seed)
    assert_cap_holds(capped, share)
    assert_pairs_whole(capped)


def test_cap_pair_across_sources_is_an_error():
    samples = [rec("a", "s", "p"), rec("b", "t", "p")] + synthetic({"c": 5, "d": 5, "e": 5, "f": 50})
    with pytest.raises(DataError, match="mixes sources"):
        data.cap_sources(samples, 0.2, seed=0)


def test_cap_on_shipped_dataset(shipped):
    capped = data.cap_sources(shipped, 0.2, seed=0)
    assert_cap_holds(capped, 0.2)
    assert_pairs_whole(capped)
    assert {s["pair"] for s in capped if s.get("pair")} == {s["pair"] for s in shipped if s.get("pair")}
    assert len(capped) >= 200


# ----------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete(shipped):
    train, val = data.split(shipped, 0.1, seed=4)
    train2, val2 = data.split(shipped, 0.1, seed=4)
    assert [s["id"] for s in train] == [s["id"] for s in train2]
    assert [s["id"] for s in val] == [s["id"] for s in val2]
    train_ids, val_ids = {s["id"] for s in train}, {s["id"] for s in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {s["id"] for s in shipped}
    assert abs(len(val) - 0.1 * len(shipped)) <= 1
    assert {s["id"] for s in data.split(shipped, 0.1, seed=5)[1]} != val_ids


def test_split_keeps_pairs_on_one_side(shipped):
    for seed in range(5):
        train, val = data.split(shipped, 0.3, seed=seed)
        assert_pairs_whole(train)
        assert_pairs_whole(val)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_split_validation_never_empty(n):
    samples = [rec(f"s{i}", "a") for i in range(n)]
    train, val = data.split(samples, 0.01, seed=0)
    assert len(val) >= 1 and len(train) >= 1


def test_split_edge_cases():
    samples = [rec(f"s{i}", "a") for i in range(10)]
    assert data.split(samples, 0.0, seed=0) == (samples, [])
    assert data.split(samples[:1], 0.5, seed=0) == (samples[:1], [])
    # a pair plus one single: the single goes to whichever side, the pair stays whole
    mixed = [rec("x", "a", "p", "contrastive"), rec("y", "a", "p", "contrastive"), rec("z", "a")]
    train, val = data.split(mixed, 0.5, seed=0)
    assert train and val
    assert_pairs_whole(train)
    assert_pairs_whole(val)
    with pytest.raises(DataError, match="single pair"):
        data.split(mixed[:2], 0.5, seed=0)
    for bad in (1.0, -0.1, "x"):
        with pytest.raises(DataError, match="validation_fraction"):
            data.split(samples, bad, seed=0)


# ----------------------------------------------------------------------------- upweighting


def test_upweight_multiplies_only_contrastive():
    samples = synthetic({"a": 5, "b": 3}, pairs={"a": 2})
    out = data.upweight_contrastive(samples, 3)
    before, after = Counter(s["id"] for s in samples), Counter(s["id"] for s in out)
    for s in samples:
        assert after[s["id"]] == (3 if s.get("kind") == "contrastive" else 1) * before[s["id"]]
    assert data.upweight_contrastive(samples, 1) == samples
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DataError, match="contrastive_weight"):
            data.upweight_contrastive(samples, bad)


def test_prepare_upweights_train_only_and_never_leaks(tmp_path):
    train_path, val_path = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    data.prepare(SHIPPED, train_path, val_path, tmp_path / "summary.tsv",
                 contrastive_weight=3, validation_fraction=0.2, seed=2)
    train, val = read_jsonl(train_path), read_jsonl(val_path)
    train_ids, val_ids = Counter(s["id"] for s in train), Counter(s["id"] for s in val)
    assert not set(train_ids) & set(val_ids)
    assert all(n == 1 for n in val_ids.values())
    assert any(s.get("kind") == "contrastive" for s in val)
    for s in train:
        assert train_ids[s["id"]] == (3 if s.get("kind") == "contrastive" else 1)
    assert_pairs_whole(val)


# ----------------------------------------------------------------------------- prepare + summary


@pytest.mark.parametrize("weight", [1, 2])
def test_summary_numbers_are_consistent(tmp_path, shipped, weight):
    out = {k: tmp_path / f"{k}.{ext}" for k, ext in (("train", "jsonl"), ("val", "jsonl"), ("summary", "tsv"))}
    df = data.prepare(SHIPPED, out["train"], out["val"], out["summary"], contrastive_weight=weight, seed=0)
    assert list(df.columns) == data.SUMMARY_COLUMNS
    total = df.set_index("source").loc["TOTAL"]
    rows = df[df.source != "TOTAL"].set_index("source")
    written = read_jsonl(out["train"]) + read_jsonl(out["val"])
    n_lines = sum(1 for p in (out["train"], out["val"]) for ln in p.read_text().splitlines() if ln.strip())

    assert total.samples_before == len(shipped)
    assert total.tokens_before == sum(len(m["content"].split()) for s in shipped for m in s["messages"])
    assert total.samples_after == n_lines == len(written)
    assert total.tokens_after == sum(len(m["content"].split()) for s in written for m in s["messages"])
    for column in ("samples_before", "tokens_before", "samples_after", "tokens_after"):
        assert rows[column].sum() == total[column]
    assert rows.share_before.sum() == pytest.approx(1.0)
    assert rows.share_after.sum() == pytest.approx(1.0)
    assert dict(rows.samples_before) == dict(Counter(s["source"] for s in shipped))
    assert dict(rows.samples_after[rows.samples_after > 0]) == dict(Counter(s["source"] for s in written))
    assert rows.loc["gitlab", "share_before"] > 0.4
    if weight == 1:
        assert rows.share_after.max() <= 0.2 + 1e-9
    # the TSV holds the same table
    tsv = pd.read_csv(out["summary"], sep="\t")
    assert list(tsv.columns) == data.SUMMARY_COLUMNS
    assert tsv.drop(columns=["share_before", "share_after"]).equals(df.drop(columns=["share_before", "share_after"]))
    # nothing half-written is left next to the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.tsv", "train.jsonl", "val.jsonl"]


def test_prepare_uses_count_tokens(tmp_path):
    df = data.prepare(SHIPPED, tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path / "s.tsv", count_tokens=len)
    shipped = data.load_samples(SHIPPED)
    total = df.set_index("source").loc["TOTAL"]
    assert total.tokens_before == sum(len(m["content"]) for s in shipped for m in s["messages"])


# ----------------------------------------------------------------------------- shipped data


def test_shipped_dataset_shape(shipped):
    assert 300 <= len(shipped) <= 400
    counts = Counter(s["source"] for s in shipped)
    assert counts["gitlab"] / len(shipped) > 0.40
    assert len(counts) >= 6
    pairs = Counter(s["pair"] for s in shipped if s.get("pair"))
    assert len(pairs) >= 25 and set(pairs.values()) == {2}
    assert all(s.get("kind") == "contrastive" for s in shipped if s.get("pair"))
    assert 150_000 <= SHIPPED.stat().st_size <= 450_000
    words = sorted(len(m["content"].split()) for s in shipped for m in s["messages"][:3] if m["role"] == "assistant")
    assert 40 <= words[len(words) // 2] <= 200  # the median first answer is short but substantial


def test_corpus_present():
    files = sorted(CORPUS.glob("*.txt"))
    assert files
    assert 150_000 <= sum(f.stat().st_size for f in files) <= 300_000


# ----------------------------------------------------------------------------- the rule script


def test_prepare_data_script_with_local_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    tok_dir = tmp_path / "tiny-model"
    tok_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(CORPUS / "overview.txt"), model_prefix=str(tok_dir / "tokenizer"), vocab_size=500,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    # a qwen config makes AutoTokenizer pick a tokenizer that drops spaces: the script must not use it
    (tok_dir / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    out = tmp_path / "out"
    smk = SimpleNamespace(
        input=SimpleNamespace(samples=[str(SHIPPED)], tokenizer_dir=str(tok_dir)),
        params=SimpleNamespace(sources=[data.file_entry(SHIPPED)], max_source_share=0.2, contrastive_weight=2,
                               validation_fraction=0.1, seed=0, validation_pairs=8, max_seq_length=64),
        wildcards=SimpleNamespace(model="tiny"),
        output=SimpleNamespace(train=str(out / "train.jsonl"), validation=str(out / "validation.jsonl"),
                               summary=str(out / "summary.tsv")),
        log=[str(tmp_path / "prepare.log")],
        rule="prepare_data",
    )
    runpy.run_path(str(REPO / "scripts" / "prepare_data.py"), init_globals={"snakemake": smk})
    summary = pd.read_csv(out / "summary.tsv", sep="\t").set_index("source")
    words = sum(len(m["content"].split()) for s in data.load_samples(SHIPPED) for m in s["messages"])
    assert summary.loc["TOTAL", "tokens_before"] > 2 * words  # sub-word tokens, not words
    log_text = Path(smk.log[0]).read_text()
    assert "tokenizer: LlamaTokenizer" in log_text
    # the same loader serves training (loraforge.train): the round-tripping tokenizer
    from loraforge.tokenizer import PROBE, load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert tokenizer.decode(tokenizer.encode(PROBE, add_special_tokens=False)) == PROBE
    with pytest.raises(RuntimeError, match=f"could not load a tokenizer from {tmp_path / 'out'}"):
        load_tokenizer(tmp_path / "out")
    assert summary.loc["TOTAL", "samples_after"] == sum(
        1 for name in ("train.jsonl", "validation.jsonl") for _ in (out / name).open())
