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

from conftest import run_snakemake, small_config, write_config
from loraforge import data
from loraforge.data import DataError
from test_hub import fake_hub, hub_env  # noqa: F401 - fixtures: huggingface_hub pointed at tests/fake_hub.py

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
    # one source (a user's own file) has nothing to balance against: kept whole
    one = synthetic({"mine": 40})
    assert data.cap_sources(one, 0.2, seed=0) == one


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


def tokenizer_folder(tok_dir: Path) -> Path:
    """A model folder with only a small SentencePiece tokenizer and a qwen3 config.json (in a
    second): all data preparation reads of a base."""
    import sentencepiece as spm

    tok_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(CORPUS / "overview.txt"), model_prefix=str(tok_dir / "tokenizer"), vocab_size=500,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    # a qwen config makes AutoTokenizer pick a tokenizer that drops spaces: the script must not use it
    (tok_dir / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return tok_dir


def test_prepare_data_script_with_local_sentencepiece_tokenizer(tmp_path, capfd):
    tok_dir = tokenizer_folder(tmp_path / "tiny-model")
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
    # max_seq_length 64 cuts most shipped samples: counted, and one warning line on the console
    assert 0 < summary.loc["TOTAL", "truncated"] <= summary.loc["TOTAL", "samples_after"]
    console = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("[lora-forge] warning")]
    assert len(console) == 1 and f"{summary.loc['TOTAL', 'truncated']} of " in console[0], console
    assert "longer than max_seq_length (64 tokens)" in console[0] and "the longest, " in console[0]


# ----------------------------------------------------------------------------- formats (issue 22)


def chat(user, answer, **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def test_three_formats_are_detected_per_file_and_converted(tmp_path):
    chatml = write_lines(tmp_path / "my_chats.jsonl", [
        chat("How do I add a column?", "Write a migration."),
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "Two "}, {"type": "text", "text": "parts"}]},
            {"role": "assistant", "content": "Joined.", "name": "bot"}], "tools": [], "source": "own"},
    ])
    sharegpt = write_lines(tmp_path / "sg.jsonl", [
        {"id": "sg-1", "system": "You review Rails code.", "conversations": [
            {"from": "human", "value": "Service object?"}, {"from": "gpt", "value": "Use a concern."},
            {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "It stays in the model."}]},
    ])
    alpaca = tmp_path / "alpaca.json"  # the usual Alpaca dump: one JSON array, pretty-printed
    alpaca.write_text(json.dumps([
        {"instruction": "Name the job backend.", "input": "", "output": "Solid Queue."},
        {"instruction": "Rewrite this.", "input": "class X; end", "output": "class Y; end", "system": "Terse."},
    ], indent=2))

    first, second = data.load_samples(chatml)
    assert first == {"messages": chat("How do I add a column?", "Write a migration.")["messages"],
                     "source": "my_chats", "id": "my_chats:1"}  # source from the file name
    assert second["source"] == "own" and "tools" not in second
    assert second["messages"][1] == {"role": "user", "content": "Two parts"}
    assert second["messages"][2] == {"role": "assistant", "content": "Joined."}

    [conv] = data.load_samples(sharegpt)
    assert conv["id"] == "sg-1" and conv["source"] == "sg"
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("system", "You review Rails code."), ("user", "Service object?"), ("assistant", "Use a concern."),
        ("user", "Why?"), ("assistant", "It stays in the model.")]

    plain, with_input = data.load_samples(alpaca, default_source="alp")
    assert plain["messages"] == [{"role": "user", "content": "Name the job backend."},
                                 {"role": "assistant", "content": "Solid Queue."}]
    assert with_input["messages"] == [{"role": "system", "content": "Terse."},
                                      {"role": "user", "content": "Rewrite this.\n\nclass X; end"},
                                      {"role": "assistant", "content": "class Y; end"}]
    assert {plain["source"], with_input["source"]} == {"alp"}
    assert (plain["id"], with_input["id"]) == ("alpaca:2", "alpaca:7")  # the line each item starts on
    alpaca.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3))  # all on line 1
    assert [s["id"] for s in data.load_samples(alpaca)] == ["alpaca:1", "alpaca:1.2", "alpaca:1.3"]


SG = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
AL = {"instruction": "q", "input": "", "output": "a"}
FORMAT_ERRORS = [
    # (first line, bad line 3, expected message after "<file>:<line>: ")
    (SG, {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     "field 'conversations[1].from': 'bot' is not one of system, human, user, gpt, assistant, chatgpt"),
    (SG, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "field 'conversations[1].value': missing"),
    (SG, {"conversations": [{"from": "human", "value": "q"}]}, "field 'conversations': no gpt turn"),
    (SG, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
     "field 'conversations[1].value': is empty"),
    (SG, AL, "this sample is Alpaca, but the file is ShareGPT (from its first sample); use one format per file"),
    (AL, {"instruction": "q", "input": 3, "output": "a"}, "field 'input': must be a string, got int"),
    (AL, {"instruction": "q", "output": ""}, "field 'output': is empty"),
    (AL, {"prompt": "q", "completion": "a"}, "this sample has none of the known formats' fields (keys: completion, prompt)"),
    (chat("q", "a"), {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "field 'messages[0].content[0]': only text parts"),
]


@pytest.mark.parametrize("first, bad, expected", FORMAT_ERRORS)
def test_format_errors_name_file_line_and_field(tmp_path, first, bad, expected):
    path = write_lines(tmp_path / "x.jsonl", [first, "", bad])
    with pytest.raises(DataError) as info:
        data.load_samples(path)
    assert str(info.value).startswith(f"{path}:3: {expected}"), str(info.value)
    assert info.value.line == 3


def test_unknown_format_and_bad_json_array_name_the_line(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ["", {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"x\.jsonl:2: not a known sample format \(keys: completion, prompt\); "
                                        r"expected `messages` \(OpenAI/ChatML\), `conversations`"):
        data.load_samples(path)
    array = tmp_path / "a.json"
    array.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q2", "output": ""}\n]\n')
    with pytest.raises(DataError, match=r"a\.json:3: field 'output': is empty"):
        data.load_samples(array)
    array.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q2" "output": "b"}\n]\n')
    with pytest.raises(DataError, match=r"a\.json:3: invalid JSON"):
        data.load_samples(array)


# ----------------------------------------------------------------------------- several files


def entry(path, **options):
    return {**data.file_entry(path), **options}


def test_several_entries_keep_ids_unique_and_pairs_apart(tmp_path):
    (tmp_path / "a").mkdir()  # two files of the same name: the same synthesised ids and pair ids
    a = write_lines(tmp_path / "a" / "set.jsonl", [rec("x", "s", "p", "contrastive"), rec("y", "s", "p", "contrastive")])
    b = write_lines(tmp_path / "set.jsonl", [dict(rec("x", "s", "p", "contrastive"), messages=msgs("other", "one")),
                                             dict(rec("y", "s", "p", "contrastive"), messages=msgs("and", "two"))])
    groups = data.load_entries([entry(a), entry(b)])
    ids = [s["id"] for g in groups for s in g]
    assert len(set(ids)) == 4 and ids[:2] == ["x", "y"]
    assert {s["pair"] for s in groups[1]} == {f"{b}:p"}  # not the same pair as a's
    assert len(data._units([s for g in groups for s in g])) == 2


def test_entry_cap_and_weight(tmp_path):
    big = write_lines(tmp_path / "big.jsonl", [rec(f"b{i}", "big") for i in range(40)])
    small = write_lines(tmp_path / "small.jsonl", [rec(f"s{i}", "small") for i in range(10)])
    out = {k: tmp_path / f"{k}.out" for k in ("train", "val", "summary")}

    def run(big_options, small_options):
        df = data.prepare([entry(big, **big_options), entry(small, **small_options)], out["train"], out["val"],
                          out["summary"], max_source_share=1, validation_fraction=0.2, seed=1)
        return Counter(s["id"] for s in read_jsonl(out["train"])), read_jsonl(out["val"]), df.set_index("source")

    train, val, df = run({"cap": 15}, {})
    assert sum(1 for i in list(train) + [s["id"] for s in val] if i.startswith("b")) == 15
    assert df.loc["big", "samples_before"] == 40 and df.loc["big", "samples_after"] == 15
    train, val, df = run({"weight": 0.25}, {"weight": 3})
    assert sum(1 for i in list(train) + [s["id"] for s in val] if i.startswith("b")) == 10
    small_val = {s["id"] for s in val if s["id"].startswith("s")}
    assert small_val, "a weighted entry still has validation samples"
    for sample_id, n in train.items():  # repeated in train only, never in validation
        assert n == (3 if sample_id.startswith("s") else 1)
        assert sample_id not in small_val


# ----------------------------------------------------------------------------- duplicates (issue 21.4)


def test_dedupe_keeps_the_first_and_prefers_pairs():
    single = rec("a", "s")
    same_text = dict(rec("b", "t"), messages=[{"role": "user", "content": "  question   a "},
                                              {"role": "assistant", "content": "answer a in a few\nwords"}])
    pair = [dict(rec("p1", "s", "p", "contrastive"), messages=single["messages"]), rec("p2", "s", "p", "contrastive")]
    kept, removed = data.dedupe([single, same_text, *pair, rec("c", "s")])
    assert [s["id"] for s in kept] == ["p1", "p2", "c"]  # the pair wins over the earlier single
    assert [s["id"] for s in removed] == ["a", "b"]  # whitespace does not make a sample new


def test_content_duplicates_never_reach_both_sides_and_are_counted(tmp_path):
    """Issue 21 case 4: appending content duplicates with new ids put 7 of 34 validation
    samples into train as well."""
    base = [rec(f"s{i}", f"src{i % 5}") for i in range(60)]
    copies = [dict(s, id=f"copy-{s['id']}") for s in base[:20]]
    path = write_lines(tmp_path / "dup.jsonl", base + copies)
    out = [tmp_path / n for n in ("t.jsonl", "v.jsonl", "s.tsv")]
    df = data.prepare(path, *out, max_source_share=1, validation_fraction=0.3, seed=3).set_index("source")
    train, val = read_jsonl(out[0]), read_jsonl(out[1])
    assert not {data.content_key(s) for s in train} & {data.content_key(s) for s in val}
    assert len(train) + len(val) == 60
    assert df.loc["TOTAL", "duplicates"] == 20 and df.loc["TOTAL", "samples_before"] == 80
    assert df.loc["src0", "duplicates"] == 4
    assert list(pd.read_csv(out[2], sep="\t").columns) == data.SUMMARY_COLUMNS


def test_held_out_prompt_repeated_in_another_sample_is_dropped_from_train(tmp_path):
    """Issue 21: prepare() no longer calling drop_leaked_prompts survived every test, as the
    shipped data never repeats a held-out prompt. Here one does: another sample asks a
    contrastive pair's question, with another answer (so it is no duplicate)."""
    pairs = []
    for p in range(3):
        pairs += [dict(rec(f"cp{p}-wrong", "c", f"cp{p}", "contrastive"), messages=msgs(f"wrong way {p}?", f"fix {p}")),
                  dict(rec(f"cp{p}-right", "c", f"cp{p}", "contrastive"), messages=msgs(f"right way {p}?", f"do {p}"))]
    repeats = [dict(rec(f"r{p}", "c"), messages=msgs(f"wrong way {p}?", f"another answer {p}")) for p in range(3)]
    path = write_lines(tmp_path / "leak.jsonl", pairs + repeats + [rec(f"o{i}", "c") for i in range(10)])
    out = [tmp_path / n for n in ("t.jsonl", "v.jsonl", "s.tsv")]
    data.prepare(path, *out, max_source_share=1, validation_fraction=0.1, seed=0, validation_pairs=3)
    train, val = read_jsonl(out[0]), read_jsonl(out[1])
    held_out = {m["content"] for s in val if s.get("kind") == "contrastive" for m in s["messages"] if m["role"] == "user"}
    assert len(held_out) == 6
    leaked = [s["id"] for s in train if {m["content"] for m in s["messages"] if m["role"] == "user"} & held_out]
    assert leaked == [], f"train repeats held-out prompts: {leaked}"
    assert {f"o{i}" for i in range(10)} <= {s["id"] for s in train + val}


# ----------------------------------------------------------------------------- truncation (issue 21.10)


def test_samples_longer_than_max_seq_length_are_counted_and_warned_about(tmp_path, caplog):
    long = dict(rec("long", "b"), messages=msgs("q " * 10, "word " * 300))
    longer = dict(rec("longer", "a"), messages=msgs("q", "word " * 900))
    path = write_lines(tmp_path / "x.jsonl", [rec(f"s{i}", "a") for i in range(8)] + [long, longer])
    out = [tmp_path / n for n in ("t.jsonl", "v.jsonl", "s.tsv")]
    with caplog.at_level("WARNING", logger="loraforge.data"):
        df = data.prepare(path, *out, max_source_share=1, validation_fraction=0, max_seq_length=256)
    df = df.set_index("source")
    assert df.loc["TOTAL", "truncated"] == 2 and df.loc["a", "truncated"] == 1 and df.loc["b", "truncated"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["prepare: 2 of 10 samples are longer than max_seq_length (256 tokens) and are cut in training; "
                        "the longest, longer, has 901 tokens (raise train.max_seq_length or shorten them)"]
    # the rendered length (count_length) decides, not the contents' tokens alone
    df = data.prepare(path, *out, max_source_share=1, validation_fraction=0, max_seq_length=256,
                      count_length=lambda s: 1000 if s["id"] == "s0" else 1)
    assert df.set_index("source").loc["TOTAL", "truncated"] == 1
    assert data.truncation_warning(data.prepare(path, *out, max_source_share=1, validation_fraction=0)) is None


def test_chat_length_counts_the_rendered_template(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from loraforge.constants import CHATML_JINJA_TEMPLATE
    from loraforge.tokenizer import chat_length_counter

    words = ["<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "there", "\n", "[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_(?:start|end)\|>|\n| "), "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    sample = {"messages": msgs("hi", "there")}
    assert chat_length_counter(tokenizer)(sample) == 2  # no template: the contents
    tokenizer.chat_template = CHATML_JINJA_TEMPLATE
    rendered = tokenizer.apply_chat_template(sample["messages"], tokenize=False)
    assert chat_length_counter(tokenizer)(sample) == len(tokenizer.encode(rendered, add_special_tokens=False)) > 2


# ----------------------------------------------------------------------------- hub datasets


DATASET = "fake-org/rails-sharegpt"


def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _sharegpt_rows(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}-{i}", "conversations": [{"from": "human", "value": f"{tag} question {i}?"},
                                                   {"from": "gpt", "value": f"{tag} answer {i}, " + "in words " * 40}]}
            for i in range(n)]


@pytest.fixture
def dataset_repo(hub_env):
    """A ShareGPT dataset on the fake hub, in the hub's layout (parquet per split), at two
    revisions: `old` (pinned by the tests) and main."""
    files = {"data/train-00000-of-00001.parquet": _parquet(_sharegpt_rows(12, "old")),
             "data/test-00000-of-00001.parquet": _parquet(_sharegpt_rows(2, "test")), "README.md": b"# rails\n"}
    old = hub_env.push_dataset(DATASET, files)
    main = hub_env.push_dataset(DATASET, {**files, "data/train-00000-of-00001.parquet": _parquet(_sharegpt_rows(12, "new"))})
    return {"hub": hub_env, "old": old, "main": main}


def test_fetch_dataset_pins_the_revision_and_never_leaves_half_a_dataset(dataset_repo, tmp_path):
    from loraforge.hub.datasets import fetch_dataset
    from loraforge.hub.errors import HubError

    out = tmp_path / "datasets"
    rows, record = out / "ds.jsonl", out / "ds.json"
    hub = dataset_repo["hub"]
    hub.faults["drop_download"]["data/train-00000-of-00001.parquet"] = 1000  # cut off for good
    with pytest.raises(HubError, match=f"{DATASET}@{dataset_repo['old']}: downloading the dataset failed"):
        fetch_dataset(DATASET, "train", rows, record, revision=dataset_repo["old"])
    assert not rows.exists() and not record.exists()
    hub.faults["drop_download"].clear()
    assert fetch_dataset(DATASET, "train", rows, record, revision=dataset_repo["old"]) == 12
    got = read_jsonl(rows)
    assert [r["id"] for r in got] == [f"old-{i}" for i in range(12)]
    assert got[0]["conversations"][0] == {"from": "human", "value": "old question 0?"}
    assert json.loads(record.read_text())["commit"] == dataset_repo["old"]
    assert sorted(p.name for p in out.iterdir()) == ["ds.json", "ds.jsonl"]  # no partial left

    assert fetch_dataset(DATASET, "test", rows, record) == 2  # no pin: main, another split
    with pytest.raises(HubError, match=r"Bad split: valid.*Available splits: \['train', 'test'\]; set split:"):
        fetch_dataset(DATASET, "valid", out / "v.jsonl", out / "v.json")
    with pytest.raises(HubError, match="fake-org/nothing: no such dataset repo"):
        fetch_dataset("fake-org/nothing", "train", out / "n.jsonl", out / "n.json")
    assert sorted(p.name for p in out.iterdir()) == ["ds.json", "ds.jsonl"]


def _dry_run_rules(work: Path, target: str) -> set[str]:
    import re

    out = run_snakemake(work, "-n", target).stdout
    return set(re.findall(r"^(?:local)?rule (\w+):", out, re.M))


def test_data_rules_read_two_local_formats_and_a_hub_dataset(dataset_repo, tmp_path):
    """A real Snakemake run: a model's own data (models.X.data) from a ChatML file without
    sources, an Alpaca JSON array (weight 2) and a hub dataset (pinned, cap 8), with one
    duplicate across files and answers longer than max_seq_length; then what reruns when a
    local file or the pinned revision changes."""
    work = tmp_path / "work"
    work.mkdir()
    chats = write_lines(work / "my_chats.jsonl", [chat(f"chat question {i}?", f"chat answer {i}.") for i in range(20)])
    alpaca = work / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"alpaca task {i}", "input": "", "output": f"alpaca answer {i}."}
                                  for i in range(9)] + [{"instruction": "chat question 3?", "output": "chat answer 3."}]))
    hub_entry = {"hub": DATASET, "revision": dataset_repo["old"], "cap": 8}
    own = {"samples": [str(chats), {"path": str(alpaca), "weight": 2}, hub_entry], "max_source_share": 1,
           "validation_pairs": 0, "validation_fraction": 0.2}
    cfg = small_config(targets=["mine"], models={"mine": {
        "base": {"path": str(tokenizer_folder(work / "base"))}, "data": own, "train": {"max_seq_length": 48}}})
    write_config(work, cfg)
    target = "results/mine/data/train.jsonl"
    run = run_snakemake(work, target)

    slug = f"fake-org--rails-sharegpt--train@{dataset_repo['old']}"
    assert json.loads((work / f"results/datasets/{slug}.json").read_text())["commit"] == dataset_repo["old"]
    summary = pd.read_csv(work / "results/mine/data/summary.tsv", sep="\t").set_index("source")
    assert dict(summary.samples_before.drop("TOTAL")) == {"my_chats": 20, "rails-sharegpt": 12, "alpaca": 10}
    assert summary.loc["alpaca", "duplicates"] == 1 and summary.loc["TOTAL", "duplicates"] == 1
    train, val = read_jsonl(work / target), read_jsonl(work / "results/mine/data/validation.jsonl")
    assert sum(1 for s in train + val if s["source"] == "rails-sharegpt") == 8  # cap 8
    alpaca_train = Counter(s["id"] for s in train if s["source"] == "alpaca")
    assert alpaca_train and set(alpaca_train.values()) == {2}  # weight 2, in train only
    truncated = summary.loc["TOTAL", "truncated"]
    assert truncated >= 8  # the hub answers are long; the tokenizer's own count decides
    warning = [ln for ln in run.stderr.splitlines() if ln.startswith("[lora-forge] warning in rule prepare_data")]
    assert len(warning) == 1 and f"{truncated} of {len(train) + len(val)} samples" in warning[0]

    assert _dry_run_rules(work, target) == set()  # cached: nothing to fetch or prepare again
    with open(chats, "a") as f:
        f.write(json.dumps(chat("a new question?", "A new answer.")) + "\n")
    assert _dry_run_rules(work, target) == {"prepare_data"}  # a changed file: its data, not the hub's
    cfg["models"]["mine"]["data"]["samples"][2] = {**hub_entry, "revision": dataset_repo["main"]}
    write_config(work, cfg)
    assert _dry_run_rules(work, target) == {"fetch_dataset", "prepare_data"}


# ----------------------------------------------------------------------------- config


def test_data_settings_per_model_and_the_paths_checked(tmp_path):
    import copy

    import yaml

    from loraforge import config as lfconfig
    from loraforge import data_sources

    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg = lfconfig.validate(copy.deepcopy(shipped))
    assert cfg["data"]["samples"] == "data/rails_chat.jsonl"  # a single string still works, kept as written
    assert [e["file"] for e in data_sources.entries(cfg, "tiny")] == ["data/rails_chat.jsonl"]

    mine = write_lines(tmp_path / "mine.jsonl", [chat("q", "a")])
    own = copy.deepcopy(shipped)
    own["models"]["tiny"]["data"] = {"samples": [str(mine), {"path": str(tmp_path / "gone.json")},
                                                 {"hub": "org/set", "split": "test"}], "max_source_share": 1}
    cfg = lfconfig.validate(own)
    tiny = lfconfig.model_settings(cfg, "tiny")["data"]
    assert tiny["max_source_share"] == 1 and tiny["contrastive_weight"] == 2  # the rest from data:
    assert lfconfig.model_settings(cfg, "tiny-moe")["data"]["samples"] == "data/rails_chat.jsonl"
    assert data_sources.data_files(cfg, "tiny")[2] == "results/datasets/org--set--test@main.jsonl"
    assert list(data_sources.hub_datasets(cfg)) == ["org--set--test@main"]
    with pytest.raises(lfconfig.ConfigError, match=r"models\.tiny\.data\.samples\[1\]: .*gone\.json does not exist"):
        lfconfig.check_paths(cfg, REPO)

    taken = copy.deepcopy(shipped)
    taken["models"]["datasets"] = {"base": {"build": "qwen3"}}
    with pytest.raises(lfconfig.ConfigError, match="models.datasets: the key `datasets` is taken by results/datasets/"):
        lfconfig.validate(taken)
