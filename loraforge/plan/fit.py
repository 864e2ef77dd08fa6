"""Does a plan fit the quota and the free space, and if not, which settings would: the same
run re-planned in consume mode, with a Q8_0 intermediate, one quant per run, alone and combined."""

from __future__ import annotations

import itertools

from loraforge.plan.model import Alternative, Plan, PlanError
from loraforge.plan.simulate import Planner
from loraforge.sizes import human


def config_forms(key: str, value: str) -> str:
    """`key` set to `value` in the two forms the commands take: Snakemake's --config (a YAML
    mapping, merged into config.yaml) and loraforge plan's --config (dotted keys)."""
    *parents, leaf = key.split(".")
    mapping = f"{leaf}: {value}"
    for parent in reversed(parents[1:]):
        mapping = f"{parent}: {{{mapping}}}"
    return f"snakemake --config '{parents[0]}={{{mapping}}}'; loraforge plan --config {key}={value}"


def misses(plan: Plan, quota: int | None, free: int | None) -> str:
    """What a plan that does not fit misses: 'quota', 'free space', both, or '' when it fits."""
    missed = []
    if quota is not None and plan.peak > quota:
        missed.append("quota")
    if free is not None and plan.peak - plan.initial > free:
        missed.append("free space")
    if not plan.feasible:
        missed.append("infeasible")
    return ", ".join(missed)


def fits(plan: Plan, quota: int | None, free: int | None) -> bool:
    if not plan.feasible:
        return False
    if quota is not None and plan.peak > quota:
        return False
    if free is not None and plan.peak - plan.initial > free:
        return False
    return True


def alternatives(plan: Plan, quota: int | None = None, free: int | None = None) -> list[Alternative]:
    """Re-plan the same run with the settings that lower the peak, alone and combined."""
    P = plan.planner
    if P is None:
        return []
    options = []  # (name, hint, transform)
    if P.merge_mode != "consume" and P.consumable:
        options.append(("consume merge mode", "set export.merge_mode: consume (" + config_forms("export.merge_mode", "consume")
                         + "); base shards move into merged/ and the base's weights are used up",
                         lambda p: p.replace(merge_mode="consume")))
    if any(t != "Q8_0" for t in P.intermediates().values()) and any("Q8_0" in L.gguf for L in P.layouts.values()):
        options.append(("Q8_0 intermediate", "set export.intermediate: Q8_0 (" + config_forms("export.intermediate", "Q8_0")
                        + "): quantize from Q8_0 instead of F16/BF16",
                        lambda p: p.with_intermediate("Q8_0")))
    if any(keep > 1 for _, keep in P.checkpoints.values()):
        options.append(("one training checkpoint", "set defaults.train.keep_checkpoints: 1 ("
                        + config_forms("defaults.train.keep_checkpoints", "1") + "; a rerun still resumes from the "
                        "latest checkpoint; two exist for a moment while the next is written)",
                        lambda p: p.replace(checkpoints={k: (one, 1) for k, (one, _) in p.checkpoints.items()})))
    one_quant = len(P.quant_steps()) > 1
    results: list[Alternative] = []

    def run(planner: Planner, per_run: bool) -> Plan:
        return planner.plan_one_quant_per_run() if per_run else planner.plan()

    combos = []
    names = [o[0] for o in options] + (["one quant per run"] if one_quant else [])
    for n in range(1, len(names) + 1):
        combos.extend(itertools.combinations(names, n))
    by_name = {o[0]: o for o in options}
    for combo in combos:
        planner = P
        per_run = False
        hints = []
        for name in combo:
            if name == "one quant per run":
                per_run = True
                hints.append("build one quant per run (snakemake --cores 1 results/<model>/<quant>.gguf, one at a time)")
            else:
                planner = by_name[name][2](planner)
                hints.append(by_name[name][1])
        p = run(planner, per_run)
        results.append(Alternative(" + ".join(combo), "; ".join(hints), p.peak, fits(p, quota, free), p,
                                   "; ".join(p.notes)))
    return results


def check(plan: Plan, quota_bytes: int | None = None, free_bytes: int | None = None) -> Plan:
    """Return the plan when its peak fits the quota and the free space, else raise
    PlanError naming the step at the peak and which alternatives fit."""
    quota = plan.quota if quota_bytes is None else quota_bytes
    free = plan.free if free_bytes is None else free_bytes
    problems = []
    if quota is not None and plan.peak > quota:
        problems.append(f"the peak {human(plan.peak)} exceeds the disk quota {human(quota)} by {human(plan.peak - quota)}")
    growth = plan.peak - plan.initial
    if free is not None and growth > free:
        problems.append(f"the run needs {human(growth)} more than is on disk now, but only {human(free)} is free")
    if not problems and plan.feasible:
        return plan
    if not plan.feasible:
        problems.extend(plan.notes)
    lines = ["disk plan does not fit: " + "; ".join(problems) + ".",
             f"Peak: {plan.describe_peak()} ({plan.merge_mode} merge mode)."]
    alts = alternatives(plan, quota, free)
    if alts:
        lines.append("What would fit (re-planned):")
        width = max(len(a.name) for a in alts)
        verdicts = {id(a): "fits" if a.fits else f"too big ({misses(a.plan, quota, free)})" for a in alts}
        vwidth = max(len(v) for v in verdicts.values())
        for a in alts:
            lines.append(f"  {verdicts[id(a)]:<{vwidth}}  {a.name:<{width}}  peak {human(a.peak)}"
                         + (f"  ({a.note})" if a.note else ""))
        good = [a for a in alts if a.fits]
        if good:
            best = min(good, key=lambda a: (a.name.count("+"), a.peak))
            lines.append(f"Suggested: {best.name}: {best.hint}.")
        else:
            lines.append("None of these fits: free disk space or raise the quota.")
    raise PlanError("\n".join(lines), plan, alts)
