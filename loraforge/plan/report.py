"""A plan as text: the job list, the disk timeline and the summary (and a DataFrame)."""

from __future__ import annotations

import dataclasses

from loraforge.plan.model import Plan
from loraforge.sizes import human


def timeline_frame(plan: Plan):
    """The timeline as a pandas DataFrame (bytes as integers)."""
    import pandas as pd

    rows = [dataclasses.asdict(e) for e in plan.events]
    cols = ["run", "step", "rule", "model", "event", "path", "delta", "used", "peak"]
    return pd.DataFrame(rows, columns=cols)


def format_jobs(plan: Plan) -> str:
    rows = [("#", "rule", "model", "priority", "outputs")]
    for k, s in enumerate(plan.order, start=1):
        outs = ", ".join(p + (" (temp)" if p in s.temp_outputs else "") for p in s.outputs) or "-"
        rows.append((str(k), s.rule, s.model or "", str(s.priority), outs))
    return format_table(rows)


def format_timeline(plan: Plan) -> str:
    """A readable table of the timeline, human units, the peak row marked."""
    multi = len({e.run for e in plan.events}) > 1
    head = (["run"] if multi else []) + ["#", "rule", "model", "event", "path", "delta", "in use", "peak"]
    rows = [tuple(head)]
    for e in plan.events:
        mark = " <= peak" if e is plan.peak_event else ""
        row = ([str(e.run)] if multi else []) + [
            str(e.step) if e.step else "-", e.rule or "-", e.model or "-", e.event, e.path or "",
            human(e.delta, signed=True), human(e.used), human(e.peak) + mark]
        rows.append(tuple(row))
    return format_table(rows, right={len(head) - 3, len(head) - 2, len(head) - 1})


def format_table(rows: list[tuple], right: set[int] = frozenset()) -> str:
    """Rows as aligned text columns, the first row a header underlined with dashes (`right`:
    the columns aligned right)."""
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [str(v).rjust(widths[c]) if c in right else str(v).ljust(widths[c]) for c, v in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(plan: Plan) -> str:
    lines = [f"Peak disk: {plan.describe_peak()} [{plan.peak / 1e9:.1f} GB]",
             f"On disk before: {human(plan.initial)}; after: {human(plan.final)}; merge mode: {plan.merge_mode}"]
    if plan.quota is not None:
        lines.append(f"Quota: {human(plan.quota)} [{plan.quota / 1e9:.1f} GB] "
                     f"({'fits' if plan.peak <= plan.quota else 'EXCEEDED'})")
    if plan.free is not None:
        lines.append(f"Free now: {human(plan.free)} (the run needs {human(max(0, plan.peak - plan.initial))} more)")
    return "\n".join(lines)
