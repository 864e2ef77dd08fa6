"""The one module that touches Snakemake's internals (snakemake 9.27.1): building a DAG
with its API in dry-run mode, and reading the jobs a built DAG will run. Every other module
of loraforge works on plain data (`loraforge.plan.Step`, `PendingJob`) and never imports
snakemake, so a Snakemake upgrade is checked here and nowhere else.

Used by `loraforge plan` (build_dag, plan_for_targets) and by the Snakefile's onstart hook
(`loraforge.workflow_hooks`: plan_from_dag, pending_jobs, ...)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from loraforge.plan.model import Plan, Step, _norm
from loraforge.plan.sizing import plan_steps


def steps_from_dag(dag) -> list[Step]:
    """Steps of the jobs a Snakemake DAG will run (snakemake 9.27.1 attributes:
    `dag.needrun_jobs(exclude_finished=False)`, `dag.toposorted(jobs)`,
    `dag.dependencies[job]` ({dep job: files}), `job.rule.name`, `job.wildcards_dict`,
    `job.input`, `job.output`, `job.temp_output`, `job.priority`, and
    `dag.derived_targetfiles`/`dag.targetjobs` for temp files Snakemake keeps).

    Works on a DAG after a dry run (where every job is already marked finished) and in
    an `onstart:` hook."""
    jobs = list(dag.needrun_jobs(exclude_finished=False))
    jobset = set(jobs)
    ordered = []
    for layer in dag.toposorted(jobs):
        ordered.extend(sorted(layer, key=lambda j: (j.rule.name, sorted((k, str(v)) for k, v in j.wildcards_dict.items()))))
    index = {j: i for i, j in enumerate(ordered)}
    targets = {_norm(f) for f in getattr(dag, "derived_targetfiles", set())}
    targetjobs = set(getattr(dag, "targetjobs", set()))
    default_target = getattr(getattr(dag, "workflow", None), "default_target", None)
    steps = []
    for j in ordered:
        keep = j in targetjobs and j.rule.name != default_target
        temp_out = set() if keep else {_norm(f) for f in j.temp_output if _norm(f) not in targets}
        temp_in = set()
        for dep, files in dag.dependencies[j].items():
            if dep not in jobset:
                temp_in |= {_norm(f) for f in files if f in dep.temp_output and _norm(f) not in targets}
        wildcards = {k: str(v) for k, v in j.wildcards_dict.items()}
        steps.append(Step(
            rule=j.rule.name,
            model=wildcards.get("model"),
            outputs=[str(f) for f in j.output],
            inputs=[str(f) for f in j.input],
            temp_outputs=temp_out,
            priority=int(j.priority),
            wildcards=wildcards,
            deps={index[d] for d in dag.dependencies[j] if d in index},
            temp_inputs=temp_in,
        ))
    return steps


def build_dag(snakefile: str | os.PathLike = "Snakefile", targets: Iterable[str] = (),
              config_overrides: Mapping | None = None, workdir: str | os.PathLike | None = None,
              configfiles: Iterable[str | os.PathLike] = ()):
    """Build the DAG with Snakemake's API in dry-run mode (nothing runs, nothing is
    deleted); returns the internal `Workflow` whose `.dag` and `.config` are filled.

    The API changes into workdir for the duration of the `with` block only, so callers
    that read files relative to it use `workdir_of(workflow)`."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, Quietness,
                                          ResourceSettings)

    snakefile = Path(snakefile)
    if workdir is not None and not snakefile.is_absolute():
        cand = Path(workdir) / snakefile
        snakefile = cand if cand.exists() or not snakefile.exists() else snakefile
    snakefile = snakefile.absolute()
    if not snakefile.exists():
        raise FileNotFoundError(f"no Snakefile at {snakefile}")
    workdir = Path(workdir).absolute() if workdir is not None else snakefile.parent
    quiet = {Quietness.ALL}
    with SnakemakeApi(OutputSettings(quiet=quiet)) as api:
        wf_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(config=dict(config_overrides or {}),
                                           configfiles=tuple(Path(c).absolute() for c in configfiles)),
            snakefile=snakefile,
            workdir=workdir,
        )
        dag_api = wf_api.dag(DAGSettings(targets=frozenset(targets)))
        check = wf_api._workflow.globals.get("check_targets")  # rules/common.smk: suggestions
        if check is not None:
            check(list(targets))
        dag_api.execute_workflow(executor="dryrun")
        workflow = wf_api._workflow
    workflow._lf_workdir = str(workdir)
    return workflow


def plan_for_targets(snakefile: str | os.PathLike = "Snakefile", targets: Iterable[str] = (),
                     config_overrides: Mapping | None = None, workdir: str | os.PathLike | None = None,
                     quota: int | str | None = None, free: int | None = None, **kw) -> Plan:
    """Build the DAG for `targets` (Snakemake dry run) and plan its peak disk (`loraforge plan`)."""
    workflow = build_dag(snakefile, targets, config_overrides, workdir, **kw)
    return plan_from_dag(workflow.dag, workflow.config, workdir=workflow._lf_workdir, quota=quota, free=free)


def plan_from_dag(dag, config: Mapping, workdir: str | os.PathLike | None = None,
                  quota: int | str | None = None, free: int | None = None) -> Plan:
    """The plan of the jobs a built DAG will run (for a Snakefile's `onstart:`)."""
    return plan_steps(steps_from_dag(dag), dict(config), workdir=workdir, quota=quota, free=free)


# --------------------------------------------------------------------------------------
# what the onstart hook needs to know of the jobs about to run
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingJob:
    """A job the run will execute, as plain data."""

    rule: str
    wildcards: dict[str, str]
    output: dict[str, str]  # named outputs
    reasons: str  # why Snakemake runs it, readable
    settings_changed: bool  # its params, or those of a job upstream of it in this run, changed
    # the inputs that jobs rerun upstream will update, when that is the job's only reason to run
    # (not forced, no output missing, no newer input, no changed params, code or input set);
    # None when it has a reason of its own
    rerun_for: frozenset[str] | None = None


def _ancestors(dag, job, seen=None):
    seen = set() if seen is None else seen
    for dep in dag.dependencies[job]:
        if dep not in seen:
            seen.add(dep)
            _ancestors(dag, dep, seen)
    return seen


def _only_upstream_reruns(reason) -> bool:
    own = (reason.forced or reason.missing_output or reason.incomplete_output or reason.updated_input
           or reason.is_provenance_triggered() or reason.nooutput or reason.noio or reason.no_metadata
           or reason.outdated_metadata)
    return not own and bool(reason.updated_input_run)


def pending_jobs(dag, rule: str | None = None) -> list[PendingJob]:
    """The jobs a built DAG will run (of `rule` only, when given)."""
    needrun = set(dag.needrun_jobs())
    out = []
    for job in needrun:
        if rule is not None and job.rule.name != rule:
            continue
        changed = bool(dag.reason(job).params_changed) or any(
            dag.reason(dep).params_changed for dep in _ancestors(dag, job) if dep in needrun
        )
        out.append(PendingJob(
            rule=job.rule.name,
            wildcards={k: str(v) for k, v in job.wildcards_dict.items()},
            output={k: str(v) for k, v in job.output.items()},
            reasons=", ".join(dag.reason(job).get_names()) or "unknown",
            settings_changed=changed,
            rerun_for=(frozenset(_norm(f) for f in dag.reason(job).updated_input_run)
                       if _only_upstream_reruns(dag.reason(job)) else None),
        ))
    return out


def keeps_temp_files(workflow) -> bool:
    """--notemp: temp() outputs are kept (nothing may be freed early either)."""
    settings = getattr(workflow, "storage_settings", None)
    return bool(getattr(settings, "notemp", False))


def is_touch_run(workflow) -> bool:
    """--touch only updates timestamps: nothing is trained, deleted or written."""
    return bool(getattr(workflow, "touch", False))


def command_line_arguments():
    """The `snakemake` command line this process runs, parsed by Snakemake's own parser; None
    in any other process (`loraforge plan` builds its DAG through the API)."""
    if Path(sys.argv[0]).name != "snakemake" and not sys.argv[0].endswith("snakemake/__main__.py"):
        return None
    try:
        from snakemake.cli import get_argument_parser

        return get_argument_parser().parse_args(sys.argv[1:])
    except (Exception, SystemExit):  # noqa: BLE001 - Snakemake itself reports a bad command line
        return None


def command_line_targets() -> list[str]:
    """The targets given on the `snakemake` command line ([] when none, or not that CLI)."""
    args = command_line_arguments()
    return sorted(args.targets or []) if args is not None else []


def output_patterns(workflow) -> list[str]:
    """Every rule's output patterns, e.g. `results/{model}/{quant}.gguf`."""
    return [str(o) for rule in workflow.rules for o in rule.output]


def default_storage_provider(workflow) -> str | None:
    """The run's --default-storage-provider (the Kubernetes profile's bucket), or None."""
    settings = getattr(workflow, "storage_settings", None)
    return getattr(settings, "default_storage_provider", None)


def has_producer(workflow, target: str) -> bool:
    """Whether a rule makes `target` (its patterns and wildcard constraints match)."""
    return any(rule.is_producer(target) for rule in workflow.rules)


# -- short "Params have changed" reasons ----------------------------------------------------
REASON_LIMIT = 300  # characters of a params-change reason


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dict_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    changes = []
    for key in list(old) + [k for k in new if k not in old]:
        name = f"{prefix}{key}"
        if key not in new:
            changes.append(f"{name} removed")
        elif key not in old:
            changes.append(f"{name} added ({_short(new[key])})")
        elif isinstance(old[key], dict) and isinstance(new[key], dict):
            changes += _dict_changes(old[key], new[key], f"{name}.")
        elif old[key] != new[key]:
            changes.append(f"{name} {_short(old[key])} -> {_short(new[key])}")
    return changes


def params_changes(only_old, only_new) -> str:
    """`r 8 -> 16, max_steps 3 -> 40`: the fields that differ between the params recorded at the
    last run and today's, instead of both params printed whole (a dict param is 1,600
    characters). Snakemake records params as repr strings, unnamed: a changed dict is paired with
    the new dict that shares the most keys."""
    old = [_literal(v) for v in sorted(only_old)]
    new = [_literal(v) for v in sorted(only_new)]
    changes = []
    for o in old:
        if isinstance(o, dict):
            match = max((n for n in new if isinstance(n, dict)), key=lambda n: len(set(n) & set(o)), default=None)
            if match is not None and set(match) & set(o):
                new.remove(match)
                changes += _dict_changes(o, match) or ["a dict param reordered"]
                continue
        changes.append(f"{_short(o)} -> {_short(new.pop(0))}" if new else f"{_short(o)} removed")
    changes += [f"{_short(n)} added" for n in new]
    text = ", ".join(changes)
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 3] + "..."


def shorten_params_reasons() -> None:
    """Make Snakemake's `Params have changed since last execution: ...` reasons (console, dry
    runs, the adapter guard's messages) name only the fields that changed. Snakemake builds that
    text in ParamsChange.__str__; this replaces that method for this process."""
    from snakemake.persistence import ParamsChange

    def __str__(self):  # noqa: N807 - the method being replaced
        return params_changes(self.only_old, self.only_new) if self else "No params change"

    ParamsChange.__str__ = __str__
