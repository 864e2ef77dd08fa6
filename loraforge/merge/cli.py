"""`loraforge merge --base DIR --adapter DIR --out DIR [--mode link|consume|copy]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from loraforge.constants import MERGE_MODES
from loraforge.merge.common import MergeError
from loraforge.merge.stream import merge
from loraforge.safetensors_io import SafetensorsFormatError

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="DIR", help="base model folder (Hugging Face layout)")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
    parser.add_argument("--mode", choices=MERGE_MODES, default="link",
                        help="untouched shards: hard-link (default), consume (move; base shards are removed), or copy")
    parser.add_argument("--report", metavar="FILE.json", help="also write the merge report here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = merge(args.base, args.adapter, args.out, mode=args.mode, progress=not args.no_progress)
    except (MergeError, SafetensorsFormatError) as e:
        print(f"loraforge merge: error: {e}", file=sys.stderr)
        return 1
    summary = json.dumps(report.as_dict(), indent=2)
    print(summary)
    if args.report:
        with open(args.report, "w") as f:
            f.write(summary + "\n")
    return 0
