"""Logging for rule scripts: everything (logging, print, tqdm, warnings) goes to the rule's
log file, so `logs/{model}/<rule>.log` tells the whole story of a job."""

from __future__ import annotations

import contextlib
import logging
import sys


@contextlib.contextmanager
def rule_logging(snakemake):
    path = snakemake.log[0] if len(snakemake.log) else None
    if path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        yield
        return
    with open(path, "a", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield
        except BaseException:
            logging.exception("rule %s failed", snakemake.rule)
            raise
        finally:
            root.removeHandler(handler)
            sys.stderr.flush()
