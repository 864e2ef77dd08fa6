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


def copy_base(src: Path, dst: Path) -> Path:
    """A private, writable copy of a base folder (for tests that consume or modify it)."""
    shutil.copytree(src, dst)
    return dst
