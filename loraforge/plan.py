"""Plan the peak disk of a run before any job starts.

The article's export died three times on a hidden 95 GB quota: 57 GB of base shards plus
57 GB of merged shards. This module replays the jobs Snakemake will run, in the order a
`--cores 1` run takes them, and tracks the bytes on disk after every event:

- a job's outputs appear when it finishes (its stale outputs are removed when it starts);
- `temp()` files disappear once every consumer of them in this run has finished (unless
  they are targets), as Snakemake's `handle_temp` does;
- the merge and the conversion are modelled inside the job, by `export.merge_mode`:
  `link` (untargeted base shards are hard links in merged/: free), `copy` (all shards
  rewritten), `consume` (each base shard is dropped once its merged shard is durable:
  peak = base + two shards, the next one being written while the last is made durable;
  the base folder is gone afterwards; the converter then releases each merged shard once
  its tensors are in the GGUF);
- in consume mode the last quantize job reading a temp intermediate frees it tensor by
  tensor as it quantizes (`loraforge.gguf.quantize(release_input=...)`): the quant grows
  while the intermediate shrinks, in llama.cpp's tensor order, instead of both being on disk
  until the job ends. Modelled per tensor when the model's architecture is known (a layout
  without it keeps the intermediate to the end: the conservative plan).

What counts: everything under `results/`, plus a base folder outside it (an HF cache).

`check()` raises `PlanError` naming the step at the peak and what would fit instead
(consume mode, one quant per run, a Q8_0 intermediate), each re-planned.

Sources of the plan: `Step`s built by hand (tests), `steps_from_dag()` on Snakemake's DAG
(`onstart:` hook, `check_workflow(workflow)`), or `plan_for_targets()` which builds the DAG
with Snakemake's API in dry-run mode (the `loraforge plan` command).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from loraforge import sizes as S
from loraforge.sizes import Shard, human, parse_size

MERGE_MODES = ("link", "consume", "copy")
# rule name -> role; the roles get an in-job model, every other rule just writes its outputs
DEFAULT_ROLES = {"merge_adapter": "merge", "convert_gguf": "convert", "quantize_gguf": "quantize"}
RESULTS_DIR = "results"


class PlanError(RuntimeError):
    """The planned peak does not fit; the message names the step and what would fit."""

    def __init__(self, message: str, plan: "Plan | None" = None, alternatives: list | None = None):
        super().__init__(message)
        self.plan = plan
        self.alternatives = alternatives or []


def _norm(path: str | os.PathLike) -> str:
    return os.path.normpath(str(path))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------------------
# the data model
# --------------------------------------------------------------------------------------


@dataclass
class Step:
    """One job: what it reads and writes. `deps` are indices into the step list (None:
    derived from which step writes each input); `temp_inputs` are temp files it reads
    that a job outside this run made (they are deleted after their last consumer too)."""

    rule: str
    model: str | None = None
    outputs: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    temp_outputs: set[str] = field(default_factory=set)
    priority: int = 0
    wildcards: dict = field(default_factory=dict)
    deps: set[int] | None = None
    temp_inputs: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.outputs = [_norm(p) for p in self.outputs]
        self.inputs = [_norm(p) for p in self.inputs]
        self.temp_outputs = {_norm(p) for p in self.temp_outputs}
        self.temp_inputs = {_norm(p) for p in self.temp_inputs}
        if self.model is None and "model" in self.wildcards:
            self.model = str(self.wildcards["model"])

    @property
    def label(self) -> str:
        extra = {k: v for k, v in self.wildcards.items() if k != "model"}
        parts = ([f"model={self.model}"] if self.model else []) + [f"{k}={v}" for k, v in extra.items()]
        return f"{self.rule}[{', '.join(parts)}]" if parts else self.rule


@dataclass
class ModelLayout:
    """What the merge and the conversion of one model move around: the base folder's
    shards (real sizes when it exists, estimates otherwise), its other files, and the
    estimated GGUF size per type."""

    model: str
    base_dir: str
    shards: list[Shard]
    other_bytes: int = 0
    gguf: dict[str, int] = field(default_factory=dict)
    gguf_meta_bytes: int = 0
    arch: "S.Arch | None" = None  # the tensors, for the in-job models of convert and quantize

    def __post_init__(self):
        self.base_dir = _norm(self.base_dir)

    def _types(self, ftype: str) -> dict[str, str] | None:
        if self.arch is None:
            return None
        try:
            return S.gguf_tensor_types(self.arch, ftype)
        except (ValueError, KeyError):
            return None

    def quantize_sequence(self, src_type: str, out_type: str) -> list[tuple[int, int]] | None:
        """(bytes read from the intermediate, bytes written to the quant) of every tensor, in
        the order llama.cpp quantizes them (tensors outside the blocks first, then block by
        block, by name within each); None without the architecture."""
        tin, tout = self._types(src_type), self._types(out_type)
        if tin is None or tout is None:
            return None

        def padded(n: int) -> int:
            return n + (-n) % S.GGUF_ALIGNMENT

        def key(t):
            m = re.match(r"blk\.(\d+)\.", t.name)
            return (int(m.group(1)) if m else -1, t.name)

        tensors = sorted(S.gguf_tensors(self.arch), key=key)
        return [(padded(S.ggml_nbytes(tin[t.name], t.shape)), padded(S.ggml_nbytes(tout[t.name], t.shape)))
                for t in tensors]

    def convert_sequence(self, outtype: str) -> list[tuple[int, list[int]]] | None:
        """The converter's writes in file order: (GGUF bytes of the tensor, indices of the
        shards released right after it: those it is the last reader of). Shards are read in
        order, tensors by name within a shard; a stacked expert tensor is emitted when its last
        expert is read. None without the architecture or the shards' tensor names."""
        types = self._types(outtype)
        if types is None or not self.shards or not all(sh.tensors for sh in self.shards):
            return None
        by_name = {t.name: t for t in S.gguf_tensors(self.arch)}
        pending: dict[str, int] = {}
        order: list[str] = []
        readers: dict[str, set[int]] = defaultdict(set)
        for k, sh in enumerate(self.shards):
            for hf in sorted(sh.tensors):
                g = S.gguf_name(hf)
                if g is None or g not in by_name:
                    continue
                readers[g].add(k)
                left = pending.get(g, len(by_name[g].hf_names) or 1) - 1
                pending[g] = left
                if left == 0:
                    order.append(g)
        if not order:
            return None
        last_reader: dict[int, int] = {}
        for j, g in enumerate(order):
            for k in readers[g]:
                last_reader[k] = j
        release_after: list[list[int]] = [[] for _ in order]
        for k in range(len(self.shards)):
            release_after[last_reader.get(k, len(order) - 1)].append(k)
        out = []
        for j, g in enumerate(order):
            n = S.ggml_nbytes(types[g], by_name[g].shape)
            out.append((n + (-n) % S.GGUF_ALIGNMENT, release_after[j]))
        return out

    @property
    def base_bytes(self) -> int:
        return self.other_bytes + sum(s.bytes for s in self.shards)

    def merged_bytes(self, mode: str) -> int:
        """New bytes merged/ takes: in link mode untargeted shards are hard links (free)."""
        if mode == "link":
            return self.other_bytes + sum(s.bytes for s in self.shards if s.targeted)
        return self.base_bytes

    @property
    def max_targeted_shard(self) -> int:
        return max((s.bytes for s in self.shards if s.targeted), default=0)

    @property
    def max_targeted_pair(self) -> int:
        """The most bytes two consecutive rewritten shards take (a consume-mode merge writes
        one while the one before is being made durable)."""
        costs = [s.bytes if s.targeted else 0 for s in self.shards]
        pairs = [a + b for a, b in zip(costs, costs[1:]) if a and b]
        return max(pairs + costs, default=0)


@dataclass
class Event:
    """One row of the timeline: after `event` of the step at `step` (1-based position in
    run order; 0 = before the run), `used` bytes are on disk."""

    step: int
    rule: str
    model: str
    event: str
    path: str
    delta: int
    used: int
    peak: int
    run: int = 1


@dataclass
class Plan:
    order: list[Step]
    events: list[Event]
    initial: int
    peak: int
    peak_event: Event
    final: int
    merge_mode: str
    label: str = ""
    planner: "Planner | None" = None
    final_present: dict[str, int] = field(default_factory=dict)
    quota: int | None = None
    free: int | None = None
    notes: list[str] = field(default_factory=list)
    feasible: bool = True
    consumed: set[str] = field(default_factory=set)

    @property
    def peak_bytes(self) -> int:
        return self.peak

    @property
    def peak_step(self) -> Step | None:
        k = self.peak_event.step
        return self.order[k - 1] if 0 < k <= len(self.order) else None

    def describe_peak(self) -> str:
        ev = self.peak_event
        if ev.step == 0:
            return f"{human(self.peak)} before any job (files already on disk)"
        where = f"step {ev.step} {self.order[ev.step - 1].label}" if ev.run == 1 and ev.step <= len(self.order) else f"run {ev.run} step {ev.step} {ev.rule}[model={ev.model}]"
        return f"{human(self.peak)} at {where}: {ev.event}"


@dataclass
class Alternative:
    name: str
    hint: str
    peak: int | None
    fits: bool
    plan: Plan | None = None
    note: str = ""


# --------------------------------------------------------------------------------------
# the planner
# --------------------------------------------------------------------------------------


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
                for p in s.outputs:
                    sim.add(p, self.size_of(s, p), "write")
                    wrote = True
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
            worst = 0.0
            if seq:
                # tensor by tensor: a shard goes only after the last tensor reading it (for an
                # MoE, the layer's stacked experts) is written, so the GGUF runs ahead of it
                shard_bytes = [sh.bytes for sh in L.shards]
                s_scale = held / (sum(shard_bytes) or 1)
                g_scale = (g - meta) / (sum(b for b, _ in seq) or 1)
                written, released = float(meta), 0.0
                for nbytes, freed in seq:
                    written += nbytes * g_scale
                    worst = max(worst, written - released)
                    released += sum(shard_bytes[k] for k in freed) * s_scale
            else:  # proportional: each shard released once its share of the GGUF is written
                shard_bytes = [sh.bytes for sh in L.shards] or [held]
                total = sum(shard_bytes) or 1
                scaled = [b * held / total for b in shard_bytes]
                written, released = float(meta), 0.0
                for b in scaled:
                    written += (g - meta) * b / held if held else 0
                    worst = max(worst, written - released)
                    released += b
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
        written, released, worst = float(meta), 0.0, 0.0
        for a, b in seq:
            written += b * out_scale
            worst = max(worst, written - released)
            released += a * in_scale
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


# --------------------------------------------------------------------------------------
# checking against the quota and the free space
# --------------------------------------------------------------------------------------


def _fits(plan: Plan, quota: int | None, free: int | None) -> bool:
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
    if P.merge_mode != "consume":
        options.append(("consume merge mode", "set export.merge_mode: consume (snakemake --config 'export={merge_mode: consume}', "
                         "loraforge plan --config export.merge_mode=consume); base shards move into merged/ and the base's weights are used up",
                         lambda p: p.replace(merge_mode="consume")))
    if any(t != "Q8_0" for t in P.intermediates().values()) and any("Q8_0" in L.gguf for L in P.layouts.values()):
        options.append(("Q8_0 intermediate", "set export.intermediate: Q8_0 (snakemake --config 'export={intermediate: Q8_0}'): "
                        "quantize from Q8_0 instead of F16/BF16",
                        lambda p: p.with_intermediate("Q8_0")))
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
        results.append(Alternative(" + ".join(combo), "; ".join(hints), p.peak, _fits(p, quota, free), p,
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
        for a in alts:
            verdict = "fits    " if a.fits else "too big "
            lines.append(f"  {verdict}{a.name:<{width}}  peak {human(a.peak)}" + (f"  ({a.note})" if a.note else ""))
        good = [a for a in alts if a.fits]
        if good:
            best = min(good, key=lambda a: (a.name.count("+"), a.peak))
            lines.append(f"Suggested: {best.name}: {best.hint}.")
        else:
            lines.append("None of these fits: free disk space or raise the quota.")
    raise PlanError("\n".join(lines), plan, alts)


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


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
    return _table(rows)


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
    return _table(rows, right={len(head) - 3, len(head) - 2, len(head) - 1})


def _table(rows: list[tuple], right: set[int] = frozenset()) -> str:
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


# --------------------------------------------------------------------------------------
# from Snakemake
# --------------------------------------------------------------------------------------


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
        dag_api.execute_workflow(executor="dryrun")
        workflow = wf_api._workflow
    workflow._lf_workdir = str(workdir)
    return workflow


def plan_for_targets(snakefile: str | os.PathLike = "Snakefile", targets: Iterable[str] = (),
                     config_overrides: Mapping | None = None, workdir: str | os.PathLike | None = None,
                     quota: int | str | None = None, free: int | None = None, **kw) -> Plan:
    """Build the DAG for `targets` (Snakemake dry run) and plan its peak disk."""
    workflow = build_dag(snakefile, targets, config_overrides, workdir, **kw)
    return plan_workflow(workflow, quota=quota, free=free)


def plan_workflow(workflow, quota: int | str | None = None, free: int | None = None,
                  workdir: str | os.PathLike | None = None) -> Plan:
    """Plan the jobs of a Snakemake Workflow whose DAG is built (onstart, or build_dag)."""
    workdir = workdir or getattr(workflow, "_lf_workdir", None) or os.getcwd()
    steps = steps_from_dag(workflow.dag)
    return plan_steps(steps, dict(workflow.config), workdir=workdir, quota=quota, free=free)


def plan_from_dag(dag, config: Mapping, workdir: str | os.PathLike | None = None,
                  quota: int | str | None = None, free: int | None = None) -> Plan:
    """The plan of the jobs a built DAG will run (for a Snakefile's `onstart:`)."""
    return plan_steps(steps_from_dag(dag), dict(config), workdir=workdir, quota=quota, free=free)


def check_plan(plan: Plan, config: Mapping | None = None, quota: int | str | None = None) -> Plan:
    """check() with the quota from `quota`, else the config's disk_quota, else the plan's."""
    if quota is None and config is not None and config.get("disk_quota") is not None:
        quota = config["disk_quota"]
    return check(plan, parse_size(quota) if quota is not None else None)


def check_workflow(workflow, quota: int | str | None = None, out=None) -> Plan:
    """For a Snakefile's `onstart:` hook: print the plan and raise PlanError when it
    does not fit (which aborts the run before any job starts)."""
    out = out or sys.stderr
    plan = plan_workflow(workflow, quota=quota)
    print(format_timeline(plan), file=out)
    print(format_summary(plan), file=out)
    return check(plan)


# --------------------------------------------------------------------------------------
# sizes of a lora-forge run (the conventions of config.yaml and the rules)
# --------------------------------------------------------------------------------------

SMALL_FILE = 64 * 1024


def _model_cfg(config: Mapping, key: str) -> dict:
    return dict((config.get("models") or {}).get(key) or {})


def base_dir_of(config: Mapping, key: str, results_dir: str = RESULTS_DIR) -> str:
    base = _model_cfg(config, key).get("base")
    if isinstance(base, Mapping) and base.get("path"):
        return _norm(base["path"])
    if isinstance(base, str) and os.path.isdir(base):
        return _norm(base)
    return _norm(f"{results_dir}/{key}/base")


def hf_config_of(config: Mapping, key: str, base_dir: str) -> dict | None:
    """The model's HF config: base/config.json when it exists, else `arch:`, else the tiny
    architecture a `build:` base will get."""
    local = S.load_hf_config(base_dir)
    if local:
        return local
    m = _model_cfg(config, key)
    if m.get("arch"):
        return dict(m["arch"])
    base = m.get("base")
    if isinstance(base, Mapping) and base.get("build"):
        from loraforge.base import TINY_ARCHS

        arch = dict(TINY_ARCHS.get(base["build"], {}))
        if arch:
            tiny = config.get("tiny_base") or {}
            arch.update(vocab_size=int(tiny.get("vocab_size", 2048)), tie_word_embeddings=True, dtype="bfloat16")
            return arch
    return None


def _targets_of(config: Mapping, key: str, results_dir: str) -> set[str] | None:
    adapter_cfg = Path(results_dir) / key / "adapter" / "adapter_config.json"
    if adapter_cfg.is_file():
        import json

        try:
            return S.adapter_targets(json.loads(adapter_cfg.read_text()))
        except ValueError:
            pass
    lora = {**((config.get("defaults") or {}).get("lora") or {}), **(_model_cfg(config, key).get("lora") or {})}
    tm = lora.get("target_modules")
    if tm:
        return S.adapter_targets({"target_modules": tm})
    return None


def _lora_rank(config: Mapping, key: str) -> int:
    lora = {**((config.get("defaults") or {}).get("lora") or {}), **(_model_cfg(config, key).get("lora") or {})}
    return int(lora.get("r", 16))


@dataclass
class RunInputs:
    sizes: dict[str, int]
    existing: dict[str, int]
    layouts: dict[str, ModelLayout]
    background: int
    merge_mode: str
    notes: list[str]


def gather_sizes(steps: list[Step], config: Mapping, results_dir: str = RESULTS_DIR) -> RunInputs:
    """Sizes of every path the steps touch (measured when it exists, estimated from the
    model config otherwise), the model layouts, and the bytes already under results/.
    Paths are relative to the current directory (the workflow's workdir)."""
    export = dict(config.get("export") or {})
    merge_mode = str(export.get("merge_mode", "link"))
    intermediate = str(export.get("intermediate", "Q8_0"))
    notes: list[str] = []
    models = sorted({s.model for s in steps if s.model})
    layouts: dict[str, ModelLayout] = {}
    archs: dict[str, S.Arch | None] = {}
    seen: set = set()
    existing: dict[str, int] = {}

    # base folders first, so hard links in merged/ count for the base
    for key in models:
        base = base_dir_of(config, key, results_dir)
        for s in steps:  # the merge's input is authoritative when the rules name it
            if s.model == key and DEFAULT_ROLES.get(s.rule) == "merge":
                cand = [p for p in s.inputs if os.path.basename(p) == "base" or p == base]
                if cand:
                    base = cand[0]
        hf = hf_config_of(config, key, base)
        try:
            arch = S.arch_from_config(hf) if hf else None
        except ValueError as e:
            notes.append(f"{key}: {e}; its sizes are unknown (0)")
            arch = None
        archs[key] = arch
        targets = _targets_of(config, key, results_dir)
        shards = S.read_base_shards(base, targets)
        if shards is not None:
            total, _ = S.measure([base], seen)
            existing[base] = total
            other = max(0, total - sum(sh.bytes for sh in shards))
        elif arch is not None:
            max_shard = 2_000_000 if (isinstance(_model_cfg(config, key).get("base"), Mapping)
                                      and _model_cfg(config, key)["base"].get("build")) else S.DEFAULT_SHARD_BYTES
            shards, other = S.model_folder_bytes(arch, max_shard)
            for sh in shards:
                sh.targeted = True  # no index to read yet: assume every shard is rewritten
        else:
            shards, other = [], 0
            notes.append(f"{key}: no config.json and no `arch:` in config.yaml; sizes unknown (0)")
        gguf: dict[str, int] = {}
        meta = 0
        if arch is not None:
            wanted = {intermediate, "Q8_0", "F16", "BF16", *map(str, export.get("quants") or [])}
            for t in wanted:
                try:
                    gguf[S.ftype_name(t)] = S.gguf_bytes(arch, t)
                except ValueError:
                    pass
            meta = S.gguf_metadata_bytes(arch)
        layouts[key] = ModelLayout(key, base, shards, other, gguf, meta, arch)

    sizes: dict[str, int] = {}
    samples = (config.get("data") or {}).get("samples")
    sample_bytes = os.path.getsize(samples) if samples and os.path.isfile(samples) else 1_000_000
    all_paths = list(dict.fromkeys(p for s in steps for p in [*s.outputs, *s.inputs]))
    for s in steps:
        for p in s.outputs:
            if p in sizes:
                continue
            L = layouts.get(s.model or "")
            arch = archs.get(s.model or "")
            sizes[p] = _estimate(p, s, L, arch, config, sample_bytes, results_dir)
    for p in all_paths:
        if p in existing:
            sizes[p] = existing[p]
            continue
        if os.path.lexists(p):
            total, _ = S.measure([p], seen)
            existing[p] = total
            sizes[p] = total
    total_results, _ = S.measure([results_dir], seen)  # what no step touches
    return RunInputs(sizes, existing, layouts, total_results, merge_mode, notes)


def _estimate(path: str, step: Step, L: ModelLayout | None, arch, config, sample_bytes: int, results_dir: str) -> int:
    name = os.path.basename(path)
    if L is not None:
        if _norm(path) == L.base_dir or name == "base":
            return L.base_bytes
        if name == "merged":
            return L.merged_bytes("copy")
        if name.endswith(".gguf"):
            t = name[: -len(".gguf")]
            try:
                t = S.ftype_name(t)
            except ValueError:
                return 0
            if t not in L.gguf and arch is not None:
                L.gguf[t] = S.gguf_bytes(arch, t)
            return L.gguf.get(t, 0)
    if name == "adapter" and arch is not None:
        return S.lora_adapter_bytes(arch, _lora_rank(config, step.model or ""),
                                    _targets_of(config, step.model or "", results_dir))
    if name in ("train.jsonl",):
        return int(sample_bytes * 1.2)
    if name in ("validation.jsonl",):
        return int(sample_bytes * 0.2)
    return SMALL_FILE


def plan_steps(steps: list[Step], config: Mapping, workdir: str | os.PathLike | None = None,
               quota: int | str | None = None, free: int | None = None,
               merge_mode: str | None = None, results_dir: str = RESULTS_DIR) -> Plan:
    """Plan `steps` of a lora-forge run with sizes from `config` (files relative to workdir)."""
    cwd = os.getcwd()
    if workdir is not None:
        os.chdir(workdir)
    try:
        ri = gather_sizes(steps, config, results_dir)
        free_now = free
        if free_now is None:
            probe = results_dir if os.path.isdir(results_dir) else "."
            free_now = shutil.disk_usage(probe).free
    finally:
        os.chdir(cwd)
    planner = Planner(steps, ri.sizes, ri.existing, merge_mode or ri.merge_mode, ri.layouts,
                      results_dir, background=max(0, ri.background))
    plan = planner.plan()
    if quota is None and config.get("disk_quota") is not None:
        quota = config["disk_quota"]
    plan.quota = parse_size(quota) if quota is not None else None
    plan.free = free_now
    plan.notes.extend(ri.notes)
    return plan


# --------------------------------------------------------------------------------------
# the `loraforge plan` command
# --------------------------------------------------------------------------------------


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
    parser.add_argument("--tsv", metavar="FILE", help="also write the timeline as TSV")
    parser.add_argument("--resources", action="store_true",
                        help="also print the threads, mem_mb, disk_mb, runtime and GPUs each job requests on a cluster")


def run(args) -> int:
    # `--config K=V TARGET` (as snakemake users type it): words without "=" are targets
    args.targets = list(args.targets) + [c for c in args.config if "=" not in c]
    try:
        overrides = parse_config_args([c for c in args.config if "=" in c])
    except ValueError as e:
        print(f"error: --config: {e}", file=sys.stderr)
        return 2
    try:
        workflow = build_dag(args.snakefile, args.targets, overrides, args.directory, configfiles=args.configfile)
        plan = plan_workflow(workflow, quota=args.quota, free=parse_size(args.free) if args.free else None)
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
    return 0
