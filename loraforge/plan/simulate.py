"""The planner: replays the jobs of a run in the order a `--cores 1` Snakemake run takes
them and tracks the bytes on disk after every event, with an in-job model of the merge, the
conversion and the quantization (shards and tensors written while others are freed)."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from loraforge import sizes as S
from loraforge.constants import MERGE_MODES
from loraforge.plan.model import (DEFAULT_ROLES, RESULTS_DIR, Event, ModelLayout, Plan, PlanError,
                                  Step, _norm, _within)


def peak_while_freeing(start: float, writes_then_frees: Iterable[tuple[float, float]]) -> float:
    """The high-water mark of (written - freed) bytes of a job that, step by step, writes some
    bytes and only then frees others (`start`: what it wrote before the first step). The one
    shape of the converter releasing merged shards and the quantizer releasing its input."""
    written, freed, worst = float(start), 0.0, 0.0
    for grow, free in writes_then_frees:
        written += grow
        worst = max(worst, written - freed)
        freed += free
    return worst


@dataclass
class Planner:
    """Simulate a `--cores 1` run of `steps`.

    sizes: bytes of every output once written (actual when the file exists, else estimated).
    existing: paths on disk before the run (a set, sized from `sizes`, or {path: bytes}).
    layouts: per model, for the in-job model of merge and convert (see ModelLayout).
    background: counted bytes in files no step touches (other models' results...).
    release_in_convert: whether the converter releases merged shards (default: consume mode).
    release_in_quantize: whether the last quantize job of a temp intermediate frees it while
    it reads it (default: consume mode).
    """

    steps: list[Step]
    sizes: Mapping[str, int] = field(default_factory=dict)
    existing: Mapping[str, int] | Iterable[str] = ()
    merge_mode: str = "link"
    layouts: Mapping[str, ModelLayout] = field(default_factory=dict)
    results_dir: str = RESULTS_DIR
    background: int = 0
    roles: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    release_in_convert: bool | None = None
    label: str = ""
    release_in_quantize: bool | None = None
    # False when a model of the run merges from the user's own `path:` folder, which is never
    # consumed: consume mode is then no alternative to offer
    consumable: bool = True
    # adapter path -> (bytes of one training checkpoint, checkpoints kept): the Trainer writes a
    # new checkpoint before it drops the oldest, so keep + 1 exist at once while training
    checkpoints: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # export.imatrix: the evaluate job also makes each kept quant without the matrix, one temp
    # file at a time, to measure what the matrix gained
    comparison_quants: bool = False

    def __post_init__(self):
        if self.merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode {self.merge_mode!r}: choose one of {', '.join(MERGE_MODES)}")
        self.sizes = {_norm(k): int(v) for k, v in dict(self.sizes).items()}
        if isinstance(self.existing, Mapping):
            self.existing = {_norm(k): int(v) for k, v in self.existing.items()}
        else:
            self.existing = {_norm(p): self.sizes.get(_norm(p), 0) for p in self.existing}
        self.results_dir = _norm(self.results_dir)

    # -- helpers ----------------------------------------------------------------------

    def replace(self, **changes) -> "Planner":
        return dataclasses.replace(self, **changes)

    def counted(self, path: str) -> bool:
        if _within(path, self.results_dir):
            return True
        return any(_within(path, L.base_dir) for L in self.layouts.values())

    @property
    def releases(self) -> bool:
        return self.merge_mode == "consume" if self.release_in_convert is None else self.release_in_convert

    @property
    def releases_in_quantize(self) -> bool:
        return self.merge_mode == "consume" if self.release_in_quantize is None else self.release_in_quantize

    def dependencies(self) -> list[set[int]]:
        """deps of every step: as given, else the steps writing its inputs."""
        producer: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            for p in s.outputs:
                producer[p] = i
        outs = sorted(producer, key=len, reverse=True)
        deps = []
        for i, s in enumerate(self.steps):
            if s.deps is not None:
                deps.append(set(s.deps))
                continue
            d = set()
            for p in s.inputs:
                if p in producer:
                    d.add(producer[p])
                else:
                    d.update(producer[o] for o in outs if _within(p, o) or _within(o, p))
            d.discard(i)
            deps.append(d)
        return deps

    def schedule(self) -> list[int]:
        """Run order of a `--cores 1` run: among ready jobs the highest priority first,
        ties in the order the steps were given, except that the quantize steps reading one
        intermediate take the worst of their tie orders when the last one releases it (consume
        mode): largest output first, so the releasing one is the smallest and the others'
        outputs sit next to the intermediate (Snakemake breaks such ties arbitrarily)."""
        deps = self.dependencies()
        rank = self._tie_ranks()
        order: list[int] = []
        remaining = set(range(len(self.steps)))
        while remaining:
            ready = [i for i in remaining if not (deps[i] & remaining)]
            if not ready:
                raise PlanError("the steps have a dependency cycle: " + ", ".join(self.steps[i].label for i in sorted(remaining)))
            i = max(ready, key=lambda j: (self.steps[j].priority, -rank[j]))
            order.append(i)
            remaining.discard(i)
        return order

    def _tie_ranks(self) -> list[int]:
        rank = list(range(len(self.steps)))
        if not self.releases_in_quantize:
            return rank
        groups: dict[tuple, list[int]] = defaultdict(list)
        for j, st in enumerate(self.steps):
            if self.roles.get(st.rule) == "quantize":
                src = next((p for p in st.inputs if p.endswith(".gguf")), None)
                if src is not None:
                    groups[(src, st.priority)].append(j)
        for members in groups.values():
            if len(members) < 2:
                continue
            by_size = sorted(members, key=lambda j: (-sum(self.sizes.get(p, 0) for p in self.steps[j].outputs), j))
            for pos, j in zip(sorted(members), by_size):
                rank[j] = pos
        return rank

    def size_of(self, step: Step, path: str) -> int:
        L = self.layouts.get(step.model or "")
        if L is not None and self.roles.get(step.rule) == "merge" and path == self._merged_output(step):
            return L.merged_bytes(self.merge_mode)
        return self.sizes.get(path, 0)

    @staticmethod
    def _merged_output(step: Step) -> str | None:
        for p in step.outputs:
            if os.path.basename(p) == "merged":
                return p
        return step.outputs[0] if step.outputs else None

    # -- the simulation ---------------------------------------------------------------

    def plan(self) -> Plan:
        steps = self.steps
        order = self.schedule()
        consumers: dict[str, set[int]] = defaultdict(set)
        for i, s in enumerate(steps):
            for p in s.inputs:
                consumers[p].add(i)
        temp = set().union(*(s.temp_outputs | s.temp_inputs for s in steps)) if steps else set()
        quants = {p for s in steps if self.roles.get(s.rule) == "quantize" for p in s.outputs}

        sim = _Sim(self)
        for p, b in self.existing.items():
            sim.present[p] = b if self.counted(p) else 0
        sim.used = self.background + sum(sim.present.values())
        sim.peak = sim.used
        sim.emit(0, None, "on disk before the run", "", sim.used)

        done: set[int] = set()
        for k, i in enumerate(order, start=1):
            s = steps[i]
            sim.k, sim.step = k, s
            for p in s.outputs:
                if p in sim.present and sim.present[p]:
                    sim.remove(p, "remove old output")
                else:
                    sim.present.pop(p, None)
            role = self.roles.get(s.rule)
            L = self.layouts.get(s.model or "")
            if role == "merge" and L is not None:
                self._merge(sim, s, L)
            elif role == "convert" and L is not None and self.releases:
                self._convert_releasing(sim, s, L)
            elif role == "quantize" and L is not None and (src := self._released_input(sim, s, i, consumers, temp, done)):
                self._quantize_releasing(sim, s, L, src)
            else:
                wrote = False
                # training: keep + 1 checkpoints exist for a moment while the next is written; at the
                # end the adapter is written beside the `keep` last ones, which go once it is in place
                kept = [self.checkpoints[p] for p in s.outputs if p in self.checkpoints]
                for one, keep in kept:
                    sim.transient((keep + 1) * one, f"{keep + 1} checkpoints while training")
                for p in s.outputs:
                    sim.add(p, self.size_of(s, p), "write")
                    wrote = True
                for one, keep in kept:
                    sim.transient(keep * one, f"{keep} checkpoint{'s' if keep > 1 else ''} until the adapter is in place "
                                              "(then removed)")
                if self.comparison_quants and s.rule == "evaluate":
                    largest = max((self.sizes.get(p, 0) for p in s.inputs if p in quants), default=0)
                    sim.transient(largest, "evaluating: a quant made without the importance matrix, one at a time")
                if not wrote:
                    sim.emit(k, s, "done", "", 0)
            done.add(i)
            for p in list(dict.fromkeys([*s.inputs, *s.outputs])):
                if p in temp and p in sim.present and consumers.get(p, set()) <= done:
                    sim.remove(p, "delete temp")
        final = sim.used
        peak_event = next(e for e in sim.events if e.used == sim.peak)  # the first to reach it
        return Plan(
            order=[steps[i] for i in order],
            events=sim.events,
            initial=sim.events[0].used,
            peak=sim.peak,
            peak_event=peak_event,
            final=final,
            merge_mode=self.merge_mode,
            label=self.label,
            planner=self,
            final_present=dict(sim.present),
            consumed=set(sim.consumed),
        )

    def _merge(self, sim: "_Sim", s: Step, L: ModelLayout) -> None:
        merged = self._merged_output(s)
        base = L.base_dir
        if self.merge_mode == "consume":
            # shard by shard: the merged shard is written, made durable, then its base shard is
            # dropped (untargeted ones are renamed: free). The durable part runs on a thread of
            # its own while the next shard is written (merge._Finisher), so two consecutive
            # rewritten shards can be on disk next to their base shards; the small files last
            sim.transient(L.other_bytes + L.max_targeted_pair,
                          "merging: a shard written while the one before is made durable, their base shards not yet dropped")
            new = L.merged_bytes("consume")
            base_now = sim.present.get(base, 0)
            sim.present[merged] = new if self.counted(merged) else 0
            sim.consumed.add(base)
            if _within(base, self.results_dir):
                sim.present.pop(base, None)  # the rule removes a base it built or fetched
                left = 0
            else:  # a user's folder is kept: its shards moved out, the small files stay
                left = min(base_now, L.other_bytes)
                sim.present[base] = left
            sim.change(sim.present[merged] + left - base_now, "write merged, base consumed", f"{merged} <- {base}")
        else:
            what = "write merged (untargeted shards hard-linked)" if self.merge_mode == "link" else "write merged (all shards copied)"
            sim.add(merged, L.merged_bytes(self.merge_mode), what)
        for p in s.outputs:
            if p != merged:
                sim.add(p, self.size_of(s, p), "write")

    def _convert_releasing(self, sim: "_Sim", s: Step, L: ModelLayout) -> None:
        gguf = next((p for p in s.outputs if p.endswith(".gguf")), s.outputs[0] if s.outputs else None)
        merged = next((p for p in s.inputs if os.path.basename(p) == "merged" and sim.present.get(p)), None)
        g = self.size_of(s, gguf) if self.counted(gguf) else 0
        if merged is None:
            sim.add(gguf, self.size_of(s, gguf), "write")
        else:
            held = max(0, sim.present[merged] - L.other_bytes)
            meta = min(g, L.gguf_meta_bytes)
            outtype = os.path.basename(gguf)[: -len(".gguf")].upper() if gguf else ""
            try:
                seq = L.convert_sequence(S.ftype_name(outtype)) if held else None
            except ValueError:
                seq = None
            if seq:
                # tensor by tensor: a shard goes only after the last tensor reading it (for an
                # MoE, the layer's stacked experts) is written, so the GGUF runs ahead of it
                shard_bytes = [sh.bytes for sh in L.shards]
                s_scale = held / (sum(shard_bytes) or 1)
                g_scale = (g - meta) / (sum(b for b, _ in seq) or 1)
                worst = peak_while_freeing(meta, ((nbytes * g_scale, sum(shard_bytes[k] for k in freed) * s_scale)
                                                  for nbytes, freed in seq))
            else:  # proportional: each shard released once its share of the GGUF is written
                shard_bytes = [sh.bytes for sh in L.shards] or [held]
                total = sum(shard_bytes) or 1
                scaled = [b * held / total for b in shard_bytes]
                worst = peak_while_freeing(meta, (((g - meta) * b / held if held else 0, b) for b in scaled))
            sim.transient(int(round(worst)), "converting: GGUF grows, each merged shard released once written")
            sim.present[gguf] = g
            sim.present[merged] -= held
            sim.change(g - held, "write GGUF, merged shards released", gguf)
        for p in s.outputs:
            if p != gguf:
                sim.add(p, self.size_of(s, p), "write")

    def _released_input(self, sim: "_Sim", s: Step, i: int, consumers: Mapping[str, set[int]],
                        temp: set[str], done: set[int]) -> str | None:
        """The temp intermediate GGUF this quantize step releases while it reads it: consume
        mode, the step is its last consumer in this run, every consumer is a quantize step
        (what the onstart hook's consumers file allows), and it is on disk."""
        if not self.releases_in_quantize:
            return None
        for p in s.inputs:
            if not p.endswith(".gguf") or p not in temp or not sim.present.get(p):
                continue
            readers = consumers.get(p, set())
            if readers - done != {i}:
                continue
            if any(self.roles.get(self.steps[j].rule) != "quantize" for j in readers):
                continue
            return p
        return None

    def _quantize_releasing(self, sim: "_Sim", s: Step, L: ModelLayout, src: str) -> None:
        out = next((p for p in s.outputs if p.endswith(".gguf")), s.outputs[0] if s.outputs else None)
        q = self.size_of(s, out) if out is not None and self.counted(out) else 0
        held = sim.present[src]
        try:
            seq = L.quantize_sequence(S.ftype_name(os.path.basename(src)[: -len(".gguf")]),
                                      S.ftype_name(os.path.basename(out)[: -len(".gguf")]))
        except ValueError:
            seq = None
        if not seq:  # the tensors are unknown: the intermediate is held to the end
            for p in s.outputs:
                sim.add(p, self.size_of(s, p), "write")
            return
        meta = min(q, L.gguf_meta_bytes)
        in_scale = max(0, held - min(held, L.gguf_meta_bytes)) / (sum(a for a, _ in seq) or 1)
        out_scale = (q - meta) / (sum(b for _, b in seq) or 1)
        # llama.cpp writes a tensor, then starts the next: only then is the previous freed
        worst = peak_while_freeing(meta, ((b * out_scale, a * in_scale) for a, b in seq))
        sim.transient(int(round(worst)), "quantizing: the quant grows, the intermediate is freed tensor by tensor")
        sim.present[out] = q
        sim.present.pop(src, None)
        sim.change(q - held, "write quant, intermediate released", out)
        for p in s.outputs:
            if p != out:
                sim.add(p, self.size_of(s, p), "write")

    # -- several runs -----------------------------------------------------------------

    def plan_runs(self, runs: list[set[int]], label: str = "") -> Plan:
        """Plan consecutive runs, each asked for the given step indices (what they need is
        recomputed: a step reruns when an output it must provide was deleted, e.g. a temp
        intermediate). The files left by one run are the existing files of the next."""
        deps = self.dependencies()
        present = dict(self.existing)
        produced_by: dict[str, int] = {p: i for i, s in enumerate(self.steps) for p in s.outputs}
        executed: set[int] = set()
        consumed: set[str] = set()
        events: list[Event] = []
        order: list[Step] = []
        notes: list[str] = []
        feasible = True
        initial = None
        for r, wanted in enumerate(runs, start=1):
            needed: set[int] = set()
            # a step asked for again is skipped when its outputs are still there
            stack = [i for i in wanted if i not in executed or any(p not in present for p in self.steps[i].outputs)]
            while stack:
                i = stack.pop()
                if i in needed:
                    continue
                needed.add(i)
                for d in deps[i]:
                    provides = [p for p in self.steps[d].outputs if p in self.steps[i].inputs] or self.steps[d].outputs
                    if d not in executed or any(p not in present or p in consumed for p in provides):
                        stack.append(d)
            for i in needed:
                for p in self.steps[i].inputs:
                    if p in produced_by or p in self.existing:
                        if (p not in present or p in consumed) and produced_by.get(p) not in needed:
                            feasible = False
                            notes.append(f"run {r}: {self.steps[i].label} needs {p}, which an earlier run removed")
            idx = sorted(needed)
            remap = {old: new for new, old in enumerate(idx)}
            sub_steps = [dataclasses.replace(self.steps[i], deps={remap[d] for d in deps[i] if d in remap}) for i in idx]
            sub = self.replace(steps=sub_steps, existing=present)
            p = sub.plan()
            for j, e in enumerate(p.events):
                events.append(dataclasses.replace(e, run=r, delta=0 if (j == 0 and r > 1) else e.delta))
            order.extend(p.order)
            if initial is None:
                initial = p.initial
            present = p.final_present
            consumed = (consumed - {q for s in sub_steps for q in s.outputs}) | p.consumed
            executed |= needed
        final = events[-1].used if events else 0
        # peak-so-far across runs
        running = 0
        for j, e in enumerate(events):
            running = max(running, e.used)
            events[j] = dataclasses.replace(e, peak=running)
        peak = running
        peak_event = next(e for e in events if e.used == peak)
        return Plan(order=order, events=events, initial=initial or 0, peak=peak,
                    peak_event=peak_event, final=final, merge_mode=self.merge_mode,
                    label=label, planner=self, final_present=present, notes=notes, feasible=feasible,
                    consumed=consumed)

    def quant_steps(self) -> list[int]:
        order = self.schedule()
        return [i for i in order if self.roles.get(self.steps[i].rule) == "quantize"]

    def plan_one_quant_per_run(self) -> Plan:
        """One quant per run, in the order a single run would build them; whatever does not
        lead to a quant (Modelfile, tables) runs with the last quant."""
        quants = self.quant_steps()
        everything = set(range(len(self.steps)))
        runs = [{q} for q in quants]
        if runs:
            runs[-1] |= everything - set(quants)
        else:
            runs = [everything]
        return self.plan_runs(runs, label="one quant per run")

    def with_intermediate(self, ftype: str) -> "Planner":
        """The same run with the converter writing `ftype` (sizes of the intermediates)."""
        sizes = dict(self.sizes)
        for s in self.steps:
            if self.roles.get(s.rule) != "convert":
                continue
            L = self.layouts.get(s.model or "")
            if L is None or ftype not in L.gguf:
                continue
            for p in s.outputs:
                if p.endswith(".gguf"):
                    sizes[p] = L.gguf[ftype]
        return self.replace(sizes=sizes)

    def intermediates(self) -> dict[str, str]:
        """{intermediate GGUF path: its type} of the convert steps."""
        out = {}
        for s in self.steps:
            if self.roles.get(s.rule) == "convert":
                for p in s.outputs:
                    if p.endswith(".gguf"):
                        out[p] = os.path.basename(p)[: -len(".gguf")].upper()
        return out


class _Sim:
    def __init__(self, planner: Planner):
        self.planner = planner
        self.present: dict[str, int] = {}
        self.used = 0
        self.peak = 0
        self.events: list[Event] = []
        self.k = 0
        self.step: Step | None = None
        self.consumed: set[str] = set()  # base folders whose shards a consume merge took

    def emit(self, k: int, step: Step | None, event: str, path: str, delta: int, used: int | None = None):
        used = self.used if used is None else used
        self.peak = max(self.peak, used)
        self.events.append(Event(k, step.rule if step else "", (step.model or "") if step else "",
                                 event, path, delta, used, self.peak))

    def add(self, path: str, nbytes: int, event: str):
        nbytes = nbytes if self.planner.counted(path) else 0
        old = self.present.get(path, 0)
        self.present[path] = nbytes
        self.change(nbytes - old, event, path)

    def remove(self, path: str, event: str):
        old = self.present.pop(path, 0)
        self.change(-old, event, path)

    def change(self, delta: int, event: str, path: str):
        self.used += delta
        self.emit(self.k, self.step, event, path, delta)

    def transient(self, extra: int, event: str):
        """An in-job high-water mark `extra` bytes above the current state."""
        self.emit(self.k, self.step, event, "", extra, self.used + extra)
