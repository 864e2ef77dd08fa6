"""A plan as text: the job list, the disk timeline and the summary (and a DataFrame)."""

from __future__ import annotations

import dataclasses
import textwrap

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


TABLE_WIDTH = 120  # a terminal's width: wider tables wrap their longest text columns


def format_table(rows: list[tuple], right: set[int] = frozenset(), width: int = TABLE_WIDTH) -> str:
    """Rows as aligned text columns, the first row a header underlined with dashes (`right`:
    the columns aligned right). Wider than `width`, the widest left-aligned columns wrap onto
    continuation lines (the other cells of those lines blank)."""
    rows = [tuple(str(v) for v in r) for r in rows]
    widths = _fit_widths(rows, [max(len(r[c]) for r in rows) for c in range(len(rows[0]))], right, width)
    lines = []
    for n, r in enumerate(rows):
        wrapped = [textwrap.wrap(v, widths[c], break_on_hyphens=False) or [""] if c not in right else [v]
                   for c, v in enumerate(r)]
        for k in range(max(map(len, wrapped))):
            cells = [(w[k] if k < len(w) else "") for w in wrapped]
            cells = [v.rjust(widths[c]) if c in right else v.ljust(widths[c]) for c, v in enumerate(cells)]
            lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fit_widths(rows: list[tuple], widths: list[int], right: set[int], width: int, narrowest: int = 16) -> list[int]:
    """Narrow the widest left-aligned column, one character at a time, until the table fits:
    first down to its longest word (text wraps at spaces), then further (a path breaks anywhere)."""
    widths = list(widths)
    longest_word = [max((len(w) for r in rows[1:] for w in r[c].split()), default=0) for c in range(len(widths))]
    while sum(widths) + 2 * (len(widths) - 1) > width:
        wrappable = [c for c in range(len(widths)) if c not in right and widths[c] > narrowest]
        wrappable = [c for c in wrappable if widths[c] > longest_word[c]] or wrappable
        if not wrappable:
            break
        widths[max(wrappable, key=lambda c: widths[c])] -= 1
    return widths


def format_summary(plan: Plan) -> str:
    lines = [f"Peak disk: {plan.describe_peak()} [{plan.peak / 1e9:.1f} GB]",
             f"On disk before: {human(plan.initial)}; after: {human(plan.final)}; merge mode: {plan.merge_mode}"]
    if plan.quota is not None:
        lines.append(f"Quota: {human(plan.quota)} [{plan.quota / 1e9:.1f} GB] "
                     f"({'fits' if plan.peak <= plan.quota else 'EXCEEDED'})")
    if plan.free is not None:
        lines.append(f"Free now: {human(plan.free)} (the run needs {human(max(0, plan.peak - plan.initial))} more)")
    return "\n".join(lines)
