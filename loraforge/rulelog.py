"""Logging for rule scripts: everything (logging, print, tqdm, warnings) goes to the rule's
log file, so `logs/{model}/<rule>.log` tells the whole story of a job.

A failure the user can fix (bad data, a full disk, a bad adapter folder, ...) ends with one
line on the console naming the file and the cause (`loraforge.errors.explain`) and exit
status 1; its traceback is in the log only. An unexpected exception (a bug) is re-raised."""

from __future__ import annotations

import contextlib
import logging
import sys

from loraforge.errors import explain


@contextlib.contextmanager
def _to_log_file(path):
    with open(path, "a", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield
        finally:
            root.removeHandler(handler)
            sys.stderr.flush()


@contextlib.contextmanager
def rule_logging(snakemake):
    path = snakemake.log[0] if len(snakemake.log) else None
    try:
        if path is None:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            yield
            return
        # a full disk can make the log file itself unwritable: the console message still comes
        with _to_log_file(path):
            try:
                yield
            except Exception as exc:
                message = explain(exc, list(snakemake.output))
                if message is None:  # a bug: the traceback is what helps
                    logging.exception("rule %s failed", snakemake.rule)
                else:  # the user's to fix: the message says it all (Snakemake echoes this log)
                    logging.error("rule %s failed: %s (%s)", snakemake.rule, message, type(exc).__name__)
                raise
    except Exception as exc:  # noqa: BLE001 - reported below, or re-raised
        message = explain(exc, list(snakemake.output))
        if message is None:
            raise
        print(f"[lora-forge] error in rule {snakemake.rule}: {message}", file=sys.__stderr__, flush=True)
        raise SystemExit(1) from None
