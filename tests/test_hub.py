"""The Hugging Face Hub side against a local fake of the hub's HTTP API (tests/fake_hub.py, a
real HTTP server in a thread): fetch_base (pinned revision, missing and gated repos, an
interrupted download) and upload_hub (model cards, sha256 verification, a failed commit, an
upload cut off mid-LFS, the local delete, the token kept out of every file).

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it is imported:
the `hub_env` fixture sets the environment (for Snakemake's subprocesses) and the module
constants (for this process). hf_xet is installed, and with it huggingface_hub 1.33 uploads
through Xet without asking the server (`_commit_api._upload_files`): HF_HUB_DISABLE_XET=1
makes it use the plain LFS batch + PUT path that the fake implements."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import clone_pipeline, run_snakemake, small_config, write_config
from fake_hub import FakeHub

TOKEN = "hf_fakeTokenThatMustNeverReachDisk0123456789"
BASE_REPO = "fake-org/tiny-qwen3"
GATED_REPO = "fake-org/gated-qwen3"


@pytest.fixture
def fake_hub():
    hub = FakeHub(tokens={TOKEN: "tester"}).start()
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(fake_hub, monkeypatch, tmp_path):
    """Point huggingface_hub (this process and child processes) at the fake hub."""
    import huggingface_hub.constants as c

    env = {"HF_ENDPOINT": fake_hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(c, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    return fake_hub


def _push_two_revisions(hub: FakeHub, base: Path) -> dict:
    """`base` on the fake hub in two revisions: `old` (pinned by tests) and main, whose
    config.json and revision.txt differ; plus a file the pipeline does not want."""
    old = hub.push_folder(BASE_REPO, base, extra={"revision.txt": b"old\n", "pytorch_model.bin": b"not wanted"})
    cfg = json.loads((base / "config.json").read_text())
    newer = hub.push_folder(BASE_REPO, base, extra={"revision.txt": b"new\n",
                                                     "config.json": json.dumps({**cfg, "_rev": "new"}).encode()})
    return {"old": old, "main": newer, "folder": base, "hub": hub}


@pytest.fixture(scope="module")
def small_model_folder(tmp_path_factory) -> Path:
    """A model folder in the hub's layout, made in milliseconds (for the fast tests): config,
    two safetensors shards of 1 MB with their index, a tokenizer config."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("small-model")
    rng = np.random.default_rng(0)
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        tensor = f"model.layers.{i}.mlp.up_proj.weight"
        save_file({tensor: rng.standard_normal((512, 512)).astype(np.float32)}, str(folder / name))
        index["weight_map"][tensor] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 512}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return folder


@pytest.fixture
def base_repo(hub_env, small_model_folder):
    return _push_two_revisions(hub_env, small_model_folder)


@pytest.fixture
def tiny_base_repo(hub_env, tiny_bases):
    """The real tiny Qwen3 base (session fixture) on the fake hub, for full workflow runs."""
    return _push_two_revisions(hub_env, tiny_bases["qwen3"])


def _same_files(a: Path, b: Path, pattern="*.safetensors"):
    files = sorted(p.name for p in a.glob(pattern))
    assert files and files == sorted(p.name for p in b.glob(pattern))
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# -- fetch_base ------------------------------------------------------------------------------


def test_fetch_honours_pinned_revision(base_repo, tmp_path):
    from loraforge.hub.download import fetch_base

    out = fetch_base(BASE_REPO, tmp_path / "base", revision=base_repo["old"])
    assert (out / "revision.txt").read_text() == "old\n"
    assert json.loads((out / "config.json").read_text()) == json.loads((base_repo["folder"] / "config.json").read_text())
    _same_files(out, base_repo["folder"])
    assert not (out / "pytorch_model.bin").exists()  # only what the pipeline reads
    assert not (out / ".cache").exists() and not (tmp_path / "base.partial").exists()

    latest = fetch_base(BASE_REPO, tmp_path / "latest")  # no pin: main
    assert (latest / "revision.txt").read_text() == "new\n"
    assert json.loads((latest / "config.json").read_text())["_rev"] == "new"


def test_fetch_missing_repo_or_revision_fails_naming_it(base_repo, tmp_path):
    from loraforge.hub.download import fetch_base
    from loraforge.hub.errors import HubError

    with pytest.raises(HubError) as e:
        fetch_base("fake-org/no-such-model", tmp_path / "base")
    assert "fake-org/no-such-model: no such model repo" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HubError, match=r"revision 'v9' not found"):
        fetch_base(BASE_REPO, tmp_path / "base", revision="v9")
    assert not (tmp_path / "base").exists()


def test_fetch_retries_a_download_cut_once_within_the_call(base_repo, tmp_path):
    """huggingface_hub resumes a cut download with a Range request from the bytes it has
    written, which it writes in 10 MB chunks (DOWNLOAD_CHUNK_SIZE): a tiny shard starts over."""
    from loraforge.hub.download import fetch_base

    shard = sorted(p.name for p in base_repo["folder"].glob("*.safetensors"))[0]
    hub = base_repo["hub"]
    hub.faults["drop_download"][shard] = 1
    out = fetch_base(BASE_REPO, tmp_path / "base", revision=base_repo["old"])
    _same_files(out, base_repo["folder"])
    gets = [r for r in hub.requests if r["method"] == "GET" and r["path"].endswith("/" + shard)]
    assert [g["status"] for g in gets] == ["dropped", 200]


def test_interrupted_download_is_never_taken_as_complete(base_repo, tmp_path):
    """A download cut off for good fails and leaves only base.partial; a rerun while the hub is
    down fails too (plain snapshot_download would return the partial folder: shown below); a
    rerun once the hub is back fetches the missing file and renames the folder."""
    from huggingface_hub import snapshot_download

    from loraforge.hub.download import fetch_base
    from loraforge.hub.errors import HubError

    hub = base_repo["hub"]
    shard = sorted(p.name for p in base_repo["folder"].glob("*.safetensors"))[-1]
    hub.faults["drop_download"][shard] = 50
    out, partial = tmp_path / "base", tmp_path / "base.partial"
    with pytest.raises(HubError, match="connection broke"):
        fetch_base(BASE_REPO, out, revision=base_repo["old"])
    assert not out.exists() and partial.is_dir() and not (partial / shard).exists()
    kept = {p.name for p in partial.glob("*.safetensors")}
    assert kept  # the other shards are kept for the rerun

    hub.faults["down"] = True
    # what fetch_base guards against: huggingface_hub returns the incomplete folder as it is
    assert Path(snapshot_download(BASE_REPO, local_dir=partial, endpoint=hub.url)) == partial.resolve()
    assert not (partial / shard).exists()
    with pytest.raises(HubError, match="HTTP 503"):
        fetch_base(BASE_REPO, out, revision=base_repo["old"])
    assert not out.exists()

    hub.faults["down"] = False
    hub.faults["drop_download"].clear()
    hub.requests.clear()
    fetch_base(BASE_REPO, out, revision=base_repo["old"])
    _same_files(out, base_repo["folder"])
    fetched = {r["path"].rsplit("/", 1)[-1] for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]}
    assert shard in fetched and not (kept - {shard}) & fetched  # finished shards were not fetched again


def test_fetch_replaces_a_file_that_does_not_match_the_listing(base_repo, tmp_path):
    from loraforge.hub.download import check_files, fetch_base, wanted_files
    from loraforge.hub.errors import HubError

    out = fetch_base(BASE_REPO, tmp_path / "base", revision=base_repo["old"])
    shard = next(out.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    from huggingface_hub import HfApi

    expected = wanted_files(HfApi(), BASE_REPO, base_repo["old"], ["*.safetensors"])
    with pytest.raises(HubError, match="sha256 differs"):
        check_files(out, expected, label=BASE_REPO)
    assert not shard.exists()  # removed, so a rerun downloads it again


# -- the real workflow's fetch_base rule --------------------------------------------------------


@pytest.mark.slow
def test_fetch_base_rule_against_the_fake_hub(tiny_base_repo, tmp_path):
    """snakemake's fetch_base: a download cut off for good fails (after the rule's retries) and
    leaves no base folder; the rerun fetches the pinned revision; a gated repo without a token
    fails with one line naming it and leaves no base folder."""
    base_repo = tiny_base_repo
    hub = base_repo["hub"]
    hub.push_folder(GATED_REPO, base_repo["folder"])
    hub.repos[GATED_REPO].gated = True
    cfg = small_config(targets=["hubtiny"], models={
        "hubtiny": {"base": {"hub": BASE_REPO, "revision": base_repo["old"]},
                    "lora": {"r": 8, "alpha": 16}, "train": {"max_steps": 3, "max_seq_length": 256}},
        "hubgated": {"base": {"hub": GATED_REPO}},
    })
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, cfg)
    shard = sorted(p.name for p in base_repo["folder"].glob("*.safetensors"))[-1]
    hub.faults["drop_download"][shard] = 1000  # cut off for good: every attempt (and retry) fails
    failed = run_snakemake(work, "results/hubtiny/base", check=False)
    assert failed.returncode != 0 and "[lora-forge] error in rule fetch_base" in failed.stderr + failed.stdout
    assert not (work / "results/hubtiny/base").exists() and not (work / "results/hubtiny/base.complete").exists()
    assert (work / "results/hubtiny/base.partial").is_dir()

    hub.faults["drop_download"].clear()
    run_snakemake(work, "results/hubtiny/base")
    got = work / "results" / "hubtiny" / "base"
    assert (got / "revision.txt").read_text() == "old\n" and (work / "results/hubtiny/base.complete").exists()
    _same_files(got, base_repo["folder"])
    assert f"commit {base_repo['old']}" in (work / "logs/hubtiny/fetch_base.log").read_text()

    run = run_snakemake(work, "results/hubgated/base", check=False)
    assert run.returncode != 0
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("[lora-forge] error in rule fetch_base")]
    assert lines and GATED_REPO in lines[0] and "gated repo" in lines[0] and "HF_TOKEN" in lines[0]
    assert not (work / "results/hubgated/base").exists()
    assert not (work / "results/hubgated/base.complete").exists()


@pytest.mark.slow
def test_hub_model_from_fetch_to_upload(tiny_base_repo, tmp_path, monkeypatch):
    """The whole path for a `hub:` model against the fake: fetch_base at a pinned revision,
    data, training, merge, GGUF, memory table, then upload_hub; the cards name the hub base."""
    base_repo = tiny_base_repo
    hub = base_repo["hub"]
    cfg = small_config(
        targets=["hubtiny"],
        export={"quants": ["Q4_K_M"], "modelfile_quant": "Q4_K_M"},
        models={"hubtiny": {"base": {"hub": BASE_REPO, "revision": base_repo["old"]}, "lora": {"r": 8, "alpha": 16},
                            "train": {"max_steps": 2, "max_seq_length": 256, "gradient_accumulation_steps": 1,
                                      "per_device_batch_size": 2, "learning_rate": 1.0e-3, "load_in_4bit": False},
                            "ollama": {"name": "rails-coder-hubtiny"}}},
    )
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, cfg)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = run_snakemake(work, "results/hubtiny/hub-upload.json")
    record = json.loads((work / "results/hubtiny/hub-upload.json").read_text())
    gguf_repo = record["repos"]["gguf"]["repo_id"]
    assert gguf_repo == "tester/rails-coder-hubtiny-GGUF"
    assert hub.files(gguf_repo)["Q4_K_M.gguf"] == (work / "results/hubtiny/Q4_K_M.gguf").read_bytes()
    meta = _front_matter(hub.files(gguf_repo)["README.md"])
    assert meta["base_model"] == BASE_REPO and meta["base_model_relation"] == "quantized" and "gguf" in meta["tags"]
    adapter_meta = _front_matter(hub.files("tester/rails-coder-hubtiny-LoRA")["README.md"])
    assert adapter_meta["base_model"] == BASE_REPO and adapter_meta["base_model_relation"] == "adapter"
    assert adapter_meta["library_name"] == "peft"
    assert (work / "results/hubtiny/base/revision.txt").read_text() == "old\n"
    _assert_no_token(work, run.stdout, run.stderr)


# -- upload_hub ------------------------------------------------------------------------------


def _upload_config(**hub) -> dict:
    return small_config(hub={"private": True, **hub})


def _front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _assert_no_token(work: Path, *texts: str):
    for text in texts:
        assert TOKEN not in text
    for p in work.rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000:
            assert TOKEN.encode() not in p.read_bytes(), p


@pytest.mark.slow
def test_upload_rule_publishes_verified_cards_and_keeps_the_token_out(pipeline, hub_env, tmp_path, monkeypatch):
    work = clone_pipeline(pipeline, tmp_path / "work")
    write_config(work, _upload_config())
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_env.faults["fail_commit"] = 1  # the first commit (the adapter's) fails with HTTP 500
    run = run_snakemake(work, "results/tiny/hub-upload.json", check=False)
    assert run.returncode != 0
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("[lora-forge] error in rule upload_hub")]
    assert lines and "HTTP 500" in lines[0] and "tester/rails-coder-tiny-LoRA" in lines[0]
    assert not (work / "results/tiny/hub-upload.json").exists()
    assert (work / "results/tiny/Q4_K_M.gguf").exists() and (work / "results/tiny/Q5_K_M.gguf").exists()

    rerun = run_snakemake(work, "results/tiny/hub-upload.json")
    record = json.loads((work / "results/tiny/hub-upload.json").read_text())
    gguf_repo, adapter_repo = "tester/rails-coder-tiny-GGUF", "tester/rails-coder-tiny-LoRA"
    assert record["repos"]["gguf"]["repo_id"] == gguf_repo and hub_env.repos[gguf_repo].private
    remote = hub_env.files(gguf_repo)
    for q in ("Q4_K_M", "Q5_K_M"):
        local = (work / f"results/tiny/{q}.gguf").read_bytes()
        assert remote[f"{q}.gguf"] == local
        row = next(r for r in record["repos"]["gguf"]["files"] if r["path"] == f"{q}.gguf")
        assert row["verified"] and row["sha256"] == row["remote_sha256"] == hashlib.sha256(local).hexdigest()
    card = remote["README.md"].decode()
    meta = _front_matter(remote["README.md"])
    assert "gguf" in meta["tags"] and meta["license"] == "apache-2.0"
    assert "base_model" not in meta  # tiny is built locally: no hub base to name
    assert "| Q4_K_M | `Q4_K_M.gguf` |" in card and "RAM min (num_ctx 32768)" in card
    adapter = hub_env.files(adapter_repo)
    assert adapter["adapter_model.safetensors"] == (work / "results/tiny/adapter/adapter_model.safetensors").read_bytes()
    assert _front_matter(adapter["README.md"])["library_name"] == "peft"
    assert ".snakemake_timestamp" not in adapter
    _assert_no_token(work, run.stdout, run.stderr, rerun.stdout, rerun.stderr)


@pytest.mark.slow
def test_upload_then_delete_local_after_verified_sha256(pipeline, hub_env, tmp_path, monkeypatch):
    """delete_local_after_upload: the GGUFs go once the hub's sha256 matches; the record keeps
    what is needed to get them back; a later run would rebuild them from the adapter (no training)."""
    work = clone_pipeline(pipeline, tmp_path / "work")
    write_config(work, _upload_config(delete_local_after_upload=True, quants=["Q4_K_M"], adapter_repo=None,
                                      user="fake-org"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    q4 = work / "results/tiny/Q4_K_M.gguf"
    sha = hashlib.sha256(q4.read_bytes()).hexdigest()
    run_snakemake(work, "results/tiny/hub-upload.json")
    record = json.loads((work / "results/tiny/hub-upload.json").read_text())
    assert not q4.exists() and (work / "results/tiny/Q5_K_M.gguf").exists()  # only the uploaded quant
    (row,) = record["repos"]["gguf"]["files"]
    assert row["local_deleted"] and row["sha256"] == sha == row["remote_sha256"]
    assert row["url"].endswith(f"/fake-org/rails-coder-tiny-GGUF/resolve/{record['repos']['gguf']['commit']}/Q4_K_M.gguf")
    assert "adapter" not in record["repos"] and "fake-org/rails-coder-tiny-LoRA" not in hub_env.repos

    # the record stands for the upload: a deleted input that a rule can make is treated like
    # a removed temp file, so asking for the record again does nothing ...
    assert "Nothing to be done" in run_snakemake(work, "-n", "results/tiny/hub-upload.json").stdout
    # ... while a bare run (rule all wants the GGUFs) rebuilds them from the adapter, no training
    dry = run_snakemake(work, "-n").stdout
    assert "rule quantize_gguf:" in dry and "Missing output files: results/tiny/Q4_K_M.gguf" in dry
    assert "rule train_adapter:" not in dry and "rule upload_hub:" not in dry


def _small_model(folder: Path, *, delete: bool) -> dict:
    """upload_model's arguments for a small model folder: one 128 kB GGUF, no adapter repo."""
    (folder / "adapter").mkdir(parents=True)
    gguf = folder / "Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + hashlib.sha256(b"x").digest() * 4096)  # an LFS file for the hub
    memory = folder / "memory.tsv"
    memory.write_text("model_file\tquant\tnum_ctx\tfile_bytes\tmin_ram_gib\trecommended_ram_gib\n"
                      f"Q4_K_M.gguf\tQ4_K_M\t4096\t{gguf.stat().st_size}\t1\t4\n")
    settings = {"user": None, "gguf_repo": "{user}/{name}-GGUF", "adapter_repo": None, "private": False,
                "quants": ["Q4_K_M"], "license": "mit", "delete_local_after_upload": delete, "name": "m-model", "model": "m"}
    return dict(model="m", settings=settings, ggufs={"Q4_K_M": gguf}, adapter_dir=folder / "adapter", memory_tsv=memory,
                quality_tsv=None, base_model="Qwen/Qwen3-8B", lora={}, modelfile_quant="Q4_K_M",
                record_path=folder / "hub-upload.json", token=TOKEN)


@pytest.mark.slow
def test_interrupted_lfs_upload_keeps_files_and_writes_no_record(hub_env, tmp_path):
    """The fake drops every LFS PUT halfway: huggingface_hub retries 5 times (1+2+4+8+8 s of
    back-off), then fails; nothing is deleted and no record is written; the rerun succeeds
    and the verified file is then deleted."""
    from loraforge.hub.errors import HubError
    from loraforge.hub.upload import upload_model

    kwargs = _small_model(tmp_path / "results" / "m", delete=True)
    gguf, record_path = kwargs["ggufs"]["Q4_K_M"], kwargs["record_path"]
    hub_env.faults["drop_lfs_put"] = 100
    with pytest.raises(HubError, match="tester/m-model-GGUF: uploading failed"):
        upload_model(**kwargs)
    assert gguf.exists() and not record_path.exists()
    assert sum(r["status"] == "dropped" for r in hub_env.requests) == 6  # first try + 5 retries

    hub_env.faults["drop_lfs_put"] = 1  # one more drop: retried by huggingface_hub, then fine
    data = gguf.read_bytes()
    record = upload_model(**kwargs)
    assert hub_env.files("tester/m-model-GGUF")["Q4_K_M.gguf"] == data and not gguf.exists()
    meta = _front_matter(hub_env.files("tester/m-model-GGUF")["README.md"])
    assert meta["base_model"] == "Qwen/Qwen3-8B" and meta["base_model_relation"] == "quantized"
    assert record["repos"]["gguf"]["files"][0]["verified"] and json.loads(record_path.read_text()) == record


def test_no_delete_when_the_hubs_sha256_differs(hub_env, tmp_path):
    from loraforge.hub.upload import UploadVerificationError, upload_model

    kwargs = _small_model(tmp_path / "results" / "m", delete=True)
    hub_env.faults["wrong_listing_sha256"] = True
    with pytest.raises(UploadVerificationError, match="Q4_K_M.gguf .*nothing was deleted"):
        upload_model(**kwargs)
    assert kwargs["ggufs"]["Q4_K_M"].exists() and not kwargs["record_path"].exists()


def test_upload_without_token_fails_before_any_request(hub_env, tmp_path):
    from loraforge.hub.errors import HubError, token_from_env

    with pytest.raises(HubError, match="HF_TOKEN is not set"):
        token_from_env(required=True)
    assert hub_env.requests == []


def test_hub_settings_are_checked_by_field():
    from loraforge.config import ConfigError, validate
    from loraforge.hub.settings import hub_settings

    cfg = validate(small_config(models={"tiny": {"hub": {"quants": ["Q6_K"]}}}))
    with pytest.raises(ConfigError, match=r"models\.tiny\.hub\.quants\[0\]: Q6_K is not built"):
        hub_settings(cfg, "tiny")
    cfg = validate(small_config(hub={"gguf_repo": "{owner}/x"}))
    with pytest.raises(ConfigError, match=r"hub\.gguf_repo: unknown placeholder \{owner\}"):
        hub_settings(cfg, "tiny")
    with pytest.raises(ConfigError, match=r"hub.delete_local_after_upload"):
        validate(small_config(hub={"delete_local_after_upload": "yes"}))
    s = hub_settings(validate(small_config(models={"tiny-moe": {"hub": {"private": False}}})), "tiny-moe")
    assert s["private"] is False and s["quants"] == ["Q4_K_M", "Q5_K_M"] and s["name"] == "rails-coder-tiny-moe"
