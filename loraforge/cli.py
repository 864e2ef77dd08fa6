"""The `loraforge` console script: the pipeline's tools outside Snakemake.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`run(args) -> int`; modules are imported lazily so `--help` stays fast and a broken optional
dependency only breaks its own subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "merge": ("loraforge.merge.cli", "stream a LoRA adapter into 16-bit safetensors shards"),
    "plan": ("loraforge.plan.cli", "preview the jobs of a target and their peak disk against the quota"),
    "status": ("loraforge.status", "what the run in a folder is doing: jobs, training step and ETA, disk, GPU memory"),
    "check-modelfile": ("loraforge.modelfile", "validate an Ollama Modelfile with Ollama's parser rules"),
    "inspect-gguf": ("loraforge.gguf", "print a GGUF's metadata and check it"),
    "restore-adapter": ("loraforge.workflow_hooks", "put an archived adapter and its training reports back"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        # arguments are added lazily below, only for the chosen subcommand
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sp = argparse.ArgumentParser(prog=f"loraforge {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sp)
    args = sp.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
