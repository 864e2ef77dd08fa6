"""Shared, session-scoped fixtures: expensive things (tiny base models, a real Snakemake run
of the whole chain) are built once per test session and reused read-only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus"

# Keep torch from fighting pytest and the other processes for the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3 and Qwen3-MoE base folders (bf16, several shards, SentencePiece tokenizer),
    briefly pre-trained. Keys: 'qwen3', 'qwen3_moe'. Treat them as read-only."""
    from loraforge.base import build_tiny_base

    root = tmp_path_factory.mktemp("bases")
    out = {}
    for arch in ("qwen3", "qwen3_moe"):
        out[arch] = root / arch
        build_tiny_base(out[arch], arch, [CORPUS], vocab_size=1024, pretrain_steps=20, seq_len=64)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """The tiny bases' tokenizer alone (loraforge.base.train_tokenizer: SentencePiece BPE on the
    corpus, ChatML template, the chat and FIM special tokens), without a model: seconds, for
    fast tests of templates and masks. Read-only."""
    from loraforge.base import read_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(read_corpus([CORPUS]), out, vocab_size=1024)
    return out


def copy_base(src: Path, dst: Path) -> Path:
    """A private, writable copy of a base folder (for tests that consume or modify it)."""
    shutil.copytree(src, dst)
    return dst


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    """A real Snakemake invocation of this repository's workflow in `workdir` (which holds
    the config.yaml to use), with the repository's workflow profile."""
    import sys

    exe = Path(sys.executable).parent / "snakemake"
    return [
        str(exe),
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--workflow-profile", str(REPO / "profiles" / "default"),
        "--cores", "2",
        *args,
    ]


def small_config(**overrides) -> dict:
    """The shipped config made small for tests: both tiny models, few steps, absolute data paths."""
    import copy

    import yaml

    from loraforge.config import deep_merge

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg = deep_merge(
        cfg,
        {
            "targets": ["tiny", "tiny-moe"],
            "tiny_base": {"corpus": [str(CORPUS)], "pretrain_steps": 30, "vocab_size": 1024},
            "data": {"samples": str(REPO / "data" / "rails_chat.jsonl")},
            "models": {
                key: {"train": {"max_steps": 3, "max_seq_length": 256, "gradient_accumulation_steps": 1}}
                for key in ("tiny", "tiny-moe")
            },
        },
    )
    return deep_merge(cfg, copy.deepcopy(overrides))


def write_config(workdir: Path, cfg: dict) -> None:
    import yaml

    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def run_snakemake(workdir: Path, *args: str, check: bool = True):
    import subprocess

    run = subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True)
    if check and run.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}")
    return run


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """One real Snakemake run of the whole chain for tiny and tiny-moe, in a temp dir.
    Read-only for tests: copy it (`clone_pipeline`) before changing anything."""
    workdir = tmp_path_factory.mktemp("pipeline")
    write_config(workdir, small_config())
    run_snakemake(workdir)
    return workdir


def clone_pipeline(src: Path, dst: Path) -> Path:
    """A private copy of a finished pipeline dir (results, logs and Snakemake's metadata),
    timestamps preserved so Snakemake sees the same state."""
    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
    return dst
