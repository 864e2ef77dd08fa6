"""loraforge.fileio: atomic outputs (nothing half-written carries the final name) and the one
reader of a model's config.json."""

import json
import os

import pytest

from loraforge import fileio
from loraforge.fileio import atomic_output, read_hf_config, write_json_atomic, write_text_atomic


def test_write_text_atomic_replaces_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "out.jsonl"
    write_text_atomic(target, "old\n", fsync=True)
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.jsonl"]
    write_json_atomic(tmp_path / "r.json", {"a": 1, "p": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1, "p": str(tmp_path)}


def test_failed_rename_keeps_the_old_file_and_removes_the_partial(tmp_path, monkeypatch):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_atomic_output_folder(tmp_path):
    out = tmp_path / "model"
    (tmp_path / "model.partial").mkdir()  # left by a killed run: discarded
    (tmp_path / "model.partial" / "stale").write_text("x")
    with atomic_output(out) as partial:
        assert partial == tmp_path / "model.partial" and not partial.exists()
        partial.mkdir()
        (partial / "a").write_text("1")
        assert not out.exists()  # nothing carries the final name before the end
    assert sorted(os.listdir(out)) == ["a"] and not (tmp_path / "model.partial").exists()
    # a second build replaces the folder; an error inside leaves the old one and no partial
    with atomic_output(out) as partial:
        partial.mkdir()
        (partial / "b").write_text("2")
    assert sorted(os.listdir(out)) == ["b"]
    with pytest.raises(RuntimeError):
        with atomic_output(out) as partial:
            partial.mkdir()
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(out)) == ["b"] and not (tmp_path / "model.partial").exists()


def test_read_hf_config(tmp_path):
    assert read_hf_config(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_hf_config(tmp_path, required=True)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    assert read_hf_config(tmp_path) == {"model_type": "qwen3"}
    assert read_hf_config(tmp_path / "config.json") == {"model_type": "qwen3"}
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: a config.json must hold a JSON object"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        read_hf_config(tmp_path)
