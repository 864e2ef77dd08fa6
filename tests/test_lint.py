"""The workflow passes Snakemake's linter and snakefmt, like the catalog's workflows."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_snakemake_lint_is_clean():
    run = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Congratulations, your workflow is in a good condition!" in run.stdout + run.stderr


def test_snakefmt_check():
    run = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_loraforge_import_in_scripts_and_benchmarks_resolves():
    """Benchmarks and rule scripts import from loraforge inside functions, where nothing runs in
    CI until a GPU run fails on a renamed helper: every `from loraforge.X import Y` must resolve."""
    import ast
    import importlib

    missing = []
    for path in sorted([*REPO.glob("bench/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("loraforge/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "loraforge":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}")
    assert not missing, "\n".join(missing)


def test_training_imports_without_jsonschema():
    """The GPU machine's image has no jsonschema; train() must still import (only validating a
    config needs it). A run of the device benchmark lost ~190 s of GPU time to this."""
    code = ("import sys; sys.modules['jsonschema'] = None\n"
            "import loraforge.train, loraforge.training_record, loraforge.train_backends, loraforge.config\n"
            "try:\n    loraforge.config.default_filling_validator()\nexcept ImportError:\n    print('lazy')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "lazy", run.stderr[-2000:]
