"""`export.merge_mode: auto` (the default): link when the run's disk plan fits the quota and
the free space, else consume, which holds about one copy of the weights instead of two, for
bases the workflow built or fetched itself (never a user's `path:` folder).

The onstart hook decides once per run, from the plan of exactly the jobs about to run, and
writes the decision to `logs/merge_mode.json`; the merge, convert and quantize jobs of the run
read it (`effective_mode`). A setting other than auto is used as it is."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loraforge.constants import MERGE_MODES
from loraforge.fileio import write_json_atomic

DECISION_PATH = Path("logs") / "merge_mode.json"


def write_decision(mode: str, reason: str, path: str | os.PathLike = DECISION_PATH) -> Path:
    return write_json_atomic(path, {"mode": mode, "reason": reason, "decided": time.time(), "pid": os.getpid()})


def decided_mode(path: str | os.PathLike = DECISION_PATH) -> str | None:
    try:
        mode = json.loads(Path(path).read_text()).get("mode")
    except (OSError, ValueError, AttributeError):
        return None
    return mode if mode in MERGE_MODES else None


def effective_mode(setting: str, base_is_users: bool, path: str | os.PathLike = DECISION_PATH) -> str:
    """The merge mode a job of this run uses: the setting, or for auto the run's decision
    (link when there is none); a user's own base folder is never consumed under auto."""
    if setting != "auto":
        return setting
    mode = decided_mode(path) or "link"
    return "link" if mode == "consume" and base_is_users else mode


def base_is_users(config: dict, model: str) -> bool:
    return "path" in config["models"][model]["base"]
