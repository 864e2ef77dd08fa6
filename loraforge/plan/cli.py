"""`loraforge plan TARGET...`: the jobs a run would take, its disk timeline, and whether it
fits the quota and the free space (exit 1 with the alternatives when it does not)."""

from __future__ import annotations

import os
import sys
from typing import Iterable

from loraforge.plan.fit import check
from loraforge.plan.model import RESULTS_DIR, PlanError
from loraforge.plan.report import format_jobs, format_summary, format_timeline, timeline_frame
from loraforge.sizes import parse_size
from loraforge.snakemake_bridge import build_dag, plan_from_dag


def parse_config_args(entries: Iterable[str]) -> dict:
    """KEY=VALUE pairs like snakemake --config; dotted keys nest (export.merge_mode=consume)."""
    import yaml

    config: dict = {}
    for entry in entries or ():
        if "=" not in entry:
            raise ValueError(f"--config {entry!r}: expected KEY=VALUE")
        key, val = entry.split("=", 1)
        try:
            value = yaml.safe_load(val) if val != "" else None
        except yaml.YAMLError:
            value = val
        node = config
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config


def add_arguments(parser) -> None:
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="files or rules to build (default: the workflow's default target)")
    parser.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides as for snakemake; dotted keys nest: export.merge_mode=consume")
    parser.add_argument("--configfile", nargs="+", default=[], metavar="FILE", help="extra config files")
    parser.add_argument("--directory", "-d", default=".", metavar="DIR", help="the workflow directory (default: .)")
    parser.add_argument("--snakefile", "-s", default="Snakefile", help="Snakefile (default: DIR/Snakefile)")
    parser.add_argument("--quota", metavar="SIZE", help="disk quota, e.g. 95GB (decimal) or 95G/95GiB (binary); "
                        "default: disk_quota from the config")
    parser.add_argument("--free", metavar="SIZE", help="free space to assume (default: measured)")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="plan training for a GPU of this memory, e.g. 80GB "
                        "(default: gpu_memory from the config, else the visible GPU); decides gradient_checkpointing: auto")
    parser.add_argument("--tsv", metavar="FILE", help="also write the timeline as TSV")
    parser.add_argument("--resources", action="store_true",
                        help="also print the threads, mem_mb, disk_mb, runtime and GPUs each job requests on a cluster")


def run(args) -> int:
    # `--config K=V TARGET` (as snakemake users type it): words without "=" are targets
    args.targets = list(args.targets) + [c for c in args.config if "=" not in c]
    try:
        overrides = parse_config_args([c for c in args.config if "=" in c])
        if args.gpu_memory:
            overrides["gpu_memory"] = args.gpu_memory
    except ValueError as e:
        print(f"error: --config: {e}", file=sys.stderr)
        return 2
    try:
        workflow = build_dag(args.snakefile, args.targets, overrides, args.directory, configfiles=args.configfile)
        plan = plan_from_dag(workflow.dag, workflow.config, workdir=workflow._lf_workdir, quota=args.quota,
                             free=parse_size(args.free) if args.free else None)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # Snakemake's own errors (bad config, missing input, ...)
        print(f"error: could not build the jobs of {', '.join(args.targets) or 'the default target'}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not plan.order:
        print("Nothing to be done (all requested files are present and up to date).")
    else:
        print(f"Jobs ({len(plan.order)}), in the order a --cores 1 run takes them:")
        print(format_jobs(plan))
        print()
        if args.resources:
            from loraforge import resources

            print("Resources each job requests from a cluster scheduler (config.yaml resources:):")
            print(resources.format_plan(plan, workflow.config, workflow._lf_workdir))
            print()
        print("Disk timeline (results/ plus any base folder outside it):")
        print(format_timeline(plan))
        print()
    for note in plan.notes:
        print(f"note: {note}")
    print(format_summary(plan))
    if args.tsv:
        timeline_frame(plan).to_csv(args.tsv, sep="\t", index=False)
    try:
        check(plan)
    except PlanError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    from loraforge import vram

    if "defaults" not in plan.config:  # not a lora-forge config (another Snakefile): no training settings
        return 0
    try:
        vram.check_training(plan.config, [s.model for s in plan.order if s.rule == "train_adapter"],
                            os.path.join(args.directory, RESULTS_DIR))
    except vram.VramError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    return 0
